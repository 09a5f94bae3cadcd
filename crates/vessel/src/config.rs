//! The machine file (`--config vm.json`) and how it combines with flags.
//!
//! ```json
//! { "kernel": "vmlinux", "initrd": "initramfs.cpio.gz",
//!   "cmdline": "console=ttyS0 reboot=k", "mem": "512M", "cpus": 2, "accel": "emu",
//!   "jit": true }
//! ```
//! Relative paths are relative to the file. Unknown keys are an error.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::RunArgs;
use crate::device_args::{DiskEntry, NetEntry};

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
pub const DEFAULT_MEM: u64 = 256 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineFile {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    mem: Option<Size>,
    cpus: Option<u32>,
    accel: Option<String>,
    jit: Option<bool>,
    #[serde(default)]
    disks: Vec<DiskEntry>,
    #[serde(default)]
    nets: Vec<NetEntry>,
    rng: Option<bool>,
}

/// A size as a number of bytes or a string like "256M".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Debug)]
pub struct Settings {
    pub machine: vmm::MachineConfig,
    pub accel: String,
}

/// Parse "256M", "1G", "512K", or a plain number of MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 256M or 1G"))?;
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

fn load_file(path: &Path) -> Result<MachineFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("machine file {}: {e}", path.display()))?;
    let mut f: MachineFile =
        serde_json::from_str(&text).map_err(|e| format!("machine file {}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rebase = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    f.kernel = f.kernel.map(rebase);
    f.initrd = f.initrd.map(rebase);
    for d in &mut f.disks {
        d.path = rebase(std::mem::take(&mut d.path));
    }
    Ok(f)
}

/// Combine the machine file (if any) with the flags; flags win.
pub fn resolve(args: RunArgs) -> Result<Settings, String> {
    let file = match &args.config {
        Some(p) => load_file(p)?,
        None => MachineFile::default(),
    };
    let kernel = args
        .kernel
        .or(file.kernel)
        .ok_or("no kernel given (--kernel or \"kernel\" in --config)")?;
    let mem = match (args.mem, file.mem) {
        (Some(m), _) => m,
        (None, Some(Size::Bytes(b))) => b,
        (None, Some(Size::Text(t))) => parse_size(&t)?,
        (None, None) => DEFAULT_MEM,
    };
    // Devices from the file come first, then those from flags.
    let mut disks: Vec<vmm::machine::DiskConfig> = file
        .disks
        .iter()
        .map(|d| vmm::machine::DiskConfig {
            path: d.path.clone(),
            read_only: d.readonly,
            allow_absolute_backing: d.allow_absolute_backing,
            format: d.format,
        })
        .collect();
    disks.extend(args.disks);
    let mut nets = file
        .nets
        .iter()
        .map(NetEntry::to_config)
        .collect::<Result<Vec<_>, _>>()?;
    nets.extend(args.nets);
    Ok(Settings {
        machine: vmm::MachineConfig {
            kernel,
            initrd: args.initrd.or(file.initrd),
            cmdline: args
                .cmdline
                .or(file.cmdline)
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            mem_size: mem,
            cpus: args.cpus.or(file.cpus).unwrap_or(1),
            disks,
            nets,
            rng: args.rng || file.rng.unwrap_or(false),
            console_output: args.console_output,
            console_output_limit: vmm::virtio::console::DEFAULT_OUTPUT_LIMIT,
            vsock: args.vsock,
            jit: args.jit.or(file.jit).unwrap_or(vmm::machine::JIT_DEFAULT),
        },
        accel: args.accel.or(file.accel).unwrap_or_else(|| "auto".to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            config: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            mem: None,
            cpus: None,
            accel: None,
            jit: None,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            console_output: None,
            vsock: None,
            api_sock: None,
            name: None,
            detach: false,
            restore: None,
            vsock_uds: None,
            paused: false,
            incoming: None,
            standby: None,
            manual_takeover: false,
            no_seccomp: false,
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn file_and_flags() {
        let dir = std::env::temp_dir().join(format!("vessel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.json");
        std::fs::write(&f, r#"{"kernel": "k", "initrd": "/abs/i", "mem": "512M", "cpus": 2}"#).unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        let s = resolve(a).unwrap();
        assert_eq!(s.machine.kernel, dir.join("k"));
        assert_eq!(s.machine.initrd, Some(PathBuf::from("/abs/i")));
        assert_eq!(s.machine.mem_size, 512 << 20);
        assert_eq!(s.machine.cpus, 2);
        assert_eq!(s.machine.cmdline, DEFAULT_CMDLINE);
        // Flags win over the file.
        let mut a = args();
        a.config = Some(f.clone());
        a.cpus = Some(1);
        a.mem = Some(128 << 20);
        let s = resolve(a).unwrap();
        assert_eq!((s.machine.cpus, s.machine.mem_size), (1, 128 << 20));
        // Unknown keys and bad JSON are errors, not silently ignored.
        std::fs::write(&f, r#"{"kernel": "k", "memory": 5}"#).unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        assert!(resolve(a).unwrap_err().contains("unknown field"));
        std::fs::write(&f, "{").unwrap();
        let mut a = args();
        a.config = Some(f);
        assert!(resolve(a).is_err());
        assert!(resolve(args()).unwrap_err().contains("no kernel"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
