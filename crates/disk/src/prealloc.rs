//! Give every L1 entry of a writable image its L2 table before imago opens
//! it, written in crash-safe order by our own code.
//!
//! Why: imago 0.2.6 allocates a new L2 table by bumping the refcount in its
//! refblock *cache*, then writing the L2 table and the L1 entry straight to
//! the file. A SIGKILL before the next flush leaves an L1 entry pointing at
//! a cluster whose on-disk refcount is 0, which `qemu-img check` calls
//! corruption (the test `sigkill_before_flush_of_new_l2_tables` shows it).
//! Data clusters are safe (imago orders those through its caches). With all
//! L2 tables present, guest writes never allocate one.
//!
//! Order here: refcounts, then the (zero) L2 tables, fsync, then the L1
//! entries, fsync. A crash in between leaks clusters and nothing else.
//! The cost is one cluster per 512 MiB of virtual disk (64 KiB clusters),
//! and the L2 tables are holes in the file until written.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::check::{get_refcount, set_refcount};
use crate::header::Header;
use crate::{Error, Result};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

fn io(offset: u64) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io { offset, source }
}

fn read_u64s(file: &File, off: u64, n: u64) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; (n * 8) as usize];
    file.read_exact_at(&mut buf, off).map_err(io(off))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Allocate the missing L2 tables of the qcow2 image at `path`. Returns how
/// many it allocated. Images it cannot help (internal snapshots, a refcount
/// structure that would have to grow) are left as they are.
pub fn preallocate_l2(path: &Path) -> Result<u64> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
    let h = Header::read(&file).map_err(|e| e.in_file(path))?;
    if h.nb_snapshots > 0 || h.incompatible & crate::header::INCOMPAT_DIRTY != 0 {
        return Ok(0);
    }
    let cs = h.cluster_size();
    let needed = h.size.div_ceil(cs * h.l2_entries());
    let l1 = read_u64s(&file, h.l1_offset, needed)?;
    let missing: Vec<u64> = (0..needed).filter(|&i| l1[i as usize] & OFFSET_MASK == 0).collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let k = missing.len() as u64;

    // New clusters at the end of the file, in refblocks that exist already.
    let bits = h.refcount_bits();
    let per_block = cs * 8 / u64::from(bits);
    let reftable = read_u64s(&file, h.reftable_offset, h.reftable_clusters * cs / 8)?;
    let first = h.file_len.div_ceil(cs);
    let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    // Which entry of `blocks` holds the refblock at an offset: a linear
    // search here made this quadratic (4M new clusters × 64K refblocks).
    let mut index: HashMap<u64, usize> = HashMap::new();
    for c in first..first + k {
        let (ri, j) = (c / per_block, c % per_block);
        let rb = match reftable.get(ri as usize) {
            Some(&e) if e & !0x1ff != 0 => e & !0x1ff,
            _ => return Ok(0), // would need a new refblock: leave it to imago
        };
        if rb
            .checked_add(cs)
            .is_none_or(|end| end > h.file_len.next_multiple_of(cs))
        {
            return Err(Error::Corrupt(format!(
                "{}: refcount block outside the file",
                path.display()
            )));
        }
        let idx = match index.get(&rb) {
            Some(&i) => i,
            None => {
                let mut b = vec![0u8; cs as usize];
                let avail = (h.file_len - rb).min(cs) as usize;
                file.read_exact_at(&mut b[..avail], rb).map_err(io(rb))?;
                blocks.push((rb, b));
                index.insert(rb, blocks.len() - 1);
                blocks.len() - 1
            }
        };
        let block = &mut blocks[idx].1;
        if get_refcount(block, j, bits) != 0 {
            return Ok(0); // odd image (refcounts past its end): leave it alone
        }
        set_refcount(block, j, bits, 1);
    }
    // 1. Refcounts.
    for (off, block) in &blocks {
        file.write_all_at(block, *off).map_err(io(*off))?;
    }
    // 2. The L2 tables: zeroes, as a hole at the end of the file.
    file.set_len((first + k) * cs).map_err(io(first * cs))?;
    file.sync_all().map_err(io(0))?;
    // 3. The L1 entries, in one write (one per entry was 4M system calls
    // for the largest L1 table).
    let mut table: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    for (n, &i) in missing.iter().enumerate() {
        let entry = ((first + n as u64) * cs) | COPIED;
        table[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_be_bytes());
    }
    file.write_all_at(&table, h.l1_offset).map_err(io(h.l1_offset))?;
    file.sync_all().map_err(io(0))?;
    Ok(k)
}
