//! A qcow2 image with its backing chain, as a [`BlockBackend`].
//!
//! The qcow2 engine is imago (sync mode); see docs/DISKS.md for why. We
//! walk and check the chain ourselves ([`crate::chain`]) and hand imago each
//! layer with its backing already opened, so imago never opens a file on its
//! own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
    layers: Vec<Layer>,
    /// Every file of the chain: the top exclusive when writable, the rest shared.
    _locks: Vec<crate::ImageLock>,
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
            layers,
            _locks: locks,
            read_only: opts.read_only,
            id: format!("vsl{:x}-{:x}", meta.dev(), meta.ino()),
        })
    }

    /// The chain, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn path(&self) -> PathBuf {
        self.layers[0].path.clone()
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
        check_write(self.read_only, offset, buf.len() as u64, self.size)?;
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
        check_write(self.read_only, offset, len, self.size)?;
        let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
        // Advisory: an image that cannot discard keeps its data.
        let _ = image.discard_to_any(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        check_write(self.read_only, offset, len, self.size)?;
        self.image().write_zeroes(offset, len).map_err(io(offset))
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}
