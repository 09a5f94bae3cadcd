//! Host-side throughput of the disk backends, no guest: raw against qcow2
//! (fresh image, and an overlay on a full raw base), sequential 1 MiB and
//! random 4 KiB, through `disk::BlockBackend` as virtio-blk uses it.
//!
//! cargo run --release -p vessel-disk --example bench -- [DIR] [MiB]

use std::path::Path;
use std::time::Instant;

use disk::{BackingRules, BlockBackend, OpenOptions};

fn mbps(bytes: u64, secs: f64) -> String {
    format!("{:8.1} MB/s", bytes as f64 / secs / 1e6)
}

fn run(name: &str, d: &dyn BlockBackend, mib: u64) {
    let size = mib << 20;
    let big = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for i in 0..mib {
        d.write_at(&big, i << 20).unwrap();
    }
    d.flush().unwrap();
    let w = t.elapsed().as_secs_f64();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    for i in 0..mib {
        d.read_at(&mut buf, i << 20).unwrap();
    }
    let r = t.elapsed().as_secs_f64();
    let ops = 20_000u64;
    let small = [0xa5u8; 4096];
    let mut x: u64 = 88172645463325252;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % (size / 4096)) * 4096
    };
    let t = Instant::now();
    for _ in 0..ops {
        d.write_at(&small, next()).unwrap();
    }
    d.flush().unwrap();
    let rw = t.elapsed().as_secs_f64();
    let mut sbuf = [0u8; 4096];
    let t = Instant::now();
    for _ in 0..ops {
        d.read_at(&mut sbuf, next()).unwrap();
    }
    let rr = t.elapsed().as_secs_f64();
    println!(
        "{name:28} seq write {}  seq read {}  4k rand write {:8.0} IOPS  4k rand read {:8.0} IOPS",
        mbps(size, w),
        mbps(size, r),
        ops as f64 / rw,
        ops as f64 / rr
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir =
        Path::new(args.get(1).map_or("/tmp", |s| s.as_str())).join(format!("vessel-disk-bench-{}", std::process::id()));
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    std::fs::create_dir_all(&dir).unwrap();
    let rw = OpenOptions::default();
    let rules = BackingRules::default();

    let raw = dir.join("a.raw");
    std::fs::File::create(&raw).unwrap().set_len(mib << 20).unwrap();
    run("raw (sparse)", &*disk::open(&raw, &rw).unwrap(), mib);

    let q = dir.join("b.qcow2");
    disk::ops::create(&q, Some(mib << 20), None, &rules).unwrap();
    run("qcow2 (fresh)", &*disk::open(&q, &rw).unwrap(), mib);
    run("qcow2 (allocated)", &*disk::open(&q, &rw).unwrap(), mib);

    let base = dir.join("base.raw");
    std::fs::write(&base, vec![1u8; (mib << 20) as usize]).unwrap();
    let o = dir.join("o.qcow2");
    disk::ops::create(&o, None, Some("base.raw"), &rules).unwrap();
    run("qcow2 overlay on raw base", &*disk::open(&o, &rw).unwrap(), mib);

    let _ = std::fs::remove_dir_all(&dir);
}
