//! End-to-end tests of the virtio devices: the real `vessel` binary, the
//! real guest kernel and its drivers, real image files, a real TAP device
//! in a network namespace. Engine: emu.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{artifact, assert_clean_run, disk_arg, guest, stdout, Scratch, TimedOutput, Watchdog};

/// Mount the test disk (read-only, with mkfs.ext4 in /tools) at /t.
const MOUNT_TOOLS: &str = "mkdir -p /t && mount -o ro /dev/vdb /t";

fn debugfs_cat(image: &Path, file: &str) -> Vec<u8> {
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .timed_output()
        .expect("debugfs (e2fsprogs)");
    assert!(o.status.success(), "debugfs: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn e2fsck_clean(image: &Path) {
    let o = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .timed_output()
        .expect("e2fsck");
    assert!(
        o.status.success(),
        "e2fsck found errors:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// The guest makes ext4 on a blank disk, writes files and powers off; the
/// host reads them back out of the image. Entropy comes from virtio-rng
/// (mkfs needs random UUIDs), which the guest also reads directly.
#[test]
fn guest_ext4_files_read_back_on_host() {
    let dir = Scratch::new("ext4");
    let image = dir.blank("blank.img", 64 << 20);
    let cmd = format!(
        "{MOUNT_TOOLS} && sh /t/tools/mkfs.ext4 -q /dev/vda && mount /dev/vda /mnt && \
         seq 1 30000 > /mnt/seq.txt && cp /t/pattern.bin /mnt/pattern.bin && \
         mkdir /mnt/d && echo computed-$((6*7)) > /mnt/d/answer && \
         cat /sys/class/misc/hw_random/rng_current && \
         dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n' && echo && \
         sync && umount /mnt"
    );
    let o = guest(&cmd, "poweroff")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .arg("--disk")
        .arg(disk_arg(&artifact("disk.ext4"), "readonly=on"))
        .arg("--rng")
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    assert!(out.contains("virtio_rng"), "hwrng is not virtio-rng:\n{out}");
    // 64 random bytes, as hex: not all zero.
    let hex = out
        .lines()
        .find(|l| l.len() == 128 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no 64 bytes from /dev/hwrng in:\n{out}"));
    assert_ne!(hex, "0".repeat(128));

    e2fsck_clean(&image);
    let expected: String = (1..=30000).map(|i| format!("{i}\n")).collect();
    assert_eq!(debugfs_cat(&image, "/seq.txt"), expected.as_bytes());
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert!(debugfs_cat(&image, "/pattern.bin") == pattern, "pattern.bin differs");
    assert_eq!(debugfs_cat(&image, "/d/answer"), b"computed-42\n");
}

/// A read-only disk: the guest sees it read-only, cannot write it, and the
/// image is unchanged afterwards.
#[test]
fn read_only_disk_refuses_writes() {
    let dir = Scratch::new("ro");
    let image = dir.0.join("ro.img");
    std::fs::copy(artifact("disk.ext4"), &image).unwrap();
    let before = std::fs::read(&image).unwrap();
    let cmd = "cat /sys/block/vda/ro; \
               if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then echo RAW-WRITE-OK; fi; \
               mount /dev/vda /mnt && cat /mnt/hello.txt; \
               if touch /mnt/new 2>/dev/null; then echo FS-WRITE-OK; fi; true";
    let o = guest(cmd, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, "readonly=on"))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    assert!(out.lines().any(|l| l.trim() == "1"), "vda is not read-only:\n{out}");
    assert!(out.contains("hello from the vessel test disk"), "{out}");
    assert!(!out.contains("RAW-WRITE-OK") && !out.contains("FS-WRITE-OK"), "{out}");
    assert!(std::fs::read(&image).unwrap() == before, "the read-only image changed");
}

/// The host file shrinks under the running VM (a host-side I/O error for
/// the sectors past its end): the guest's read fails with an I/O error in
/// its kernel log, and the VMM keeps serving the guest.
#[test]
fn host_io_error_reaches_guest_and_vmm_survives() {
    let dir = Scratch::new("ioerr");
    let image = dir.0.join("disk.img");
    std::fs::copy(artifact("disk.ext4"), &image).unwrap();
    let cmd = "echo SHRINK-NOW; read go; \
               if dd if=/dev/vda of=/dev/null bs=4096 skip=12288 count=1 iflag=direct 2>/dev/null; \
               then echo READ-OK; else echo READ-FAILED; fi; \
               dmesg | grep -m1 'I/O error'; \
               dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -1; echo STILL-ALIVE";
    let mut child = guest(cmd, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _watchdog = Watchdog::new(&child);
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut out = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        out.push_str(&line);
        if line.trim() == "SHRINK-NOW" {
            // 64 MiB disk; keep the first 32 MiB. The guest reads at 48 MiB.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap()
                .set_len(32 << 20)
                .unwrap();
            stdin.write_all(b"go\r").unwrap();
            stdin.flush().unwrap();
        }
        line.clear();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "vessel failed: {status:?}\n{out}");
    assert!(out.contains("READ-FAILED") && !out.contains("READ-OK"), "{out}");
    assert!(out.contains("I/O error"), "no I/O error in the guest log:\n{out}");
    assert!(
        out.contains("STILL-ALIVE") && out.contains("VESSEL-CMD-EXIT=0"),
        "{out}"
    );
}

/// SIGKILL right after the guest's `sync` returns: everything written
/// before it is in the image.
#[test]
fn data_synced_before_sigkill_is_in_the_image() {
    let dir = Scratch::new("kill");
    let image = dir.blank("disk.img", 16 << 20);
    let cmd = "mkdir -p /t && mount -o ro /dev/vdb /t && \
               dd if=/t/pattern.bin of=/dev/vda bs=64k 2>/dev/null && \
               seq 1 5000 | dd of=/dev/vda bs=4k seek=512 conv=notrunc 2>/dev/null && \
               sync && echo SYNCED && sleep 100";
    let mut child = guest(cmd, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .arg("--disk")
        .arg(disk_arg(&artifact("disk.ext4"), "readonly=on"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _watchdog = Watchdog::new(&child);
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut out = String::new();
    for line in reader.lines() {
        let line = line.unwrap();
        out.push_str(&line);
        out.push('\n');
        if line.trim() == "SYNCED" {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    child.wait().unwrap();
    assert!(out.contains("SYNCED"), "{out}");
    let data = std::fs::read(&image).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert!(data[..1 << 20] == pattern[..], "pattern not in the image");
    let seq: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    let at = 512 * 4096;
    assert_eq!(&data[at..at + seq.len()], seq.as_bytes());
}

/// A network namespace, removed when dropped.
struct NetNs(String);

impl NetNs {
    fn new(tap: &str, host_ip: &str) -> NetNs {
        let name = format!("vessel-test-{}", std::process::id());
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).timed_output().expect("ip (iproute2)");
            assert!(
                o.status.success(),
                "ip {args:?}: {} (this test needs root)",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).timed_output();
        ip(&["netns", "add", &name]);
        let ns = NetNs(name.clone());
        ip(&["-n", &name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", &name, "addr", "add", host_ip, "dev", tap]);
        ip(&["-n", &name, "link", "set", tap, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    /// Run `f` on a thread inside the namespace (its sockets live there).
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            use std::os::unix::io::AsRawFd;
            // SAFETY: setns on a namespace fd we opened; it changes only
            // this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).timed_output();
    }
}

/// A TAP in a namespace links host and guest; a TCP transfer of 3 MiB goes
/// to the guest and comes back intact.
#[test]
fn tcp_transfer_both_ways_over_tap() {
    let ns = NetNs::new("vtap0", "10.77.0.1/24");
    let payload: Vec<u8> = {
        // Incompressible, reproducible bytes (xorshift).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let to_guest = payload.clone();
    let server = ns.spawn(move || {
        let down = TcpListener::bind("10.77.0.1:5000").unwrap();
        let up = TcpListener::bind("10.77.0.1:5001").unwrap();
        let (mut s, _) = down.accept().unwrap();
        s.write_all(&to_guest).unwrap();
        drop(s);
        let (mut s, _) = up.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    });
    let cmd = "ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up && \
               cat /sys/class/net/eth0/address && \
               nc 10.77.0.1 5000 > /tmp/r && ls -l /tmp/r && nc 10.77.0.1 5001 < /tmp/r";
    let netns_path = format!("/var/run/netns/{}", ns.0);
    let o = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(guest(cmd, "reboot").get_args())
        .args(["--net", "tap=vtap0,mac=52:54:00:12:34:56"])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(Path::new(&netns_path).exists());
    assert_clean_run(&o);
    assert!(stdout(&o).contains("52:54:00:12:34:56"), "{}", stdout(&o));
    let back = server.join().unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "the bytes that came back differ");
}

/// The virtio-console is a second console: what the guest writes to
/// /dev/hvc0 lands in the host file.
#[test]
fn virtio_console_output_reaches_the_host_file() {
    let dir = Scratch::new("hvc");
    let file = dir.0.join("hvc0.log");
    let o = guest("echo second-console-$((40+2)) > /dev/hvc0", "reboot")
        .arg("--console-output")
        .arg(&file)
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("second-console-42"), "{text:?}");
}

/// Discard punches a hole in the image; the driver negotiated EVENT_IDX;
/// unbinding and rebinding the driver resets and re-initializes the device,
/// which then works again.
#[test]
fn discard_event_idx_and_driver_rebind() {
    use std::os::unix::fs::MetadataExt;
    let dir = Scratch::new("discard");
    let image = dir.blank("disk.img", 8 << 20);
    let cmd = "mkdir -p /t && mount -o ro /dev/vdb /t && \
               for s in 0 16 32; do dd if=/t/pattern.bin of=/dev/vda bs=64k seek=$s conv=notrunc 2>/dev/null; done && \
               sync && blkdiscard -o 1048576 -l 1048576 /dev/vda && \
               echo features=$(cat /sys/bus/virtio/devices/virtio0/features) && \
               echo virtio0 > /sys/bus/virtio/drivers/virtio_blk/unbind && \
               echo virtio0 > /sys/bus/virtio/drivers/virtio_blk/bind && sleep 0.2 && \
               echo after-rebind=$(dd if=/dev/vda bs=4 count=1 skip=1 iflag=direct 2>/dev/null | od -An -tu1)";
    let o = guest(cmd, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .arg("--disk")
        .arg(disk_arg(&artifact("disk.ext4"), "readonly=on"))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    let features = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("features="))
        .unwrap_or_else(|| panic!("no features line:\n{out}"));
    assert_eq!(
        features.as_bytes().get(29),
        Some(&b'1'),
        "EVENT_IDX not negotiated: {features}"
    );
    assert_eq!(
        features.as_bytes().get(32),
        Some(&b'1'),
        "VERSION_1 not negotiated: {features}"
    );
    // Bytes 4..8 of the pattern (i mod 251), read through the re-bound driver.
    assert!(out.contains("after-rebind= 4 5 6 7"), "{out}");
    let data = std::fs::read(&image).unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert!(data[..1 << 20] == pattern[..]);
    assert!(
        data[1 << 20..2 << 20].iter().all(|&b| b == 0),
        "discarded range not zero"
    );
    assert!(data[2 << 20..3 << 20] == pattern[..]);
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(
        allocated <= (2 << 20) + (64 << 10),
        "no hole punched: {allocated} bytes allocated"
    );
}

/// An image chain that qemu-img made (a compressed qcow2 base and an
/// overlay on it) serves the guest: the files on it read back correctly.
#[test]
fn guest_reads_a_compressed_qcow2_chain_made_by_qemu_img() {
    let dir = Scratch::new("qemuchain");
    let qemu_img = |args: &[&str]| {
        let o = Command::new("qemu-img")
            .args(args)
            .current_dir(&dir.0)
            .timed_output()
            .expect("qemu-img (qemu-utils)");
        assert!(
            o.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let base = artifact("disk.ext4");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        base.to_str().unwrap(),
        "base.qcow2",
    ]);
    qemu_img(&["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let cmd = "mount -o ro /dev/vda /mnt && cd /mnt && sha256sum -c SHA256SUMS && cat hello.txt";
    let o = guest(cmd, "reboot")
        .arg("--disk")
        .arg(disk_arg(&dir.0.join("top.qcow2"), "readonly=on"))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    assert!(
        out.contains("hello.txt: OK") && out.contains("pattern.bin: OK"),
        "{out}"
    );
    assert!(out.contains("hello from the vessel test disk"), "{out}");
}
