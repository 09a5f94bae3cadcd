//! Crash consistency: a child process writes and flushes in a loop and is
//! killed with SIGKILL. Afterwards qemu-img check finds no corruption
//! (leaks are acceptable) and every write the child reported flushed is
//! there. (The guest-level variant comes with virtio-blk.)

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use disk::OpenOptions;

/// Slots of 4 KiB; a prime, so `i * STRIDE % SLOTS` visits each slot once.
const SLOTS: u64 = 16381;
const STRIDE: u64 = 7919;
const WRITES_PER_FLUSH: u64 = 3;

fn write_of(i: u64) -> (u64, Vec<u8>) {
    let slot = i * STRIDE % SLOTS;
    // 2 KiB at a sector offset inside the slot: partial clusters, so every
    // allocation copies the rest of its cluster from the backing file.
    let off = slot * 4096 + (i % 3) * 512;
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
        .args(["check", "-f", "qcow2", img.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn crash_consistency_under_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_data: Vec<u8> = (0..SLOTS * 4096).map(|i| (i % 241) as u8).collect();
    std::fs::write(&base, &base_data).unwrap();
    for (round, kill_after) in [40u64, 150, 400].into_iter().enumerate() {
        let img = dir.path().join(format!("crash{round}.qcow2"));
        disk::ops::create(&img, None, Some("base.raw"), &OpenOptions::default()).unwrap();
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
            if let Some(n) = line.strip_prefix("flushed ") {
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
            if let Some(n) = line.strip_prefix("flushed ") {
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
        let last_slot = (SLOTS - 1) * 4096;
        disk.read_at(&mut buf, last_slot).unwrap();
        let written = (0..acked + WRITES_PER_FLUSH).any(|i| i * STRIDE % SLOTS == SLOTS - 1);
        if !written {
            assert!(buf[..] == base_data[last_slot as usize..][..4096]);
        }
        drop(disk);

        // Leaks are repairable, after which the image is clean.
        disk::check::check(&img, true).unwrap();
        assert_eq!(qemu_check(&img).0, 0);
    }
}
