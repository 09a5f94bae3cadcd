//! Disks in VM snapshots (issue 11), at the image level: a layer frozen by
//! a snapshot, the original continuing on its new overlay, and clones each
//! on a fresh overlay of their own. qemu-img is the oracle for every layer.

use std::path::Path;
use std::process::Command;

use disk::{ops, BackingRules, BlockBackend, ImageFormat, OpenOptions};

const MIB: u64 = 1 << 20;

fn open_rw(path: &Path) -> Box<dyn BlockBackend> {
    disk::open(
        path,
        &OpenOptions {
            read_only: false,
            format: Some(ImageFormat::Qcow2),
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn write(path: &Path, offset: u64, byte: u8) {
    let d = open_rw(path);
    d.write_at(&[byte; 4096], offset).unwrap();
    d.flush().unwrap();
}

fn read(path: &Path, offset: u64) -> Vec<u8> {
    let d = open_rw(path);
    let mut buf = vec![0u8; 4096];
    d.read_at(&mut buf, offset).unwrap();
    buf
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e} (the tests need qemu-img from qemu-utils)"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const A: u64 = 0;
const B: u64 = MIB;
const C1: u64 = 2 * MIB;
const C2: u64 = 3 * MIB;

#[test]
fn clones_of_a_frozen_layer_share_the_past_and_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let rules = BackingRules::default();
    let base = dir.path().join("base.qcow2");
    let vm = dir.path().join("vm.qcow2");
    ops::create(&base, Some(8 * MIB), None, &rules).unwrap();
    ops::create(&vm, None, Some("base.qcow2"), &rules).unwrap();

    write(&vm, A, 0xaa);
    let frozen = ops::snapshot(&vm, "vmsnap-1", None, &rules).unwrap();
    assert_eq!(frozen, dir.path().join("vm@vmsnap-1.qcow2"));
    write(&vm, B, 0xbb); // the original, after the snapshot

    let clones = [
        dir.path().join("vm@vmsnap-1.clone-1.qcow2"),
        dir.path().join("vm@vmsnap-1.clone-2.qcow2"),
    ];
    for c in &clones {
        assert_eq!(ops::clone_overlay(&frozen, c, &rules).unwrap(), 8 * MIB);
    }
    write(&clones[0], C1, 0xc1);
    write(&clones[1], C2, 0xc2);

    for (c, own, other) in [(&clones[0], C1, C2), (&clones[1], C2, C1)] {
        assert_eq!(
            read(c, A),
            vec![0xaa; 4096],
            "{}: the write before the snapshot",
            c.display()
        );
        assert_eq!(
            read(c, B),
            vec![0; 4096],
            "{}: the original's write after it",
            c.display()
        );
        assert_eq!(
            read(c, other),
            vec![0; 4096],
            "{}: the other clone's write",
            c.display()
        );
        assert_ne!(read(c, own), vec![0; 4096], "{}: its own write", c.display());
    }
    assert_eq!(read(&vm, A), vec![0xaa; 4096]);
    assert_eq!(read(&vm, B), vec![0xbb; 4096]);
    assert_eq!(read(&vm, C1), vec![0; 4096]);
    assert_eq!(read(&frozen, B), vec![0; 4096], "the frozen layer never changes");

    for layer in [&base, &frozen, &vm, &clones[0], &clones[1]] {
        qemu_img(&["check", "-U", "-f", "qcow2", layer.to_str().unwrap()]);
    }
    for top in [&vm, &clones[0], &clones[1]] {
        let info = qemu_img(&["info", "-U", "--backing-chain", top.to_str().unwrap()]);
        assert!(info.contains("vm@vmsnap-1.qcow2"), "{info}");
        assert!(info.contains("base.qcow2"), "{info}");
    }
}

#[test]
fn clone_overlays_are_refused_where_they_would_share_or_escape() {
    let dir = tempfile::tempdir().unwrap();
    let rules = BackingRules::default();
    let vm = dir.path().join("vm.qcow2");
    ops::create(&vm, Some(MIB), None, &rules).unwrap();
    let frozen = ops::snapshot(&vm, "s", None, &rules).unwrap();

    let c = dir.path().join("c.qcow2");
    ops::clone_overlay(&frozen, &c, &rules).unwrap();
    let again = ops::clone_overlay(&frozen, &c, &rules).unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let away = ops::clone_overlay(&frozen, &sub.join("c.qcow2"), &rules).unwrap_err();
    assert!(away.to_string().contains("directory"), "{away}");

    // A layer some VM still writes is not frozen: no clone on it.
    let writer = open_rw(&vm);
    let busy = ops::clone_overlay(&vm, &dir.path().join("d.qcow2"), &rules).unwrap_err();
    assert!(!dir.path().join("d.qcow2").exists(), "{busy}");
    drop(writer);

    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert!(ops::clone_overlay(&raw, &dir.path().join("r.qcow2"), &rules).is_err());
}

#[test]
fn an_open_disk_freezes_its_top_and_carries_on_in_a_new_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let rules = BackingRules::default();
    let base = dir.path().join("base.qcow2");
    let vm = dir.path().join("vm.qcow2");
    ops::create(&base, Some(8 * MIB), None, &rules).unwrap();
    ops::create(&vm, None, Some("base.qcow2"), &rules).unwrap();

    let live = open_rw(&vm);
    live.write_at(&[0xaa; 4096], A).unwrap();
    let frozen = live.freeze_top("vmsnap-1").unwrap().expect("a qcow2 disk is frozen");
    assert_eq!(frozen, dir.path().join("vm@vmsnap-1.qcow2"));
    live.write_at(&[0xbb; 4096], B).unwrap();
    let mut buf = vec![0u8; 4096];
    live.read_at(&mut buf, A).unwrap();
    assert_eq!(buf, vec![0xaa; 4096], "the open disk still reads what it froze");

    // The frozen layer takes no writer; clones are made on it while the
    // original still runs.
    assert!(disk::open(
        &frozen,
        &OpenOptions {
            read_only: false,
            format: Some(ImageFormat::Qcow2)
        }
    )
    .is_err());
    let clone = dir.path().join("vm@vmsnap-1.clone-1.qcow2");
    ops::clone_overlay(&frozen, &clone, &rules).unwrap();
    // A second writer of the original's new top is refused.
    assert!(ops::clone_overlay(&vm, &dir.path().join("x.qcow2"), &rules).is_err());
    live.flush().unwrap();

    assert_eq!(read(&clone, A), vec![0xaa; 4096]);
    assert_eq!(read(&clone, B), vec![0; 4096], "the original's write after the freeze");
    drop(live);
    assert_eq!(read(&vm, B), vec![0xbb; 4096]);
    assert_eq!(read(&frozen, B), vec![0; 4096]);
    for layer in [&base, &frozen, &vm, &clone] {
        qemu_img(&["check", "-U", "-f", "qcow2", layer.to_str().unwrap()]);
    }
    let info = qemu_img(&["info", "-U", "--backing-chain", vm.to_str().unwrap()]);
    assert!(
        info.contains("vm@vmsnap-1.qcow2") && info.contains("base.qcow2"),
        "{info}"
    );

    // A raw disk is not frozen.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let r = disk::open(
        &raw,
        &OpenOptions {
            read_only: false,
            format: Some(ImageFormat::Raw),
        },
    )
    .unwrap();
    assert!(r.freeze_top("s").unwrap().is_none());
}
