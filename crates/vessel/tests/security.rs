//! Regression tests for the holes of issue 14, run end to end: the real
//! `vessel` binary, the real guest kernel, a guest that acts hostile.

mod common;

use common::{assert_clean_run, disk_arg, guest, stdout, Scratch, TimedOutput};

const SECRET: &str = "HOST-SECRET-0123456789";

/// The first sector of a qcow2 v2 image (64 KiB clusters) whose backing
/// file is `backing`, with no backing format: what a hostile guest writes
/// into sector 0 of its raw disk (crates/disk/tests/format_rule.rs checks
/// that QEMU follows such a header).
fn planted_sector(backing: &str) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    let mut put = |at: usize, b: &[u8]| s[at..at + b.len()].copy_from_slice(b);
    put(0, b"QFI\xfb");
    put(4, &2u32.to_be_bytes());
    put(8, &72u64.to_be_bytes());
    put(16, &(backing.len() as u32).to_be_bytes());
    put(20, &16u32.to_be_bytes());
    put(24, &(1u64 << 20).to_be_bytes());
    put(36, &1u32.to_be_bytes());
    put(40, &0x10000u64.to_be_bytes());
    put(48, &0x20000u64.to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(72, backing.as_bytes());
    s
}

/// The guest writes the planted sector to sector 0 of /dev/vda and says
/// whether the write went through.
fn plant_cmd() -> String {
    // Only the header's first 80 bytes travel on the command line (it has
    // a length limit); `conv=sync` pads the sector with zeroes.
    format!(
        "echo {} | base64 -d > /tmp/h && \
         if dd if=/tmp/h of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null; \
         then echo PLANT-WRITTEN; else echo PLANT-REFUSED; fi; true",
        common::b64_bytes(&planted_sector("secret")[..80])
    )
}

/// The guest reads the start of its disk and says whether the host's
/// secret is in it.
const LOOK_CMD: &str = "head -c 65536 /dev/vda > /tmp/d; \
     if grep -q HOST-SECRET /tmp/d; then echo SECRET-SEEN; else echo SECRET-NOT-SEEN; fi; \
     head -c 4 /tmp/d | od -An -tx1";

/// Hole 1 (CVE-2008-2004 class): a guest writes a qcow2 header naming a
/// host file as its backing into sector 0 of its raw disk; after a reboot
/// it must not see the host file.
#[test]
fn guest_planted_qcow2_header_never_reaches_a_host_file() {
    let dir = Scratch::new("plant");
    std::fs::write(dir.0.join("secret"), SECRET).unwrap();
    let image = dir.blank("disk.img", 4 << 20);

    // 1. Format from the file name (raw): the write to sector 0 is refused.
    let o = guest(&plant_cmd(), "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    assert!(out.contains("PLANT-REFUSED"), "the guest wrote an image header:\n{out}");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(&bytes[..4], &[0, 0, 0, 0], "sector 0 changed on the host");
    // Reboot: the guest sees its own (zero) disk.
    let o = guest(LOOK_CMD, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    assert!(stdout(&o).contains("SECRET-NOT-SEEN"), "{}", stdout(&o));

    // 2. format=raw: the guest owns every byte and the header lands...
    let o = guest(&plant_cmd(), "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, "format=raw"))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    assert!(stdout(&o).contains("PLANT-WRITTEN"), "{}", stdout(&o));
    assert_eq!(&std::fs::read(&image).unwrap()[..4], b"QFI\xfb");
    // ...but a reboot with format=raw shows the guest its own bytes,
    let o = guest(LOOK_CMD, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, "format=raw"))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    assert!(out.contains("SECRET-NOT-SEEN"), "{out}");
    assert!(
        out.contains("51 46 49 fb"),
        "the guest does not see its own header:\n{out}"
    );
    // ...and one without a format refuses to start, naming the image.
    let o = guest(LOOK_CMD, "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .timed_output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "vessel started:\n{}", stdout(&o));
    assert!(!stdout(&o).contains("SECRET-SEEN"), "{}", stdout(&o));
    assert!(err.contains("disk.img") && err.contains("format="), "{err}");
}

/// Hole 5: the virtio-console output file stops growing at its limit
/// (64 MiB by default, counting what it held before): a guest that writes
/// forever cannot fill the host's disk. The file starts 10 bytes short of
/// the limit; the guest writes 100.
#[test]
fn virtio_console_output_file_stops_at_its_limit() {
    const LIMIT: u64 = 64 << 20;
    let dir = Scratch::new("hvc-cap");
    let file = dir.blank("hvc0.log", LIMIT - 10);
    let o = guest(
        "i=0; while [ $i -lt 10 ]; do echo 0123456789abcdefghijklmnopqrstuvwxyz > /dev/hvc0; i=$((i+1)); done; echo wrote",
        "reboot",
    )
    .arg("--console-output")
    .arg(&file)
    .timed_output()
    .unwrap();
    assert_clean_run(&o);
    assert!(stdout(&o).contains("wrote"), "{}", stdout(&o));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), LIMIT);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(&bytes[(LIMIT - 10) as usize..], b"0123456789");
}

/// Hole 7: the initrd goes at the top of RAM, above the loaded kernel's
/// real end (a bzImage's `init_size`), not above a fixed 80 MiB guess: a
/// 64 MiB guest takes the real 1 MiB initramfs with both kernels.
#[test]
fn a_64_mib_guest_boots_with_the_initramfs() {
    for kernel in ["kernel/vmlinux", "kernel/bzImage"] {
        let o = common::guest_on(kernel, 1, "64M", "head -1 /proc/meminfo", "reboot")
            .timed_output()
            .unwrap();
        assert_clean_run(&o);
        assert!(stdout(&o).contains("MemTotal:"), "{kernel}: {}", stdout(&o));
    }
}

/// Hole 8: with `nosmp` and two vCPUs, the second is never started; when
/// the first halts with interrupts off (`halt -f`), the guest is done and
/// Vessel must end with status 0 instead of waiting forever.
#[test]
fn halt_with_nosmp_and_two_vcpus_ends_the_run() {
    let mut c = common::vessel();
    c.args(["run", "--accel", "emu", "--mem", "256M", "--cpus", "2"])
        .arg("--kernel")
        .arg(common::artifact("kernel/vmlinux"))
        .arg("--initrd")
        .arg(common::artifact("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 nosmp vessel.end=halt vessel.cmd={}",
            common::b64("grep -c ^processor /proc/cpuinfo")
        ))
        .stdin(std::process::Stdio::null());
    let o = c.timed_output().unwrap();
    assert_clean_run(&o);
    let out = stdout(&o);
    assert!(
        out.lines().any(|l| l.trim() == "1"),
        "nosmp guest sees more than one CPU:\n{out}"
    );
}

/// Hole 9: two VMs never write one image. While a first `vessel` runs on
/// an image, a second is refused with an error naming it (read-only too:
/// the writer has it alone), and so is QEMU, which sees the same locks.
#[test]
fn a_second_vm_on_a_writable_image_is_refused() {
    use std::io::{BufRead, BufReader};
    let dir = Scratch::new("lock");
    let image = dir.blank("shared.img", 8 << 20);
    let mut first = guest("echo HOLDING-THE-DISK; sleep 120", "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _watchdog = common::Watchdog::new(&first);
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("HOLDING-THE-DISK") => break,
            Some(_) => {}
            None => panic!("the first VM ended before its guest ran"),
        }
    }
    for opts in ["", "readonly=on", "format=raw"] {
        let o = guest("echo SECOND-VM-RAN", "reboot")
            .arg("--disk")
            .arg(disk_arg(&image, opts))
            .timed_output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "a second VM ran on the image ({opts}):\n{}",
            stdout(&o)
        );
        assert!(!stdout(&o).contains("SECOND-VM-RAN"));
        assert!(err.contains("shared.img") && err.contains("in use"), "{opts}: {err}");
    }
    let o = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&image)
        .output()
        .expect("qemu-io");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("\"write\" lock"),
        "QEMU could write the image: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The first VM is gone, and its locks with it.
    let o = guest("echo SECOND-VM-RAN", "reboot")
        .arg("--disk")
        .arg(disk_arg(&image, ""))
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
}

/// Hole 11: guests survive a busy host. Ten guests start at once on this
/// 2-core machine, so each vCPU thread waits for a core; PIT ticks missed
/// meanwhile used to merge into one, Linux's timer check saw too few, and
/// some guests panicked ("IO-APIC + timer doesn't work!") while the rest
/// fell back from the IOAPIC ("MP-BIOS bug: 8254 timer not connected").
/// Missed ticks are now delivered, as KVM reinjects them.
#[test]
fn guests_started_all_at_once_keep_their_timer() {
    const GUESTS: usize = 10;
    let runs: Vec<_> = (0..GUESTS)
        .map(|_| {
            std::thread::spawn(|| {
                common::guest_on("kernel/vmlinux", 1, "64M", "echo timer-ok", "reboot")
                    .timed_output()
                    .unwrap()
            })
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let o = r.join().unwrap();
        let out = stdout(&o);
        for bad in [
            "timer doesn't work",
            "Kernel panic",
            "8254 timer not connected to IO-APIC",
        ] {
            assert!(!out.contains(bad), "guest {i} of {GUESTS}: {bad}:\n{out}");
        }
        assert_clean_run(&o);
        assert!(out.contains("timer-ok"), "guest {i}: {out}");
    }
}
