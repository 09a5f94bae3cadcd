//! `vessel disk` end to end: the real binary on real files, with qemu-img
//! and qemu-io as the independent judges; and qcow2 chains under a real
//! guest through virtio-blk.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::TimedOutput;

fn vessel(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
        .current_dir(dir)
        .arg("disk")
        .args(args)
        .timed_output()
        .expect("run vessel")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = vessel(dir, args);
    assert!(
        out.status.success(),
        "vessel disk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tool(dir: &Path, cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .current_dir(dir)
        .args(args)
        .timed_output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (the tests need qemu-img and qemu-io from qemu-utils)"))
}

fn qemu_io_write(dir: &Path, img: &str, pattern: u8, off: u64, len: u64) {
    let c = format!("write -P {pattern} {off} {len}");
    let out = tool(dir, "qemu-io", &["-f", "qcow2", "-c", &c, img]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `qemu-img check` exit status: 0 clean, 3 leaks, 2 corruption.
fn qemu_check(dir: &Path, img: &str) -> i32 {
    let out = tool(dir, "qemu-img", &["check", img]);
    out.status.code().unwrap_or(-1)
}

/// The disk's contents, through `vessel disk convert --format raw`.
fn contents(dir: &Path, img: &str) -> Vec<u8> {
    let raw = dir.join("contents.raw");
    let _ = std::fs::remove_file(&raw);
    ok(dir, &["convert", img, "contents.raw", "--format", "raw"]);
    std::fs::read(raw).unwrap()
}

fn expect(size: usize, fills: &[(u8, usize, usize)]) -> Vec<u8> {
    let mut v = vec![0u8; size];
    for &(p, off, len) in fills {
        v[off..off + len].fill(p);
    }
    v
}

const M: usize = 1 << 20;

#[test]
fn snapshots_revert_and_commit() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(d, &["create", "base.qcow2", "--size", "16M"]);
    qemu_io_write(d, "base.qcow2", 0x61, 0, 3 * M as u64);
    ok(d, &["create", "vm.qcow2", "--backing", "base.qcow2"]);
    qemu_io_write(d, "vm.qcow2", 0x62, M as u64, M as u64);
    let s1 = expect(16 * M, &[(0x61, 0, 3 * M), (0x62, M, M)]);
    ok(d, &["snapshot", "vm.qcow2", "--name", "s1"]);
    qemu_io_write(d, "vm.qcow2", 0x63, 2 * M as u64, M as u64);
    ok(d, &["snapshot", "vm.qcow2", "--name", "s2"]);
    qemu_io_write(d, "vm.qcow2", 0x64, 0, 4096);
    let now = expect(
        16 * M,
        &[(0x61, 0, 3 * M), (0x62, M, M), (0x63, 2 * M, M), (0x64, 0, 4096)],
    );
    assert!(contents(d, "vm.qcow2") == now);
    for img in ["vm.qcow2", "vm@s1.qcow2", "vm@s2.qcow2", "base.qcow2"] {
        assert_eq!(qemu_check(d, img), 0, "{img}");
    }

    let info = ok(d, &["info", "vm.qcow2"]);
    for want in [
        "image: vm.qcow2",
        "image: vm@s2.qcow2  [snapshot s2]",
        "image: vm@s1.qcow2  [snapshot s1]",
        "image: base.qcow2",
        "virtual size: 16.0 MiB (16777216 bytes)",
        "allocated size:",
        "chain: 4 layer(s)",
    ] {
        assert!(info.contains(want), "{want:?} not in\n{info}");
    }
    let list = ok(d, &["snapshots", "vm.qcow2"]);
    let names: Vec<&str> = list.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(names, ["s2", "s1"]);

    // Reverting drops s2 and everything written since s1.
    let out = ok(d, &["revert", "vm.qcow2", "--to", "s1"]);
    assert!(out.contains("removed vm@s2.qcow2"), "{out}");
    assert!(!d.join("vm@s2.qcow2").exists());
    assert!(contents(d, "vm.qcow2") == s1);
    assert_eq!(qemu_check(d, "vm.qcow2"), 0);
    let qinfo = tool(d, "qemu-img", &["info", "--backing-chain", "vm.qcow2"]);
    assert!(String::from_utf8_lossy(&qinfo.stdout).contains("backing file: vm@s1.qcow2"));

    // Commit merges the top into s1 and leaves an empty top.
    qemu_io_write(d, "vm.qcow2", 0x65, 5 * M as u64, 100_000);
    let after = expect(16 * M, &[(0x61, 0, 3 * M), (0x62, M, M), (0x65, 5 * M, 100_000)]);
    ok(d, &["commit", "vm.qcow2"]);
    assert!(contents(d, "vm.qcow2") == after);
    assert!(contents(d, "vm@s1.qcow2") == after);
    assert_eq!(qemu_check(d, "vm.qcow2"), 0);
    assert_eq!(qemu_check(d, "vm@s1.qcow2"), 0);

    let out = vessel(d, &["revert", "vm.qcow2", "--to", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: no snapshot named"));
    let out = vessel(d, &["snapshot", "vm.qcow2", "--name", "../x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn convert_matches_qemu_compare() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(d, &["create", "src.qcow2", "--size", "8M"]);
    qemu_io_write(d, "src.qcow2", 0x71, 12345, 3 * M as u64);
    ok(d, &["convert", "src.qcow2", "out.raw", "--format", "raw"]);
    ok(d, &["convert", "out.raw", "out.qcow2", "--format", "qcow2"]);
    assert_eq!(qemu_check(d, "out.qcow2"), 0);
    for (a, fa, b, fb) in [
        ("src.qcow2", "qcow2", "out.raw", "raw"),
        ("out.qcow2", "qcow2", "out.raw", "raw"),
    ] {
        let out = tool(d, "qemu-img", &["compare", "-f", fa, "-F", fb, a, b]);
        assert!(
            out.status.success(),
            "{a} vs {b}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(std::fs::metadata(d.join("out.raw")).unwrap().len(), 8 * M as u64);
    // Never overwrites.
    let out = vessel(d, &["convert", "src.qcow2", "out.raw", "--format", "raw"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_finds_and_repairs_leaks() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(d, &["create", "leaky.qcow2", "--size", "4M"]);
    qemu_io_write(d, "leaky.qcow2", 0x33, 0, 200_000);
    assert!(ok(d, &["check", "leaky.qcow2"]).contains("No errors were found"));
    // Leak a cluster: append one and give it refcount 1 (16-bit refcounts).
    let p = d.join("leaky.qcow2");
    let mut img = std::fs::read(&p).unwrap();
    let cs = 65536usize;
    img.resize(img.len().next_multiple_of(cs) + cs, 0);
    let leaked = img.len() / cs - 1;
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(img[rt..rt + 8].try_into().unwrap()) as usize;
    img[rb + 2 * leaked..rb + 2 * leaked + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&p, img).unwrap();
    assert_eq!(qemu_check(d, "leaky.qcow2"), 3);

    let out = vessel(d, &["check", "leaky.qcow2"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 leaked clusters were found"));
    let out = ok(d, &["check", "leaky.qcow2", "--repair"]);
    assert!(out.contains("1 leaked clusters were repaired"), "{out}");
    assert_eq!(qemu_check(d, "leaky.qcow2"), 0);
    assert!(contents(d, "leaky.qcow2")[..200_000].iter().all(|&b| b == 0x33));

    // Corruption: an L2 entry pointing past the end of the file.
    let mut img = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    img[l2..l2 + 8].copy_from_slice(&((1u64 << 40) | (1 << 63)).to_be_bytes());
    std::fs::write(&p, img).unwrap();
    let out = vessel(d, &["check", "leaky.qcow2", "--repair"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn backing_rules_and_errors() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    ok(d, &["create", "base.qcow2", "--size", "1M"]);
    let out = vessel(d, &["create", "sub/top.qcow2", "--backing", "../base.qcow2"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("--allow-absolute-backing"),
        "{err}"
    );
    ok(
        d,
        &[
            "create",
            "sub/top.qcow2",
            "--backing",
            "../base.qcow2",
            "--allow-absolute-backing",
        ],
    );
    assert_eq!(vessel(d, &["info", "sub/top.qcow2"]).status.code(), Some(2));
    ok(d, &["info", "sub/top.qcow2", "--allow-absolute-backing"]);

    let out = vessel(d, &["create", "nosize.qcow2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("size"));
    let out = vessel(d, &["create", "base.qcow2", "--size", "1M"]);
    assert_eq!(out.status.code(), Some(2), "create must not overwrite");
    std::fs::write(d.join("junk.qcow2"), b"QFI\xfb\0\0\0\x09garbage").unwrap();
    let out = vessel(d, &["info", "junk.qcow2"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(d.join("plain.raw"), [0u8; 4096]).unwrap();
    let out = vessel(d, &["check", "plain.raw"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("raw file"));
    assert!(ok(d, &["info", "plain.raw"]).contains("format: raw"));
}

// ---- Under a guest ---------------------------------------------------------

/// What the guest writes: the test disk's 1 MiB pattern at 0, and a
/// sequence of numbers at 2 MiB. `conv=fsync` makes the kernel send a
/// virtio-blk FLUSH; a plain `sync` after writing to a raw block device
/// does not, and a qcow2 image (like QEMU's) keeps its metadata in a
/// write-back cache until the guest flushes.
const GUEST_WRITES: &str = "mkdir -p /t && mount -o ro /dev/vdb /t && \
    dd if=/t/pattern.bin of=/dev/vda bs=64k conv=fsync 2>/dev/null && \
    seq 1 5000 | dd of=/dev/vda bs=4k seek=512 conv=notrunc,fsync 2>/dev/null && \
    echo SYNCED";

fn guest_wrote(data: &[u8], base: &[u8]) {
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert!(data[..1 << 20] == pattern[..], "pattern not in the disk");
    let seq: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    let at = 2 << 20;
    assert_eq!(&data[at..at + seq.len()], seq.as_bytes());
    // The rest still comes from the backing file.
    let rest = at + seq.len().next_multiple_of(4096);
    assert!(data[rest..] == base[rest..], "backing data lost");
}

/// A guest writes through virtio-blk to a qcow2 overlay on a backing chain
/// (made by `vessel disk` and snapshotted); the image passes qemu-img check
/// before and after, and the snapshot is untouched.
#[test]
fn guest_writes_to_a_qcow2_chain() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base: Vec<u8> = (0..16u32 << 20).map(|i| (i / 4096) as u8).collect();
    std::fs::write(d.join("base.raw"), &base).unwrap();
    ok(d, &["convert", "base.raw", "base.qcow2", "--format", "qcow2"]);
    ok(d, &["create", "vm.qcow2", "--backing", "base.qcow2"]);
    ok(d, &["snapshot", "vm.qcow2", "--name", "clean"]);
    assert_eq!(qemu_check(d, "vm.qcow2"), 0);
    let o = common::guest(GUEST_WRITES, "poweroff")
        .arg("--disk")
        .arg(common::disk_arg(&d.join("vm.qcow2"), ""))
        .arg("--disk")
        .arg(common::disk_arg(&common::artifact("disk.ext4"), "readonly=on"))
        .timed_output()
        .unwrap();
    common::assert_clean_run(&o);
    assert!(common::stdout(&o).contains("SYNCED"));
    for img in ["vm.qcow2", "vm@clean.qcow2", "base.qcow2"] {
        assert_eq!(qemu_check(d, img), 0, "{img}");
    }
    guest_wrote(&contents(d, "vm.qcow2"), &base);
    assert!(contents(d, "vm@clean.qcow2") == base);
    // Reverting brings the clean disk back.
    ok(d, &["revert", "vm.qcow2", "--to", "clean"]);
    assert!(contents(d, "vm.qcow2") == base);
}

/// SIGKILL right after the guest's `sync` returns, on a qcow2 overlay:
/// qemu-img check finds no corruption and the synced data is there.
#[test]
fn guest_data_synced_before_sigkill_is_in_the_qcow2_image() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base: Vec<u8> = (0..16u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(d.join("base.raw"), &base).unwrap();
    let out = tool(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "vm.qcow2"],
    );
    assert!(out.status.success());
    let mut child = common::guest(&format!("{GUEST_WRITES} && sleep 100"), "reboot")
        .arg("--disk")
        .arg(common::disk_arg(&d.join("vm.qcow2"), ""))
        .arg("--disk")
        .arg(common::disk_arg(&common::artifact("disk.ext4"), "readonly=on"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _watchdog = common::Watchdog::new(&child);
    let mut synced = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if line.unwrap().trim() == "SYNCED" {
            child.kill().unwrap(); // SIGKILL
            synced = true;
            break;
        }
    }
    child.wait().unwrap();
    assert!(synced, "the guest never synced");
    let code = qemu_check(d, "vm.qcow2");
    assert!(code == 0 || code == 3, "qemu-img check exit {code}");
    guest_wrote(&contents(d, "vm.qcow2"), &base);
}

/// Durability, shown where the page cache cannot hide it. A SIGKILL test
/// cannot catch a missing fdatasync (the data survives in the host's page
/// cache), so this one watches the system calls: under `strace`, every
/// write Vessel makes to a raw and to a qcow2 image must be followed by a
/// completed fdatasync or fsync of that image before the guest can tell
/// the world "SYNCED" (its serial output, written after the flush
/// requests completed).
#[test]
fn every_image_write_is_synced_before_the_guest_sees_its_flush_complete() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::write(d.join("raw.img"), vec![0u8; 4 << 20]).unwrap();
    let out = tool(d, "qemu-img", &["create", "-f", "qcow2", "vm.qcow2", "4M"]);
    assert!(out.status.success());
    let writes = "dd if=/dev/urandom of=/dev/vda bs=64k count=8 conv=fsync 2>/dev/null && \
        dd if=/dev/urandom of=/dev/vdb bs=64k count=8 conv=fsync 2>/dev/null && echo SYNCED";
    let mut run = common::guest(writes, "reboot");
    run.arg("--disk")
        .arg(common::disk_arg(&d.join("raw.img"), "format=raw"))
        .arg("--disk")
        .arg(common::disk_arg(&d.join("vm.qcow2"), "format=qcow2"));
    let log = d.join("strace.log");
    let mut traced = Command::new("strace");
    traced
        .current_dir(d)
        .args([
            "-f",
            "-qq",
            "--seccomp-bpf",
            "-e",
            "trace=openat,fdatasync,fsync,pwrite64,pwritev,pwritev2,write",
        ])
        .arg("-o")
        .arg(&log)
        .arg(run.get_program())
        .args(run.get_args())
        .stdin(Stdio::null());
    let out = traced
        .timed_output()
        .unwrap_or_else(|e| panic!("strace: {e} (guest/build-all.sh installs it)"));
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.contains("SYNCED"), "the guest never synced:\n{console}");
    let log = std::fs::read_to_string(&log).unwrap();
    for image in ["raw.img", "vm.qcow2"] {
        let unsynced = writes_unsynced_before(&log, image, "SYNCED");
        assert_eq!(
            unsynced,
            Some(0),
            "{image}: writes not synced before the guest saw its flush complete"
        );
    }
}

/// In an `strace -f` log: how many writes to the (last read-write) file
/// descriptor of `image` were not covered by a completed fdatasync/fsync of
/// it, started after them, by the time the serial output (write(1, ...))
/// had spelled `marker`. `None` when the image was never written before the
/// marker (the check would prove nothing) or the marker never appeared.
fn writes_unsynced_before(log: &str, image: &str, marker: &str) -> Option<usize> {
    let mut fd = String::new();
    // Per thread: the write count when its unfinished sync started.
    let mut syncing: std::collections::HashMap<&str, usize> = Default::default();
    let (mut written, mut synced, mut serial) = (0usize, 0usize, String::new());
    for line in log.lines() {
        let (pid, call) = line.split_once(' ').unwrap_or(("", line));
        let call = call.trim_start();
        let ok = call.ends_with("= 0");
        if call.starts_with("openat(")
            && (call.contains(&format!("\"{image}\"")) || call.contains(&format!("/{image}\"")))
            && call.contains("O_RDWR")
        {
            fd = call.rsplit("= ").next().unwrap_or("").trim().to_string();
        } else if fd.is_empty() {
            continue;
        } else if ["pwrite64", "pwritev", "pwritev2"]
            .iter()
            .any(|n| call.starts_with(&format!("{n}({fd},")))
        {
            written += 1;
        } else if ["fdatasync", "fsync"]
            .iter()
            .any(|n| call.starts_with(&format!("{n}({fd})")))
        {
            if ok {
                synced = written;
            }
        } else if ["fdatasync", "fsync"]
            .iter()
            .any(|n| call.starts_with(&format!("{n}({fd} <unfinished")))
        {
            syncing.insert(pid, written);
        } else if call.starts_with("<... fdatasync resumed>") || call.starts_with("<... fsync resumed>") {
            if let Some(at_start) = syncing.remove(pid) {
                if ok {
                    synced = synced.max(at_start);
                }
            }
        } else if let Some(rest) = call.strip_prefix("write(1, \"") {
            serial.push_str(rest.split('"').next().unwrap_or(""));
            if serial.contains(marker) {
                return (written > 0).then_some(written - synced);
            }
        }
    }
    None
}

/// The log reader above catches a write that no sync covers, or that a
/// sync already under way when it was made does not cover.
#[test]
fn the_sync_check_sees_an_unsynced_write() {
    let open = "10 openat(AT_FDCWD, \"a.img\", O_RDWR|O_CLOEXEC) = 4\n";
    let said = "11 write(1, \"OK\", 2) = 2\n";
    let synced = format!("{open}12 pwrite64(4, \"x\"..., 512, 0) = 512\n12 fdatasync(4)    = 0\n{said}");
    assert_eq!(writes_unsynced_before(&synced, "a.img", "OK"), Some(0));
    let unsynced = format!("{open}12 pwrite64(4, \"x\"..., 512, 0) = 512\n{said}12 fdatasync(4)    = 0\n");
    assert_eq!(writes_unsynced_before(&unsynced, "a.img", "OK"), Some(1));
    let raced = format!(
        "{open}12 fdatasync(4 <unfinished ...>\n13 pwrite64(4, \"x\"..., 512, 0) = 512\n12 <... fdatasync resumed>) = 0\n{said}"
    );
    assert_eq!(writes_unsynced_before(&raced, "a.img", "OK"), Some(1));
    assert_eq!(writes_unsynced_before(&format!("{open}{said}"), "a.img", "OK"), None);
}
