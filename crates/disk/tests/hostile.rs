//! Bad images get a clear error: never a panic, never an absurd allocation.

use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{BackingRules, Error, OpenOptions};

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (the tests need qemu-img and qemu-io from qemu-utils)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A valid 1 MiB image with some data, as bytes.
fn good_image(dir: &Path) -> Vec<u8> {
    let p = dir.join("good.qcow2");
    disk::ops::create(&p, Some(1 << 20), None, &BackingRules::default()).unwrap();
    let d = disk::open(&p, &OpenOptions::default()).unwrap();
    d.write_at(&[0x5a; 70000], 1000).unwrap();
    d.flush().unwrap();
    drop(d);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    bytes
}

fn patched(dir: &Path, name: &str, mut img: Vec<u8>, at: usize, bytes: &[u8]) -> PathBuf {
    img[at..at + bytes.len()].copy_from_slice(bytes);
    let p = dir.join(name);
    std::fs::write(&p, img).unwrap();
    p
}

fn open_err(p: &Path) -> Error {
    match disk::open(p, &ro()) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    }
}

#[test]
fn corrupt_headers_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let img = good_image(dir.path());
    let cases: &[(&str, usize, &[u8], &str)] = &[
        ("version", 4, &7u32.to_be_bytes(), "version"),
        ("cluster bits", 20, &40u32.to_be_bytes(), "cluster size"),
        ("huge size", 24, &u64::MAX.to_be_bytes(), "virtual size"),
        ("huge l1", 36, &u32::MAX.to_be_bytes(), "L1 table"),
        ("l1 outside", 40, &(1u64 << 40).to_be_bytes(), "outside the file"),
        ("l1 unaligned", 40, &0x30001u64.to_be_bytes(), "aligned"),
        ("reftable outside", 48, &(1u64 << 50).to_be_bytes(), "outside the file"),
        ("reftable huge", 56, &u32::MAX.to_be_bytes(), "refcount table"),
        ("encrypted", 32, &1u32.to_be_bytes(), "encrypted"),
        (
            "backing overflow",
            8,
            &(u64::MAX - 2).to_be_bytes(),
            "backing file name",
        ),
        ("refcount order", 96, &9u32.to_be_bytes(), "refcount order"),
        ("header length", 100, &7u32.to_be_bytes(), "header length"),
        ("unknown feature", 72, &(1u64 << 40).to_be_bytes(), "incompatible"),
        ("corrupt bit", 72, &2u64.to_be_bytes(), "marked corrupt"),
    ];
    for (name, at, bytes, want) in cases {
        let p = patched(dir.path(), "bad.qcow2", img.clone(), *at, bytes);
        let msg = open_err(&p).to_string();
        assert!(msg.contains(want), "{name}: {msg}");
        // check reads the same header and refuses the same way.
        assert!(disk::check::check(&p, false).is_err(), "{name}");
    }
}

#[test]
fn truncated_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = good_image(dir.path());
    for len in [4, 71, 100, 1000, 65536 * 2] {
        let p = dir.path().join("short.qcow2");
        std::fs::write(&p, &img[..len]).unwrap();
        if let Ok(d) = disk::open(&p, &ro()) {
            let mut b = [0u8; 512];
            let _ = d.read_at(&mut b, 0);
        }
    }
}

#[test]
fn l2_and_data_outside_the_file_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let img = good_image(dir.path());
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    // L1 entry 0 pointing far beyond the end of the file.
    let far = ((1u64 << 40) | (1 << 63)).to_be_bytes();
    let p = patched(dir.path(), "l2.qcow2", img.clone(), l1, &far);
    let rep = disk::check::check(&p, false).unwrap();
    assert!(rep.corruptions > 0, "{rep:?}");
    if let Ok(d) = disk::open(&p, &ro()) {
        let mut b = vec![0u8; 4096];
        if d.read_at(&mut b, 0).is_ok() {
            assert!(b.iter().all(|&x| x == 0));
        }
    }
    // An L2 entry pointing beyond the file.
    let l2 = (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let p = patched(
        dir.path(),
        "data.qcow2",
        img,
        l2,
        &((1u64 << 45) | (1 << 63)).to_be_bytes(),
    );
    let rep = disk::check::check(&p, false).unwrap();
    assert!(rep.corruptions > 0, "{rep:?}");
    // Data past the end of the file reads as zeroes (as in QEMU) or fails.
    if let Ok(d) = disk::open(&p, &ro()) {
        let mut b = vec![0u8; 4096];
        if d.read_at(&mut b, 0).is_ok() {
            assert!(b.iter().all(|&x| x == 0));
        }
    }
}

#[test]
fn backing_loops_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
        "1M",
    ]);
    assert!(matches!(open_err(&a), Error::BackingLoop { .. }));
    let s = dir.path().join("self.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        s.to_str().unwrap(),
        "1M",
    ]);
    assert!(matches!(open_err(&s), Error::BackingLoop { .. }));
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rules = BackingRules::default();
    let mut prev = "l0.qcow2".to_string();
    disk::ops::create(&dir.path().join(&prev), Some(1 << 20), None, &rules).unwrap();
    for i in 1..disk::MAX_CHAIN_DEPTH {
        let name = format!("l{i}.qcow2");
        disk::ops::create(&dir.path().join(&name), None, Some(&prev), &rules).unwrap();
        prev = name;
    }
    // Exactly at the limit: fine.
    disk::open(&dir.path().join(&prev), &ro()).unwrap();
    let deep = dir.path().join("deep.qcow2");
    let err = disk::ops::create(&deep, None, Some(&prev), &rules).unwrap_err();
    assert!(matches!(err, Error::ChainTooDeep { .. }), "{err}");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &prev,
        "-F",
        "qcow2",
        deep.to_str().unwrap(),
        "1M",
    ]);
    assert!(matches!(open_err(&deep), Error::ChainTooDeep { .. }));
}

#[test]
fn absolute_and_parent_backing_paths_need_permission() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = dir.path().join("base.qcow2");
    disk::ops::create(&base, Some(1 << 20), None, &BackingRules::default()).unwrap();
    let abs = sub.join("abs.qcow2");
    let up = sub.join("up.qcow2");
    let allow = BackingRules {
        allow_absolute_backing: true,
    };
    // Creating them needs the permission too.
    assert!(matches!(
        disk::ops::create(&abs, None, Some(base.to_str().unwrap()), &BackingRules::default()),
        Err(Error::Backing { .. })
    ));
    disk::ops::create(&abs, None, Some(base.to_str().unwrap()), &allow).unwrap();
    disk::ops::create(&up, None, Some("../base.qcow2"), &allow).unwrap();
    for p in [&abs, &up] {
        let e = open_err(p);
        assert!(matches!(e, Error::Backing { .. }), "{e}");
        assert!(e.to_string().contains("--allow-absolute-backing"), "{e}");
        let d = disk::open_with(p, &ro(), &allow).unwrap();
        assert_eq!(d.size(), 1 << 20);
    }
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
        "1M",
    ]);
    let e = open_err(&a).to_string();
    assert!(e.contains("gone.qcow2"), "{e}");
}

/// The deterministic stand-in for the fuzz target: mutate real images
/// (ours, and QEMU's with compressed clusters and a backing file) and open,
/// read and check each mutant.
#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i / 300) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let comp = dir.path().join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw.to_str().unwrap(),
        comp.to_str().unwrap(),
    ]);
    let over = dir.path().join("over.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "src.raw",
        "-F",
        "raw",
        over.to_str().unwrap(),
    ]);
    let seeds = [std::fs::read(&comp).unwrap(), std::fs::read(&over).unwrap()];
    let fuzz_dir = dir.path().join("f");
    std::fs::create_dir(&fuzz_dir).unwrap();
    std::fs::copy(&raw, fuzz_dir.join("src.raw")).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..1000 {
        let mut img = seeds[i % 2].clone();
        let n = 1 + rand() % 6;
        for _ in 0..n {
            // Mostly the header and the first metadata clusters.
            let span = if rand() % 4 == 0 {
                img.len()
            } else {
                img.len().min(8192)
            };
            let at = (rand() as usize) % span;
            img[at] = match rand() % 3 {
                0 => rand() as u8,
                1 => img[at] ^ (1 << (rand() % 8)),
                _ => 0xff,
            };
        }
        disk::fuzzing::open_and_read(&fuzz_dir, &img);
    }
}

/// Found by the fuzzer: refcount structures that sent imago's allocator
/// into unbounded recursion (a stack overflow) on the first write. Such
/// images are refused for writing and still readable.
#[test]
fn inconsistent_refcounts_refuse_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.qcow2");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/refblock-recursion.qcow2"),
        &p,
    )
    .unwrap();
    let e = disk::open(&p, &OpenOptions::default())
        .err()
        .expect("opened for writing");
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    let d = disk::open(&p, &ro()).unwrap();
    let mut b = [0u8; 4096];
    let _ = d.read_at(&mut b, 0);
    disk::fuzzing::open_and_read(dir.path(), &std::fs::read(&p).unwrap());
}

/// Many internal snapshots sharing one L1 table: check stays bounded.
#[test]
fn shared_snapshot_tables_do_not_make_check_quadratic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snaps.qcow2");
    disk::ops::create(&p, Some(64 << 30), None, &BackingRules::default()).unwrap();
    // Opening it writable gives all 128 L1 entries an L2 table.
    drop(disk::open(&p, &OpenOptions::default()).unwrap());
    let mut img = std::fs::read(&p).unwrap();
    let cs = 65536usize;
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap());
    let l1_entries = u32::from_be_bytes(img[36..40].try_into().unwrap());
    // A snapshot table of 20000 entries, all naming the active L1 table.
    let table = img.len().next_multiple_of(cs);
    let n = 20_000u32;
    img.resize(table + n as usize * 40, 0);
    for i in 0..n as usize {
        let e = &mut img[table + i * 40..][..40];
        e[0..8].copy_from_slice(&l1.to_be_bytes());
        e[8..12].copy_from_slice(&l1_entries.to_be_bytes());
    }
    img[60..64].copy_from_slice(&n.to_be_bytes());
    img[64..72].copy_from_slice(&(table as u64).to_be_bytes());
    std::fs::write(&p, &img).unwrap();
    let start = std::time::Instant::now();
    let r = disk::check::check(&p, false);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
