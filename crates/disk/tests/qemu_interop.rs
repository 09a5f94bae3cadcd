//! Interoperability with QEMU: qemu-img and qemu-io are the oracle.
//! Images made by QEMU read correctly here; images written here pass
//! `qemu-img check` and compare equal to their raw contents.

use std::path::Path;
use std::process::Command;

use disk::{BackingRules, BlockBackend, OpenOptions};

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (the tests need qemu-img and qemu-io from qemu-utils)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    run("qemu-io", &args);
}

/// `qemu-img check`: exit status 0 clean, 3 leaks only, 2 corruption.
fn qemu_check(img: &Path) -> i32 {
    let out = Command::new("qemu-img")
        // -U: a child forked by a sibling test may hold our (closed) image
        // locks for a moment; the check is about data, not locks.
        .args(["check", "-U", "-f", "qcow2", img.to_str().unwrap()])
        .output()
        .expect("qemu-img (the tests need qemu-img and qemu-io from qemu-utils)");
    if out.status.code() != Some(0) {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    out.status.code().unwrap_or(-1)
}

fn to_raw(img: &Path, raw: &Path) -> Vec<u8> {
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

fn read_all(disk: &dyn BlockBackend) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    // Odd-sized pieces exercise unaligned reads across clusters.
    let mut off = 0;
    while off < buf.len() {
        let n = (buf.len() - off).min(100_000);
        disk.read_at(&mut buf[off..off + n], off as u64).unwrap();
        off += n;
    }
    buf
}

#[test]
fn reads_a_qemu_backing_chain_over_raw() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let mut data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
        ],
    );
    qemu_io(&mid, "qcow2", &["write -P 0x11 65536 131072", "write -z 1048576 65536"]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x22 100000 5000", "write -P 0x33 4190000 4000"],
    );
    data[65536..65536 + 131072].fill(0x11);
    data[1048576..1048576 + 65536].fill(0);
    data[100000..105000].fill(0x22);
    data[4190000..4194000].fill(0x33);

    let disk = disk::open(
        &top,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(disk.size(), 4 << 20);
    assert!(read_all(&*disk) == data, "chain contents differ");
}

#[test]
fn reads_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let comp = dir.path().join("c.qcow2");
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| ((i / 7) % 13) as u8 ^ (i >> 16) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            comp.to_str().unwrap(),
        ],
    );
    let disk = disk::open(&comp, &OpenOptions::default()).unwrap();
    assert!(read_all(&*disk) == data, "compressed contents differ");
    // Overwriting part of a compressed cluster keeps the rest.
    disk.write_at(&[0xee; 1000], 70_000).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert_eq!(qemu_check(&comp), 0);
    let mut want = data.clone();
    want[70_000..71_000].fill(0xee);
    assert!(to_raw(&comp, &dir.path().join("out.raw")) == want);
}

#[test]
fn our_writes_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    qemu_io(&base, "qcow2", &["write -P 0x44 0 8M"]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    let mut want = vec![0x44u8; 8 << 20];
    {
        let disk = disk::open(&top, &OpenOptions::default()).unwrap();
        let mut x: u64 = 12345;
        for i in 0..300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = 1 + (x >> 33) as usize % 20000;
            let off = (x >> 7) as usize % (want.len() - len);
            let buf = vec![i as u8; len];
            disk.write_at(&buf, off as u64).unwrap();
            want[off..off + len].copy_from_slice(&buf);
        }
        disk.write_zeroes(3 << 20, 200_000, true).unwrap();
        want[3 << 20..(3 << 20) + 200_000].fill(0);
        disk.flush().unwrap();
        assert!(read_all(&*disk) == want);
    }
    assert_eq!(qemu_check(&top), 0);
    let raw = dir.path().join("want.raw");
    std::fs::write(&raw, &want).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            top.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

#[test]
fn concurrent_writers_leave_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mt.qcow2");
    disk::ops::create(&img, Some(16 << 20), None, &BackingRules::default()).unwrap();
    let disk: std::sync::Arc<dyn BlockBackend> = disk::open(&img, &OpenOptions::default()).unwrap().into();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let disk = disk.clone();
            s.spawn(move || {
                for i in 0..64u64 {
                    // Interleaved 4 KiB pieces: threads share clusters and L2 tables.
                    let off = (i * 4 + t) * 4096 * 3;
                    disk.write_at(&[(t * 64 + i) as u8; 4096], off).unwrap();
                    if i % 16 == 0 {
                        disk.flush().unwrap();
                    }
                }
            });
        }
    });
    disk.flush().unwrap();
    for t in 0..4u64 {
        for i in 0..64u64 {
            let mut b = [0u8; 4096];
            disk.read_at(&mut b, (i * 4 + t) * 4096 * 3).unwrap();
            assert!(b.iter().all(|&x| x == (t * 64 + i) as u8));
        }
    }
    drop(disk);
    assert_eq!(qemu_check(&img), 0);
}

/// Our check agrees with qemu-img check on QEMU's images: every refcount
/// width, compressed clusters, internal snapshots and backing chains.
#[test]
fn check_agrees_with_qemu_on_qemu_images() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data: Vec<u8> = (0..2u32 << 20).map(|i| ((i >> 9) % 7) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let mut images = Vec::new();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let img = dir.path().join(format!("rc{bits}.qcow2"));
        let opt = format!("refcount_bits={bits},cluster_size=4096");
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                &opt,
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        images.push(img);
    }
    let comp = dir.path().join("comp.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            comp.to_str().unwrap(),
        ],
    );
    images.push(comp);
    let snap = dir.path().join("snap.qcow2");
    run(
        "qemu-img",
        &["convert", "-O", "qcow2", raw.to_str().unwrap(), snap.to_str().unwrap()],
    );
    run("qemu-img", &["snapshot", "-c", "s1", snap.to_str().unwrap()]);
    qemu_io(&snap, "qcow2", &["write -P 0x77 0 100000"]);
    run("qemu-img", &["snapshot", "-c", "s2", snap.to_str().unwrap()]);
    qemu_io(&snap, "qcow2", &["write -P 0x78 50000 100000"]);
    images.push(snap);
    for img in &images {
        assert_eq!(qemu_check(img), 0, "{}", img.display());
        let r = disk::check::check(img, false).unwrap();
        assert!(r.corruptions == 0 && r.leaks == 0, "{}: {r:?}", img.display());
        assert!(r.allocated_clusters > 0);
        // And they read correctly (refcount widths do not matter to reads).
        if !img.ends_with("snap.qcow2") {
            let d = disk::open(img, &OpenOptions::default()).unwrap();
            assert!(read_all(&*d) == data, "{}", img.display());
            // Writing through every refcount width keeps them clean.
            d.write_at(&[9; 70000], 1 << 20).unwrap();
            d.flush().unwrap();
            drop(d);
            assert_eq!(qemu_check(img), 0, "{} after our write", img.display());
            assert_eq!(disk::check::check(img, false).unwrap().corruptions, 0);
        }
    }
}
