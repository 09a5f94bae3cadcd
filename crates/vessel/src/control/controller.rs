//! The one handler of [`VmmAction`]s: it holds the configuration until
//! `InstanceStart`, then the running machine, and checks every request
//! against the VM's state.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::{ActionError, InstanceInfo, Msg, Version, VmState, VmmAction, VmmData, FIRECRACKER_API_VERSION};
use crate::fc;
use crate::metrics::MetricsSink;

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the guest's serial console goes once the VM starts, and who feeds
/// it input. Given by the binary (terminal, detached VM, tests).
pub struct ConsoleWiring {
    /// The serial output when no `PUT /serial` names a file: the VMM's
    /// stdout, as in Firecracker, or a detached VM's log and clients.
    pub default_output: Box<dyn FnMut() -> Box<dyn Write + Send> + Send>,
    /// Called once the machine exists, with its console input (to connect
    /// the terminal or a console socket).
    pub on_start: Box<dyn FnMut(vmm::machine::ConsoleInput) + Send>,
}

/// What the VMM's main loop is told when the VM's run ends.
#[derive(Debug)]
pub enum Exit {
    /// The guest (or a stop request) ended the run.
    Ran(vmm::RunOutcome),
    /// Stopped before any VM started.
    NeverStarted,
}

struct RunningVm {
    handle: vmm::VmHandle,
    engine: vmm::EngineKind,
    started: Instant,
}

pub struct Controller {
    id: String,
    state: VmState,
    boot_source: Option<fc::BootSource>,
    machine: fc::MachineConfig,
    drives: Vec<fc::Drive>,
    nets: Vec<fc::NetworkInterface>,
    entropy: Option<fc::Entropy>,
    vsock: Option<fc::Vsock>,
    logger: Option<fc::Logger>,
    metrics_config: Option<fc::Metrics>,
    serial: Option<fc::Serial>,
    metrics: MetricsSink,
    console: ConsoleWiring,
    vm: Option<RunningVm>,
    /// Told when the VM's run ends.
    exits: Sender<Msg>,
    /// A stop was asked for before any VM ran.
    stopped: bool,
    /// A machine given whole by `vessel run`'s flags (which reach further
    /// than Firecracker's API: qcow2 backing rules, virtio-console, taps
    /// created on demand); used instead of the API's pieces.
    direct: Option<vmm::MachineConfig>,
    /// The current or last migration, either way.
    pub(crate) migration: crate::migration::Slot,
    /// Failover, either side, and the serial output's gate.
    pub(crate) failover: crate::failover::Slot,
}

impl Controller {
    pub fn new(id: String, console: ConsoleWiring, exits: Sender<Msg>, metrics: MetricsSink) -> Self {
        Controller {
            id,
            state: VmState::NotStarted,
            boot_source: None,
            machine: fc::MachineConfig::default(),
            drives: Vec::new(),
            nets: Vec::new(),
            entropy: None,
            vsock: None,
            logger: None,
            metrics_config: None,
            serial: None,
            metrics,
            console,
            vm: None,
            exits,
            stopped: false,
            direct: None,
            migration: crate::migration::Slot::default(),
            failover: crate::failover::Slot::default(),
        }
    }

    /// Take the whole machine from `vessel run`'s flags.
    pub fn configure_direct(&mut self, m: vmm::MachineConfig, accel: String) {
        self.machine.vcpu_count = u8::try_from(m.cpus).unwrap_or(u8::MAX);
        self.machine.mem_size_mib = m.mem_size >> 20;
        self.machine.accel = accel;
        self.machine.jit = m.jit;
        self.boot_source = Some(fc::BootSource {
            kernel_image_path: m.kernel.clone(),
            initrd_path: m.initrd.clone(),
            boot_args: Some(m.cmdline.clone()),
        });
        self.drives = m
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| fc::Drive {
                drive_id: format!("drive{i}"),
                path_on_host: d.path.clone(),
                is_root_device: false,
                is_read_only: d.read_only,
                partuuid: None,
                cache_type: "Writeback".into(),
                rate_limiter: None,
                io_engine: "Sync".into(),
                format: match d.format.unwrap_or_else(|| disk::ImageFormat::from_file_name(&d.path)) {
                    disk::ImageFormat::Qcow2 => "qcow2".into(),
                    disk::ImageFormat::Raw => "raw".into(),
                },
            })
            .collect();
        self.nets = m
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| fc::NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                host_dev_name: n.tap.clone().unwrap_or_default(),
                guest_mac: n
                    .mac
                    .map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect();
        self.entropy = m.rng.then(fc::Entropy::default);
        self.vsock = m.vsock.as_ref().map(|v| fc::Vsock {
            vsock_id: v.id.clone(),
            guest_cid: u32::try_from(v.guest_cid).unwrap_or(u32::MAX),
            uds_path: v.uds_path.clone(),
        });
        self.direct = Some(m);
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn metrics(&self) -> &MetricsSink {
        &self.metrics
    }

    /// Handle one request. A refused request leaves everything as it was.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmData, ActionError> {
        let (group, name) = action.metric();
        let result = self.dispatch(action);
        self.metrics.count(group, name, result.is_ok());
        result
    }

    fn dispatch(&mut self, action: VmmAction) -> Result<VmmData, ActionError> {
        if action.is_pre_boot() && self.state != VmState::NotStarted {
            return Err(ActionError::NotAllowedAfterStart);
        }
        if self.migration.active()
            && matches!(
                action,
                VmmAction::Pause
                    | VmmAction::Resume
                    | VmmAction::CreateSnapshot(_)
                    | VmmAction::LoadSnapshot(_)
                    | VmmAction::InstanceStart
            )
        {
            return Err(ActionError::Runtime(
                "a migration is in progress: cancel it first (PUT /migration/cancel)".into(),
            ));
        }
        if self.failover.protecting()
            && matches!(
                action,
                VmmAction::Pause | VmmAction::Resume | VmmAction::CreateSnapshot(_) | VmmAction::MigrationSend(_)
            )
        {
            return Err(ActionError::Runtime(
                "the VM is protected by a standby (GET /failover): it cannot be paused, snapshotted or migrated under it".into(),
            ));
        }
        if self.failover.standing_by()
            && matches!(
                action,
                VmmAction::InstanceStart | VmmAction::LoadSnapshot(_) | VmmAction::MigrationReceive(_)
            )
        {
            return Err(ActionError::Runtime(
                "this Vessel is a failover standby: it runs the guest only when it takes over".into(),
            ));
        }
        if action == VmmAction::Resume && self.failover.fenced() {
            // The operator knows the standby is dead: run alone, with the
            // TAPs and disks the fence let go of.
            if let Some(vm) = &self.vm {
                vm.handle
                    .reattach_backends(Duration::from_secs(10))
                    .map_err(|e| ActionError::Runtime(format!("resuming a fenced VM: {e}")))?;
                crate::failover::release_disks(&vm.handle);
            }
            self.failover.unfence();
        }
        let empty = Ok(VmmData::Empty);
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(self.instance_info())),
            VmmAction::GetVersion => Ok(VmmData::Version(Version {
                firecracker_version: FIRECRACKER_API_VERSION.into(),
                vessel_version: env!("CARGO_PKG_VERSION").into(),
            })),
            VmmAction::GetFullConfig => Ok(VmmData::FullConfig(Box::new(self.full_config()))),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(self.machine.clone())),
            VmmAction::PutMachineConfig(m) => {
                m.validate().map_err(ActionError::InvalidConfig)?;
                self.machine = m;
                empty
            }
            VmmAction::PatchMachineConfig(u) => {
                if u == fc::MachineConfigUpdate::default() {
                    return Err(ActionError::InvalidConfig("empty PATCH request".into()));
                }
                let m = self.machine.patched(u);
                m.validate().map_err(ActionError::InvalidConfig)?;
                self.machine = m;
                empty
            }
            VmmAction::PutBootSource(b) => {
                if b.kernel_image_path.as_os_str().is_empty() {
                    return Err(ActionError::InvalidConfig("kernel_image_path is empty".into()));
                }
                self.boot_source = Some(b);
                empty
            }
            VmmAction::PutDrive(d) => {
                d.validate().map_err(ActionError::InvalidConfig)?;
                if d.is_root_device && self.drives.iter().any(|o| o.is_root_device && o.drive_id != d.drive_id) {
                    return Err(ActionError::InvalidConfig("a root block device already exists".into()));
                }
                match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    Some(o) => *o = d,
                    None => {
                        self.room_for_one_more_device()?;
                        self.drives.push(d)
                    }
                }
                empty
            }
            VmmAction::PatchDrive(u) => {
                fc::check_id("drive_id", &u.drive_id).map_err(ActionError::InvalidConfig)?;
                if self.state != VmState::NotStarted {
                    return Err(ActionError::Unsupported(
                        "changing a drive of a running microVM is not supported by Vessel yet".into(),
                    ));
                }
                let Some(d) = self.drives.iter().position(|o| o.drive_id == u.drive_id) else {
                    return Err(ActionError::InvalidConfig(format!("no drive with id {:?}", u.drive_id)));
                };
                let mut new = self.drives[d].clone();
                if let Some(p) = u.path_on_host {
                    new.path_on_host = p;
                }
                if u.rate_limiter.is_some() {
                    new.rate_limiter = u.rate_limiter;
                }
                new.validate().map_err(ActionError::InvalidConfig)?;
                self.drives[d] = new;
                empty
            }
            VmmAction::PutNetworkInterface(n) => {
                n.validate().map_err(ActionError::InvalidConfig)?;
                if self
                    .nets
                    .iter()
                    .any(|o| o.iface_id != n.iface_id && o.host_dev_name == n.host_dev_name)
                {
                    return Err(ActionError::InvalidConfig(format!(
                        "host_dev_name {:?} is used by another interface",
                        n.host_dev_name
                    )));
                }
                match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
                    Some(o) => *o = n,
                    None => {
                        self.room_for_one_more_device()?;
                        self.nets.push(n)
                    }
                }
                empty
            }
            VmmAction::PatchNetworkInterface(u) => {
                fc::check_id("iface_id", &u.iface_id).map_err(ActionError::InvalidConfig)?;
                let Some(n) = self.nets.iter().position(|o| o.iface_id == u.iface_id) else {
                    return Err(ActionError::InvalidConfig(format!(
                        "no network interface with id {:?}",
                        u.iface_id
                    )));
                };
                let mut new = self.nets[n].clone();
                if u.rx_rate_limiter.is_some() {
                    new.rx_rate_limiter = u.rx_rate_limiter;
                }
                if u.tx_rate_limiter.is_some() {
                    new.tx_rate_limiter = u.tx_rate_limiter;
                }
                new.validate().map_err(ActionError::InvalidConfig)?;
                self.nets[n] = new;
                empty
            }
            VmmAction::PutEntropy(e) => {
                if let Some(r) = &e.rate_limiter {
                    if r != &fc::RateLimiter::default() {
                        return Err(ActionError::InvalidConfig(
                            "rate_limiter: rate limiting is not supported by Vessel".into(),
                        ));
                    }
                }
                if self.entropy.is_none() {
                    self.room_for_one_more_device()?;
                }
                self.entropy = Some(e);
                empty
            }
            VmmAction::PutVsock(v) => {
                v.validate().map_err(ActionError::InvalidConfig)?;
                if self.vsock.is_none() {
                    self.room_for_one_more_device()?;
                }
                self.vsock = Some(v);
                empty
            }
            VmmAction::PutLogger(l) => {
                crate::logging::configure(&l).map_err(ActionError::InvalidConfig)?;
                self.logger = Some(l);
                empty
            }
            VmmAction::PutMetrics(m) => {
                if self.metrics_config.is_some() {
                    return Err(ActionError::InvalidConfig("metrics are already configured".into()));
                }
                self.metrics.open(&m.metrics_path).map_err(ActionError::InvalidConfig)?;
                self.metrics_config = Some(m);
                empty
            }
            VmmAction::PutSerial(s) => {
                if s.serial_out_path.as_os_str().is_empty() {
                    return Err(ActionError::InvalidConfig("serial_out_path is empty".into()));
                }
                self.serial = Some(s);
                empty
            }
            VmmAction::InstanceStart => {
                if self.state != VmState::NotStarted {
                    return Err(ActionError::NotAllowedAfterStart);
                }
                self.start()?;
                empty
            }
            VmmAction::SendCtrlAltDel => {
                let vm = self.running()?;
                if self.state != VmState::Running {
                    return Err(ActionError::Runtime("the microVM is paused: resume it first".into()));
                }
                vm.handle
                    .send_ctrl_alt_del()
                    .map_err(|e| ActionError::Runtime(format!("SendCtrlAltDel: {e}")))?;
                empty
            }
            VmmAction::FlushMetrics => {
                self.metrics.flush().map_err(ActionError::Runtime)?;
                empty
            }
            VmmAction::Pause => {
                let vm = self.running()?;
                let mut next = self.state;
                next.transition(VmState::Paused)?;
                if !vm.handle.pause(PAUSE_TIMEOUT) {
                    vm.handle.resume();
                    return Err(ActionError::Runtime(format!(
                        "not every vCPU stopped within {} s; the microVM keeps running",
                        PAUSE_TIMEOUT.as_secs()
                    )));
                }
                self.state = next;
                empty
            }
            VmmAction::Resume => {
                let vm = self.running()?;
                let mut next = self.state;
                next.transition(VmState::Running)?;
                vm.handle.resume();
                self.state = next;
                empty
            }
            VmmAction::CreateSnapshot(c) => {
                let vm = self.running()?;
                if self.state != VmState::Paused {
                    return Err(ActionError::Runtime(
                        "pause the microVM before taking a snapshot".into(),
                    ));
                }
                if c.snapshot_type != "Full" {
                    return Err(ActionError::Unsupported(format!(
                        "snapshot_type {:?} is not supported (only \"Full\")",
                        c.snapshot_type
                    )));
                }
                if c.snapshot_path.as_os_str().is_empty() || c.mem_file_path.as_os_str().is_empty() {
                    return Err(ActionError::InvalidConfig(
                        "snapshot_path and mem_file_path must not be empty".into(),
                    ));
                }
                if c.snapshot_path == c.mem_file_path {
                    return Err(ActionError::InvalidConfig(
                        "snapshot_path and mem_file_path must be different files".into(),
                    ));
                }
                if let Some(v) = &c.version {
                    return Err(ActionError::Unsupported(format!(
                        "version {v:?}: Vessel writes only its own snapshot format (version {})",
                        vmm::persist::FORMAT_VERSION
                    )));
                }
                let started = Instant::now();
                let info = vm
                    .handle
                    .snapshot(&c.snapshot_path, &c.mem_file_path)
                    .map_err(|e| ActionError::Runtime(e.to_string()))?;
                tracing::info!(
                    "snapshot: {} bytes of state, {} of {} bytes of memory written, in {} ms",
                    info.state_bytes,
                    info.mem_bytes,
                    info.mem_size,
                    started.elapsed().as_millis()
                );
                empty
            }
            VmmAction::LoadSnapshot(l) => {
                if self.state != VmState::NotStarted {
                    return Err(ActionError::NotAllowedAfterStart);
                }
                if self.boot_source.is_some()
                    || !self.drives.is_empty()
                    || !self.nets.is_empty()
                    || self.direct.is_some()
                {
                    return Err(ActionError::InvalidConfig(
                        "loading a snapshot is only allowed before the microVM is configured".into(),
                    ));
                }
                if l.enable_diff_snapshots || l.track_dirty_pages {
                    return Err(ActionError::Unsupported("diff snapshots are not supported".into()));
                }
                self.load_snapshot(l)?;
                empty
            }
            VmmAction::MigrationReceive(r) => {
                crate::migration::start_receive(self, r)?;
                empty
            }
            VmmAction::MigrationSend(r) => {
                crate::migration::start_send(self, r)?;
                empty
            }
            VmmAction::GetMigration => Ok(VmmData::Migration(self.migration.info())),
            VmmAction::CancelMigration => {
                self.migration.cancel()?;
                empty
            }
            VmmAction::FailoverStandby(r) => {
                crate::failover::start_standby(self, r)?;
                empty
            }
            VmmAction::FailoverProtect(r) => {
                crate::failover::start_protect(self, r)?;
                empty
            }
            VmmAction::GetFailover => Ok(VmmData::Failover(Box::new(self.failover.info()))),
            VmmAction::FailoverTakeover => {
                self.failover.request_takeover()?;
                empty
            }
            VmmAction::Stop => {
                match &self.vm {
                    // The run thread reports the end through `exits`.
                    Some(vm) => vm.handle.quit(),
                    None => {
                        if !self.stopped {
                            self.stopped = true;
                            let _ = self.exits.send(Msg::Exit(Exit::NeverStarted));
                        }
                    }
                }
                empty
            }
        }
    }

    /// Where the main loop hears of work for it (migration threads).
    pub(crate) fn exits(&self) -> Sender<Msg> {
        self.exits.clone()
    }

    /// The running VM to migrate away, and whether it is paused.
    pub(crate) fn migration_source(&self) -> Result<(vmm::VmHandle, bool), ActionError> {
        let vm = self.running()?;
        Ok((vm.handle.clone(), self.state == VmState::Paused))
    }

    /// Refuse `what` unless this Vessel is fresh: not started, nothing
    /// configured (as for loading a snapshot).
    pub(crate) fn check_fresh(&self, what: &str) -> Result<(), ActionError> {
        if self.state != VmState::NotStarted {
            return Err(ActionError::NotAllowedAfterStart);
        }
        if self.boot_source.is_some() || !self.drives.is_empty() || !self.nets.is_empty() || self.direct.is_some() {
            return Err(ActionError::InvalidConfig(format!(
                "{what} is only allowed before the microVM is configured"
            )));
        }
        Ok(())
    }

    /// An incoming migration's machine, built from the state and the
    /// memory that came, paused and not yet running.
    pub(crate) fn prepare_incoming(
        &mut self,
        state: &vmm::persist::MachineState,
        mem: vmm::migration::stream::GuestMemoryMmap,
        accel: Option<String>,
    ) -> Result<vmm::Machine, ActionError> {
        self.check_fresh("receiving a migration")?;
        // The engine asked for here, else the source's.
        let accel: vmm::Accel = accel
            .unwrap_or_else(|| state.engine.to_string())
            .parse()
            .map_err(|e: vmm::Error| ActionError::InvalidConfig(e.to_string()))?;
        let (engine, why) = vmm::engine::choose(accel).map_err(|e| ActionError::StartMicrovm(e.to_string()))?;
        let output = self.serial_output()?;
        let machine = vmm::Machine::restore_with_memory(state, mem, output, engine)
            .map_err(|e| ActionError::StartMicrovm(e.to_string()))?;
        eprintln!("{why} (the source ran {})", state.engine);
        Ok(machine)
    }

    /// The source committed: run the prepared machine. Returns when its
    /// vCPUs were let go, and the VM's handle.
    pub(crate) fn start_incoming(
        &mut self,
        machine: vmm::Machine,
        state: &vmm::persist::MachineState,
    ) -> Result<(std::time::SystemTime, vmm::VmHandle), ActionError> {
        let engine = machine.engine();
        self.configure_direct(state.config.clone(), engine.to_string());
        self.launch(machine, engine)?;
        self.state = VmState::Paused;
        let handle = self.running()?.handle.clone();
        handle.resume();
        let resumed_at = std::time::SystemTime::now();
        self.state = VmState::Running;
        Ok((resumed_at, handle))
    }

    /// The split-brain rule: the failover link went silent, so the
    /// standby may run the guest now; pause here. True when paused.
    pub(crate) fn fence_pause(&mut self, vm: &vmm::VmHandle) -> bool {
        if !vm.pause(PAUSE_TIMEOUT) {
            return false;
        }
        // Let go of the TAPs and disk images, so that the standby can
        // open them when it takes over.
        if let Err(e) = vm.release_backends() {
            eprintln!("vessel: failover: fenced, but cannot let go of the host resources: {e}");
        }
        if self.state == VmState::Running {
            self.state = VmState::Paused;
        }
        true
    }

    /// The VM's run ended (the main loop learned it from `exits`).
    pub fn mark_shut_down(&mut self) {
        if matches!(self.state, VmState::Running | VmState::Paused) {
            self.state = VmState::ShutDown;
        }
    }

    /// Each vCPU's instruction pointer while paused, for the pause report.
    pub fn vcpu_summary(&self) -> String {
        let Some(vm) = &self.vm else {
            return String::new();
        };
        vm.handle
            .vcpu_states()
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(s) => format!("vcpu{i} rip={:#x}", s.rip),
                None => format!("vcpu{i} state unreadable"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn running(&self) -> Result<&RunningVm, ActionError> {
        match (&self.vm, self.state) {
            (Some(vm), VmState::Running | VmState::Paused) => Ok(vm),
            (_, VmState::ShutDown) => Err(ActionError::Runtime("the microVM has shut down".into())),
            _ => Err(ActionError::NotStarted),
        }
    }

    /// Refuse a new virtio device when the machine's windows are full.
    fn room_for_one_more_device(&self) -> Result<(), ActionError> {
        let count = self.drives.len()
            + self.nets.len()
            + usize::from(self.entropy.is_some())
            + usize::from(self.vsock.is_some());
        if count >= vmm::virtio::MAX_DEVICES {
            return Err(ActionError::InvalidConfig(format!(
                "at most {} virtio devices",
                vmm::virtio::MAX_DEVICES
            )));
        }
        Ok(())
    }

    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            app_name: "Vessel".into(),
            id: self.id.clone(),
            state: self.state.as_str().into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            engine: self.vm.as_ref().map(|v| v.engine.to_string()),
            pid: std::process::id(),
            uptime_s: self.vm.as_ref().map(|v| v.started.elapsed().as_secs()).unwrap_or(0),
        }
    }

    pub fn full_config(&self) -> fc::FullVmConfig {
        fc::FullVmConfig {
            boot_source: self.boot_source.clone(),
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            entropy: self.entropy.clone(),
            vsock: self.vsock.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics_config.clone(),
            serial: self.serial.clone(),
            ..Default::default()
        }
    }

    /// Apply a whole configuration (`--config-file`), in the order the API
    /// would: logger and metrics first, then the machine and its devices.
    pub fn apply_full_config(&mut self, c: fc::FullVmConfig) -> Result<(), ActionError> {
        for (name, v) in [
            ("balloon", &c.balloon),
            ("mmds-config", &c.mmds_config),
            ("cpu-config", &c.cpu_config),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ActionError::Unsupported(format!(
                    "\"{name}\" is not supported by Vessel"
                )));
            }
        }
        let mut actions = Vec::new();
        if let Some(l) = c.logger {
            actions.push(VmmAction::PutLogger(l));
        }
        if let Some(m) = c.metrics {
            actions.push(VmmAction::PutMetrics(m));
        }
        if let Some(m) = c.machine_config {
            actions.push(VmmAction::PutMachineConfig(m));
        }
        if let Some(b) = c.boot_source {
            actions.push(VmmAction::PutBootSource(b));
        }
        actions.extend(c.drives.into_iter().map(VmmAction::PutDrive));
        actions.extend(c.network_interfaces.into_iter().map(VmmAction::PutNetworkInterface));
        if let Some(e) = c.entropy {
            actions.push(VmmAction::PutEntropy(e));
        }
        if let Some(v) = c.vsock {
            actions.push(VmmAction::PutVsock(v));
        }
        if let Some(s) = c.serial {
            actions.push(VmmAction::PutSerial(s));
        }
        for a in actions {
            self.handle(a)?;
        }
        Ok(())
    }

    /// The machine the configuration describes (root drive first, as
    /// Firecracker orders it, so it is /dev/vda).
    pub fn machine_config(&self) -> Result<vmm::MachineConfig, ActionError> {
        if let Some(m) = &self.direct {
            return Ok(m.clone());
        }
        let boot = self
            .boot_source
            .as_ref()
            .ok_or_else(|| ActionError::StartMicrovm("no boot source: PUT /boot-source first".into()))?;
        let mut drives: Vec<&fc::Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        let mut cmdline = boot.boot_args.clone().unwrap_or_else(fc::default_boot_args);
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let mode = if root.is_read_only { "ro" } else { "rw" };
            match &root.partuuid {
                Some(p) => cmdline.push_str(&format!(" root=PARTUUID={p} {mode}")),
                None => cmdline.push_str(&format!(" root=/dev/vda {mode}")),
            }
        }
        let disks = drives
            .iter()
            .map(|d| vmm::machine::DiskConfig {
                path: d.path_on_host.clone(),
                read_only: d.is_read_only,
                allow_absolute_backing: false,
                format: Some(if d.is_qcow2().unwrap_or(false) {
                    disk::ImageFormat::Qcow2
                } else {
                    disk::ImageFormat::Raw
                }),
            })
            .collect();
        let nets = self
            .nets
            .iter()
            .map(|n| {
                Ok(vmm::machine::NetConfig {
                    id: Some(n.iface_id.clone()),
                    tap: Some(n.host_dev_name.clone()),
                    mac: n
                        .guest_mac
                        .as_deref()
                        .map(crate::device_args::parse_mac)
                        .transpose()
                        .map_err(ActionError::InvalidConfig)?,
                })
            })
            .collect::<Result<Vec<_>, ActionError>>()?;
        Ok(vmm::MachineConfig {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            cmdline,
            mem_size: self.machine.mem_size_mib << 20,
            cpus: u32::from(self.machine.vcpu_count),
            disks,
            nets,
            rng: self.entropy.is_some(),
            console_output: None,
            console_output_limit: vmm::virtio::console::DEFAULT_OUTPUT_LIMIT,
            vsock: self.vsock.as_ref().map(|v| vmm::machine::VsockConfig {
                id: v.vsock_id.clone(),
                guest_cid: u64::from(v.guest_cid),
                uds_path: v.uds_path.clone(),
            }),
            jit: self.machine.jit,
        })
    }

    /// The serial output, through the failover gate (which holds it back
    /// while the VM is protected, until its epoch is acknowledged).
    fn serial_output(&mut self) -> Result<Box<dyn Write + Send>, ActionError> {
        let out: Box<dyn Write + Send> = match &self.serial {
            Some(s) => Box::new(open_output(&s.serial_out_path).map_err(|e| {
                ActionError::StartMicrovm(format!("serial_out_path {}: {e}", s.serial_out_path.display()))
            })?),
            None => (self.console.default_output)(),
        };
        Ok(self.failover.gate.writer(out))
    }

    fn start(&mut self) -> Result<(), ActionError> {
        let cfg = self.machine_config()?;
        // Only regular files: a FIFO or device named by a client would
        // block the VMM while it reads.
        for (what, p) in [
            ("kernel_image_path", Some(&cfg.kernel)),
            ("initrd_path", cfg.initrd.as_ref()),
        ] {
            if let Some(p) = p {
                let meta = std::fs::metadata(p)
                    .map_err(|e| ActionError::StartMicrovm(format!("{what} {}: {e}", p.display())))?;
                if !meta.is_file() {
                    return Err(ActionError::StartMicrovm(format!(
                        "{what} {} is not a regular file",
                        p.display()
                    )));
                }
            }
        }
        let accel: vmm::Accel = self
            .machine
            .accel
            .parse()
            .map_err(|e: vmm::Error| ActionError::InvalidConfig(e.to_string()))?;
        let (engine, why) = vmm::engine::choose(accel).map_err(|e| ActionError::StartMicrovm(e.to_string()))?;
        let output = self.serial_output()?;
        let machine =
            vmm::Machine::with_engine(&cfg, output, engine).map_err(|e| ActionError::StartMicrovm(e.to_string()))?;
        eprintln!("{why}");
        self.launch(machine, engine)?;
        self.state.transition(VmState::Running)?;
        Ok(())
    }

    /// Restore the VM a snapshot describes; it stays paused unless
    /// `resume_vm`.
    pub fn load_snapshot(&mut self, l: fc::SnapshotLoad) -> Result<(), ActionError> {
        let mem_file = l.mem_file().map_err(ActionError::InvalidConfig)?;
        let mut state = vmm::persist::MachineState::read_file(&l.snapshot_path)
            .map_err(|e| ActionError::InvalidConfig(format!("{}: {e}", l.snapshot_path.display())))?;
        apply_network_overrides(&mut state, &l.network_overrides, "the snapshot")?;
        if let Some(o) = &l.vsock_override {
            let vsock =
                state.config.vsock.as_mut().ok_or_else(|| {
                    ActionError::InvalidConfig("vsock_override: the snapshot has no vsock device".into())
                })?;
            vsock.uds_path = o.uds_path.clone();
        }
        let accel = l.accel.clone().unwrap_or_else(|| state.engine.to_string());
        let accel_kind: vmm::Accel = accel
            .parse()
            .map_err(|e: vmm::Error| ActionError::InvalidConfig(e.to_string()))?;
        let (engine, why) = vmm::engine::choose(accel_kind).map_err(|e| ActionError::StartMicrovm(e.to_string()))?;
        let output = self.serial_output()?;
        let started = Instant::now();
        // Disks frozen into the snapshot get an overlay of this VM's own.
        let clone_id = format!("{}-{}", &self.id[..self.id.len().min(40)], vmm::machine::unix_millis());
        let overlays = state
            .clone_disks(&clone_id)
            .map_err(|e| ActionError::InvalidConfig(e.to_string()))?;
        let machine = vmm::Machine::restore(&state, &mem_file, output, engine).map_err(|e| {
            for f in &overlays {
                let _ = std::fs::remove_file(f);
            }
            ActionError::StartMicrovm(e.to_string())
        })?;
        eprintln!("{why}");
        self.configure_direct(state.config.clone(), accel);
        self.launch(machine, engine)?;
        self.state = VmState::Paused;
        tracing::info!("snapshot restored in {} us", started.elapsed().as_micros());
        if l.resume_vm {
            self.handle(VmmAction::Resume)?;
        }
        Ok(())
    }

    /// Run a built machine on its own thread.
    fn launch(&mut self, machine: vmm::Machine, engine: vmm::EngineKind) -> Result<(), ActionError> {
        let handle = machine.vm_handle();
        (self.console.on_start)(machine.input_handle());
        let exits = self.exits.clone();
        std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let outcome = machine.run();
                let _ = exits.send(Msg::Exit(Exit::Ran(outcome)));
            })
            .map_err(|e| ActionError::StartMicrovm(format!("cannot start the VM thread: {e}")))?;
        self.vm = Some(RunningVm {
            handle,
            engine,
            started: Instant::now(),
        });
        Ok(())
    }
}

/// Open a serial, log or metrics destination for appending: a file (created if
/// missing) or a named pipe, never blocking on a pipe with no reader yet.
pub fn open_output(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // Writes block normally once open: a guest's console output is not
    // dropped because a reader is slow.
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        use std::os::unix::io::AsRawFd;
        let fd = f.as_raw_fd();
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Give a restored or migrated VM's network interfaces the TAPs (and
/// MACs) the user names; `source` says where the state came from.
pub(crate) fn apply_network_overrides(
    state: &mut vmm::persist::MachineState,
    overrides: &[fc::NetworkOverride],
    source: &str,
) -> Result<(), ActionError> {
    for o in overrides {
        fc::check_id("iface_id", &o.iface_id).map_err(ActionError::InvalidConfig)?;
        let by_id = state
            .config
            .nets
            .iter()
            .position(|n| n.id.as_deref() == Some(o.iface_id.as_str()));
        let by_position = o
            .iface_id
            .strip_prefix("net")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&i| i < state.config.nets.len());
        let i = by_id
            .or(by_position)
            .ok_or_else(|| ActionError::InvalidConfig(format!("no network interface {:?} in {source}", o.iface_id)))?;
        state.config.nets[i].tap = Some(o.host_dev_name.clone());
        if let Some(mac) = &o.guest_mac {
            let mac = crate::device_args::parse_mac(mac)
                .map_err(|e| ActionError::InvalidConfig(format!("guest_mac: {e}")))?;
            state.config.nets[i].mac = Some(mac);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (Controller, std::sync::mpsc::Receiver<Msg>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let wiring = ConsoleWiring {
            default_output: Box::new(|| Box::new(std::io::sink())),
            on_start: Box::new(|_| {}),
        };
        (Controller::new("t".into(), wiring, tx, MetricsSink::default()), rx)
    }

    fn drive(id: &str, root: bool) -> fc::Drive {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "path_on_host": format!("/images/{id}"), "is_root_device": root
        }))
        .unwrap()
    }

    #[test]
    fn root_drive_comes_first_and_names_root() {
        let (mut c, _rx) = controller();
        c.handle(VmmAction::PutBootSource(fc::BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        }))
        .unwrap();
        c.handle(VmmAction::PutDrive(drive("data", false))).unwrap();
        c.handle(VmmAction::PutDrive(drive("rootfs", true))).unwrap();
        let err = c.handle(VmmAction::PutDrive(drive("other", true))).unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
        let m = c.machine_config().unwrap();
        assert_eq!(m.disks[0].path, Path::new("/images/rootfs"));
        assert_eq!(m.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!((m.cpus, m.mem_size), (1, 128 << 20));
    }

    #[test]
    fn refused_requests_change_nothing() {
        let (mut c, _rx) = controller();
        let before = c.full_config();
        let bad = fc::MachineConfig {
            vcpu_count: 0,
            ..Default::default()
        };
        assert!(c.handle(VmmAction::PutMachineConfig(bad)).is_err());
        assert!(c.handle(VmmAction::PatchMachineConfig(Default::default())).is_err());
        assert!(c.handle(VmmAction::Pause).is_err());
        assert!(c.handle(VmmAction::Resume).is_err());
        assert!(c.handle(VmmAction::SendCtrlAltDel).is_err());
        // No boot source: InstanceStart is refused and the VM stays unstarted.
        assert!(c.handle(VmmAction::InstanceStart).is_err());
        assert_eq!(c.state(), VmState::NotStarted);
        assert_eq!(c.full_config(), before);
    }

    #[test]
    fn bad_kernel_leaves_vm_unstarted() {
        let (mut c, _rx) = controller();
        c.handle(VmmAction::PutMachineConfig(fc::MachineConfig {
            accel: "emu".into(),
            ..Default::default()
        }))
        .unwrap();
        c.handle(VmmAction::PutBootSource(fc::BootSource {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            initrd_path: None,
            boot_args: None,
        }))
        .unwrap();
        let e = c.handle(VmmAction::InstanceStart).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
        assert_eq!(c.state(), VmState::NotStarted);
        // Configuration is still allowed after a failed start.
        c.handle(VmmAction::PatchMachineConfig(fc::MachineConfigUpdate {
            vcpu_count: Some(2),
            ..Default::default()
        }))
        .unwrap();
    }

    #[test]
    fn stop_before_start_ends_the_loop() {
        let (mut c, rx) = controller();
        c.handle(VmmAction::Stop).unwrap();
        assert!(matches!(rx.try_recv(), Ok(Msg::Exit(Exit::NeverStarted))));
    }
}
