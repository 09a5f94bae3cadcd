//! One control layer for the VM: every request, whether from the HTTP API,
//! a signal or the command line, is a typed [`VmmAction`] that one
//! [`Controller`] handles on the VMM's main thread, against an explicit
//! state machine ([`VmState`]). Modelled on Firecracker's `VmmAction` and
//! its pre-boot and runtime controllers.

mod controller;
mod state;

pub(crate) use controller::apply_network_overrides;
pub use controller::{open_output, ConsoleWiring, Controller, Exit};
pub use state::{StateError, VmState};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::fc;

/// What the VMM's main loop receives: a request (from the API, a signal or
/// the binary itself) with where to send the answer, or news that the VM's
/// run ended.
pub enum Msg {
    Request {
        action: VmmAction,
        reply: Option<oneshot::Sender<Result<VmmData, ActionError>>>,
    },
    /// A signal: SIGUSR1 pause, SIGUSR2 resume, SIGTERM/SIGINT stop.
    Signal(i32),
    Exit(Exit),
    /// Work another thread needs done with the controller (a migration
    /// building or starting its VM), run on the main thread.
    Call(Box<dyn FnOnce(&mut Controller) + Send>),
}

/// What a client asks of the VMM.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVersion,
    GetFullConfig,
    GetMachineConfig,
    PutMachineConfig(fc::MachineConfig),
    PatchMachineConfig(fc::MachineConfigUpdate),
    PutBootSource(fc::BootSource),
    PutDrive(fc::Drive),
    PatchDrive(fc::DriveUpdate),
    PutNetworkInterface(fc::NetworkInterface),
    PatchNetworkInterface(fc::NetworkInterfaceUpdate),
    PutEntropy(fc::Entropy),
    PutVsock(fc::Vsock),
    PutLogger(fc::Logger),
    PutMetrics(fc::Metrics),
    PutSerial(fc::Serial),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    CreateSnapshot(fc::SnapshotCreate),
    LoadSnapshot(fc::SnapshotLoad),
    /// `PUT /migration/receive`: listen for an incoming migration.
    MigrationReceive(crate::migration::ReceiveRequest),
    /// `PUT /migration/send`: migrate this VM away.
    MigrationSend(crate::migration::SendRequest),
    /// `GET /migration`.
    GetMigration,
    /// `PUT /migration/cancel`.
    CancelMigration,
    /// `PUT /failover/standby`: hold a primary's checkpoints.
    FailoverStandby(crate::failover::StandbyRequest),
    /// `PUT /failover/protect`: checkpoint this VM to a standby.
    FailoverProtect(crate::failover::ProtectRequest),
    /// `GET /failover`.
    GetFailover,
    /// `PUT /failover/takeover`: the standby takes over now.
    FailoverTakeover,
    /// Stop the VM cleanly (SIGTERM, SIGINT, `vessel stop`): vCPUs out,
    /// devices stopped, disks flushed, then the process exits 0.
    Stop,
}

impl VmmAction {
    /// Whether the action only configures a VM that has not started yet.
    pub fn is_pre_boot(&self) -> bool {
        matches!(
            self,
            VmmAction::PutMachineConfig(_)
                | VmmAction::PatchMachineConfig(_)
                | VmmAction::PutBootSource(_)
                | VmmAction::PutDrive(_)
                | VmmAction::PutNetworkInterface(_)
                | VmmAction::PutEntropy(_)
                | VmmAction::PutVsock(_)
                | VmmAction::PutLogger(_)
                | VmmAction::PutMetrics(_)
                | VmmAction::PutSerial(_)
        )
    }

    /// Firecracker's metric group and counter name for this request.
    pub fn metric(&self) -> (&'static str, &'static str) {
        match self {
            VmmAction::GetInstanceInfo => ("get_api_requests", "instance_info_count"),
            VmmAction::GetVersion => ("get_api_requests", "vmm_version_count"),
            VmmAction::GetFullConfig => ("get_api_requests", "vm_config_count"),
            VmmAction::GetMachineConfig => ("get_api_requests", "machine_cfg_count"),
            VmmAction::PutMachineConfig(_) => ("put_api_requests", "machine_cfg"),
            VmmAction::PatchMachineConfig(_) => ("patch_api_requests", "machine_cfg"),
            VmmAction::PutBootSource(_) => ("put_api_requests", "boot_source"),
            VmmAction::PutDrive(_) => ("put_api_requests", "drive"),
            VmmAction::PatchDrive(_) => ("patch_api_requests", "drive"),
            VmmAction::PutNetworkInterface(_) => ("put_api_requests", "network"),
            VmmAction::PatchNetworkInterface(_) => ("patch_api_requests", "network"),
            VmmAction::PutEntropy(_) => ("put_api_requests", "entropy"),
            VmmAction::PutVsock(_) => ("put_api_requests", "vsock"),
            VmmAction::PutLogger(_) => ("put_api_requests", "logger"),
            VmmAction::PutMetrics(_) => ("put_api_requests", "metrics"),
            VmmAction::PutSerial(_) => ("put_api_requests", "serial"),
            VmmAction::InstanceStart | VmmAction::SendCtrlAltDel | VmmAction::FlushMetrics => {
                ("put_api_requests", "actions")
            }
            VmmAction::Pause | VmmAction::Resume => ("patch_api_requests", "vmm"),
            VmmAction::CreateSnapshot(_) => ("put_api_requests", "snapshot_create"),
            VmmAction::LoadSnapshot(_) => ("put_api_requests", "snapshot_load"),
            VmmAction::MigrationReceive(_) | VmmAction::MigrationSend(_) | VmmAction::CancelMigration => {
                ("put_api_requests", "migration")
            }
            VmmAction::GetMigration => ("get_api_requests", "migration_count"),
            VmmAction::FailoverStandby(_) | VmmAction::FailoverProtect(_) | VmmAction::FailoverTakeover => {
                ("put_api_requests", "failover")
            }
            VmmAction::GetFailover => ("get_api_requests", "failover_count"),
            VmmAction::Stop => ("signals", "stop"),
        }
    }
}

/// `GET /`: Firecracker's InstanceInfo, with Vessel's fields after it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: String,
    pub vmm_version: String,
    /// Vessel: the engine running the vCPUs, once started.
    pub engine: Option<String>,
    /// Vessel: the VMM's process id.
    pub pid: u32,
    /// Vessel: seconds since the VM started (0 before).
    pub uptime_s: u64,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Version {
    pub firecracker_version: String,
    pub vessel_version: String,
}

/// What a handled action answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    Version(Version),
    FullConfig(Box<fc::FullVmConfig>),
    MachineConfig(fc::MachineConfig),
    Migration(vmm::migration::MigrationInfo),
    Failover(Box<crate::failover::FailoverInfo>),
}

/// Why an action was refused. Every variant is the client's to fix, or a
/// fact about the VM's state; the API answers each with 400.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    InvalidConfig(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the requested operation is not supported after starting the microVM")]
    NotAllowedAfterStart,
    #[error("the microVM has not been started")]
    NotStarted,
    #[error("cannot start the microVM: {0}")]
    StartMicrovm(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Runtime(String),
}

/// The Firecracker API version Vessel follows, reported by `GET /version`
/// so that clients checking for a minimum version accept Vessel.
pub const FIRECRACKER_API_VERSION: &str = "1.7.0";
