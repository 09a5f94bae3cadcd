//! Guest physical memory: RAM below the 32-bit MMIO hole, the rest above 4 GiB.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// Start of the MMIO hole below 4 GiB (IOAPIC, LAPIC, virtio-mmio).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// Smallest guest we accept: the kernel, initrd and page tables must fit.
pub const MIN_MEM: u64 = 32 << 20;

/// RAM ranges for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]
    }
}

/// Allocate guest memory.
pub fn create(size: u64) -> Result<GuestMemoryMmap> {
    if size < MIN_MEM {
        return Err(Error::Config(format!(
            "memory size {} MiB is below the minimum of {} MiB",
            size >> 20,
            MIN_MEM >> 20
        )));
    }
    if let Some(host) = host_memory() {
        if size > host {
            return Err(Error::Config(format!(
                "memory size {} MiB is more than the host's {} MiB",
                size >> 20,
                host >> 20
            )));
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(format!("cannot allocate {} MiB: {e}", size >> 20)))
}

/// A 64-bit digest of every byte of guest memory (and the layout), to
/// tell whether memory changed. Not cryptographic; the same bytes give the
/// same digest in every run and build.
pub fn digest(mem: &GuestMemoryMmap) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |h: u64, w: u64| {
        let h = (h ^ w).wrapping_mul(K);
        h ^ (h >> 29)
    };
    let mut h = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        h = mix(mix(h, start), len);
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            if mem.read_slice(&mut buf[..n], GuestAddress(start + off)).is_err() {
                // Unreadable memory cannot happen inside a region; count it
                // as a difference rather than hiding it.
                h = mix(h, u64::MAX);
            }
            for w in buf[..n].chunks(8) {
                let mut b = [0u8; 8];
                b[..w.len()].copy_from_slice(w);
                h = mix(h, u64::from_le_bytes(b));
            }
            off += n as u64;
        }
    }
    h
}

/// The host's physical memory, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Write all guest memory to `path`, as a sparse file laid out like guest
/// physical memory (region after region): pages of zeroes are holes.
/// Returns the bytes written. The VM must be paused: nothing may write
/// guest memory meanwhile.
///
/// Pages of anonymous memory that were never touched (neither present nor
/// swapped out, says /proc/self/pagemap) are zero and skipped without
/// reading them, which would fault each one in; runs of non-zero pages go
/// out in one write each.
pub fn save_to_file(mem: &GuestMemoryMmap, path: &std::path::Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const MAX_RUN: usize = 4 << 20;
    let err = |e: std::io::Error| Error::Memory(format!("{}: {e}", path.display()));
    // A new file renamed over the old one: a VM restored from the old file
    // maps it privately, and truncating it under that VM would fault it.
    let tmp = path.with_extension("vessel-tmp");
    let f = std::fs::File::create(&tmp).map_err(err)?;
    let zero = [0u8; PAGE];
    let mut pos = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("guest memory region: {e}")))?;
        // SAFETY: `host` is the start of the region's mapping of `len`
        // bytes, which `mem` keeps mapped while we hold it; the VM is
        // paused, so nothing writes it while the slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let untouched = if region.file_offset().is_none() {
            untouched_pages(host as usize, len / PAGE)
        } else {
            None
        };
        let mut run_start: Option<usize> = None;
        let flush = |start: usize, end: usize, written: &mut u64| -> Result<()> {
            f.write_all_at(&bytes[start..end], pos + start as u64).map_err(err)?;
            *written += (end - start) as u64;
            Ok(())
        };
        for page in 0..len / PAGE {
            let at = page * PAGE;
            let skip = untouched.as_ref().is_some_and(|u| u[page]) || bytes[at..at + PAGE] == zero;
            match (skip, run_start) {
                (true, Some(start)) => {
                    flush(start, at, &mut written)?;
                    run_start = None;
                }
                (false, Some(start)) if at - start >= MAX_RUN => {
                    flush(start, at, &mut written)?;
                    run_start = Some(at);
                }
                (false, None) => run_start = Some(at),
                _ => {}
            }
        }
        if let Some(start) = run_start {
            flush(start, len / PAGE * PAGE, &mut written)?;
        }
        pos += len as u64;
    }
    f.set_len(pos).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(written)
}

/// For `pages` pages of this process's anonymous memory from `addr`: which
/// were never touched (neither present nor swapped out), from
/// /proc/self/pagemap. `None` when pagemap cannot be read (say, no /proc
/// in a jail): then every page is read.
fn untouched_pages(addr: usize, pages: usize) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 4096];
    let first = (addr / 4096) as u64;
    while out.len() < pages {
        let n = (pages - out.len()).min(buf.len() / 8);
        f.read_exact_at(&mut buf[..n * 8], (first + out.len() as u64) * 8)
            .ok()?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            e & (PRESENT | SWAPPED) == 0
        }));
    }
    Some(out)
}

/// Guest memory of `size` bytes mapped from a file written by
/// [`save_to_file`], copy-on-write (`MAP_PRIVATE`): pages come in from the
/// file on first touch, and the guest's writes never reach the file. The
/// restore does not read the file, so it takes the same time at any size.
pub fn map_private(path: &std::path::Path, size: u64) -> Result<GuestMemoryMmap> {
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let err = |e: String| Error::Memory(format!("{}: {e}", path.display()));
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let len = meta.len();
    if len != size {
        return Err(err(format!(
            "the memory file has {len} bytes, the snapshot's machine {size}"
        )));
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut file_off = 0u64;
    for (start, rlen) in ram_ranges(size) {
        let region = MmapRegion::<()>::build(
            Some(FileOffset::from_arc(file.clone(), file_off)),
            rlen as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| err(format!("mapping {rlen} bytes: {e}")))?;
        regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| err("bad region".into()))?);
        file_off += rlen;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_split() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
        assert!(create(1 << 20).is_err());
    }

    /// Saving skips untouched and zero pages, writes long runs whole, and
    /// a restored (file-backed) memory saves again with every page, read
    /// or not since the restore.
    #[test]
    fn save_and_map_back() {
        let size = 64u64 << 20;
        let mem = create(size).unwrap();
        mem.write_slice(&[1; 4096], GuestAddress(0)).unwrap();
        mem.write_slice(&[0; 4096], GuestAddress(8192)).unwrap(); // touched, zero
        mem.write_slice(&vec![2u8; 5 << 20], GuestAddress(1 << 20)).unwrap(); // longer than a run
        mem.write_obj(3u8, GuestAddress(size - 1)).unwrap();
        let dir = std::env::temp_dir().join(format!("vessel-memsave-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let written = save_to_file(&mem, &a).unwrap();
        assert_eq!(written, 4096 + (5 << 20) + 4096);
        assert_eq!(std::fs::metadata(&a).unwrap().len(), size);
        let restored = map_private(&a, size).unwrap();
        assert_eq!(digest(&restored), digest(&mem));
        // Pages of the restored memory are the file's until touched.
        restored.write_obj(4u8, GuestAddress(4096)).unwrap();
        assert_eq!(save_to_file(&restored, &b).unwrap(), written + 4096);
        let again = map_private(&b, size).unwrap();
        assert_eq!(digest(&again), digest(&restored));
        assert_ne!(digest(&again), digest(&mem));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn digest_sees_one_changed_byte() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21), (GuestAddress(1 << 22), 4096)]).unwrap();
        let d0 = digest(&mem);
        assert_eq!(d0, digest(&mem));
        mem.write_obj(1u8, GuestAddress((1 << 22) + 4095)).unwrap();
        let d1 = digest(&mem);
        assert_ne!(d0, d1);
        mem.write_obj(0u8, GuestAddress((1 << 22) + 4095)).unwrap();
        assert_eq!(d0, digest(&mem));
        mem.write_obj(7u8, GuestAddress(12345)).unwrap();
        assert_ne!(d0, digest(&mem));
    }
}
