//! A raw image: the file's bytes are the disk's bytes.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use crate::probe::{looks_like_image, PROBE_LEN};
use crate::{check_range, check_write, BlockBackend, Error, Result};

pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
    id: String,
    /// Set when the format was not given: guest writes may not make the
    /// first sector look like an image format (QEMU's rule, [`crate::probe`]).
    /// The lock makes check-and-write of sector 0 atomic.
    first_sector_guard: Option<Mutex<()>>,
    /// Shared for a read-only disk, exclusive for a writable one.
    _lock: crate::ImageLock,
}

impl RawFile {
    /// Open a raw image whose format the user gave: every write goes through.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_inner(path, read_only, false)
    }

    /// Open a file taken for raw without the user saying so (by its file
    /// name): writes that would make its first sector look like an image
    /// format fail with [`Error::FirstSectorGuard`].
    pub fn open_probed(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_inner(path, read_only, true)
    }

    /// Whether writes to the first sector are guarded ([`RawFile::open_probed`]).
    pub fn guards_first_sector(&self) -> bool {
        self.first_sector_guard.is_some()
    }

    fn open_inner(path: &Path, read_only: bool, guard: bool) -> Result<Self> {
        let open_err = |source| Error::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(Error::Format(format!("{}: not a file or block device", path.display())));
        }
        // A block device's metadata says 0 bytes; its end is its size.
        let size = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
        let lock = crate::ImageLock::on(
            file.try_clone().map_err(open_err)?,
            path,
            crate::ImageFormat::Raw,
            !read_only,
        )?;
        // The id names the file (device and inode), like QEMU's default
        // serial is per drive: stable across runs, distinct between disks.
        let id = format!("vsl{:x}-{:x}", meta.dev(), meta.ino());
        Ok(RawFile {
            file,
            size,
            read_only,
            id,
            first_sector_guard: guard.then(|| Mutex::new(())),
            _lock: lock,
        })
    }

    /// The part of `[offset, offset+len)` after a guarded first sector
    /// (the whole range when there is no guard).
    fn past_guarded_head(&self, offset: u64, len: u64) -> (u64, u64) {
        if self.first_sector_guard.is_none() || offset >= PROBE_LEN as u64 {
            return (offset, len);
        }
        let end = offset + len;
        let start = end.min(PROBE_LEN as u64);
        (start, end - start)
    }

    /// Write `buf` at `offset` (< [`PROBE_LEN`]) unless the first sector
    /// would then look like an image format.
    fn guarded_write(&self, lock: &Mutex<()>, buf: &[u8], offset: u64) -> Result<()> {
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let len = (self.size.min(PROBE_LEN as u64)) as usize;
        let mut sector = vec![0u8; len];
        self.file
            .read_exact_at(&mut sector, 0)
            .map_err(|source| Error::Io { offset: 0, source })?;
        let start = offset as usize;
        let n = buf.len().min(len.saturating_sub(start));
        sector[start..start + n].copy_from_slice(&buf[..n]);
        if let Some(format) = looks_like_image(&sector) {
            return Err(Error::FirstSectorGuard(format));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| Error::Io { offset, source })
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a file descriptor we own, with plain integer
        // arguments; it touches no memory of ours.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Io { offset, source })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_write(self.read_only, offset, buf.len() as u64, self.size)?;
        if let (Some(lock), true) = (&self.first_sector_guard, offset < PROBE_LEN as u64) {
            return self.guarded_write(lock, buf, offset);
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| Error::Io { offset, source })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| Error::Io { offset: 0, source })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(self.read_only, offset, len, self.size)?;
        let (offset, len) = self.past_guarded_head(offset, len);
        // Discard is advisory: a file system that cannot punch holes simply
        // keeps the data.
        let _ = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_write(self.read_only, offset, len, self.size)?;
        // Zeroes could still complete a signature byte by byte: the part in
        // a guarded first sector is an ordinary (checked) write.
        let (rest, rest_len) = self.past_guarded_head(offset, len);
        if rest > offset {
            self.write_at(&vec![0u8; (rest - offset) as usize], offset)?;
        }
        let (offset, len) = (rest, rest_len);
        if len == 0 {
            return Ok(());
        }
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        // The file system cannot do it in place: write zeroes.
        let zeroes = vec![0u8; 64 * 1024];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(zeroes.len());
            self.write_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize, fill: u8) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![fill; len]).unwrap();
        f
    }

    #[test]
    fn reads_and_writes_round_trip() {
        let f = image(8192, 0xaa);
        let disk = RawFile::open(f.path(), false).unwrap();
        assert_eq!(disk.size(), 8192);
        disk.write_at(&[1, 2, 3, 4], 4096).unwrap();
        disk.flush().unwrap();
        let mut buf = [0u8; 6];
        disk.read_at(&mut buf, 4095).unwrap();
        assert_eq!(buf, [0xaa, 1, 2, 3, 4, 0xaa]);
    }

    #[test]
    fn refuses_out_of_range_and_overflowing_access() {
        let f = image(4096, 0);
        let disk = RawFile::open(f.path(), false).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(disk.read_at(&mut buf, 4095), Err(Error::OutOfRange { .. })));
        assert!(matches!(disk.write_at(&buf, u64::MAX), Err(Error::OutOfRange { .. })));
        assert!(matches!(disk.discard(u64::MAX, 2), Err(Error::OutOfRange { .. })));
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = image(4096, 7);
        let disk = RawFile::open(f.path(), true).unwrap();
        assert!(matches!(disk.write_at(&[0], 0), Err(Error::ReadOnly)));
        assert!(matches!(disk.write_zeroes(0, 512, true), Err(Error::ReadOnly)));
        let mut b = [0u8; 1];
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 7);
    }

    #[test]
    fn write_zeroes_zeroes_and_punches() {
        let f = image(3 * 65536, 0xff);
        let disk = RawFile::open(f.path(), false).unwrap();
        disk.write_zeroes(65536, 65536, true).unwrap();
        disk.write_zeroes(0, 512, false).unwrap();
        let mut buf = vec![0u8; 3 * 65536];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..65536].iter().all(|&b| b == 0xff));
        assert!(buf[65536..131072].iter().all(|&b| b == 0));
        assert!(buf[131072..].iter().all(|&b| b == 0xff));
        // The punched range no longer takes space (on file systems with holes).
        let blocks = std::fs::metadata(f.path()).unwrap().blocks();
        assert!(blocks * 512 <= 3 * 65536, "{blocks} blocks");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = RawFile::open(Path::new("/nonexistent/disk.img"), false).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }
}
