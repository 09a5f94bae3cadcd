//! Issue 14, hole 9: two users never write one image at once. Vessel takes
//! QEMU's OFD locks (crates/disk/src/lock.rs), so these tests use QEMU's own
//! tools as the other process: each side must see the other's locks.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use disk::{BackingRules, Error, OpenOptions};

/// The tests run one at a time: a child forked by one test holds (until
/// it execs) a copy of the other test's descriptors, and with them its
/// OFD locks, for a moment after the other test closed them.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

/// `qemu-io` with `img` open (read-write unless `-r` is in `args`), once
/// it has served a read: it holds its locks until its stdin closes.
fn qemu_io_holding(img: &Path, args: &[&str]) -> Child {
    let mut child = Command::new("qemu-io")
        .args(args)
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io (the tests need qemu-utils)");
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(stdin, "read 0 512").unwrap();
    stdin.flush().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "qemu-io ended before it read (is the image locked?)");
        if line.contains("read 512/512") {
            break;
        }
    }
    child
}

fn qemu_img(args: &[&str], img: &Path) -> std::process::Output {
    Command::new("qemu-img").args(args).arg(img).output().expect("qemu-img")
}

#[test]
fn a_second_writer_is_refused_by_name() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    for name in ["disk.img", "disk.qcow2"] {
        let img = dir.path().join(name);
        if name.ends_with(".qcow2") {
            disk::ops::create(&img, Some(1 << 20), None, &BackingRules::default()).unwrap();
        } else {
            std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        }
        let fmt = if name.ends_with(".qcow2") { "qcow2" } else { "raw" };

        // QEMU writes it: Vessel may neither write nor read it.
        let mut q = qemu_io_holding(&img, &["-f", fmt]);
        let e = disk::open(&img, &OpenOptions::default()).err().expect("opened");
        assert!(matches!(e, Error::Locked { .. }), "{name}: {e}");
        assert!(e.to_string().contains(name), "{e}");
        assert!(disk::open(&img, &ro()).is_err(), "{name}: read while QEMU writes");
        drop(q.stdin.take());
        q.wait().unwrap();

        // Vessel writes it: QEMU may not write it ("Failed to get "write"
        // lock"), nor start a VM on it; qemu-img cannot read a qcow2
        // image's metadata under it (as under a running QEMU VM).
        let d = disk::open(&img, &OpenOptions::default()).unwrap();
        let o = Command::new("qemu-io")
            .args(["-f", fmt, "-c", "write 0 512"])
            .arg(&img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("wrote 512/512") && err.contains("\"write\" lock"),
            "{name}: qemu-io wrote an image Vessel writes: {err}"
        );
        let o = Command::new("qemu-system-x86_64")
            .args(["-M", "pc", "-accel", "tcg", "-S", "-display", "none", "-nodefaults"])
            .args(["-monitor", "none", "-drive"])
            .arg(format!("file={},format={fmt},if=virtio", img.display()))
            .output()
            .expect("qemu-system-x86_64");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("lock"),
            "{name}: QEMU started: {err}"
        );
        if fmt == "qcow2" {
            let o = qemu_img(&["info", "-f", fmt], &img);
            assert!(
                !o.status.success(),
                "qemu-img read the metadata of a qcow2 image Vessel writes"
            );
        }
        // A second Vessel writer in this process is refused the same way.
        assert!(matches!(
            disk::open(&img, &OpenOptions::default()),
            Err(Error::Locked { .. })
        ));
        drop(d);

        // Readers share: Vessel and QEMU read together.
        let r = disk::open(&img, &ro()).unwrap();
        let mut q = qemu_io_holding(&img, &["-r", "-f", fmt]);
        let r2 = disk::open(&img, &ro()).unwrap();
        assert!(
            disk::open(&img, &OpenOptions::default()).is_err(),
            "{name}: writer among readers"
        );
        drop(q.stdin.take());
        q.wait().unwrap();
        drop((r, r2));
        // Everyone gone: writable again.
        drop(disk::open(&img, &OpenOptions::default()).unwrap());
    }
}

/// Backing files are locked shared: two overlays on one base run together,
/// and nobody may write the base meanwhile.
#[test]
fn backing_files_are_shared_and_protected() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let rules = BackingRules::default();
    disk::ops::create(&base, Some(1 << 20), None, &rules).unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    disk::ops::create(&a, None, Some("base.qcow2"), &rules).unwrap();
    disk::ops::create(&b, None, Some("base.qcow2"), &rules).unwrap();
    let da = disk::open(&a, &OpenOptions::default()).unwrap();
    let db = disk::open(&b, &OpenOptions::default()).unwrap();
    let e = disk::open(&base, &OpenOptions::default())
        .err()
        .expect("base opened writable");
    assert!(e.to_string().contains("base.qcow2"), "{e}");
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("wrote"),
        "QEMU wrote a base in use"
    );
    // `vessel disk commit` into the base is refused too.
    let e = disk::ops::commit(&a, None, &rules, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    drop((da, db));
    disk::ops::commit(&a, None, &rules, &mut |_, _| {}).unwrap();
}
