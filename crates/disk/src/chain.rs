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

/// An image file's format. Vessel never takes it from bytes a guest can
/// write: it is what the user says, or else what the file name says
/// ([`ImageFormat::from_file_name`]); docs/DISKS.md, "Formats".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The format a file name implies: a name ending in `.qcow2` (in any
    /// case) is a qcow2 image, anything else is raw.
    pub fn from_file_name(path: &Path) -> ImageFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("qcow2") => ImageFormat::Qcow2,
            _ => ImageFormat::Raw,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<ImageFormat> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::Unsupported(format!(
                "image format {other:?} (known: raw, qcow2)"
            ))),
        }
    }
}

/// One image in a chain.
#[derive(Clone, Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub format: ImageFormat,
    /// The qcow2 header; `None` for raw files.
    pub header: Option<Header>,
}

impl Layer {
    /// Open one image file (no backing) as `format`, or, without one, as
    /// its file name says ([`ImageFormat::from_file_name`]). The bytes in
    /// the file never choose the format: a file whose name says raw but
    /// which starts like a qcow2 image is refused rather than followed
    /// (its first sector may be a guest's doing; docs/DISKS.md).
    pub fn probe(path: &Path, format: Option<ImageFormat>) -> Result<(Layer, File)> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.display().to_string(),
            source,
        })?;
        let format = match format {
            Some(f) => f,
            None => {
                let by_name = ImageFormat::from_file_name(path);
                if by_name == ImageFormat::Raw && header::is_qcow2(&file)? {
                    return Err(Error::FormatMismatch {
                        path: path.display().to_string(),
                    });
                }
                by_name
            }
        };
        let header = match format {
            ImageFormat::Qcow2 => Some(Header::read(&file).map_err(|e| e.in_file(path))?),
            ImageFormat::Raw => None,
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

fn parse_format(image: &Path, name: Option<&str>) -> Result<Option<ImageFormat>> {
    match name {
        None => Ok(None),
        Some("raw") => Ok(Some(ImageFormat::Raw)),
        Some("qcow2") => Ok(Some(ImageFormat::Qcow2)),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: backing format {other:?}",
            image.display()
        ))),
    }
}

/// The chain from `top` down to its base, top first; the format of `top`
/// comes from its file name.
pub fn walk(top: &Path, opts: &BackingRules) -> Result<Vec<Layer>> {
    walk_as(top, None, opts)
}

/// [`walk`] with `top` opened as `format` (`None`: by its file name).
/// Backing files take the format their image's header records, or else
/// the one their file name implies.
pub fn walk_as(top: &Path, format: Option<ImageFormat>, opts: &BackingRules) -> Result<Vec<Layer>> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((top.to_path_buf(), format));
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
