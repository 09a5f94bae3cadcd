//! A qcow2 image with its backing chain, as a [`BlockBackend`].
//!
//! The qcow2 engine is imago (sync mode); see docs/DISKS.md for why. We
//! walk and check the chain ourselves ([`crate::chain`]) and hand imago each
//! layer with its backing already opened, so imago never opens a file on its
//! own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};

use crate::chain::{self, ImageFormat, Layer};
use crate::{check_range, check_write, BackingRules, BlockBackend, Error, OpenOptions, Result};

pub(crate) type Image = FormatAccess<ImagoFile>;

fn imago_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::Corrupt(format!("{}: {e}", path.display()))
        } else {
            Error::Open {
                path: path.display().to_string(),
                source: e,
            }
        }
    }
}

/// Open one layer through imago, on top of an already opened backing.
pub(crate) fn open_layer(layer: &Layer, writable: bool, backing: Option<Arc<Image>>) -> Result<Image> {
    let err = imago_err(&layer.path);
    let storage = ImagoFile::open(StorageOpenOptions::new().filename(&layer.path).write(writable)).map_err(&err)?;
    Ok(match layer.format {
        ImageFormat::Raw => FormatAccess::new(
            Raw::builder(storage)
                .write(writable)
                .open(DenyImplicitOpenGate::default())
                .map_err(&err)?,
        ),
        ImageFormat::Qcow2 => FormatAccess::new(
            Qcow2::<ImagoFile, Arc<Image>>::builder(storage)
                .write(writable)
                .backing(backing)
                .open(DenyImplicitOpenGate::default())
                .map_err(&err)?,
        ),
    })
}

/// Before writing to an image, make sure its metadata is consistent: imago
/// trusts the refcounts when it allocates, and a hostile refcount structure
/// sent it into unbounded recursion (found by the fuzzer). Leaks are fine.
/// An image that [`crate::check`] cannot check (more than 2^27 clusters,
/// tables shared too many times) is refused too: unchecked, it is exactly
/// the image that could send imago into that recursion.
fn refuse_corrupt(path: &Path) -> Result<()> {
    match crate::check::check(path, false) {
        Ok(r) if r.corruptions > 0 => Err(Error::Corrupt(format!(
            "{}: {} errors in its metadata (first: {}); it can only be opened read-only. \
             `vessel disk check` lists them; `qemu-img check -r all` can repair them",
            path.display(),
            r.corruptions,
            r.messages.first().map_or("", |m| m.as_str()),
        ))),
        Ok(_) => Ok(()),
        Err(Error::Unsupported(why)) => Err(Error::Unsupported(format!(
            "{why}; an image Vessel cannot check is opened read-only only (its refcounts \
             decide where writes go). `qemu-img convert` it to a qcow2 image with larger clusters"
        ))),
        Err(e) => Err(e),
    }
}

/// Open a chain (top first, as [`chain::walk`] returns it); only the top may be writable.
pub(crate) fn open_chain(layers: &[Layer], writable: bool) -> Result<Image> {
    if let (true, Some(top)) = (writable, layers.first()) {
        if top.format == ImageFormat::Qcow2 {
            refuse_corrupt(&top.path)?;
            crate::prealloc::preallocate_l2(&top.path)?;
        }
    }
    let mut below: Option<Arc<Image>> = None;
    let last = layers.len().saturating_sub(1);
    for (i, layer) in layers.iter().enumerate().rev() {
        let image = open_layer(layer, writable && i == 0, below.take())?;
        if i == 0 {
            return Ok(image);
        }
        debug_assert!(i <= last);
        below = Some(Arc::new(image));
    }
    Err(Error::Format("empty chain".into()))
}

pub struct Qcow2Disk {
    image: RwLock<Image>,
    /// The chain, top first, and the locks on every file of it: the top
    /// exclusive when writable, the rest shared. It changes when the top
    /// is frozen ([`BlockBackend::freeze_top`]).
    chain: Mutex<(Vec<Layer>, Vec<crate::ImageLock>)>,
    rules: BackingRules,
    /// A freeze renamed the top but could not reopen the new chain: the
    /// open image is now the frozen layer, which must never be written.
    stuck: AtomicBool,
    size: u64,
    read_only: bool,
    id: String,
}

impl Qcow2Disk {
    pub fn open(path: &Path, opts: &OpenOptions, rules: &BackingRules) -> Result<Self> {
        let layers = chain::walk_as(path, Some(ImageFormat::Qcow2), rules)?;
        // Locked before anything writes (the check's repair, L2 pre-allocation).
        let locks = crate::lock::lock_chain(&layers, !opts.read_only)?;
        let image = open_chain(&layers, !opts.read_only)?;
        let meta = std::fs::metadata(path).map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Qcow2Disk {
            size: image.size(),
            image: RwLock::new(image),
            chain: Mutex::new((layers, locks)),
            rules: *rules,
            stuck: AtomicBool::new(false),
            read_only: opts.read_only,
            id: format!("vsl{:x}-{:x}", meta.dev(), meta.ino()),
        })
    }

    /// The chain, top first.
    pub fn layers(&self) -> Vec<Layer> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    pub fn path(&self) -> PathBuf {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).0[0].path.clone()
    }

    fn writable(&self) -> bool {
        !self.read_only && !self.stuck.load(Ordering::Acquire)
    }

    fn image(&self) -> std::sync::RwLockReadGuard<'_, Image> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn io(offset: u64) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io { offset, source }
}

impl BlockBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.image().read(buf, offset).map_err(io(offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_write(!self.writable(), offset, buf.len() as u64, self.size)?;
        self.image().write(buf, offset).map_err(io(offset))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let image = self.image();
        image.flush().map_err(io(0))?;
        image.sync().map_err(io(0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(!self.writable(), offset, len, self.size)?;
        let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
        // Advisory: an image that cannot discard keeps its data.
        let _ = image.discard_to_any(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        check_write(!self.writable(), offset, len, self.size)?;
        self.image().write_zeroes(offset, len).map_err(io(offset))
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    /// The live snapshot of docs/DISKS.md: with I/O held off (the image's
    /// write lock), flush, drop this disk's own locks, run
    /// [`crate::ops::snapshot`] (which takes the top's exclusive lock
    /// itself), then reopen the chain on the new top with its locks. Between
    /// dropping and retaking the locks another process could take them;
    /// then the reopen fails with the lock error.
    fn freeze_top(&self, name: &str) -> Result<Option<PathBuf>> {
        if !self.writable() {
            return Err(Error::ReadOnly);
        }
        let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
        image.flush().map_err(io(0))?;
        image.sync().map_err(io(0))?;
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let top = chain.0[0].path.clone();
        chain.1.clear();
        let frozen = match crate::ops::snapshot(&top, name, Some(ImageFormat::Qcow2), &self.rules) {
            Ok(f) => f,
            Err(e) => {
                // Nothing was renamed: the old chain is still ours.
                chain.1 = crate::lock::lock_chain(&chain.0, true)?;
                return Err(e);
            }
        };
        let reopen = || -> Result<_> {
            let layers = chain::walk_as(&top, Some(ImageFormat::Qcow2), &self.rules)?;
            let locks = crate::lock::lock_chain(&layers, true)?;
            let new = open_chain(&layers, true)?;
            Ok((layers, locks, new))
        };
        match reopen() {
            Ok((layers, locks, new)) => {
                *image = new;
                *chain = (layers, locks);
                Ok(Some(frozen))
            }
            Err(e) => {
                self.stuck.store(true, Ordering::Release);
                Err(e)
            }
        }
    }
}
