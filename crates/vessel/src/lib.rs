//! Vessel's binary as a library: the command line, Firecracker's API and
//! command line, the control layer that every request goes through, and
//! the runtime directories of named VMs.

pub mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod console_hub;
pub mod control;
pub mod device_args;
pub mod disk_cmd;
pub mod exec;
pub mod failover;
pub mod fc;
pub mod firecracker;
pub mod jail;
pub mod launch;
pub mod logging;
pub mod metrics;
pub mod migration;
pub mod runtime;
pub mod signals;
pub mod snapshot_text;
