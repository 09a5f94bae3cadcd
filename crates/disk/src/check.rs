//! `vessel disk check`: rebuild an image's reference counts from its
//! metadata and compare them with the stored refcounts, like `qemu-img
//! check`. A cluster referenced more often than its refcount says is
//! corruption; one whose refcount is higher than its references is a leak,
//! which `repair` fixes by lowering the refcount.
//!
//! Every read is bounded by the file, so a hostile image is reported, not
//! followed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::header::Header;
use crate::{Error, Result};

/// Bits 9..=55 of an L1/L2 entry hold a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Images with more clusters than this are not checked (a 2^27-entry table
/// of u32 is 512 MiB, the most we are willing to hold).
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;
/// Detailed messages kept per report; the count keeps going.
const MAX_MESSAGES: usize = 20;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors: metadata pointing outside the file, misaligned or reserved
    /// bits, refcounts lower than the references.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    pub leaks_fixed: u64,
    /// The first few problems, for people.
    pub messages: Vec<String>,
    /// Data clusters allocated in this image (not counting the backing).
    pub allocated_clusters: u64,
    /// Clusters the virtual disk spans.
    pub total_clusters: u64,
    pub image_end: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == self.leaks_fixed
    }

    fn error(&mut self, msg: String) {
        self.corruptions += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(format!("ERROR {msg}"));
        }
    }
}

struct Walker<'a> {
    file: &'a File,
    h: &'a Header,
    refs: Vec<u32>,
    report: CheckReport,
    /// Table entries we may still visit. Internal snapshots can share one
    /// L1 table many times over; the budget keeps a small hostile file from
    /// costing quadratic time.
    budget: u64,
}

impl Walker<'_> {
    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        // Tables may end at the file's end without filling their cluster.
        let avail = self.h.file_len.saturating_sub(off).min(len) as usize;
        self.file
            .read_exact_at(&mut buf[..avail], off)
            .map_err(|source| Error::Io { offset: off, source })?;
        Ok(buf)
    }

    fn spend(&mut self, entries: u64) -> Result<()> {
        self.budget = self.budget.checked_sub(entries).ok_or_else(|| {
            Error::Unsupported("checking an image whose tables are referenced this many times".into())
        })?;
        Ok(())
    }

    /// Count a reference to the clusters in `[off, off+len)`; false if they
    /// lie outside the file.
    fn add(&mut self, off: u64, len: u64, what: &str) -> bool {
        let cs = self.h.cluster_size();
        let n = self.refs.len() as u64;
        let first = off / cs;
        let last = match off.checked_add(len.max(1) - 1) {
            Some(end) => end / cs,
            None => u64::MAX,
        };
        if last >= n {
            self.report.error(format!("{what} at {off:#x} lies outside the image"));
            return false;
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
        true
    }

    fn walk_l1(&mut self, l1_offset: u64, l1_entries: u64, active: bool) -> Result<()> {
        let cs = self.h.cluster_size();
        if l1_entries == 0 {
            return Ok(());
        }
        if !l1_offset.is_multiple_of(cs) || !self.add(l1_offset, l1_entries * 8, "L1 table") {
            if !l1_offset.is_multiple_of(cs) {
                self.report.error(format!("L1 table at {l1_offset:#x} is not aligned"));
            }
            return Ok(());
        }
        self.spend(l1_entries)?;
        let l1 = self.read(l1_offset, l1_entries * 8)?;
        for (i, e) in l1.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(e.try_into().unwrap_or_default());
            if e & L1_RESERVED != 0 {
                self.report
                    .error(format!("L1 entry {i} has reserved bits set ({e:#x})"));
                continue;
            }
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) {
                self.report.error(format!("L2 table at {l2:#x} is not aligned"));
                continue;
            }
            if !self.add(l2, cs, "L2 table") {
                continue;
            }
            self.spend(cs / 8)?;
            let table = self.read(l2, cs)?;
            self.walk_l2(&table, active);
        }
        Ok(())
    }

    fn walk_l2(&mut self, table: &[u8], active: bool) {
        let cs = self.h.cluster_size();
        let cb = self.h.cluster_bits;
        for e in table.chunks_exact(8) {
            let e = u64::from_be_bytes(e.try_into().unwrap_or_default());
            if e & L2_COMPRESSED != 0 {
                let shift = 62 - (cb - 8);
                let host = e & ((1u64 << shift) - 1);
                let sectors = ((e >> shift) & ((1u64 << (cb - 8)) - 1)) + 1;
                let start = host & !511;
                if self.add(start, sectors * 512, "compressed cluster") && active {
                    self.report.allocated_clusters += 1;
                }
                continue;
            }
            if e & L2_RESERVED != 0 {
                self.report.error(format!("L2 entry {e:#x} has reserved bits set"));
                continue;
            }
            let data = e & OFFSET_MASK;
            if data == 0 {
                continue;
            }
            if !data.is_multiple_of(cs) {
                self.report.error(format!("data cluster at {data:#x} is not aligned"));
                continue;
            }
            if self.add(data, cs, "data cluster") && active {
                self.report.allocated_clusters += 1;
            }
        }
    }

    fn walk_snapshots(&mut self) -> Result<()> {
        let h = self.h;
        let mut off = h.snapshots_offset;
        let start = off;
        for i in 0..h.nb_snapshots {
            let fixed = self.read(off, 40)?;
            let be32 = |at: usize| u32::from_be_bytes(fixed[at..at + 4].try_into().unwrap_or_default());
            let l1_offset = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or_default());
            let l1_entries = u64::from(be32(8));
            let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
            let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let extra = u64::from(be32(36));
            let len = (40 + extra + id_len + name_len).next_multiple_of(8);
            off += len;
            if off > h.file_len || l1_entries > (32 << 20) / 8 {
                self.report.error(format!("snapshot {i} lies outside the image"));
                return Ok(());
            }
            self.walk_l1(l1_offset, l1_entries, false)?;
        }
        self.add(start, off - start, "snapshot table");
        Ok(())
    }
}

pub(crate) fn get_refcount(block: &[u8], j: u64, bits: u32) -> u64 {
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = j as usize * w;
        block[at..at + w].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b))
    } else {
        let per = 8 / bits as u64;
        let byte = block[(j / per) as usize];
        (u64::from(byte) >> ((j % per) * u64::from(bits))) & ((1 << bits) - 1)
    }
}

pub(crate) fn set_refcount(block: &mut [u8], j: u64, bits: u32, v: u64) {
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = j as usize * w;
        for (k, b) in block[at..at + w].iter_mut().enumerate() {
            *b = (v >> (8 * (w - 1 - k))) as u8;
        }
    } else {
        let per = 8 / bits as u64;
        let shift = (j % per) * u64::from(bits);
        let mask = ((1u8 << bits) - 1) << shift;
        let b = &mut block[(j / per) as usize];
        *b = (*b & !mask) | (((v as u8) << shift) & mask);
    }
}

/// Check one qcow2 image (not its backing files). With `repair`, fix leaks
/// (only when there is no corruption).
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(repair)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
    if !crate::header::is_qcow2(&file)? {
        return Err(Error::Unsupported(format!(
            "{}: check works on qcow2 images; this is a raw file",
            path.display()
        )));
    }
    let h = Header::read(&file).map_err(|e| e.in_file(path))?;
    check_file(&file, &h, repair).map_err(|e| e.in_file(path))
}

fn check_file(file: &File, h: &Header, repair: bool) -> Result<CheckReport> {
    let cs = h.cluster_size();
    let nclusters = h.file_len.div_ceil(cs);
    if nclusters > MAX_CHECK_CLUSTERS {
        return Err(Error::Unsupported(format!(
            "checking images of more than {MAX_CHECK_CLUSTERS} clusters"
        )));
    }
    let mut w = Walker {
        file,
        h,
        refs: vec![0; nclusters as usize],
        // 64 visits of every entry the file could hold, plus slack.
        budget: 64 * (h.file_len / 8) + (1 << 24),
        report: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            image_end: h.file_len,
            ..Default::default()
        },
    };
    w.add(0, cs, "header");
    w.walk_l1(h.l1_offset, h.l1_entries, true)?;
    if h.nb_snapshots > 0 {
        w.walk_snapshots()?;
    }
    let rt_len = h.reftable_clusters * cs;
    w.add(h.reftable_offset, rt_len, "refcount table");
    let reftable = w.read(h.reftable_offset, rt_len)?;
    let bits = h.refcount_bits();
    let per_block = cs * 8 / u64::from(bits);
    let mut blocks = Vec::new();
    for (i, e) in reftable.chunks_exact(8).enumerate() {
        let off = u64::from_be_bytes(e.try_into().unwrap_or_default()) & !0x1ff;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            w.report.error(format!("refcount block {i} at {off:#x} is not aligned"));
            continue;
        }
        if w.add(off, cs, "refcount block") {
            blocks.push((i as u64, off));
        }
    }

    let mut refs = std::mem::take(&mut w.refs);
    let mut report = std::mem::take(&mut w.report);
    let mut covered = vec![false; refs.len()];
    let mut dirty_blocks = Vec::new();
    for (i, off) in blocks {
        // Only the entries for clusters inside the file are compared: a
        // refcount table may name up to 2^20 blocks (all the same one, in a
        // hostile image), and walking every entry of each was a spin of
        // 2^35 steps. Reftable indexes are distinct, so this visits each
        // cluster of the file at most once.
        let first = i.saturating_mul(per_block);
        let Some(in_file) = nclusters.checked_sub(first).filter(|&n| n > 0) else {
            continue;
        };
        let mut block = w.read(off, cs)?;
        let mut dirty = false;
        for j in 0..per_block.min(in_file) {
            let c = i * per_block + j;
            let stored = get_refcount(&block, j, bits);
            let want = refs.get(c as usize).copied().map_or(0, u64::from);
            if let Some(cov) = covered.get_mut(c as usize) {
                *cov = true;
            }
            if stored < want {
                report.error(format!("cluster {c}: refcount {stored} but {want} references"));
            } else if stored > want {
                report.leaks += 1;
                if report.messages.len() < MAX_MESSAGES {
                    report
                        .messages
                        .push(format!("Leaked cluster {c} refcount={stored} reference={want}"));
                }
                set_refcount(&mut block, j, bits, want);
                dirty = true;
            }
        }
        if dirty {
            dirty_blocks.push((off, block));
        }
    }
    for (c, r) in refs.iter_mut().enumerate() {
        if *r > 0 && !covered[c] {
            report.error(format!("cluster {c}: refcount 0 but {r} references"));
        }
    }
    if repair && report.leaks > 0 {
        if report.corruptions > 0 {
            return Err(Error::Corrupt(format!(
                "{} errors found; not repairing leaks of a corrupt image",
                report.corruptions
            )));
        }
        if h.has_bitmaps {
            return Err(Error::Unsupported("repairing images with persistent bitmaps".into()));
        }
        for (off, block) in &dirty_blocks {
            file.write_all_at(block, *off)
                .map_err(|source| Error::Io { offset: *off, source })?;
        }
        file.sync_all().map_err(|source| Error::Io { offset: 0, source })?;
        report.leaks_fixed = report.leaks;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width_round_trip() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut block = vec![0u8; 512];
            let per = 512 * 8 / u64::from(bits);
            let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            for j in 0..per {
                set_refcount(&mut block, j, bits, (j * 2654435761) & max);
            }
            for j in 0..per {
                assert_eq!(
                    get_refcount(&block, j, bits),
                    (j * 2654435761) & max,
                    "{bits} bits, entry {j}"
                );
            }
        }
        // The qcow2 layout: 1-bit entries fill each byte from its low bit.
        let mut b = [0u8; 1];
        set_refcount(&mut b, 0, 1, 1);
        set_refcount(&mut b, 3, 1, 1);
        assert_eq!(b[0], 0b1001);
        let mut b = [0u8; 2];
        set_refcount(&mut b, 0, 16, 0x0102);
        assert_eq!(b, [1, 2]);
    }
}
