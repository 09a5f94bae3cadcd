//! Image locks, so that two VMs (or a VM and `qemu-img`) never write one
//! image at once: open file description (OFD) locks on the bytes QEMU uses
//! (block/file-posix.c), so Vessel and QEMU see each other's locks.
//!
//! QEMU's protocol: each block permission `i` (consistent read 0, write 1,
//! write-unchanged 2, resize 3) has two bytes. A holder of the permission
//! takes a shared lock on byte `100 + i`; a holder that does not let others
//! have it takes a shared lock on byte `200 + i`. Before using an image, a
//! user tests (F_OFD_GETLK with a write lock) byte `200 + i` for every
//! permission it wants and byte `100 + i` for every one it does not share.
//!
//! Vessel takes the bytes a QEMU 7.2 VM takes for the same drive (read
//! from /proc/locks with `qemu-system-x86_64 -drive ...`):
//! - a **writable** raw image: consistent read and write, not sharing write
//!   (bytes 100, 101, 201); a writable qcow2 image also resize, not shared
//!   (100, 101, 103, 201, 203): the only writer;
//! - a **read-only** raw image: consistent read, not sharing write (100,
//!   201); a read-only qcow2 image or backing file also does not share
//!   resize (100, 201, 203): any number of readers, and no writer.
//!
//! So a second writer, Vessel or QEMU, is refused ("Failed to get "write"
//! lock" in QEMU's words), and so is a writer of an image others read.
//!
//! The locks last while the returned [`ImageLock`] (its file descriptor) is
//! open, and go away with the process, however it ends.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, ImageFormat, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;
const ALL: u32 = READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// (permissions held, permissions shared) for a use of an image.
fn permissions(format: ImageFormat, writable: bool) -> (u32, u32) {
    let (perm, unshared) = match (format, writable) {
        (ImageFormat::Raw, true) => (READ | WRITE, WRITE),
        (ImageFormat::Raw, false) => (READ, WRITE),
        (ImageFormat::Qcow2, true) => (READ | WRITE | RESIZE, WRITE | RESIZE),
        (ImageFormat::Qcow2, false) => (READ, WRITE | RESIZE),
    };
    (perm, ALL & !unshared)
}
/// How long a conflicting lock is retried (see [`ImageLock::on`]).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_millis(200);
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The locks held on one image file.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

fn flock(kind: i32, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value
    // (l_pid must be 0 for OFD locks), and the fields we use are set below.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = kind as libc::c_short;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = start;
    f.l_len = 1;
    f
}

fn fcntl_lock(file: &File, cmd: i32, f: &mut libc::flock) -> std::io::Result<()> {
    // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) the `flock`
    // we pass by pointer, which lives for the call; the fd is ours.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, f as *mut libc::flock) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether some other open file description holds a lock on byte `at`.
fn held_elsewhere(file: &File, at: i64) -> std::io::Result<bool> {
    let mut f = flock(libc::F_WRLCK, at);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut f)?;
    Ok(f.l_type != libc::F_UNLCK as libc::c_short)
}

impl ImageLock {
    /// Lock the image of `format` at `path` for writing (`writable`) or
    /// reading. A conflicting user is an [`Error::Locked`] naming the image.
    pub fn acquire(path: &Path, format: ImageFormat, writable: bool) -> Result<ImageLock> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::on(file, path, format, writable)
    }

    /// Take the locks on an already opened `file` (which the lock keeps).
    ///
    /// A conflict is retried for a moment before it is an error: a child
    /// that a thread of this process forks holds a copy of every open
    /// descriptor, and with it the OFD locks of an image just closed,
    /// until it execs.
    pub fn on(file: File, path: &Path, format: ImageFormat, writable: bool) -> Result<ImageLock> {
        let start = std::time::Instant::now();
        loop {
            match Self::try_lock(&file, path, format, writable) {
                Err(Error::Locked { .. }) if start.elapsed() < RETRY_FOR => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(ImageLock { _file: file }),
            }
        }
    }

    fn try_lock(file: &File, path: &Path, format: ImageFormat, writable: bool) -> Result<()> {
        let (perm, shared) = permissions(format, writable);
        let io = |source| Error::Open {
            path: path.display().to_string(),
            source,
        };
        let lock = |at| fcntl_lock(file, libc::F_OFD_SETLK, &mut flock(libc::F_RDLCK, at));
        // As QEMU: take our bytes, then test for the others' (both sides
        // of a race then see each other).
        for i in 0..4 {
            let bit = 1u32 << i;
            if perm & bit != 0 {
                lock(PERM_BASE + i64::from(i)).map_err(|e| locked_or(e, path, NAMES[i as usize]))?;
            }
            if shared & bit == 0 {
                lock(SHARED_BASE + i64::from(i)).map_err(|e| locked_or(e, path, NAMES[i as usize]))?;
            }
        }
        for i in 0..4 {
            let bit = 1u32 << i;
            let name = NAMES[i as usize];
            if perm & bit != 0 && held_elsewhere(file, SHARED_BASE + i64::from(i)).map_err(io)? {
                return Err(Error::Locked {
                    path: path.display().to_string(),
                    reason: format!("another user does not share the \"{name}\" permission Vessel needs"),
                });
            }
            if shared & bit == 0 && held_elsewhere(file, PERM_BASE + i64::from(i)).map_err(io)? {
                return Err(Error::Locked {
                    path: path.display().to_string(),
                    reason: format!("another user holds the \"{name}\" permission"),
                });
            }
        }
        Ok(())
    }
}

/// A lock that could not be taken: someone holds a write lock on the byte.
fn locked_or(e: std::io::Error, path: &Path, name: &str) -> Error {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Error::Locked {
            path: path.display().to_string(),
            reason: format!("cannot lock the \"{name}\" byte"),
        },
        _ => Error::Open {
            path: path.display().to_string(),
            source: e,
        },
    }
}

/// Lock every file of a chain (top first): the top for writing when
/// `writable`, the backing files for reading.
pub fn lock_chain(layers: &[crate::Layer], writable: bool) -> Result<Vec<ImageLock>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| ImageLock::acquire(&l.path, l.format, writable && i == 0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        // OFD locks conflict between open file descriptions, even in one
        // process: enough to test the protocol here.
        for f in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let w = ImageLock::acquire(&p, f, true).unwrap();
            let e = ImageLock::acquire(&p, f, true).unwrap_err();
            assert!(matches!(e, Error::Locked { .. }), "{e}");
            assert!(e.to_string().contains("img"), "{e}");
            assert!(ImageLock::acquire(&p, f, false).is_err());
            drop(w);
            let r1 = ImageLock::acquire(&p, f, false).unwrap();
            let r2 = ImageLock::acquire(&p, f, false).unwrap();
            assert!(ImageLock::acquire(&p, f, true).is_err());
            drop((r1, r2));
            ImageLock::acquire(&p, f, true).unwrap();
        }
    }
}
