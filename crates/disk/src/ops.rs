//! Image operations behind `vessel disk`: create, info, snapshot, revert,
//! commit and convert. The image must not be open in a running VM (see
//! docs/DISKS.md for how live snapshots will work).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatCreateBuilder, ShallowMapping, Storage, StorageCreateOptions};

use crate::chain::{self, ImageFormat, Layer};
use crate::qcow2::{open_chain, Image};
use crate::{BackingRules, Error, Result};

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Open {
        path: path.display().to_string(),
        source,
    }
}

/// Create a qcow2 image. `backing` is the name written into the header; it
/// is resolved relative to the new image (and must obey the backing rules).
/// With a backing file and no size, the size is the backing file's.
pub fn create(path: &Path, size: Option<u64>, backing: Option<&str>, opts: &BackingRules) -> Result<u64> {
    let (size, backing) = match backing {
        Some(name) => {
            let target = chain::resolve_backing(path, name, opts)?;
            let layers = chain::walk(&target, opts)?;
            if layers.len() >= chain::MAX_CHAIN_DEPTH {
                return Err(Error::ChainTooDeep {
                    image: path.display().to_string(),
                    limit: chain::MAX_CHAIN_DEPTH,
                });
            }
            let bsize = layers[0].virtual_size()?;
            (size.unwrap_or(bsize), Some((name.to_string(), layers[0].format)))
        }
        None => (
            size.ok_or_else(|| Error::Format("a size is needed for an image without a backing file".into()))?,
            None,
        ),
    };
    if size > crate::header::MAX_VIRTUAL_SIZE {
        return Err(Error::Format(format!(
            "size {size} is larger than the limit {}",
            crate::header::MAX_VIRTUAL_SIZE
        )));
    }
    create_qcow2(path, size, backing.as_ref().map(|(n, f)| (n.as_str(), *f)))?;
    Ok(size)
}

fn create_qcow2(path: &Path, size: u64, backing: Option<(&str, ImageFormat)>) -> Result<()> {
    let storage = ImagoFile::create_open(StorageCreateOptions::new().filename(path)).map_err(io_err(path))?;
    let mut builder = Qcow2::<ImagoFile, Arc<Image>>::create_builder(storage).size(size);
    if let Some((name, format)) = backing {
        builder = builder.backing(name.to_string(), format.name().to_string());
    }
    if let Err(e) = builder.create() {
        let _ = std::fs::remove_file(path);
        return Err(io_err(path)(e));
    }
    // create() flushed; make it durable before anyone relies on it.
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

fn sync_dir(path: &Path) -> Result<()> {
    let mut dir = parent(path);
    if dir.as_os_str().is_empty() {
        dir = PathBuf::from(".");
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))
}

/// The directory part of `path` ("" for a bare file name, as in `chain`).
fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// One layer as `vessel disk info` shows it.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (like qemu-img's "disk size").
    pub allocated: u64,
    pub file_size: u64,
    pub cluster_size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The snapshot this layer holds, if it is one of ours.
    pub snapshot: Option<String>,
}

/// The chain from `path` down, top first. `format`: the format of `path`
/// (`None`: its file name's, [`ImageFormat::from_file_name`]).
pub fn info(path: &Path, format: Option<ImageFormat>, opts: &BackingRules) -> Result<Vec<LayerInfo>> {
    let layers = chain::walk_as(path, format, opts)?;
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let meta = std::fs::metadata(&l.path).map_err(io_err(&l.path))?;
            Ok(LayerInfo {
                path: l.path.clone(),
                format: l.format,
                virtual_size: l.virtual_size()?,
                allocated: meta.blocks() * 512,
                file_size: meta.len(),
                cluster_size: l.header.as_ref().map(|h| h.cluster_size()),
                backing_file: l.header.as_ref().and_then(|h| h.backing_file.clone()),
                backing_format: l.header.as_ref().and_then(|h| h.backing_format.clone()),
                snapshot: if i == 0 { None } else { snapshot_name(&l.path) },
            })
        })
        .collect()
}

// ---- Snapshots -------------------------------------------------------------
//
// A snapshot NAME of `dir/vm.qcow2` is the layer `dir/vm@NAME.qcow2`: taking
// it renames the current top to that name and puts a new empty overlay under
// the old name, so whatever refers to `vm.qcow2` keeps working. The name is
// in the file name only, so qemu-img sees ordinary backing chains.

/// Is `name` usable as a snapshot name?
pub fn valid_snapshot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn split_name(path: &Path) -> Option<(String, String)> {
    let file = path.file_name()?.to_str()?;
    match file.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => Some((stem.to_string(), format!(".{ext}"))),
        _ => Some((file.to_string(), String::new())),
    }
}

/// The snapshot a layer file holds, from its name `STEM@NAME.EXT`.
pub fn snapshot_name(path: &Path) -> Option<String> {
    let (stem, _) = split_name(path)?;
    let (_, name) = stem.rsplit_once('@')?;
    valid_snapshot_name(name).then(|| name.to_string())
}

fn snapshot_path(top: &Path, name: &str) -> Result<PathBuf> {
    let (stem, ext) = split_name(top).ok_or_else(|| Error::Format(format!("{}: no file name", top.display())))?;
    Ok(parent(top).join(format!("{stem}@{name}{ext}")))
}

fn temp_path(top: &Path) -> PathBuf {
    let file = top
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(top).join(format!(".{file}.vessel-new"))
}

/// A snapshot in a chain.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub name: String,
    pub path: PathBuf,
    /// When the layer was frozen (its last modification).
    pub mtime: i64,
    pub allocated: u64,
}

/// The snapshots in the chain of `top`, newest first.
pub fn snapshots(top: &Path, format: Option<ImageFormat>, opts: &BackingRules) -> Result<Vec<SnapshotInfo>> {
    Ok(info(top, format, opts)?
        .into_iter()
        .filter_map(|l| {
            let name = l.snapshot?;
            let mtime = std::fs::metadata(&l.path).map(|m| m.mtime()).unwrap_or(0);
            Some(SnapshotInfo {
                name,
                path: l.path,
                mtime,
                allocated: l.allocated,
            })
        })
        .collect())
}

fn top_qcow2(top: &Path, format: Option<ImageFormat>, opts: &BackingRules) -> Result<Vec<Layer>> {
    let layers = chain::walk_as(top, format, opts)?;
    if layers[0].format != ImageFormat::Qcow2 {
        return Err(Error::Unsupported(format!(
            "{}: snapshots need a qcow2 image; convert it with `vessel disk convert --format qcow2`",
            top.display()
        )));
    }
    Ok(layers)
}

/// Make `top` an empty overlay on `backing_name` (a file next to it), by an
/// atomic rename of a new file over it.
fn replace_with_overlay(top: &Path, size: u64, backing_name: &str, backing_format: ImageFormat) -> Result<()> {
    let tmp = temp_path(top);
    let _ = std::fs::remove_file(&tmp);
    create_qcow2(&tmp, size, Some((backing_name, backing_format)))?;
    if let Err(e) = std::fs::rename(&tmp, top) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(top)(e));
    }
    sync_dir(top)
}

/// Take snapshot `name` of `top` (which no VM may have open). Returns the
/// file that now holds the snapshot.
pub fn snapshot(top: &Path, name: &str, format: Option<ImageFormat>, opts: &BackingRules) -> Result<PathBuf> {
    if !valid_snapshot_name(name) {
        return Err(Error::Format(format!(
            "invalid snapshot name {name:?}: use up to 64 letters, digits, '.', '_' or '-'"
        )));
    }
    let layers = top_qcow2(top, format, opts)?;
    if layers
        .iter()
        .skip(1)
        .any(|l| snapshot_name(&l.path).as_deref() == Some(name))
    {
        return Err(Error::Format(format!("a snapshot named {name:?} already exists")));
    }
    let _lock = crate::ImageLock::acquire(top, ImageFormat::Qcow2, true)?;
    let snap = snapshot_path(top, name)?;
    if snap.symlink_metadata().is_ok() {
        return Err(Error::Format(format!("{} already exists", snap.display())));
    }
    let size = layers[0].virtual_size()?;
    let backing_name = snap
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    // New overlay first (it names a file that does not exist yet), then
    // two renames: a crash between them leaves `top` missing and both
    // files present under names that say what to do (docs/DISKS.md).
    let tmp = temp_path(top);
    let _ = std::fs::remove_file(&tmp);
    create_qcow2(&tmp, size, Some((&backing_name, ImageFormat::Qcow2)))?;
    if let Err(e) = std::fs::rename(top, &snap) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(top)(e));
    }
    if let Err(e) = std::fs::rename(&tmp, top) {
        let _ = std::fs::rename(&snap, top);
        return Err(io_err(top)(e));
    }
    sync_dir(top)?;
    Ok(snap)
}

/// Give a restore or clone of a VM snapshot its own writable layer: create
/// `overlay`, a new empty qcow2 image whose backing file is `frozen` (a
/// layer frozen into a VM snapshot). `overlay` must be in the same
/// directory as `frozen`, so that the backing name is a plain file name
/// and the default backing rules follow it; it must not exist yet. The
/// frozen layer must not be open for writing anywhere (its shared lock is
/// taken while the overlay is made). Returns the overlay's virtual size.
pub fn clone_overlay(frozen: &Path, overlay: &Path, opts: &BackingRules) -> Result<u64> {
    let layers = top_qcow2(frozen, Some(ImageFormat::Qcow2), opts)?;
    if layers.len() >= chain::MAX_CHAIN_DEPTH {
        return Err(Error::ChainTooDeep {
            image: overlay.display().to_string(),
            limit: chain::MAX_CHAIN_DEPTH,
        });
    }
    if parent(frozen) != parent(overlay) {
        return Err(Error::Format(format!(
            "{}: a clone's overlay must be in the directory of its frozen layer {}",
            overlay.display(),
            frozen.display()
        )));
    }
    let name = frozen
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Format(format!("{}: no file name", frozen.display())))?;
    if overlay.symlink_metadata().is_ok() {
        return Err(Error::Format(format!("{} already exists", overlay.display())));
    }
    let _shared = crate::lock::lock_chain(&layers, false)?;
    let size = layers[0].virtual_size()?;
    create_qcow2(overlay, size, Some((&name, ImageFormat::Qcow2)))?;
    sync_dir(overlay)?;
    Ok(size)
}

/// Revert `top` to snapshot `name`: a new empty top on that snapshot; the
/// snapshots taken after it are deleted. Returns the deleted files.
pub fn revert(top: &Path, name: &str, format: Option<ImageFormat>, opts: &BackingRules) -> Result<Vec<PathBuf>> {
    let layers = top_qcow2(top, format, opts)?;
    let k = layers
        .iter()
        .skip(1)
        .position(|l| snapshot_name(&l.path).as_deref() == Some(name))
        .map(|i| i + 1)
        .ok_or_else(|| Error::Format(format!("no snapshot named {name:?} in the chain of {}", top.display())))?;
    let _lock = crate::ImageLock::acquire(top, ImageFormat::Qcow2, true)?;
    let target = &layers[k];
    // Snapshot files live next to the top, so the new top names it by its
    // file name; otherwise reuse the name the layer above used.
    let backing_name = match target.path.file_name() {
        Some(f) if parent(&target.path) == parent(top) => f.to_string_lossy().into_owned(),
        _ => layers[k - 1]
            .header
            .as_ref()
            .and_then(|h| h.backing_file.clone())
            .ok_or_else(|| Error::Format("chain without a backing name".into()))?,
    };
    replace_with_overlay(top, layers[0].virtual_size()?, &backing_name, target.format)?;
    let mut dropped = Vec::new();
    for l in &layers[1..k] {
        // Only our own snapshot files are deleted; anything else stays.
        if snapshot_name(&l.path).is_some() && parent(&l.path) == parent(top) {
            std::fs::remove_file(&l.path).map_err(io_err(&l.path))?;
            dropped.push(l.path.clone());
        }
    }
    Ok(dropped)
}

/// Progress of a long operation: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Merge the top layer of `top` into its backing file and empty the top.
/// Returns the number of bytes copied down.
pub fn commit(top: &Path, format: Option<ImageFormat>, opts: &BackingRules, progress: Progress) -> Result<u64> {
    let layers = top_qcow2(top, format, opts)?;
    if layers.len() < 2 {
        return Err(Error::Format(format!(
            "{} has no backing file to commit into",
            top.display()
        )));
    }
    let size = layers[0].virtual_size()?;
    if layers[1].virtual_size()? < size {
        return Err(Error::Unsupported("committing into a smaller backing file".into()));
    }
    let backing_name = layers[0]
        .header
        .as_ref()
        .and_then(|h| h.backing_file.clone())
        .unwrap_or_default();
    // The top and the layer written into are ours alone; the rest shared.
    let _locks = layers
        .iter()
        .enumerate()
        .map(|(i, l)| crate::ImageLock::acquire(&l.path, l.format, i <= 1))
        .collect::<Result<Vec<_>>>()?;
    let mut copied = 0;
    {
        let lower = open_chain(&layers[1..], true)?;
        let upper = open_chain(&layers, false)?;
        let mut buf = Vec::new();
        let mut off = 0;
        while off < size {
            let (mapping, len) = upper
                .get_shallow_mapping(off, (size - off).min(4 << 20))
                .map_err(|source| Error::Io { offset: off, source })?;
            let len = len.max(1).min(size - off);
            let mine = match mapping {
                ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => true,
                ShallowMapping::Zero { explicit, .. } => explicit,
                ShallowMapping::Eof { .. } => break,
                _ => false,
            };
            if mine {
                buf.resize(len as usize, 0);
                upper
                    .read(&mut buf[..], off)
                    .map_err(|source| Error::Io { offset: off, source })?;
                lower
                    .write(&buf[..], off)
                    .map_err(|source| Error::Io { offset: off, source })?;
                copied += len;
            }
            off += len;
            progress(off, size);
        }
        lower.flush().map_err(|source| Error::Io { offset: 0, source })?;
        lower.sync().map_err(|source| Error::Io { offset: 0, source })?;
    }
    replace_with_overlay(top, size, &backing_name, layers[1].format)?;
    Ok(copied)
}

/// Copy the whole disk of `src` (through its chain; its format is
/// `src_format` or its file name's) into a new standalone image `dst` of
/// `format`. Zero ranges stay unallocated.
pub fn convert(
    src: &Path,
    src_format: Option<ImageFormat>,
    dst: &Path,
    format: ImageFormat,
    opts: &BackingRules,
    progress: Progress,
) -> Result<()> {
    let layers = chain::walk_as(src, src_format, opts)?;
    let _locks = crate::lock::lock_chain(&layers, false)?;
    let input = open_chain(&layers, false)?;
    let size = input.size();
    let result = (|| {
        let out: Box<dyn crate::BlockBackend> = match format {
            ImageFormat::Raw => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dst)
                    .map_err(io_err(dst))?;
                f.set_len(size).map_err(io_err(dst))?;
                drop(f);
                Box::new(crate::RawFile::open(dst, false)?)
            }
            ImageFormat::Qcow2 => {
                create_qcow2(dst, size, None)?;
                Box::new(crate::Qcow2Disk::open(dst, &crate::OpenOptions::default(), opts)?)
            }
        };
        copy(&input, &*out, size, progress)?;
        out.flush()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy(input: &FormatAccess<ImagoFile>, out: &dyn crate::BlockBackend, size: u64, progress: Progress) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK) as usize;
        input
            .read(&mut buf[..n], off)
            .map_err(|source| Error::Io { offset: off, source })?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_at(&buf[..n], off)?;
        }
        off += n as u64;
        progress(off, size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names() {
        for ok in ["a", "before-upgrade", "v1.2_x", &"x".repeat(64)] {
            assert!(valid_snapshot_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", "a@b", &"x".repeat(65), "é"] {
            assert!(!valid_snapshot_name(bad), "{bad}");
        }
        assert_eq!(snapshot_name(Path::new("/d/vm@s1.qcow2")).as_deref(), Some("s1"));
        assert_eq!(snapshot_name(Path::new("vm@s1")).as_deref(), Some("s1"));
        assert_eq!(snapshot_name(Path::new("/d/vm.qcow2")), None);
        assert_eq!(snapshot_name(Path::new("/d/vm@.qcow2")), None);
        assert_eq!(
            snapshot_path(Path::new("/d/vm.qcow2"), "s1").unwrap(),
            Path::new("/d/vm@s1.qcow2")
        );
        assert_eq!(
            snapshot_path(Path::new("vm.qcow2"), "s1").unwrap(),
            Path::new("vm@s1.qcow2")
        );
    }
}
