//! Vessel's machine: guest memory, Linux boot, legacy devices, and the
//! engines that run vCPUs. Devices are plain structs with serde state.

pub mod acpi;
pub mod boot;
pub mod cpu_features;
pub mod devices;
pub mod emu;
pub mod engine;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod persist;
pub mod seccomp;
pub(crate) mod vcpu_loop;
pub mod virtio;

#[cfg(test)]
mod long_uptime_tests;
#[cfg(test)]
mod lost_ticks_tests;
#[cfg(test)]
mod port_io_tests;

pub use engine::{Accel, EngineKind};
pub use machine::{Machine, MachineConfig, RunOutcome, VmHandle};

/// Errors from building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("initrd {path}: {reason}")]
    Initrd { path: String, reason: String },
    #[error("command line: {0}")]
    Cmdline(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
}

pub type Result<T> = std::result::Result<T, Error>;
