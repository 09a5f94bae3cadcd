//! Virtual disks: image files turned into block devices.
//!
//! A [`BlockBackend`] is what the virtio-blk device talks to. It works in
//! bytes at byte offsets; the device checks that requests are in range and
//! sector-aligned before they get here, and backends check again.

pub mod chain;
pub mod check;
pub mod fuzzing;
pub mod header;
pub mod lock;
pub mod ops;
mod prealloc;
mod probe;
mod qcow2;
mod raw;

use std::path::Path;

pub use chain::{ImageFormat, Layer, MAX_CHAIN_DEPTH};
pub use lock::ImageLock;
pub use probe::looks_like_image;
pub use qcow2::Qcow2Disk;
pub use raw::RawFile;

/// Errors from opening or accessing a disk image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("I/O error at offset {offset}: {source}")]
    Io { offset: u64, source: std::io::Error },
    #[error("access of {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("{0}")]
    Format(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{image}: backing file {backing:?} not followed: {reason}")]
    Backing {
        image: String,
        backing: String,
        reason: String,
    },
    #[error("{image}: backing chain loops back to this image")]
    BackingLoop { image: String },
    #[error("{image}: backing chain is deeper than {limit} images")]
    ChainTooDeep { image: String, limit: usize },
    #[error(
        "{path}: its name says raw (it does not end in .qcow2) but it starts with a qcow2 header; \
         Vessel never lets bytes a guest may have written choose a format: name the format \
         (--disk ...,format=qcow2, or `vessel disk --format qcow2`; for a backing file, record it \
         with `qemu-img rebase -u -F qcow2`) or rename the image"
    )]
    FormatMismatch { path: String },
    #[error(
        "write to the first sector refused: it would make this raw image look like a {0} image \
         (its format was not given, so QEMU's rule for probed raw images applies; docs/DISKS.md)"
    )]
    FirstSectorGuard(&'static str),
    #[error(
        "{path}: the image is in use ({reason}): another VM or QEMU has it open, and an image \
         is written by one user at a time (read-only users may share it)"
    )]
    Locked { path: String, reason: String },
}

impl Error {
    /// Name the file in a corruption message that lacks it.
    pub(crate) fn in_file(self, path: &Path) -> Error {
        match self {
            Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", path.display())),
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
            e => e,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A block device backed by an image. Shared between threads (a device's
/// queues, a snapshot writer), so every method takes `&self`.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes as the guest sees it.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Fill `buf` from `offset`. Holes read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make every completed write durable (fdatasync or better).
    fn flush(&self) -> Result<()>;
    /// The range need not keep its data; reads may return zeroes or old data.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// The range must read back as zeroes. `may_unmap` lets the backend
    /// free the space (punch a hole) instead of writing zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// A stable identifier for the guest (virtio-blk GET_ID, 20 bytes max).
    fn id(&self) -> String;
    /// Freeze the current top layer as the read-only snapshot layer `name`
    /// and carry on writing a new, empty overlay on it, while the disk
    /// stays open (docs/DISKS.md, "Snapshots of a running VM"). The caller
    /// holds off guest I/O (the VM is paused). Returns the frozen layer's
    /// path, or `None` for a backend that is not frozen (raw files: the
    /// user manages their contents, docs/SNAPSHOTS.md).
    fn freeze_top(&self, _name: &str) -> Result<Option<std::path::PathBuf>> {
        Ok(None)
    }
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// The image's format. `None`: the file name decides (`.qcow2` is
    /// qcow2, anything else raw), and a raw image so opened refuses guest
    /// writes that would make its first sector look like an image format
    /// (QEMU's rule for probed raw images). Never the file's contents.
    pub format: Option<ImageFormat>,
}

/// Which backing-file names in an image may be followed (docs/DISKS.md,
/// "Backing files"). The default follows only relative names that stay in
/// or below the image's directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackingRules {
    /// Also follow absolute names and names with `..` components.
    pub allow_absolute_backing: bool,
}

/// Open an image file as a block device: a qcow2 image with its backing
/// chain under the default [`BackingRules`], or a raw file; the format is
/// `opts.format` or else the file name's (see [`OpenOptions::format`]).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockBackend>> {
    open_with(path, opts, &BackingRules::default())
}

/// [`open`] with explicit backing-file rules.
pub fn open_with(path: &Path, opts: &OpenOptions, rules: &BackingRules) -> Result<Box<dyn BlockBackend>> {
    match opts.format {
        Some(ImageFormat::Qcow2) => Ok(Box::new(Qcow2Disk::open(path, opts, rules)?)),
        Some(ImageFormat::Raw) => Ok(Box::new(RawFile::open(path, opts.read_only)?)),
        None => match chain::Layer::probe(path, None)?.0.format {
            ImageFormat::Qcow2 => Ok(Box::new(Qcow2Disk::open(path, opts, rules)?)),
            ImageFormat::Raw => Ok(Box::new(RawFile::open_probed(path, opts.read_only)?)),
        },
    }
}

/// Check that a write-like access (write, discard, write-zeroes) may go
/// ahead: the disk is writable and the range lies inside it.
pub fn check_write(read_only: bool, offset: u64, len: u64, size: u64) -> Result<()> {
    if read_only {
        return Err(Error::ReadOnly);
    }
    check_range(offset, len, size)
}

/// Check that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}
