//! Issue 14, hole 3: crafted qcow2 headers that used to reach imago
//! unchecked, or made our own code spin, get a clear error or finish in
//! time proportional to the file.

use std::path::Path;
use std::time::{Duration, Instant};

use disk::{Error, OpenOptions};

/// Write `image` (a list of (offset, bytes)) as a file of `len` bytes.
fn write_image(path: &Path, len: u64, parts: &[(u64, Vec<u8>)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (off, b) in parts {
        f.write_all_at(b, *off).unwrap();
    }
}

/// A qcow2 v3 header.
#[allow(clippy::too_many_arguments)]
fn header(
    cluster_bits: u32,
    size: u64,
    l1_entries: u32,
    l1_offset: u64,
    reftable_offset: u64,
    reftable_clusters: u32,
    refcount_order: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; 112];
    let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(20, &cluster_bits.to_be_bytes());
    put(24, &size.to_be_bytes());
    put(36, &l1_entries.to_be_bytes());
    put(40, &l1_offset.to_be_bytes());
    put(48, &reftable_offset.to_be_bytes());
    put(56, &reftable_clusters.to_be_bytes());
    put(96, &refcount_order.to_be_bytes());
    put(100, &104u32.to_be_bytes());
    // 104..112: the end-of-extensions marker (zeroes).
    h
}

fn be64s(v: impl IntoIterator<Item = u64>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// More than 2^27 clusters (512-byte clusters in a sparse 64 GiB file):
/// too large for our check, so the image used to be opened writable
/// unchecked, straight into imago's allocator. Now: read-only only, with
/// an error that says why.
#[test]
fn images_too_large_to_check_are_not_opened_writable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.qcow2");
    let cs = 512u64;
    let len = ((1u64 << 27) + 8) * cs;
    // Header, L1 (1 entry) at cluster 1, reftable at 2, refblock at 3.
    let mut refblock = vec![0u8; cs as usize];
    for c in 0..4 {
        refblock[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    write_image(
        &p,
        len,
        &[
            (0, header(9, 32 << 10, 1, cs, 2 * cs, 1, 4)),
            (2 * cs, be64s([3 * cs])),
            (3 * cs, refblock),
        ],
    );
    let start = Instant::now();
    let e = disk::open(&p, &OpenOptions::default()).err().expect("opened writable");
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("huge.qcow2") && msg.contains("read-only"), "{msg}");
    // Read-only still works.
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let d = disk::open(&p, &ro).unwrap();
    let mut b = [1u8; 512];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 512]);
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}

/// A refcount table of 2^20 entries that all name the same refcount block:
/// our check compared every entry of every block, 2^35 steps. Now it
/// reports the corruption at once, and a writable open is refused.
#[test]
fn a_refcount_table_naming_one_block_a_million_times_does_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shared.qcow2");
    let cs = 65536u64;
    let rt_clusters = 128u64; // 8 MiB: 2^20 entries
    let rb = (2 + rt_clusters) * cs;
    let mut refblock = vec![0u8; cs as usize];
    for c in 0..(3 + rt_clusters) as usize {
        refblock[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    write_image(
        &p,
        rb + cs,
        &[
            (0, header(16, 512 << 20, 1, cs, 2 * cs, rt_clusters as u32, 4)),
            (2 * cs, be64s(std::iter::repeat_n(rb, (rt_clusters * cs / 8) as usize))),
            (rb, refblock),
        ],
    );
    let start = Instant::now();
    let report = disk::check::check(&p, false).unwrap();
    assert!(report.corruptions > 0, "{report:?}");
    let e = disk::open(&p, &OpenOptions::default()).err().expect("opened writable");
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
}

/// The largest L1 table (4M entries, 512-byte clusters, 64-bit refcounts)
/// with every L2 table missing and 2^16 refcount blocks already in place:
/// L2 pre-allocation looked each new cluster's block up by a linear search
/// (2^22 × 2^15 steps). Now it is linear, and the image stays consistent.
#[test]
fn l2_preallocation_is_linear_in_the_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.qcow2");
    let cs = 512u64;
    let per_block = cs * 8 / 64;
    let k = 1u64 << 22; // L1 entries, all missing
    let l1_clusters = k * 8 / cs;
    // Refcount blocks enough for every existing cluster and the k new ones.
    let mut r = 1u64;
    let (rt_clusters, existing) = loop {
        let rt = (r * 8).div_ceil(cs);
        let existing = 1 + l1_clusters + rt + r;
        if r * per_block >= existing + k {
            break (rt, existing);
        }
        r += 1;
    };
    let rt_off = (1 + l1_clusters) * cs;
    let rb_first = rt_off + rt_clusters * cs;
    let reftable = be64s((0..r).map(|i| rb_first + i * cs));
    // Every existing cluster has refcount 1 (64-bit entries).
    let mut blocks = vec![0u8; (r * cs) as usize];
    for c in 0..existing as usize {
        blocks[c * 8..c * 8 + 8].copy_from_slice(&1u64.to_be_bytes());
    }
    let size = k * cs * (cs / 8);
    write_image(
        &p,
        existing * cs,
        &[
            (0, header(9, size, k as u32, cs, rt_off, rt_clusters as u32, 6)),
            (rt_off, reftable),
            (rb_first, blocks),
        ],
    );
    assert!(disk::check::check(&p, false).unwrap().is_clean());
    let start = Instant::now();
    let d = disk::open(&p, &OpenOptions::default()).unwrap();
    let took = start.elapsed();
    d.write_at(&[0x5a; 512], size - 512).unwrap();
    d.flush().unwrap();
    drop(d);
    assert!(took < Duration::from_secs(60), "opening took {took:?}");
    let r = disk::check::check(&p, false).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}
