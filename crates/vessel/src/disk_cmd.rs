//! `vessel disk`: create, inspect, snapshot and convert disk images
//! (docs/DISKS.md). Exit codes: 0 success; 2 an error; `check` returns 2
//! for corruption and 3 for leaks left unrepaired (as `qemu-img check`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use disk::ops::{self, LayerInfo};
use disk::{BackingRules, ImageFormat};

#[derive(clap::Args)]
pub struct DiskArgs {
    /// Follow backing-file names that are absolute paths or contain `..`.
    #[arg(long, global = true)]
    allow_absolute_backing: bool,
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a qcow2 image, optionally on top of a backing image.
    Create {
        image: PathBuf,
        /// Virtual size, e.g. 10G, 512M or bytes [default: the backing file's].
        #[arg(long, value_parser = parse_bytes)]
        size: Option<u64>,
        /// Backing image, named relative to the new image's directory.
        #[arg(long)]
        backing: Option<String>,
    },
    /// Show the whole backing chain: formats, virtual and allocated sizes.
    Info {
        image: PathBuf,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Freeze the image as snapshot NAME and continue in a new overlay.
    Snapshot {
        image: PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// List the snapshots in the image's chain, newest first.
    Snapshots {
        image: PathBuf,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Go back to snapshot NAME, dropping everything written after it.
    Revert {
        image: PathBuf,
        #[arg(long)]
        to: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Merge the top layer down into its backing file.
    Commit {
        image: PathBuf,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Copy an image (with its whole chain) into a standalone image.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        /// The format of DST.
        #[arg(long, value_parser = parse_format, default_value = "qcow2")]
        format: ImageFormat,
        /// The format of SRC [default: from its file name: .qcow2 is qcow2, anything else raw].
        #[arg(long, value_parser = parse_format)]
        src_format: Option<ImageFormat>,
    },
    /// Look for leaked clusters and corruption.
    Check {
        image: PathBuf,
        /// Repair leaks (refused if the image is corrupt).
        #[arg(long)]
        repair: bool,
    },
}

/// The image's format, when its file name does not say it.
#[derive(clap::Args)]
struct FormatArg {
    /// raw or qcow2 [default: from the file name: .qcow2 is qcow2, anything
    /// else raw; the file's contents never decide (docs/DISKS.md)].
    #[arg(long, value_parser = parse_format)]
    format: Option<ImageFormat>,
}

fn parse_format(s: &str) -> Result<ImageFormat, String> {
    s.parse::<ImageFormat>().map_err(|e| e.to_string())
}

/// A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size like 10G"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn run(args: DiskArgs) -> ExitCode {
    let opts = BackingRules {
        allow_absolute_backing: args.allow_absolute_backing,
    };
    match dispatch(args.command, &opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn dispatch(cmd: DiskCommand, opts: &BackingRules) -> disk::Result<ExitCode> {
    match cmd {
        DiskCommand::Create { image, size, backing } => {
            let size = ops::create(&image, size, backing.as_deref(), opts)?;
            println!("created {} ({})", image.display(), human(size));
        }
        DiskCommand::Info { image, format } => print_info(&ops::info(&image, format.format, opts)?),
        DiskCommand::Snapshot { image, name, format } => {
            let file = ops::snapshot(&image, &name, format.format, opts)?;
            println!("snapshot {name} is {}", file.display());
        }
        DiskCommand::Snapshots { image, format } => {
            let snaps = ops::snapshots(&image, format.format, opts)?;
            if snaps.is_empty() {
                println!("no snapshots");
            }
            for s in snaps {
                println!("{}\t{}\t{}", s.name, s.path.display(), human(s.allocated));
            }
        }
        DiskCommand::Revert { image, to, format } => {
            let dropped = ops::revert(&image, &to, format.format, opts)?;
            println!("{} reverted to snapshot {to}", image.display());
            for d in dropped {
                println!("removed {}", d.display());
            }
        }
        DiskCommand::Commit { image, format } => {
            let bar = progress_bar("commit");
            let copied = ops::commit(&image, format.format, opts, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!("committed {} into the backing file", human(copied));
        }
        DiskCommand::Convert {
            src,
            dst,
            format,
            src_format,
        } => {
            let bar = progress_bar("convert");
            ops::convert(&src, src_format, &dst, format, opts, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!("wrote {} ({})", dst.display(), format.name());
        }
        DiskCommand::Check { image, repair } => return check(&image, repair),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(layers: &[LayerInfo]) {
    for (i, l) in layers.iter().enumerate() {
        let role = match (&l.snapshot, i) {
            (Some(name), _) => format!("  [snapshot {name}]"),
            (None, 0) => String::new(),
            (None, _) => "  [backing]".to_string(),
        };
        println!("image: {}{role}", l.path.display());
        println!("  format: {}", l.format.name());
        println!("  virtual size: {} ({} bytes)", human(l.virtual_size), l.virtual_size);
        println!("  allocated size: {} ({} bytes)", human(l.allocated), l.allocated);
        if let Some(cs) = l.cluster_size {
            println!("  cluster size: {cs}");
        }
        if let Some(b) = &l.backing_file {
            let f = l.backing_format.as_deref().unwrap_or("probed");
            println!("  backing file: {b} ({f})");
        }
    }
    let total: u64 = layers.iter().map(|l| l.allocated).sum();
    println!("chain: {} layer(s), {} allocated in all", layers.len(), human(total));
}

fn check(image: &Path, repair: bool) -> disk::Result<ExitCode> {
    let r = disk::check::check(image, repair)?;
    for m in &r.messages {
        println!("{m}");
    }
    if r.corruptions > 0 {
        println!("{} errors were found on the image.", r.corruptions);
    }
    if r.leaks > 0 {
        println!("{} leaked clusters were found on the image.", r.leaks);
    }
    if r.leaks_fixed > 0 {
        println!("{} leaked clusters were repaired.", r.leaks_fixed);
    }
    if r.corruptions == 0 && r.leaks == r.leaks_fixed {
        println!("No errors were found on the image.");
    }
    println!(
        "{}/{} = {:.2}% allocated, image end offset: {}",
        r.allocated_clusters,
        r.total_clusters,
        100.0 * r.allocated_clusters as f64 / r.total_clusters.max(1) as f64,
        r.image_end
    );
    Ok(if r.corruptions > 0 {
        ExitCode::from(2)
    } else if r.leaks > r.leaks_fixed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
