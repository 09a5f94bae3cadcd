//! Our own reading of a qcow2 header, done before anything else touches the
//! image. It bounds every size against the file, so a hostile header is a
//! clear [`Error::Corrupt`] and never an absurd allocation, and it gives us
//! the backing-file name to resolve under our own rules.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Largest virtual size we accept (QEMU's limit is 2^61; we take 64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 46;
/// Largest L1 table (QEMU's limit: 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table (QEMU's limit: 8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// The parts of a qcow2 header that Vessel uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_entries: u64,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub refcount_order: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The image has persistent dirty bitmaps (clusters we do not walk).
    pub has_bitmaps: bool,
    /// Length of the file the header was read from.
    pub file_len: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

/// Is this file a qcow2 image (by its magic)?
pub fn is_qcow2(file: &File) -> Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(Error::Io { offset: 0, source }),
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    pub fn read(file: &File) -> Result<Header> {
        let file_len = file.metadata().map_err(|source| Error::Io { offset: 0, source })?.len();
        Self::parse_with(file_len, |buf, off| {
            file.read_exact_at(buf, off)
                .map_err(|source| Error::Io { offset: off, source })
        })
    }

    /// Parse a header from an in-memory image (fuzzing, tests).
    pub fn parse(image: &[u8]) -> Result<Header> {
        Self::parse_with(image.len() as u64, |buf, off| {
            let start = usize::try_from(off).map_err(|_| corrupt("offset overflow"))?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| image.get(start..end))
                .ok_or_else(|| corrupt(format!("header reads past the end of the file at {off}")))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn parse_with(file_len: u64, mut read: impl FnMut(&mut [u8], u64) -> Result<()>) -> Result<Header> {
        if file_len < 72 {
            return Err(corrupt("file too short for a qcow2 header"));
        }
        let mut b = [0u8; 104];
        let avail = file_len.min(104) as usize;
        read(&mut b[..avail], 0)?;
        if b[..4] != MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic)"));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(corrupt(format!("unsupported qcow2 version {version}")));
        }
        let backing_offset = be64(&b, 8);
        let backing_len = be32(&b, 16);
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!("invalid cluster size 2^{cluster_bits}")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(&b, 24);
        if size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!(
                "virtual size {size} is larger than the limit {MAX_VIRTUAL_SIZE}"
            )));
        }
        if be32(&b, 32) != 0 {
            return Err(Error::Unsupported("encrypted qcow2 images".into()));
        }
        let l1_entries = u64::from(be32(&b, 36));
        let l1_offset = be64(&b, 40);
        let reftable_offset = be64(&b, 48);
        let reftable_clusters = u64::from(be32(&b, 56));
        let nb_snapshots = be32(&b, 60);
        let snapshots_offset = be64(&b, 64);
        let (incompatible, refcount_order, header_len) = if version == 3 {
            if file_len < 104 {
                return Err(corrupt("file too short for a qcow2 v3 header"));
            }
            let header_len = be32(&b, 100);
            if !(104..=cluster_size as u32).contains(&header_len) || !header_len.is_multiple_of(8) {
                return Err(corrupt(format!("invalid header length {header_len}")));
            }
            (be64(&b, 72), be32(&b, 96), u64::from(header_len))
        } else {
            (0, 4, 72)
        };
        if refcount_order > 6 {
            return Err(corrupt(format!("invalid refcount order {refcount_order}")));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "the image is marked corrupt; repair it with `qemu-img check -r all`",
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported("qcow2 images with an external data file".into()));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Unsupported("qcow2 images with extended L2 entries".into()));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTL2;
        if incompatible & !known != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible qcow2 features {:#x}",
                incompatible & !known
            )));
        }
        if incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
            let mut ct = [0u8; 1];
            read(&mut ct, 104)?;
            if header_len <= 104 || ct[0] != 0 {
                return Err(Error::Unsupported("qcow2 compression types other than zlib".into()));
            }
        }

        // Every table must be cluster-aligned and lie inside the file.
        let l1_bytes = l1_entries * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!("L1 table of {l1_entries} entries is too large")));
        }
        let needed_l1 = size.div_ceil(cluster_size * (cluster_size / 8));
        if l1_entries < needed_l1 {
            return Err(corrupt(format!(
                "L1 table of {l1_entries} entries cannot map {size} bytes"
            )));
        }
        if l1_bytes > 0 {
            check_table("L1 table", l1_offset, l1_bytes, cluster_size, file_len)?;
        }
        let reftable_bytes = reftable_clusters * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES || reftable_clusters == 0 {
            return Err(corrupt(format!(
                "invalid refcount table size ({reftable_clusters} clusters)"
            )));
        }
        check_table(
            "refcount table",
            reftable_offset,
            reftable_bytes,
            cluster_size,
            file_len,
        )?;
        if nb_snapshots > 0 {
            check_table("snapshot table", snapshots_offset, 1, cluster_size, file_len)?;
        }

        let mut backing_file = None;
        if backing_offset != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(corrupt(format!("invalid backing file name length {backing_len}")));
            }
            let end = backing_offset
                .checked_add(u64::from(backing_len))
                .filter(|&e| e <= cluster_size.min(file_len))
                .ok_or_else(|| corrupt("backing file name lies outside the first cluster"))?;
            let mut name = vec![0u8; (end - backing_offset) as usize];
            read(&mut name, backing_offset)?;
            let name = String::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?;
            if name.contains('\0') {
                return Err(corrupt("backing file name contains a NUL byte"));
            }
            backing_file = Some(name);
        }

        // Header extensions: in the first cluster, and (as QEMU reads them)
        // before the backing file name when there is one.
        let mut backing_format = None;
        let mut has_bitmaps = false;
        let mut at = header_len;
        let mut limit = cluster_size.min(file_len);
        if backing_offset != 0 {
            limit = limit.min(backing_offset);
        }
        loop {
            if at + 8 > limit {
                if version == 2 || backing_offset != 0 {
                    break; // the extensions may end without an end marker here
                }
                return Err(corrupt("header extensions run past the first cluster"));
            }
            let mut eh = [0u8; 8];
            read(&mut eh, at)?;
            let (ty, len) = (be32(&eh, 0), u64::from(be32(&eh, 4)));
            if ty == EXT_END {
                break;
            }
            let data_end = at + 8 + len;
            if data_end > limit {
                return Err(corrupt(format!("header extension {ty:#x} runs past the first cluster")));
            }
            match ty {
                EXT_BACKING_FORMAT => {
                    let mut f = vec![0u8; len as usize];
                    read(&mut f, at + 8)?;
                    let f = String::from_utf8(f).map_err(|_| corrupt("backing format is not UTF-8"))?;
                    backing_format = Some(f.trim_end_matches('\0').to_string());
                }
                EXT_BITMAPS => has_bitmaps = true,
                EXT_DATA_FILE => return Err(Error::Unsupported("qcow2 images with an external data file".into())),
                _ => {}
            }
            at = data_end.next_multiple_of(8);
        }

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_entries,
            l1_offset,
            reftable_offset,
            reftable_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible,
            refcount_order,
            backing_file,
            backing_format,
            has_bitmaps,
            file_len,
        })
    }
}

fn check_table(name: &str, offset: u64, bytes: u64, cluster_size: u64, file_len: u64) -> Result<()> {
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(corrupt(format!("{name} at {offset:#x} is not cluster-aligned")));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len.next_multiple_of(cluster_size) => Ok(()),
        _ => Err(corrupt(format!(
            "{name} at {offset:#x} ({bytes} bytes) lies outside the file ({file_len} bytes)"
        ))),
    }
}
