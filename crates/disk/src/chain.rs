//! Backing chains: which file an image's backing-file name refers to, under
//! rules the user can see (docs/DISKS.md), and the list of layers from the
//! top image down to its base.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::header::{self, Header};
use crate::{BackingRules, Error, Result};

/// The deepest backing chain we follow (QEMU has no fixed limit; a chain
/// deeper than this is a loop we did not see or a hostile image).
pub const MAX_CHAIN_DEPTH: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// One image in a chain.
#[derive(Clone, Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub format: Format,
    /// The qcow2 header; `None` for raw files.
    pub header: Option<Header>,
}

impl Layer {
    /// Open one image file (no backing) and read what it is.
    pub fn probe(path: &Path, format: Option<Format>) -> Result<(Layer, File)> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        let is_qcow2 = header::is_qcow2(&file)?;
        let format = match format {
            Some(f) => f,
            None if is_qcow2 => Format::Qcow2,
            None => Format::Raw,
        };
        let header = match format {
            Format::Qcow2 => Some(Header::read(&file).map_err(|e| e.in_file(path))?),
            Format::Raw => None,
        };
        Ok((
            Layer {
                path: path.to_path_buf(),
                format,
                header,
            },
            file,
        ))
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> Result<u64> {
        match &self.header {
            Some(h) => Ok(h.size),
            None => std::fs::metadata(&self.path)
                .map(|m| m.len())
                .map_err(|source| Error::Open {
                    path: self.path.display().to_string(),
                    source,
                }),
        }
    }
}

/// Where a backing-file name written in `image` points, or an error if the
/// rules forbid following it.
///
/// Rules: a relative name is taken relative to the directory holding the
/// image (as QEMU does). Absolute names and names with `..` components are
/// refused unless `rules.allow_absolute_backing` is set.
pub fn resolve_backing(image: &Path, name: &str, opts: &BackingRules) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::Corrupt(format!("{}: empty backing file name", image.display())));
    }
    if name.contains("://") || name.starts_with("json:") {
        return Err(Error::Backing {
            image: image.display().to_string(),
            backing: name.to_string(),
            reason: "protocol and json: backing names are not supported".into(),
        });
    }
    let p = Path::new(name);
    let leaves = p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir));
    if leaves && !opts.allow_absolute_backing {
        return Err(Error::Backing {
            image: image.display().to_string(),
            backing: name.to_string(),
            reason: "absolute backing paths and `..` are refused; pass --allow-absolute-backing to follow them".into(),
        });
    }
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let dir = image.parent().unwrap_or(Path::new(""));
    Ok(dir.join(p))
}

fn parse_format(image: &Path, name: Option<&str>) -> Result<Option<Format>> {
    match name {
        None => Ok(None),
        Some("raw") => Ok(Some(Format::Raw)),
        Some("qcow2") => Ok(Some(Format::Qcow2)),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: backing format {other:?}",
            image.display()
        ))),
    }
}

/// The chain from `top` down to its base, top first.
pub fn walk(top: &Path, opts: &BackingRules) -> Result<Vec<Layer>> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((top.to_path_buf(), None));
    while let Some((path, format)) = next.take() {
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep {
                image: top.display().to_string(),
                limit: MAX_CHAIN_DEPTH,
            });
        }
        let (layer, file) = Layer::probe(&path, format)?;
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        if !seen.insert((meta.dev(), meta.ino())) {
            return Err(Error::BackingLoop {
                image: path.display().to_string(),
            });
        }
        if let Some(h) = &layer.header {
            if let Some(name) = &h.backing_file {
                let backing = resolve_backing(&path, name, opts)?;
                let format = parse_format(&path, h.backing_format.as_deref())?;
                next = Some((backing, format));
            }
        }
        layers.push(layer);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_relative_to_the_image() {
        let o = BackingRules::default();
        let allow = BackingRules {
            allow_absolute_backing: true,
        };
        let img = Path::new("/images/vm/top.qcow2");
        assert_eq!(
            resolve_backing(img, "base.qcow2", &o).unwrap(),
            Path::new("/images/vm/base.qcow2")
        );
        assert_eq!(
            resolve_backing(img, "sub/b.raw", &o).unwrap(),
            Path::new("/images/vm/sub/b.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("top.qcow2"), "b", &o).unwrap(),
            Path::new("b")
        );
        for refused in ["/etc/shadow", "../base.qcow2", "a/../../b"] {
            assert!(
                matches!(resolve_backing(img, refused, &o), Err(Error::Backing { .. })),
                "{refused}"
            );
        }
        assert_eq!(resolve_backing(img, "/etc/b", &allow).unwrap(), Path::new("/etc/b"));
        assert_eq!(
            resolve_backing(img, "../b", &allow).unwrap(),
            Path::new("/images/vm/../b")
        );
        for never in ["", "nbd://host/x", "json:{}"] {
            assert!(resolve_backing(img, never, &allow).is_err(), "{never}");
        }
    }
}
