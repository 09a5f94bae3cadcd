//! Crash consistency: a child process writes and flushes in a loop and is
//! killed with SIGKILL. Afterwards qemu-img check finds no corruption
//! (leaks are acceptable) and every write the child reported flushed is
//! there. (The guest-level variant comes with virtio-blk.)

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use disk::{BackingRules, OpenOptions};

/// Slots of 4 KiB; a prime, so `i * STRIDE % SLOTS` visits each slot once.
const SLOTS: u64 = 16381;
const STRIDE: u64 = 7919;
const WRITES_PER_FLUSH: u64 = 3;
/// An L2 table maps 512 MiB (64 KiB clusters).
const REGION: u64 = 512 << 20;
const REGIONS: u64 = 64;

fn write_of(i: u64) -> (u64, Vec<u8>) {
    let slot = i * STRIDE % SLOTS;
    // Slots are spread over REGIONS regions, each mapped by its own L2
    // table, so the loop keeps allocating L2 tables as well as data. 2 KiB
    // at a sector offset inside the slot: partial clusters, so every
    // allocation copies the rest of its cluster from the backing file.
    let off = (slot % REGIONS) * REGION + (slot / REGIONS) * 4096 + (i % 3) * 512;
    let mut data = vec![0u8; 2048];
    for (k, b) in data.iter_mut().enumerate() {
        *b = (i as u8) ^ (k as u8) ^ 0x5a;
    }
    data[..8].copy_from_slice(&i.to_le_bytes());
    (off, data)
}

/// The child: write, write, write, flush, report; forever.
#[test]
#[ignore = "run by crash_consistency_under_sigkill as a child process"]
fn crash_child() {
    let Some(path) = std::env::var_os("VESSEL_CRASH_IMAGE") else {
        return;
    };
    let disk = disk::open(Path::new(&path), &OpenOptions::default()).unwrap();
    let mut out = std::io::stdout().lock();
    if let Some(mode) = std::env::var_os("VESSEL_CRASH_NOFLUSH") {
        // Unflushed writes that allocate L2 tables (or, on an image with
        // 512-byte clusters, enough data to need new refcount blocks),
        // then wait to be killed.
        if mode == "refblocks" {
            for c in 0..1500 {
                disk.write_at(&[0xab; 512], c * 1024).unwrap();
            }
        } else {
            for r in 0..8 {
                disk.write_at(&[0xab; 512], r * REGION + 4096).unwrap();
            }
        }
        writeln!(out, "written").unwrap();
        out.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
    let mut i = 0;
    loop {
        for _ in 0..WRITES_PER_FLUSH {
            let (off, data) = write_of(i);
            disk.write_at(&data, off).unwrap();
            i += 1;
        }
        disk.flush().unwrap();
        writeln!(out, "flushed {i}").unwrap();
        out.flush().unwrap();
        if i >= SLOTS - WRITES_PER_FLUSH {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}

fn qemu_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        // -U: a child forked by a sibling test may hold our (closed) image
        // locks for a moment; the check is about data, not locks.
        .args(["check", "-U", "-f", "qcow2", img.to_str().unwrap()])
        .output()
        .expect("qemu-img (the tests need qemu-img and qemu-io from qemu-utils)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn crash_consistency_under_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    // A sparse base with data at the start of every region.
    let base_data: Vec<u8> = (0..(1u64 << 20) + 65536).map(|i| (i % 241) as u8).collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(REGIONS * REGION).unwrap();
        for r in 0..REGIONS {
            f.write_all_at(&base_data, r * REGION).unwrap();
        }
    }
    for (round, kill_after) in [40u64, 150, 400].into_iter().enumerate() {
        let img = dir.path().join(format!("crash{round}.qcow2"));
        disk::ops::create(&img, None, Some("base.raw"), &BackingRules::default()).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("VESSEL_CRASH_IMAGE", &img)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some((_, n)) = line.split_once("flushed ") {
                acked = n.parse().unwrap();
                if acked >= kill_after {
                    break;
                }
            }
        }
        // The child is in the middle of its next writes: kill it there, at
        // a different point in each round.
        std::thread::sleep(std::time::Duration::from_micros(round as u64 * 700));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // It may have flushed more before dying; those count as written too.
        for line in lines.map_while(|l| l.ok()) {
            if let Some((_, n)) = line.split_once("flushed ") {
                acked = n.parse().unwrap();
            }
        }
        assert!(acked >= kill_after, "child died early at {acked}");

        let (code, report) = qemu_check(&img);
        eprintln!("round {round}: killed after {acked} flushed writes; qemu-img check exit {code}");
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exit {code}:\n{report}"
        );
        let ours = disk::check::check(&img, false).unwrap();
        assert_eq!(ours.corruptions, 0, "{ours:?}");

        let disk = disk::open(&img, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 4096];
        for i in 0..acked {
            let (off, data) = write_of(i);
            disk.read_at(&mut buf[..data.len()], off).unwrap();
            assert!(
                buf[..data.len()] == data[..],
                "round {round}: flushed write {i} is missing"
            );
        }
        // Untouched data still comes from the backing file.
        let untouched = 5 * REGION + (1 << 20);
        disk.read_at(&mut buf, untouched).unwrap();
        assert!(buf[..] == base_data[1 << 20..][..4096]);
        drop(disk);

        // Leaks are repairable, after which the image is clean.
        disk::check::check(&img, true).unwrap();
        assert_eq!(qemu_check(&img).0, 0);
    }
}

fn kill_unflushed(img: &Path, mode: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("VESSEL_CRASH_IMAGE", img)
        .env("VESSEL_CRASH_NOFLUSH", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let written = lines.any(|l| l.is_ok_and(|l| l.ends_with("written")));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(written, "the child did not finish its writes");
    let (code, report) = qemu_check(img);
    assert!(code == 0 || code == 3, "qemu-img check exit {code}:\n{report}");
}

/// Killed after writes that allocated metadata (L2 tables) but before any
/// flush: the image may leak, but must not be corrupt.
#[test]
fn sigkill_before_flush_of_new_l2_tables() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("noflush.qcow2");
    disk::ops::create(&img, Some(REGIONS * REGION), None, &BackingRules::default()).unwrap();
    kill_unflushed(&img, "l2");
}

/// The same for new refcount blocks: 512-byte clusters with 16-bit
/// refcounts need a new refcount block every 128 KiB of file.
#[test]
fn sigkill_before_flush_of_new_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rb.qcow2");
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            img.to_str().unwrap(),
            "2M",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    kill_unflushed(&img, "refblocks");
}
