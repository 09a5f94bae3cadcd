//! The VM's configuration in Firecracker's shapes: the bodies of
//! `PUT /machine-config`, `/boot-source`, `/drives/{id}` and the rest, and
//! the whole of it as `GET /vm/config` returns it and `--config-file` reads
//! it. Vessel's own additions (`accel`, a drive's `format`) are optional
//! fields in the same objects. Every body is checked here, before anything
//! acts on it: unknown fields, wrong types and out-of-range values are
//! errors with a message that names the field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_CMDLINE;

/// Firecracker's limit on vCPUs (its swagger: 1..=32).
pub const MAX_VCPUS: u8 = 32;
/// The largest guest memory accepted, in MiB (x86-64 below the 4 GiB hole
/// and above it; the machine refuses what it cannot map).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Longest drive, interface or VM id, as in Firecracker.
pub const MAX_ID_LEN: usize = 64;

/// `PUT /machine-config` and the machine part of `GET /vm/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default = "huge_pages_none")]
    pub huge_pages: String,
    /// Firecracker's CPU templates are Intel/AMD CPUID masks for KVM; none
    /// is offered here (null or "None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Vessel: the CPU engine, `emu`, `kvm` or `auto` (the default: kvm
    /// when /dev/kvm can run ordinary guests, emu otherwise).
    #[serde(default = "accel_auto")]
    pub accel: String,
    /// Vessel: with the emu engine, run hot guest code through x86emu's
    /// JIT tier (default true; false: the interpreter only).
    #[serde(default = "jit_on")]
    pub jit: bool,
}

fn huge_pages_none() -> String {
    "None".into()
}

fn accel_auto() -> String {
    "auto".into()
}

fn jit_on() -> bool {
    vmm::machine::JIT_DEFAULT
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: huge_pages_none(),
            cpu_template: None,
            accel: accel_auto(),
            jit: jit_on(),
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<String>,
    pub cpu_template: Option<String>,
    pub accel: Option<String>,
    pub jit: Option<bool>,
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(format!(
                "vcpu_count must be between 1 and {MAX_VCPUS}, not {}",
                self.vcpu_count
            ));
        }
        if self.smt {
            return Err("smt is not supported: Vessel's vCPUs have one thread per core".into());
        }
        if self.mem_size_mib == 0 || self.mem_size_mib > MAX_MEM_MIB {
            return Err(format!(
                "mem_size_mib must be between 1 and {MAX_MEM_MIB}, not {}",
                self.mem_size_mib
            ));
        }
        if self.huge_pages != "None" {
            return Err(format!(
                "huge_pages {:?} is not supported (only \"None\")",
                self.huge_pages
            ));
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => {}
            Some(t) => return Err(format!("cpu_template {t:?} is not supported (only \"None\")")),
        }
        self.accel.parse::<vmm::Accel>().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// This configuration with `u`'s fields applied.
    pub fn patched(&self, u: MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: u.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: u.smt.unwrap_or(self.smt),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: u.huge_pages.unwrap_or_else(|| self.huge_pages.clone()),
            cpu_template: u.cpu_template.or_else(|| self.cpu_template.clone()),
            accel: u.accel.unwrap_or_else(|| self.accel.clone()),
            jit: u.jit.unwrap_or(self.jit),
        }
    }
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Firecracker's rate limiter object. Vessel does not limit rates; it
/// accepts a limiter only when it limits nothing (no buckets), so a client
/// that sends an empty one still works and one that asks for a limit hears
/// that it is not applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<serde_json::Value>,
}

fn check_rate_limiter(what: &str, r: &Option<RateLimiter>) -> Result<(), String> {
    match r {
        Some(r)
            if r.bandwidth.as_ref().is_some_and(|v| !v.is_null()) || r.ops.as_ref().is_some_and(|v| !v.is_null()) =>
        {
            Err(format!("{what}: rate limiting is not supported by Vessel"))
        }
        _ => Ok(()),
    }
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default = "cache_unsafe")]
    pub cache_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default = "io_sync")]
    pub io_engine: String,
    /// Vessel: the image format, `raw` (the default, as Firecracker's
    /// drives are raw files) or `qcow2`. Never guessed from the contents.
    #[serde(default = "format_raw")]
    pub format: String,
}

fn cache_unsafe() -> String {
    "Unsafe".into()
}
fn io_sync() -> String {
    "Sync".into()
}
fn format_raw() -> String {
    "raw".into()
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    pub path_on_host: Option<PathBuf>,
    pub rate_limiter: Option<RateLimiter>,
}

/// Ids (drives, interfaces, the VM) are 1 to 64 of `[A-Za-z0-9_-]`: they
/// become parts of paths and kernel arguments.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{what} {id:?} is invalid: use 1 to {MAX_ID_LEN} letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

impl Drive {
    pub fn validate(&self) -> Result<(), String> {
        check_id("drive_id", &self.drive_id)?;
        if self.path_on_host.as_os_str().is_empty() {
            return Err("path_on_host is empty".into());
        }
        match self.cache_type.as_str() {
            "Unsafe" | "Writeback" => {}
            t => return Err(format!("cache_type {t:?} must be \"Unsafe\" or \"Writeback\"")),
        }
        match self.io_engine.as_str() {
            "Sync" | "Async" => {}
            t => return Err(format!("io_engine {t:?} must be \"Sync\" or \"Async\"")),
        }
        if let Some(p) = &self.partuuid {
            if p.is_empty() || p.len() > 64 || !p.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                return Err(format!("partuuid {p:?} is not a partition UUID"));
            }
        }
        self.is_qcow2()?;
        check_rate_limiter("rate_limiter", &self.rate_limiter)
    }

    /// Whether the drive is a qcow2 image (else raw).
    pub fn is_qcow2(&self) -> Result<bool, String> {
        match self.format.as_str() {
            "raw" => Ok(false),
            "qcow2" => Ok(true),
            f => Err(format!("format {f:?} must be \"raw\" or \"qcow2\"")),
        }
    }
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimiter>,
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterface {
    pub fn validate(&self) -> Result<(), String> {
        check_id("iface_id", &self.iface_id)?;
        // IFNAMSIZ is 16 with the terminating NUL.
        if self.host_dev_name.is_empty()
            || self.host_dev_name.len() > 15
            || self.host_dev_name.contains(['/', '\0', ' '])
        {
            return Err(format!(
                "host_dev_name {:?} is not a network interface name (1 to 15 characters, no '/' or spaces)",
                self.host_dev_name
            ));
        }
        if let Some(mac) = &self.guest_mac {
            crate::device_args::parse_mac(mac).map_err(|e| format!("guest_mac: {e}"))?;
        }
        check_rate_limiter("rx_rate_limiter", &self.rx_rate_limiter)?;
        check_rate_limiter("tx_rate_limiter", &self.tx_rate_limiter)
    }
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`: a virtio-vsock device with Firecracker's hybrid
/// Unix-socket back end (docs/VSOCK.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Deprecated in Firecracker, accepted and ignored there as here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context ID: 3 or more (0-2 are reserved).
    pub guest_cid: u32,
    /// The host socket that stands for the guest; host listeners for
    /// guest-initiated connections are `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

impl Vsock {
    pub fn validate(&self) -> Result<(), String> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(format!(
                "guest_cid {}: must be at least 3 (0, 1 and 2 are reserved) and below 2^32 - 1",
                self.guest_cid
            ));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err("uds_path is empty".into());
        }
        // sun_path holds 108 bytes; `_<port>` adds up to 11.
        if self.uds_path.as_os_str().len() > 96 {
            return Err(format!(
                "uds_path {}: longer than 96 bytes (a Unix socket path, with `_<port>` added, must fit 107)",
                self.uds_path.display()
            ));
        }
        Ok(())
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

/// `PUT /serial`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    pub serial_out_path: PathBuf,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    pub state: String,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default = "snapshot_full")]
    pub snapshot_type: String,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    /// Firecracker's old target-version field; only this Vessel's format
    /// can be written, so a version other than ours is refused.
    #[serde(default)]
    pub version: Option<String>,
}

fn snapshot_full() -> String {
    "Full".into()
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: String,
    pub backend_path: PathBuf,
}

/// One entry of `network_overrides`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
    /// Vessel: a MAC address of the clone's own for the device.
    #[serde(default)]
    pub guest_mac: Option<String>,
}

/// `vsock_override` of `PUT /snapshot/load` (Firecracker's): the restored
/// vsock device listens on this socket instead of the snapshot's, so that
/// clones of one snapshot can run side by side.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    /// Firecracker's older form of `mem_backend` (a file).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Vessel: the engine to restore under (default: the snapshot's).
    #[serde(default)]
    pub accel: Option<String>,
}

impl SnapshotLoad {
    /// The memory file, from whichever form the request used.
    pub fn mem_file(&self) -> Result<PathBuf, String> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => Err("give mem_backend or mem_file_path, not both".into()),
            (Some(p), None) => Ok(p.clone()),
            (None, Some(b)) if b.backend_type == "File" => Ok(b.backend_path.clone()),
            (None, Some(b)) => Err(format!(
                "mem_backend type {:?} is not supported (only \"File\")",
                b.backend_type
            )),
            (None, None) => Err("mem_backend is missing".into()),
        }
    }
}

/// The whole configuration: `GET /vm/config`, and the file that
/// `firecracker --config-file` reads. Sections Vessel does not have
/// (balloon, MMDS) must be absent or null.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    pub entropy: Option<Entropy>,
    #[serde(default)]
    pub logger: Option<Logger>,
    #[serde(default)]
    pub metrics: Option<Metrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Serial>,
    #[serde(default, skip_serializing)]
    pub balloon: Option<serde_json::Value>,
    #[serde(default)]
    pub vsock: Option<Vsock>,
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
}

/// The kernel command line Firecracker's clients expect when they give
/// none: ours (serial console, i8042 reset) plus `pci=off`, since the
/// machine has no PCI.
pub fn default_boot_args() -> String {
    format!("{DEFAULT_CMDLINE} pci=off")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_checks() {
        let m: MachineConfig = serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
        assert_eq!(m.accel, "auto");
        assert!(m.jit, "a Firecracker client that never names `jit` gets the JIT");
        m.validate().unwrap();
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 2}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 2, "mem_size_mib": 1, "x": 1}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 300, "mem_size_mib": 1}"#).is_err());
        for bad in [
            r#"{"vcpu_count": 0, "mem_size_mib": 1}"#,
            r#"{"vcpu_count": 33, "mem_size_mib": 1}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "smt": true}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "accel": "fast"}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 1, "cpu_template": "T2"}"#,
        ] {
            let m: MachineConfig = serde_json::from_str(bad).unwrap();
            assert!(m.validate().is_err(), "{bad}");
        }
        let p = m.patched(MachineConfigUpdate {
            mem_size_mib: Some(64),
            ..Default::default()
        });
        assert_eq!((p.vcpu_count, p.mem_size_mib), (2, 64));
    }

    #[test]
    fn drive_checks() {
        let d: Drive =
            serde_json::from_str(r#"{"drive_id": "rootfs", "path_on_host": "/x.ext4", "is_root_device": true}"#)
                .unwrap();
        d.validate().unwrap();
        assert!(!d.is_qcow2().unwrap());
        let mut bad = d.clone();
        bad.drive_id = "a/b".into();
        assert!(bad.validate().is_err());
        let mut bad = d.clone();
        bad.format = "vmdk".into();
        assert!(bad.validate().is_err());
        let mut bad = d.clone();
        bad.rate_limiter = Some(RateLimiter {
            bandwidth: Some(serde_json::json!({"size": 1, "refill_time": 1})),
            ops: None,
        });
        assert!(bad.validate().is_err());
        let mut ok = d;
        ok.rate_limiter = Some(RateLimiter::default());
        ok.validate().unwrap();
    }

    #[test]
    fn vsock_checks() {
        let v: Vsock = serde_json::from_str(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap();
        v.validate().unwrap();
        let v: Vsock =
            serde_json::from_str(r#"{"vsock_id": "vsock0", "guest_cid": 42, "uds_path": "/tmp/v.sock"}"#).unwrap();
        v.validate().unwrap();
        for bad in [
            r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#,
            r#"{"guest_cid": 4294967295, "uds_path": "/tmp/v.sock"}"#,
            r#"{"guest_cid": 3, "uds_path": ""}"#,
        ] {
            let v: Vsock = serde_json::from_str(bad).unwrap();
            assert!(v.validate().is_err(), "{bad}");
        }
        let long = format!(r#"{{"guest_cid": 3, "uds_path": "/{}"}}"#, "x".repeat(100));
        assert!(serde_json::from_str::<Vsock>(&long).unwrap().validate().is_err());
        assert!(serde_json::from_str::<Vsock>(r#"{"guest_cid": -1, "uds_path": "/v"}"#).is_err());
        assert!(serde_json::from_str::<Vsock>(r#"{"guest_cid": 3, "uds_path": "/v", "x": 1}"#).is_err());
    }

    #[test]
    fn full_config_round_trips() {
        let text = r#"{
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}],
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "AA:FC:00:00:00:01"}],
            "balloon": null, "vsock": null, "logger": null, "metrics": null, "mmds-config": null
        }"#;
        let c: FullVmConfig = serde_json::from_str(text).unwrap();
        let again: FullVmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
        assert!(serde_json::from_str::<FullVmConfig>(r#"{"bogus": 1}"#).is_err());
    }
}
