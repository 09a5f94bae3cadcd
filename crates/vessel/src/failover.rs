//! Failover in the control plane (docs/FAILOVER.md): `PUT /failover/standby`
//! on a fresh Vessel, `PUT /failover/protect` on a running one (both answer
//! at once; the work runs on threads of their own), `GET /failover`,
//! `PUT /failover/takeover`. The frames, the epoch capture and the output
//! gate are in `vmm::migration::failover`; the initial sync is a migration
//! stream (`vmm::migration::stream`).

use std::io::{BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::migration::failover::{self as fo, FailoverError, FrameKind, OutputGate, PauseStats, Timing};
use vmm::migration::stream::{self, Hello, Message, StreamError};

use crate::control::{ActionError, Controller, Msg};
use crate::migration::{on_main, Endpoint};

/// How long the standby waits for the initial sync's next bytes.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a takeover tries to open the primary's TAPs and disks.
const TAKEOVER_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The most guest memory a standby accepts.
const MAX_STANDBY_MEM: u64 = 1 << 40;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TakeoverMode {
    /// Take over by itself after `timeout_ms` of silence.
    #[default]
    Auto,
    /// Only on `PUT /failover/takeover`.
    Manual,
}

/// `PUT /failover/standby`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyRequest {
    pub listen_url: String,
    #[serde(default)]
    pub takeover: TakeoverMode,
    /// At takeover, open these TAPs instead of the primary's (as
    /// `PUT /snapshot/load` and `PUT /migration/receive` take them).
    #[serde(default)]
    pub network_overrides: Vec<crate::fc::NetworkOverride>,
}

/// `PUT /failover/protect`; only `standby_url` is required.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    pub standby_url: String,
    #[serde(default = "default_epoch")]
    pub epoch_ms: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_epoch() -> u64 {
    50
}
fn default_heartbeat() -> u64 {
    100
}
fn default_timeout() -> u64 {
    500
}

impl ProtectRequest {
    fn validate(&self) -> Result<(Endpoint, Timing), String> {
        for (name, v) in [
            ("epoch_ms", self.epoch_ms),
            ("heartbeat_ms", self.heartbeat_ms),
            ("timeout_ms", self.timeout_ms),
        ] {
            if !(1..=60_000).contains(&v) {
                return Err(format!("{name} {v} must be from 1 to 60000"));
            }
        }
        if self.timeout_ms <= self.heartbeat_ms.max(self.epoch_ms) {
            return Err(format!(
                "timeout_ms {} must be longer than heartbeat_ms and epoch_ms",
                self.timeout_ms
            ));
        }
        let e = Endpoint::parse(&self.standby_url)?;
        Ok((
            e,
            Timing {
                epoch_ms: self.epoch_ms,
                heartbeat_ms: self.heartbeat_ms,
                timeout_ms: self.timeout_ms,
            },
        ))
    }
}

/// Where protection stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Neither side of a protection.
    #[default]
    None,
    /// Standby: listening for the primary.
    Waiting,
    /// The initial sync runs.
    Syncing,
    /// Epochs flow and are acknowledged.
    Protected,
    /// Primary: the standby is gone, the VM runs on alone. Standby
    /// (manual mode): the primary is gone, waiting for a takeover.
    Unprotected,
    /// Primary: the link went silent; the VM is paused and its held output
    /// is never released (the split-brain rule).
    Fenced,
    /// Standby: it runs the guest now.
    TookOver,
    /// It ended without taking over (a corrupt epoch, the primary ended
    /// protection, a refused stream): see `error`.
    Failed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseFigures {
    pub median: f64,
    pub p99: f64,
}

/// `GET /failover`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverInfo {
    /// "primary" or "standby" (absent before any protection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub status: Status,
    /// Epochs acknowledged (primary) or applied (standby), the initial
    /// sync not counted.
    pub epochs: u64,
    /// Since the last acknowledged (primary) or applied (standby) epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_age_ms: Option<u64>,
    /// Stream bytes sent (primary) or received (standby).
    pub checkpoint_bytes: u64,
    /// How long each epoch paused the guest (primary), in ms.
    pub pause_ms: PauseFigures,
    /// Output held until its epoch is acknowledged: serial and
    /// virtio-console bytes and network frames.
    pub output_held_bytes: u64,
    /// Primary: disk writes held in the overlays until their epoch is
    /// acknowledged and written to the images.
    pub disk_held_bytes: u64,
    /// Standby: the epoch it would resume from (took-over: resumed from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_epoch: Option<u64>,
    /// Standby: how long the takeover took, from the decision to the
    /// guest running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub takeover_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
struct Shared {
    info: Mutex<FailoverInfo>,
    last_checkpoint: Mutex<Option<Instant>>,
    pauses: Mutex<PauseStats>,
    /// `PUT /failover/takeover` asked for it.
    takeover_now: AtomicBool,
    /// The protected VM's disk overlays (primary).
    overlays: Mutex<Vec<Arc<vmm::virtio::epoch_overlay::EpochOverlay>>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut FailoverInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn checkpoint_now(&self) {
        *self.last_checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn status(&self) -> Status {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).status
    }
}

/// The controller's view of protection, either side, and the console's
/// output gate (every machine's serial output goes through it).
pub struct Slot {
    shared: Arc<Shared>,
    pub(crate) gate: Arc<OutputGate>,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            shared: Arc::new(Shared::default()),
            gate: Arc::new(OutputGate::default()),
        }
    }
}

impl Slot {
    pub fn info(&self) -> FailoverInfo {
        let mut i = self.shared.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        i.last_checkpoint_age_ms = self
            .shared
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_millis() as u64);
        let (median, p99) = self.shared.pauses.lock().unwrap_or_else(|e| e.into_inner()).summary();
        i.pause_ms = PauseFigures { median, p99 };
        i.output_held_bytes = self.gate.held_bytes();
        i.disk_held_bytes = self
            .shared
            .overlays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|o| o.held_bytes())
            .sum();
        i
    }

    /// A primary protecting (or syncing): the VM must not be paused,
    /// snapshotted or migrated under it.
    pub fn protecting(&self) -> bool {
        let i = self.shared.info.lock().unwrap_or_else(|e| e.into_inner());
        i.role.as_deref() == Some("primary") && matches!(i.status, Status::Syncing | Status::Protected)
    }

    /// A standby waiting, syncing or holding checkpoints.
    pub fn standing_by(&self) -> bool {
        let i = self.shared.info.lock().unwrap_or_else(|e| e.into_inner());
        i.role.as_deref() == Some("standby")
            && matches!(
                i.status,
                Status::Waiting | Status::Syncing | Status::Protected | Status::Unprotected
            )
    }

    pub fn fenced(&self) -> bool {
        self.shared.status() == Status::Fenced
    }

    /// The operator resumed a fenced primary: it runs alone, unprotected,
    /// and what it held is released.
    pub fn unfence(&self) {
        self.gate.release_all();
        self.shared.update(|i| {
            i.status = Status::Unprotected;
            i.error = Some("resumed by the operator after fencing: unprotected".into());
        });
    }

    /// `PUT /failover/takeover`.
    pub fn request_takeover(&self) -> Result<(), ActionError> {
        if !self.standing_by() || self.shared.status() == Status::Waiting {
            return Err(ActionError::Runtime(
                "no standby holding checkpoints here: nothing to take over".into(),
            ));
        }
        if self.shared.status() == Status::Syncing {
            return Err(ActionError::Runtime(
                "the initial sync is not done: there is no whole state to take over from yet".into(),
            ));
        }
        self.shared.takeover_now.store(true, Ordering::Release);
        Ok(())
    }
}

/// `PUT /failover/protect`: check, then protect on a thread of its own.
pub fn start_protect(ctl: &mut Controller, req: ProtectRequest) -> Result<(), ActionError> {
    let (endpoint, timing) = req.validate().map_err(ActionError::InvalidConfig)?;
    if ctl.failover.protecting() {
        return Err(ActionError::Runtime("the VM is already protected".into()));
    }
    if ctl.migration.active() {
        return Err(ActionError::Runtime("a migration is in progress".into()));
    }
    let (handle, paused) = ctl.migration_source()?;
    if paused {
        return Err(ActionError::Runtime(
            "the VM is paused: resume it before protecting it".into(),
        ));
    }
    if handle.engine_kind() != vmm::EngineKind::Emu {
        return Err(ActionError::Unsupported(
            "failover runs under the emu engine only for now (under kvm it has not been tested)".into(),
        ));
    }
    let shared = ctl.failover.shared.clone();
    *shared.info.lock().unwrap_or_else(|e| e.into_inner()) = FailoverInfo {
        role: Some("primary".into()),
        status: Status::Syncing,
        ..Default::default()
    };
    *shared.pauses.lock().unwrap_or_else(|e| e.into_inner()) = PauseStats::default();
    *shared.last_checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let gate = ctl.failover.gate.clone();
    let exits = ctl.exits();
    let url = req.standby_url.clone();
    std::thread::Builder::new()
        .name("failover-primary".into())
        .spawn(move || primary_thread(handle, endpoint, url, timing, shared, gate, exits))
        .map_err(|e| ActionError::Runtime(format!("cannot start the failover thread: {e}")))?;
    Ok(())
}

/// How the link to the standby ended, as the primary sees it.
#[derive(Debug)]
enum LinkEnd {
    /// The standby closed it or said it gives up: it is gone, the primary
    /// runs on unprotected.
    Closed(String),
    /// Nothing came for `timeout_ms` (or a write stalled that long): the
    /// standby may be alive behind a cut link and take over; fence.
    Silent(String),
    /// The standby takes over on request: fence.
    TakenOver,
}

fn classify_io(e: &std::io::Error) -> bool {
    // true: silence (timeouts), false: the peer is gone.
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

fn link_end_of(e: FailoverError) -> LinkEnd {
    match e {
        FailoverError::Stream(StreamError::Io(io)) if classify_io(&io) => {
            LinkEnd::Silent(format!("nothing from the standby: {io}"))
        }
        e => LinkEnd::Closed(e.to_string()),
    }
}

fn primary_thread(
    vm: vmm::VmHandle,
    endpoint: Endpoint,
    url: String,
    timing: Timing,
    shared: Arc<Shared>,
    gate: Arc<OutputGate>,
    exits: Sender<Msg>,
) {
    let end = primary_run(&vm, &endpoint, timing, &shared, &gate);
    vm.dirty_log().disable();
    if matches!(end, Ok(()) | Err(LinkEnd::Closed(_))) {
        // Nobody will take over: the held disk writes go to the images.
        release_disks(&vm);
    }
    match end {
        Ok(()) => {
            // The VM stopped: the standby was told not to take over.
            gate.release_all();
            shared.update(|i| {
                i.status = Status::Unprotected;
                i.error = Some("the VM stopped; protection ended".into());
            });
        }
        Err(LinkEnd::Closed(why)) => {
            gate.release_all();
            eprintln!("vessel: failover: the standby at {url} is gone ({why}); the VM runs on UNPROTECTED");
            tracing::warn!("failover: standby gone ({why}): unprotected");
            shared.update(|i| {
                i.status = Status::Unprotected;
                i.error = Some(format!("the standby is gone: {why}"));
            });
        }
        Err(LinkEnd::Silent(why)) => fence(&vm, &gate, &shared, &exits, &url, &why),
        Err(LinkEnd::TakenOver) => fence(&vm, &gate, &shared, &exits, &url, "the standby took over on request"),
    }
}

/// Every held disk write to its image, and writes straight through from
/// now on (protection ended with nobody to take over).
pub(crate) fn release_disks(vm: &vmm::VmHandle) {
    for (i, o) in vm.disk_overlays() {
        if let Err(e) = o.release_all() {
            eprintln!("vessel: failover: writing disk {i}'s held writes: {e}");
        }
    }
}

/// The split-brain rule: the link is silent, so the standby may be taking
/// over. Never release held output again, and pause the guest.
fn fence(vm: &vmm::VmHandle, gate: &OutputGate, shared: &Shared, exits: &Sender<Msg>, url: &str, why: &str) {
    gate.fence();
    shared.update(|i| {
        i.status = Status::Fenced;
        i.error = Some(format!(
            "{why}; fenced: paused, output held (resume only if the standby is known dead)"
        ));
    });
    eprintln!(
        "vessel: failover: link to the standby at {url} lost ({why}); FENCED: the VM is paused and its held output is kept back"
    );
    let vm2 = vm.clone();
    let paused = on_main(exits, move |ctl| ctl.fence_pause(&vm2));
    if !matches!(paused, Ok(true)) {
        // The main thread is gone or the pause did not finish: stop the
        // vCPUs directly, so the guest never runs on here.
        let _ = vm.pause(Duration::from_secs(10));
    }
}

fn primary_run(
    vm: &vmm::VmHandle,
    endpoint: &Endpoint,
    timing: Timing,
    shared: &Arc<Shared>,
    gate: &Arc<OutputGate>,
) -> Result<(), LinkEnd> {
    let timeout = Duration::from_millis(timing.timeout_ms);
    let conn = endpoint.connect().map_err(LinkEnd::Closed)?;
    let reader = conn
        .set_write_timeout(timeout.max(Duration::from_secs(5)))
        .and_then(|_| conn.try_clone())
        .map_err(|e| LinkEnd::Closed(format!("socket: {e}")))?;
    let mut w = BufWriter::with_capacity(1 << 20, conn);
    let mut sent = 0u64;
    let io = |e: std::io::Error| {
        if classify_io(&e) {
            LinkEnd::Silent(format!("writing to the standby stalled: {e}"))
        } else {
            LinkEnd::Closed(format!("writing to the standby: {e}"))
        }
    };
    let stream_err = |e: StreamError| match e {
        StreamError::Io(e) => io(e),
        e => LinkEnd::Closed(e.to_string()),
    };
    let cfg_json = serde_json::to_vec(&timing).unwrap_or_default();
    sent += fo::write_frame(&mut w, FrameKind::Config, 0, &cfg_json).map_err(io)?;
    // The initial sync: a live migration that never switches over. Output
    // is held from here; the sync's last part is epoch 0.
    vm.set_output_gate(gate);
    gate.hold();
    sent += stream::write_header(&mut w).map_err(stream_err)?;
    let cfg = vm.config().clone();
    let max_epoch = fo::max_epoch_len(cfg.mem_size);
    sent += stream::write_message(
        &mut w,
        &Message::Hello(Hello {
            vessel_version: env!("CARGO_PKG_VERSION").into(),
            mem_size: cfg.mem_size,
            cpus: cfg.cpus,
        }),
    )
    .map_err(stream_err)?;
    fo::start_tracking(vm).map_err(|e| LinkEnd::Closed(e.to_string()))?;
    let before = sent;
    sent += fo::send_all_pages(vm, &mut w, &mut |n| shared.update(|i| i.checkpoint_bytes = before + n))
        .map_err(stream_err)?;
    // Disk writes are held from epoch 0's pause on (what came before is
    // in the images, under the state epoch 0 carries).
    let overlays = vm.disk_overlays();
    *shared.overlays.lock().unwrap_or_else(|e| e.into_inner()) = overlays.iter().map(|(_, o)| o.clone()).collect();
    let mut started = Ok(());
    gate.set_pausing(true);
    let first = fo::capture(vm, || {
        gate.mark(0);
        for (_, o) in &overlays {
            if let Err(e) = o.start() {
                started = Err(e);
            }
        }
    });
    gate.set_pausing(false);
    let first = first.map_err(|e| LinkEnd::Closed(e.to_string()))?;
    started.map_err(|e| LinkEnd::Closed(format!("making the disks durable: {e}")))?;
    let committed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    shared.pauses.lock().unwrap_or_else(|e| e.into_inner()).add(first.pause);
    w.write_all(&first.payload).map_err(io)?;
    w.flush().map_err(io)?;
    sent += first.payload.len() as u64;
    shared.update(|i| i.checkpoint_bytes = sent);
    // Acknowledgements come on a thread of their own; it reports how the
    // link ended.
    let (end_tx, end_rx) = std::sync::mpsc::channel::<LinkEnd>();
    {
        let shared = shared.clone();
        let gate = gate.clone();
        let overlays = overlays.clone();
        let committed = committed.clone();
        let _ = reader.set_read_timeout(timeout);
        std::thread::Builder::new()
            .name("failover-acks".into())
            .spawn(move || {
                let mut r = BufReader::new(reader);
                loop {
                    match fo::read_frame(&mut r, 0) {
                        Ok(f) => match f.kind {
                            FrameKind::Ack => {
                                gate.release(f.epoch);
                                for (i, o) in &overlays {
                                    if let Err(e) = o.commit(f.epoch) {
                                        tracing::error!("failover: writing disk {i}'s epoch {}: {e}", f.epoch);
                                    }
                                }
                                committed.store(f.epoch, Ordering::Release);
                                shared.checkpoint_now();
                                shared.update(|i| {
                                    if i.status == Status::Syncing {
                                        i.status = Status::Protected;
                                        tracing::info!("failover: protected (initial sync acknowledged)");
                                    }
                                    i.epochs = f.epoch;
                                });
                            }
                            FrameKind::Heartbeat => {}
                            FrameKind::Takeover => {
                                let _ = end_tx.send(LinkEnd::TakenOver);
                                return;
                            }
                            FrameKind::Error => {
                                let why = String::from_utf8_lossy(&f.payload).into_owned();
                                let _ = end_tx.send(LinkEnd::Closed(format!("the standby gave up: {why}")));
                                return;
                            }
                            k => {
                                let _ = end_tx.send(LinkEnd::Closed(format!("the standby sent a {} frame", k.name())));
                                return;
                            }
                        },
                        Err(e) => {
                            let _ = end_tx.send(link_end_of(e));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| LinkEnd::Closed(format!("cannot start the ack thread: {e}")))?;
    }
    // A failed write: the reader may know better (the standby said it
    // takes over, then closed): ask it first.
    let verdict = |e: LinkEnd| end_rx.recv_timeout(Duration::from_secs(1)).unwrap_or(e);
    let epoch_every = Duration::from_millis(timing.epoch_ms);
    let heartbeat_every = Duration::from_millis(timing.heartbeat_ms);
    let tick = epoch_every.min(heartbeat_every);
    let mut next_epoch = Instant::now() + epoch_every;
    let mut last_sent = Instant::now();
    let mut epoch = 0u64;
    loop {
        if let Ok(end) = end_rx.recv_timeout(tick.min(next_epoch.saturating_duration_since(Instant::now()))) {
            return Err(end);
        }
        if vm.stopped() {
            let _ = fo::write_frame(&mut w, FrameKind::End, epoch, &[]);
            let _ = w.flush();
            return Ok(());
        }
        let now = Instant::now();
        if overlays.iter().any(|(_, o)| o.wants_epoch()) {
            // An epoch's disk writes reached their bound: end it now.
            next_epoch = now;
        }
        if now >= next_epoch {
            epoch += 1;
            let mut disk_ops = Vec::new();
            gate.set_pausing(true);
            for (_, o) in &overlays {
                o.set_pausing(true);
            }
            let captured = fo::capture(vm, || {
                gate.mark(epoch);
                disk_ops = overlays.iter().map(|(i, o)| (*i, o.seal(epoch))).collect();
            });
            gate.set_pausing(false);
            for (_, o) in &overlays {
                o.set_pausing(false);
            }
            let c = match captured {
                Ok(c) => c,
                Err(_) if vm.stopped() => continue,
                Err(e) => {
                    let why = format!("checkpoint failed: {e}");
                    let _ = fo::write_frame(&mut w, FrameKind::Error, epoch, why.as_bytes());
                    let _ = w.flush();
                    return Err(LinkEnd::Closed(why));
                }
            };
            shared.pauses.lock().unwrap_or_else(|e| e.into_inner()).add(c.pause);
            if !overlays.is_empty() {
                let writes = fo::encode_disk_writes(committed.load(Ordering::Acquire), &disk_ops);
                if writes.len() as u64 > fo::max_disk_writes_len(max_epoch) {
                    let why = format!(
                        "epoch {epoch} wrote {} MiB to disk, more than a checkpoint carries",
                        writes.len() >> 20
                    );
                    let _ = fo::write_frame(&mut w, FrameKind::Error, epoch, why.as_bytes());
                    let _ = w.flush();
                    return Err(LinkEnd::Closed(why));
                }
                sent += fo::write_frame(&mut w, FrameKind::DiskWrites, epoch, &writes).map_err(|e| verdict(io(e)))?;
            }
            sent += fo::write_frame(&mut w, FrameKind::Epoch, epoch, &c.payload).map_err(|e| verdict(io(e)))?;
            w.flush().map_err(|e| verdict(io(e)))?;
            shared.update(|i| i.checkpoint_bytes = sent);
            last_sent = Instant::now();
            next_epoch += epoch_every;
            if next_epoch < last_sent {
                // Behind (a slow link or a big epoch): the next one now.
                next_epoch = last_sent;
            }
        } else if now.duration_since(last_sent) >= heartbeat_every {
            sent += fo::write_frame(&mut w, FrameKind::Heartbeat, epoch, &[]).map_err(|e| verdict(io(e)))?;
            w.flush().map_err(|e| verdict(io(e)))?;
            last_sent = now;
        }
    }
}

/// `PUT /failover/standby`: listen (204 once listening), then hold the
/// primary's checkpoints on a thread of its own.
pub fn start_standby(ctl: &mut Controller, req: StandbyRequest) -> Result<(), ActionError> {
    let endpoint = Endpoint::parse(&req.listen_url).map_err(ActionError::InvalidConfig)?;
    for o in &req.network_overrides {
        crate::fc::check_id("iface_id", &o.iface_id).map_err(ActionError::InvalidConfig)?;
    }
    ctl.check_fresh("standing by")?;
    if ctl.migration.active() {
        return Err(ActionError::Runtime("a migration is in progress".into()));
    }
    if ctl.failover.standing_by() {
        return Err(ActionError::Runtime("already standing by".into()));
    }
    let listener = endpoint
        .listen()
        .map_err(|e| ActionError::InvalidConfig(format!("listen_url: {e}")))?;
    let shared = ctl.failover.shared.clone();
    shared.takeover_now.store(false, Ordering::Release);
    *shared.info.lock().unwrap_or_else(|e| e.into_inner()) = FailoverInfo {
        role: Some("standby".into()),
        status: Status::Waiting,
        ..Default::default()
    };
    *shared.last_checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let exits = ctl.exits();
    let url = req.listen_url.clone();
    let mode = req.takeover;
    let overrides = req.network_overrides;
    std::thread::Builder::new()
        .name("failover-standby".into())
        .spawn(move || standby_thread(listener, url, mode, overrides, shared, exits))
        .map_err(|e| ActionError::Runtime(format!("cannot start the failover thread: {e}")))?;
    Ok(())
}

fn standby_thread(
    listener: crate::migration::Listener,
    url: String,
    mode: TakeoverMode,
    overrides: Vec<crate::fc::NetworkOverride>,
    shared: Arc<Shared>,
    exits: Sender<Msg>,
) {
    let fail = |why: String| {
        eprintln!("vessel: failover standby on {url}: {why}; nothing runs here");
        shared.update(|i| {
            i.status = Status::Failed;
            i.error = Some(why);
        });
    };
    let never = AtomicBool::new(false);
    let conn = match listener.accept(&never) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    drop(listener);
    shared.update(|i| i.status = Status::Syncing);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(format!("socket: {e}")),
    };
    let _ = conn.set_read_timeout(SYNC_TIMEOUT);
    let _ = writer.set_write_timeout(SYNC_TIMEOUT);
    let mut r = BufReader::with_capacity(1 << 20, conn);
    // The primary's timing, then the initial sync.
    let timing: Timing = match fo::read_frame(&mut r, 0) {
        Ok(f) if f.kind == FrameKind::Config => match serde_json::from_slice(&f.payload) {
            Ok(t) => t,
            Err(e) => return fail(format!("malformed failover config: {e}")),
        },
        Ok(f) => return fail(format!("a {} frame where the config was expected", f.kind.name())),
        Err(e) => return fail(e.to_string()),
    };
    if timing.timeout_ms == 0 || timing.timeout_ms > 60_000 || timing.heartbeat_ms == 0 {
        return fail(format!("failover timing out of range: {timing:?}"));
    }
    let incoming = stream::receive(
        &mut r,
        MAX_STANDBY_MEM,
        &mut |size| vmm::memory::create(size).map_err(|e| e.to_string()),
        &mut |bytes| shared.update(|i| i.checkpoint_bytes = bytes),
    );
    let incoming = match incoming {
        Ok(i) => i,
        Err(e) => {
            let why = format!("initial sync failed: {e}");
            let _ = fo::write_frame(&mut writer, FrameKind::Error, 0, why.as_bytes());
            return fail(why);
        }
    };
    let mem = incoming.mem;
    let mem_size = incoming.hello.mem_size;
    let cpus = incoming.hello.cpus;
    let mut state = incoming.state;
    let mut bytes = incoming.bytes;
    let mut applied = 0u64;
    if fo::write_frame(&mut writer, FrameKind::Ack, 0, &[]).is_err() {
        return fail("the primary went away at the end of the initial sync; discarded what it sent".into());
    }
    shared.checkpoint_now();
    shared.update(|i| {
        i.status = Status::Protected;
        i.resume_epoch = Some(0);
        i.checkpoint_bytes = bytes;
    });
    eprintln!(
        "vessel: failover standby on {url}: initial sync done ({} MiB); protecting",
        bytes >> 20
    );
    let timeout = Duration::from_millis(timing.timeout_ms);
    // Silence for timeout_ms fails a read: the primary is gone.
    let _ = r.get_ref().set_read_timeout(timeout);
    let _ = writer.set_write_timeout(timeout);
    let max_epoch = fo::max_epoch_len(mem_size);
    // Disk writes: those of the next epoch (kept only if it is applied),
    // and those of applied epochs the primary has not written to the
    // images yet, oldest first, with their size.
    let mut next_writes: Option<(u64, fo::DiskWrites)> = None;
    let mut held_writes: std::collections::VecDeque<(u64, Vec<(u32, fo::DiskOp)>)> = Default::default();
    let mut held_bytes = 0u64;
    let max_held = 8 * fo::max_disk_writes_len(max_epoch);
    let why = loop {
        if shared.takeover_now.load(Ordering::Acquire) {
            break "forced (PUT /failover/takeover)".to_string();
        }
        match fo::read_frame(&mut r, max_epoch) {
            Ok(f) => match f.kind {
                FrameKind::Epoch => {
                    bytes += f.payload.len() as u64 + 32;
                    let checked = match fo::check_epoch(&f.payload, &mem, mem_size, cpus) {
                        Ok(c) => c,
                        Err(e) => {
                            let why = format!("epoch {} refused, discarded: {e}", f.epoch);
                            let _ = fo::write_frame(&mut writer, FrameKind::Error, f.epoch, why.as_bytes());
                            return fail(why);
                        }
                    };
                    match fo::apply_epoch(&mem, checked) {
                        Ok(s) => state = s,
                        Err(e) => return fail(format!("applying epoch {}: {e}", f.epoch)),
                    }
                    if let Some((e, w)) = next_writes.take() {
                        // The epoch is applied: its disk writes are kept;
                        // what the primary wrote to the images is dropped.
                        if e == f.epoch {
                            held_bytes += ops_bytes(&w.ops);
                            held_writes.push_back((e, w.ops));
                        }
                        while held_writes.front().is_some_and(|&(e, _)| e <= w.committed_through) {
                            if let Some((_, ops)) = held_writes.pop_front() {
                                held_bytes = held_bytes.saturating_sub(ops_bytes(&ops));
                            }
                        }
                    }
                    applied = f.epoch;
                    shared.checkpoint_now();
                    shared.update(|i| {
                        i.epochs += 1;
                        i.resume_epoch = Some(applied);
                        i.checkpoint_bytes = bytes;
                    });
                    if let Err(e) = fo::write_frame(&mut writer, FrameKind::Ack, f.epoch, &[]) {
                        break format!("acknowledging epoch {}: {e}", f.epoch);
                    }
                }
                FrameKind::DiskWrites => {
                    bytes += f.payload.len() as u64 + 32;
                    let checked = fo::parse_disk_writes(&f.payload, state.config.disks.len()).and_then(|w| {
                        let size = ops_bytes(&w.ops);
                        if held_bytes + size > max_held {
                            return Err(FailoverError::Malformed(
                                "disk-writes",
                                format!(
                                    "{} MiB of disk writes held for the primary, which has not written them",
                                    (held_bytes + size) >> 20
                                ),
                            ));
                        }
                        Ok(w)
                    });
                    match checked {
                        Ok(w) => next_writes = Some((f.epoch, w)),
                        Err(e) => {
                            let why = format!("the disk writes of epoch {} refused, discarded: {e}", f.epoch);
                            let _ = fo::write_frame(&mut writer, FrameKind::Error, f.epoch, why.as_bytes());
                            return fail(why);
                        }
                    }
                }
                FrameKind::Heartbeat => {
                    if let Err(e) = fo::write_frame(&mut writer, FrameKind::Heartbeat, f.epoch, &[]) {
                        break format!("answering a heartbeat: {e}");
                    }
                }
                FrameKind::End => {
                    return fail("the primary ended protection (its VM stopped); discarded the checkpoints".into())
                }
                FrameKind::Error => {
                    return fail(format!(
                        "the primary gave up: {}; discarded the checkpoints",
                        String::from_utf8_lossy(&f.payload)
                    ))
                }
                k => {
                    let why = format!("a {} frame from the primary", k.name());
                    let _ = fo::write_frame(&mut writer, FrameKind::Error, 0, why.as_bytes());
                    return fail(why);
                }
            },
            Err(FailoverError::Checksum(kind, epoch)) => {
                // The link corrupts: the primary is alive, so taking over
                // would run the guest twice. Give up protection instead.
                let why = format!("checksum mismatch in the {kind} frame of epoch {epoch}: the stream is corrupt; the epoch was discarded, never applied");
                let _ = fo::write_frame(&mut writer, FrameKind::Error, epoch, why.as_bytes());
                return fail(why);
            }
            Err(e @ (FailoverError::UnknownType(_) | FailoverError::TooLong { .. } | FailoverError::Malformed(..))) => {
                let why = format!("{e}; discarded what came");
                let _ = fo::write_frame(&mut writer, FrameKind::Error, 0, why.as_bytes());
                return fail(why);
            }
            Err(e) => {
                // Silence for timeout_ms, a closed or reset link, or an
                // epoch cut short: the primary is gone. A half-received
                // epoch is discarded (it was never applied).
                break match e {
                    FailoverError::Stream(StreamError::Io(io)) if classify_io(&io) => {
                        format!("nothing from the primary for {} ms", timing.timeout_ms)
                    }
                    e => format!("the primary is gone ({e})"),
                };
            }
        }
    };
    // Tell the primary, in case it is alive behind a slow link: it fences
    // itself on this frame. Then drain the connection for a while rather
    // than close it with bytes unread (TCP would reset it, and the frame
    // could be lost with the reset).
    let _ = writer.set_write_timeout(Duration::from_millis(200));
    let _ = fo::write_frame(&mut writer, FrameKind::Takeover, applied, &[]);
    let _ = std::thread::Builder::new()
        .name("failover-drain".into())
        .spawn(move || {
            let _ = r.get_ref().set_read_timeout(Duration::from_secs(1));
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = vec![0u8; 64 << 10];
            while Instant::now() < deadline {
                match std::io::Read::read(&mut r, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if classify_io(&e) => {}
                    Err(_) => break,
                }
            }
            drop(writer);
        });
    if mode == TakeoverMode::Manual && !shared.takeover_now.load(Ordering::Acquire) {
        eprintln!("vessel: failover standby on {url}: {why}; waiting for PUT /failover/takeover (manual mode)");
        shared.update(|i| {
            i.status = Status::Unprotected;
            i.error = Some(format!("{why}: waiting for PUT /failover/takeover"));
        });
        while !shared.takeover_now.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let decided = Instant::now();
    let age = shared
        .last_checkpoint
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map_or(0, |t| t.elapsed().as_millis());
    if let Err(e) = crate::control::apply_network_overrides(&mut state, &overrides, "the protected VM") {
        return fail(format!("takeover failed: network_overrides: {e}"));
    }
    // The primary's TAPs and disk images: a dead process's files close as
    // the kernel tears it down, a fenced primary lets go of them; until
    // then opening them fails (a TAP takes one process, an image's lock
    // one writer). Try again until they are free.
    // The held disk writes of the applied epochs go to the images first
    // (a half-received epoch's were never kept).
    let ops: Vec<(u32, fo::DiskOp)> = held_writes.into_iter().flat_map(|(_, ops)| ops).collect();
    let machine = loop {
        if let Err(e) = fo::write_held_disk_ops(&state.config, &ops) {
            if decided.elapsed() < TAKEOVER_OPEN_TIMEOUT {
                tracing::info!("failover: takeover: {e}; trying again");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            return fail(format!("takeover failed: the held disk writes: {e}"));
        }
        let st = state.clone();
        let m = mem.clone();
        match on_main(&exits, move |ctl| ctl.prepare_incoming(&st, m, None)) {
            Ok(Ok(m)) => break m,
            Ok(Err(e)) if decided.elapsed() < TAKEOVER_OPEN_TIMEOUT => {
                tracing::info!("failover: takeover: {e}; trying again");
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(Err(e)) => return fail(format!("takeover failed: {e}")),
            Err(e) => return fail(format!("takeover failed: {e}")),
        }
    };
    drop(mem);
    let vm = match on_main(&exits, move |ctl| ctl.start_incoming(machine, &state)) {
        Ok(Ok((_, vm))) => vm,
        Ok(Err(e)) => return fail(format!("takeover failed: {e}")),
        Err(e) => return fail(format!("takeover failed: {e}")),
    };
    let took = decided.elapsed().as_millis() as u64;
    shared.update(|i| {
        i.role = Some("primary".into());
        i.status = Status::TookOver;
        i.takeover_ms = Some(took);
        i.error = Some(why.clone());
    });
    eprintln!(
        "vessel: failover: {why}; TOOK OVER from epoch {applied} (checkpoint {age} ms old) in {took} ms; this VMM is the primary now, unprotected"
    );
    // Tell the network where the guest is now (RARP, as after a migration).
    crate::migration::announce(&vm);
}

/// Bytes of data in held disk writes.
fn ops_bytes(ops: &[(u32, fo::DiskOp)]) -> u64 {
    ops.iter()
        .map(|(_, op)| match op {
            fo::DiskOp::Write { data, .. } => data.len() as u64 + 24,
            fo::DiskOp::Zero { .. } => 24,
        })
        .sum()
}

/// `vessel protect NAME --standby URL`.
#[derive(clap::Args)]
pub struct ProtectArgs {
    /// The VM to protect.
    pub name: String,
    /// The standby: unix:PATH or tcp:HOST:PORT (a `vessel run --standby`).
    #[arg(long)]
    pub standby: String,
    /// Checkpoint period, in ms.
    #[arg(long, default_value_t = 50)]
    pub epoch_ms: u64,
    /// Heartbeat period when no checkpoint goes, in ms.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Silence after which the standby takes over (and the primary fences
    /// itself), in ms.
    #[arg(long, default_value_t = 500)]
    pub timeout_ms: u64,
}

/// Start protection through the VM's API and wait until the initial sync
/// is acknowledged.
pub fn cli_protect(sock: &std::path::Path, a: &ProtectArgs) -> Result<(), String> {
    use crate::api::client;
    let body = serde_json::json!({
        "standby_url": a.standby,
        "epoch_ms": a.epoch_ms,
        "heartbeat_ms": a.heartbeat_ms,
        "timeout_ms": a.timeout_ms,
    })
    .to_string();
    let timeout = Duration::from_secs(10);
    let r = client::request(sock, "PUT", "/failover/protect", Some(&body), timeout)
        .map_err(|e| format!("{}: {e}", a.name))?;
    if r.status >= 400 {
        return Err(format!("{}: {}", a.name, r.fault()));
    }
    let start = Instant::now();
    loop {
        let r = client::request(sock, "GET", "/failover", None, timeout).map_err(|e| format!("{}: {e}", a.name))?;
        let info: FailoverInfo = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
        match info.status {
            Status::Protected => {
                eprintln!(
                    "{} is protected by {} ({:.1} MiB initial sync in {} ms)",
                    a.name,
                    a.standby,
                    info.checkpoint_bytes as f64 / f64::from(1 << 20),
                    start.elapsed().as_millis()
                );
                return Ok(());
            }
            Status::Syncing => {}
            s => {
                return Err(format!(
                    "{}: protection {}: {}",
                    a.name,
                    serde_json::to_value(s).map(|v| v.to_string()).unwrap_or_default(),
                    info.error.unwrap_or_default()
                ))
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protect_request_defaults_and_checks() {
        let r: ProtectRequest = serde_json::from_str(r#"{"standby_url": "tcp:h:1"}"#).unwrap();
        assert_eq!((r.epoch_ms, r.heartbeat_ms, r.timeout_ms), (50, 100, 500));
        assert!(r.validate().is_ok());
        for bad in [
            r#"{"standby_url": "tcp:h:1", "epoch_ms": 0}"#,
            r#"{"standby_url": "tcp:h:1", "timeout_ms": 100}"#,
            r#"{"standby_url": "tcp:h:1", "heartbeat_ms": 1000000}"#,
            r#"{"standby_url": "ftp:h:1"}"#,
        ] {
            let r: ProtectRequest = serde_json::from_str(bad).unwrap();
            assert!(r.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<ProtectRequest>(r#"{"standby_url": "tcp:h:1", "x": 1}"#).is_err());
        let s: StandbyRequest = serde_json::from_str(r#"{"listen_url": "unix:/s"}"#).unwrap();
        assert_eq!(s.takeover, TakeoverMode::Auto);
        assert!(serde_json::from_str::<StandbyRequest>(r#"{"listen_url": "unix:/s", "takeover": "maybe"}"#).is_err());
    }

    #[test]
    fn status_names() {
        assert_eq!(serde_json::to_value(Status::TookOver).unwrap(), "took-over");
        assert_eq!(serde_json::to_value(Status::Protected).unwrap(), "protected");
    }
}
