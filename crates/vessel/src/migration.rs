//! Migration in the control plane: `PUT /migration/receive` on a fresh
//! Vessel, `PUT /migration/send` on the source (both answer at once; the
//! migration runs on a thread of its own), `GET /migration`,
//! `PUT /migration/cancel`. The stream and the pre-copy engine are in
//! `vmm::migration`; docs/MIGRATION.md describes the protocol.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use vmm::migration::send::{Mode, SendOptions, TimeoutAction};
use vmm::migration::stream::{self, Message};
use vmm::migration::{MigrationInfo, Status};

use crate::control::{ActionError, Controller, Msg, VmmAction};

/// How long either side waits for the other before it counts as gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a migrated source waits for a client to read "completed"
/// before it exits.
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// How long it stays once a client has read it, for other clients.
const REPORT_LINGER: Duration = Duration::from_secs(2);
/// The most guest memory a destination accepts from a stream.
const MAX_INCOMING_MEM: u64 = 1 << 40;

/// `PUT /migration/receive`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    pub receiver_url: String,
    /// Vessel extension: the engine to run the VM under here (emu, kvm,
    /// auto); the source's by default. Either engine takes a VM from
    /// either, under the CPUID rule of snapshots.
    #[serde(default)]
    pub accel: Option<String>,
    /// TAPs (and MACs) of this host for the VM's network interfaces,
    /// as in `PUT /snapshot/load`; by default the destination opens the
    /// TAP the source used, once the source has let go of it.
    #[serde(default)]
    pub network_overrides: Vec<crate::fc::NetworkOverride>,
}

/// `PUT /migration/send`; only `destination_url` is required.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub destination_url: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    #[serde(default)]
    pub max_bandwidth_mbps: Option<u64>,
    #[serde(default = "yes")]
    pub auto_converge: bool,
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    #[serde(default = "default_timeout_action")]
    pub timeout_action: TimeoutAction,
}

fn default_mode() -> Mode {
    Mode::Live
}
fn default_downtime() -> u64 {
    300
}
fn yes() -> bool {
    true
}
fn default_timeout() -> u64 {
    3600
}
fn default_timeout_action() -> TimeoutAction {
    TimeoutAction::Cancel
}

impl SendRequest {
    fn validate(&self) -> Result<Endpoint, String> {
        if self.downtime_ms == 0 || self.downtime_ms > 3_600_000 {
            return Err(format!("downtime_ms {} must be from 1 to 3600000", self.downtime_ms));
        }
        if self.max_bandwidth_mbps == Some(0) {
            return Err("max_bandwidth_mbps must be positive (or null for no limit)".into());
        }
        if self.timeout_s == 0 {
            return Err("timeout_s must be positive".into());
        }
        Endpoint::parse(&self.destination_url)
    }
}

/// Where a migration stream goes: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        if let Some(p) = url.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{url:?}: no socket path after unix:"));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(a) = url.strip_prefix("tcp:") {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("{url:?}: expected tcp:HOST:PORT"));
            }
            return Ok(Endpoint::Tcp(a.trim_start_matches('[').replace("]:", ":")));
        }
        Err(format!("{url:?}: a migration URL is unix:PATH or tcp:HOST:PORT"))
    }

    fn tcp_addr(a: &str) -> Result<std::net::SocketAddr, String> {
        // "HOST:PORT", with an IPv6 host in brackets or bare.
        let (h, p) = a.rsplit_once(':').ok_or_else(|| format!("{a}: no port"))?;
        let h = h.trim_start_matches('[').trim_end_matches(']');
        (h, p.parse::<u16>().map_err(|e| e.to_string())?)
            .to_socket_addrs()
            .map_err(|e| format!("{a}: {e}"))?
            .next()
            .ok_or_else(|| format!("{a}: no address"))
    }

    pub(crate) fn connect(&self) -> Result<Conn, String> {
        match self {
            Endpoint::Unix(p) => UnixStream::connect(p)
                .map(Conn::Unix)
                .map_err(|e| format!("{}: {e}", p.display())),
            Endpoint::Tcp(a) => {
                let addr = Self::tcp_addr(a)?;
                let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("{a}: {e}"))?;
                let _ = s.set_nodelay(true);
                Ok(Conn::Tcp(s))
            }
        }
    }

    pub(crate) fn listen(&self) -> Result<Listener, String> {
        match self {
            Endpoint::Unix(p) => UnixListener::bind(p)
                .map(|l| Listener::Unix(l, p.clone()))
                .map_err(|e| format!("{}: {e}", p.display())),
            Endpoint::Tcp(a) => {
                let addr = Self::tcp_addr(a)?;
                TcpListener::bind(addr)
                    .map(Listener::Tcp)
                    .map_err(|e| format!("{a}: {e}"))
            }
        }
    }
}

pub(crate) enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Wait for one connection, giving up when `cancel` is set.
    pub(crate) fn accept(&self, cancel: &AtomicBool) -> Result<Conn, String> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(|e| e.to_string())?;
        loop {
            let r = match self {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    // The small replies (prepared, running) must not wait
                    // for Nagle: they are on the downtime's path.
                    let _ = s.set_nodelay(true);
                    Conn::Tcp(s)
                }),
            };
            match r {
                Ok(c) => {
                    c.set_nonblocking(false).map_err(|e| e.to_string())?;
                    return Ok(c);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if cancel.load(Ordering::Acquire) {
                        return Err("cancelled before the source connected".into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One end of a migration (or failover) connection.
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(Some(t)),
            Conn::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }

    /// A peer that stops reading (a host that died) fails the writer
    /// after `t` instead of blocking it for good.
    pub(crate) fn set_write_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(Some(t)),
            Conn::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }

    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(on),
            Conn::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// The controller's view of the migration: its figures, and whether one
/// runs now.
#[derive(Default)]
pub struct Slot {
    info: Arc<Mutex<MigrationInfo>>,
    cancel: Arc<AtomicBool>,
    active: Arc<AtomicBool>,
    /// A client saw the final figures (the source waits a moment for it
    /// before it exits, so `vessel migrate` sees "completed").
    reported: Arc<AtomicBool>,
}

impl Slot {
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn info(&self) -> MigrationInfo {
        let i = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if i.status == Status::Completed {
            self.reported.store(true, Ordering::Release);
        }
        i
    }

    pub fn cancel(&self) -> Result<(), ActionError> {
        if !self.active() {
            return Err(ActionError::Runtime("no migration is in progress".into()));
        }
        self.cancel.store(true, Ordering::Release);
        Ok(())
    }

    /// Start a new migration's record; refused while one runs.
    fn begin(&self, role: &str, mode: Option<Mode>) -> Result<(), ActionError> {
        if self.active.swap(true, Ordering::AcqRel) {
            return Err(ActionError::Runtime("a migration is already in progress".into()));
        }
        self.cancel.store(false, Ordering::Release);
        self.reported.store(false, Ordering::Release);
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = MigrationInfo {
            status: Status::Setup,
            role: Some(role.into()),
            mode: mode.map(|m| match m {
                Mode::Cold => "cold".into(),
                Mode::Live => "live".into(),
            }),
            ..Default::default()
        };
        Ok(())
    }

    fn handles(&self) -> Handles {
        Handles {
            info: self.info.clone(),
            cancel: self.cancel.clone(),
            active: self.active.clone(),
            reported: self.reported.clone(),
        }
    }
}

/// What a migration thread holds of the slot.
struct Handles {
    info: Arc<Mutex<MigrationInfo>>,
    cancel: Arc<AtomicBool>,
    active: Arc<AtomicBool>,
    reported: Arc<AtomicBool>,
}

impl Handles {
    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn fail(&self, status: Status, why: String, started: Instant) {
        self.update(|i| {
            i.status = status;
            i.error = Some(why);
            i.total_time_ms = started.elapsed().as_millis() as u64;
        });
        self.active.store(false, Ordering::Release);
    }
}

/// `PUT /migration/send`: check, then migrate on a thread of its own.
pub fn start_send(ctl: &mut Controller, req: SendRequest) -> Result<(), ActionError> {
    let endpoint = req.validate().map_err(ActionError::InvalidConfig)?;
    let (handle, paused) = ctl.migration_source()?;
    // A paused VM's vCPUs cannot answer dirty-page flushes: it goes cold,
    // and stays paused if the migration fails.
    let mode = if paused { Mode::Cold } else { req.mode };
    ctl.migration.begin("source", Some(mode))?;
    let h = ctl.migration.handles();
    let exits = ctl.exits();
    let opts = SendOptions {
        mode,
        downtime_limit: Duration::from_millis(req.downtime_ms),
        max_bandwidth: req.max_bandwidth_mbps.map(|m| m.saturating_mul(1_000_000) / 8),
        auto_converge: req.auto_converge,
        timeout: Duration::from_secs(req.timeout_s),
        timeout_action: req.timeout_action,
        resume_on_failure: !paused,
    };
    let url = req.destination_url.clone();
    std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || send_thread(handle, endpoint, url, opts, h, exits))
        .map_err(|e| ActionError::Runtime(format!("cannot start the migration thread: {e}")))?;
    Ok(())
}

fn send_thread(vm: vmm::VmHandle, endpoint: Endpoint, url: String, opts: SendOptions, h: Handles, exits: Sender<Msg>) {
    let started = Instant::now();
    let conn = match endpoint.connect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vessel: migration to {url} failed: cannot connect: {e}; the VM runs on");
            return h.fail(Status::Failed, format!("cannot connect to {url}: {e}"), started);
        }
    };
    let mut reader = match conn
        .set_write_timeout(PEER_TIMEOUT)
        .and_then(|_| conn.try_clone())
        .and_then(|r| r.set_read_timeout(PEER_TIMEOUT).map(|_| r))
    {
        Ok(r) => r,
        Err(e) => return h.fail(Status::Failed, format!("socket: {e}"), started),
    };
    let result = vmm::migration::send::send(&vm, &mut reader, conn, &opts, &h.info, &h.cancel);
    match result {
        Ok(o) => {
            eprintln!(
                "vessel: migrated to {url} ({}): {:.1} MiB sent in {} ms, {} iterations, downtime {}",
                if opts.mode == Mode::Live { "live" } else { "cold" },
                o.transferred_bytes as f64 / f64::from(1 << 20),
                o.total_time.as_millis(),
                o.iterations,
                o.downtime_ms.map_or("unknown".into(), |d| format!("{d} ms"))
            );
            // A client polling GET /migration (`vessel migrate`) must see
            // "completed" before the API goes away with the process: wait
            // until one has, or at most REPORT_GRACE on a busy host where
            // the client's next poll may come late.
            let wait = Instant::now();
            while !h.reported.load(Ordering::Acquire) && wait.elapsed() < REPORT_GRACE {
                std::thread::sleep(Duration::from_millis(10));
            }
            // More than one client may poll (`vessel migrate` and a
            // dashboard): the first to read "completed" must not end the
            // process under the others' feet. They get a moment too.
            if h.reported.load(Ordering::Acquire) {
                std::thread::sleep(REPORT_LINGER.min(REPORT_GRACE.saturating_sub(wait.elapsed())));
            }
            let _ = exits.send(Msg::Call(Box::new(|ctl: &mut Controller| {
                let _ = ctl.handle(VmmAction::Stop);
            })));
        }
        Err(e) => {
            let runs = if opts.resume_on_failure {
                "runs on"
            } else {
                "stays paused"
            };
            eprintln!("vessel: migration to {url} failed: {e}; the VM {runs}");
        }
    }
    h.active.store(false, Ordering::Release);
}

/// `PUT /migration/receive`: listen (204 once listening), then take one
/// incoming migration on a thread of its own.
pub fn start_receive(ctl: &mut Controller, req: ReceiveRequest) -> Result<(), ActionError> {
    let endpoint = Endpoint::parse(&req.receiver_url).map_err(ActionError::InvalidConfig)?;
    if let Some(a) = &req.accel {
        // Refused now rather than after the whole stream came.
        let accel = a
            .parse::<vmm::Accel>()
            .map_err(|e| ActionError::InvalidConfig(e.to_string()))?;
        vmm::engine::choose(accel).map_err(|e| ActionError::InvalidConfig(e.to_string()))?;
    }
    for o in &req.network_overrides {
        crate::fc::check_id("iface_id", &o.iface_id).map_err(ActionError::InvalidConfig)?;
    }
    ctl.check_fresh("receiving a migration")?;
    if ctl.migration.active() {
        return Err(ActionError::Runtime("a migration is already in progress".into()));
    }
    let listener = endpoint
        .listen()
        .map_err(|e| ActionError::InvalidConfig(format!("receiver_url: {e}")))?;
    ctl.migration.begin("destination", None)?;
    let h = ctl.migration.handles();
    let exits = ctl.exits();
    let url = req.receiver_url.clone();
    let accel = req.accel.clone();
    let overrides = req.network_overrides;
    std::thread::Builder::new()
        .name("migration-receive".into())
        .spawn(move || receive_thread(listener, url, accel, overrides, h, exits))
        .map_err(|e| ActionError::Runtime(format!("cannot start the migration thread: {e}")))?;
    Ok(())
}

/// Run `f` on the main thread, with the controller, and wait for its answer.
pub(crate) fn on_main<T: Send + 'static>(
    exits: &Sender<Msg>,
    f: impl FnOnce(&mut Controller) -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    exits
        .send(Msg::Call(Box::new(move |ctl: &mut Controller| {
            let _ = tx.send(f(ctl));
        })))
        .map_err(|_| "the VMM is shutting down".to_string())?;
    rx.recv().map_err(|_| "the VMM is shutting down".to_string())
}

fn receive_thread(
    listener: Listener,
    url: String,
    accel: Option<String>,
    overrides: Vec<crate::fc::NetworkOverride>,
    h: Handles,
    exits: Sender<Msg>,
) {
    let started = Instant::now();
    let fail = |why: String, conn: Option<&mut Conn>| {
        eprintln!("vessel: incoming migration on {url} failed: {why}; nothing runs here");
        if let Some(c) = conn {
            let _ = stream::write_message(c, &Message::Error(why.clone()));
            let _ = c.flush();
        }
        let status = if h.cancel.load(Ordering::Acquire) {
            Status::Cancelled
        } else {
            Status::Failed
        };
        h.fail(status, why, started);
    };
    let mut conn = match listener.accept(&h.cancel) {
        Ok(c) => c,
        Err(e) => return fail(e, None),
    };
    drop(listener);
    let started = Instant::now();
    h.update(|i| i.status = Status::Active);
    let mut reader = match conn
        .try_clone()
        .and_then(|r| r.set_read_timeout(PEER_TIMEOUT).map(|_| r))
    {
        Ok(r) => r,
        Err(e) => return fail(format!("socket: {e}"), None),
    };
    let incoming = stream::receive(
        &mut std::io::BufReader::with_capacity(1 << 20, &mut reader),
        MAX_INCOMING_MEM,
        &mut |size| vmm::memory::create(size).map_err(|e| e.to_string()),
        &mut |bytes| {
            h.update(|i| i.transferred_bytes = bytes);
        },
    );
    let incoming = match incoming {
        Ok(i) => i,
        Err(e) => return fail(e.to_string(), Some(&mut conn)),
    };
    h.update(|i| {
        i.transferred_bytes = incoming.bytes;
        i.total_bytes = incoming.hello.mem_size;
    });
    let mut state = incoming.state;
    if let Err(e) = crate::control::apply_network_overrides(&mut state, &overrides, "the migrated VM") {
        return fail(format!("network_overrides: {e}"), Some(&mut conn));
    }
    let mem = incoming.mem;
    let st = state.clone();
    let machine = match on_main(&exits, move |ctl| ctl.prepare_incoming(&st, mem, accel)) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return fail(e.to_string(), Some(&mut conn)),
        Err(e) => return fail(e, Some(&mut conn)),
    };
    if let Err(e) = stream::write_message(&mut conn, &Message::Prepared).and_then(|_| conn.flush().map_err(Into::into))
    {
        machine.discard();
        return fail(format!("the source is gone: {e}; discarded what it sent"), None);
    }
    let paused_at = match stream::read_message(&mut reader) {
        Ok(Message::Commit {
            paused_at_unix_ns,
            iterations,
        }) => {
            h.update(|i| i.iterations = iterations);
            paused_at_unix_ns
        }
        Ok(Message::Error(e)) => {
            machine.discard();
            return fail(format!("{e}; discarded what it sent"), None);
        }
        Ok(m) => {
            machine.discard();
            return fail(
                format!("a {} message where commit was expected; discarded what came", m.name()),
                Some(&mut conn),
            );
        }
        Err(e) => {
            machine.discard();
            return fail(format!("the source did not commit ({e}); discarded what it sent"), None);
        }
    };
    let resumed = on_main(&exits, move |ctl| ctl.start_incoming(machine, &state));
    let (resumed_at, vm) = match resumed {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(format!("cannot run the received VM: {e}"), Some(&mut conn)),
        Err(e) => return fail(e, Some(&mut conn)),
    };
    let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let downtime_ms = ns(resumed_at).saturating_sub(paused_at) / 1_000_000;
    let _ = stream::write_message(&mut conn, &Message::Running { downtime_ms });
    let _ = conn.flush();
    h.update(|i| {
        i.status = Status::Completed;
        i.downtime_ms = Some(downtime_ms);
        i.total_time_ms = started.elapsed().as_millis() as u64;
        i.remaining_bytes = 0;
    });
    h.active.store(false, Ordering::Release);
    tracing::info!("incoming migration on {url} completed: downtime {downtime_ms} ms");
    announce(&vm);
}

/// Announce the guest on its network after the switch, as QEMU's
/// announce-self does with its defaults: a RARP frame from each NIC's MAC,
/// five times, after gaps of 50, 150, 250 and 350 ms, so that switches and
/// bridges learn where the guest is now even if a frame is lost.
pub(crate) fn announce(vm: &vmm::VmHandle) {
    const ROUNDS: u64 = 5;
    for round in 0..ROUNDS {
        if vm.stopped() || vm.announce_network() == 0 {
            return;
        }
        if round + 1 < ROUNDS {
            std::thread::sleep(Duration::from_millis(50 + 100 * round));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Endpoint::parse("unix:/tmp/m.sock"),
            Ok(Endpoint::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:4444"),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert!(Endpoint::parse("tcp:[::1]:4444").is_ok());
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "http://x",
            "exec:cat",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn receive_request_takes_an_engine() {
        let r: ReceiveRequest = serde_json::from_str(r#"{"receiver_url": "unix:/s"}"#).unwrap();
        assert_eq!(r.accel, None);
        let r: ReceiveRequest = serde_json::from_str(r#"{"receiver_url": "unix:/s", "accel": "kvm"}"#).unwrap();
        assert_eq!(r.accel.as_deref(), Some("kvm"));
        assert!(serde_json::from_str::<ReceiveRequest>(r#"{"receiver_url": "unix:/s", "engine": "kvm"}"#).is_err());
    }

    #[test]
    fn receive_request_takes_network_overrides() {
        let r: ReceiveRequest = serde_json::from_str(r#"{"receiver_url": "tcp:h:1"}"#).unwrap();
        assert!(r.network_overrides.is_empty());
        let r: ReceiveRequest = serde_json::from_str(
            r#"{"receiver_url": "tcp:h:1", "network_overrides": [{"iface_id": "net0", "host_dev_name": "tap9"}]}"#,
        )
        .unwrap();
        assert_eq!(r.network_overrides[0].host_dev_name, "tap9");
        assert!(serde_json::from_str::<ReceiveRequest>(
            r#"{"receiver_url": "tcp:h:1", "network_overrides": [{"iface_id": "net0"}]}"#
        )
        .is_err());
    }

    #[test]
    fn send_request_defaults_and_checks() {
        let r: SendRequest = serde_json::from_str(r#"{"destination_url": "tcp:h:1"}"#).unwrap();
        assert_eq!(
            (
                r.mode,
                r.downtime_ms,
                r.max_bandwidth_mbps,
                r.auto_converge,
                r.timeout_s,
                r.timeout_action
            ),
            (Mode::Live, 300, None, true, 3600, TimeoutAction::Cancel)
        );
        assert!(r.validate().is_ok());
        for bad in [
            r#"{"destination_url": "tcp:h:1", "mode": "warm"}"#,
            r#"{"destination_url": "tcp:h:1", "timeout_action": "explode"}"#,
            r#"{"destination_url": "tcp:h:1", "bogus": 1}"#,
            r#"{"mode": "cold"}"#,
        ] {
            assert!(serde_json::from_str::<SendRequest>(bad).is_err(), "{bad}");
        }
        for bad in [
            r#"{"destination_url": "tcp:h:1", "downtime_ms": 0}"#,
            r#"{"destination_url": "tcp:h:1", "max_bandwidth_mbps": 0}"#,
            r#"{"destination_url": "tcp:h:1", "timeout_s": 0}"#,
            r#"{"destination_url": "ftp:h:1"}"#,
        ] {
            let r: SendRequest = serde_json::from_str(bad).unwrap();
            assert!(r.validate().is_err(), "{bad}");
        }
    }
}

/// `vessel migrate NAME --to URL`.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The VM to migrate.
    pub name: String,
    /// The destination: unix:PATH or tcp:HOST:PORT (a `vessel run --incoming`).
    #[arg(long)]
    pub to: String,
    /// cold (pause, then copy) or live (pre-copy while it runs).
    #[arg(long, default_value = "live")]
    pub mode: String,
    /// The longest pause allowed at the switch, in ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Bandwidth limit in Mbit/s [default: none].
    #[arg(long)]
    pub max_bandwidth_mbps: Option<u64>,
    /// Do not throttle the vCPUs when pre-copy does not converge.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Give up (or switch, with --timeout-action switch) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_s: u64,
    #[arg(long, default_value = "cancel")]
    pub timeout_action: String,
}

/// Start the migration through the VM's API and show its progress until
/// it ends.
pub fn cli_migrate(sock: &std::path::Path, a: &MigrateArgs) -> Result<(), String> {
    use crate::api::client;
    let body = serde_json::json!({
        "destination_url": a.to,
        "mode": a.mode,
        "downtime_ms": a.downtime_ms,
        "max_bandwidth_mbps": a.max_bandwidth_mbps,
        "auto_converge": !a.no_auto_converge,
        "timeout_s": a.timeout_s,
        "timeout_action": a.timeout_action,
    })
    .to_string();
    let timeout = Duration::from_secs(10);
    let r = client::request(sock, "PUT", "/migration/send", Some(&body), timeout)
        .map_err(|e| format!("{}: {e}", a.name))?;
    if r.status >= 400 {
        return Err(format!("{}: {}", a.name, r.fault()));
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {bytes} sent  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last: Option<MigrationInfo> = None;
    loop {
        let info = match client::request(sock, "GET", "/migration", None, timeout) {
            Ok(r) if r.status == 200 => serde_json::from_str::<MigrationInfo>(&r.body).map_err(|e| e.to_string())?,
            Ok(r) => return Err(format!("{}: {}", a.name, r.fault())),
            Err(e) => {
                bar.abandon();
                let status = last.map_or("unknown".to_string(), |l| format!("{:?}", l.status).to_lowercase());
                return Err(format!(
                    "{}: the source's API went away before the migration finished (last status {status}): {e}",
                    a.name
                ));
            }
        };
        bar.set_length(info.total_bytes.max(info.transferred_bytes));
        bar.set_position(info.transferred_bytes);
        bar.set_message(format!(
            "iteration {}, dirty {:.1} MB/s, expected downtime {} ms{}",
            info.iterations,
            info.dirty_rate_bytes_per_s as f64 / 1e6,
            info.expected_downtime_ms,
            if info.throttle_percent > 0 {
                format!(", throttle {}%", info.throttle_percent)
            } else {
                String::new()
            }
        ));
        match info.status {
            Status::Completed => {
                bar.finish_and_clear();
                eprintln!(
                    "migrated {} to {}: {:.1} MiB in {} ms, {} iterations, downtime {}",
                    a.name,
                    a.to,
                    info.transferred_bytes as f64 / f64::from(1 << 20),
                    info.total_time_ms,
                    info.iterations,
                    info.downtime_ms.map_or("unknown".into(), |d| format!("{d} ms"))
                );
                return Ok(());
            }
            Status::Failed | Status::Cancelled => {
                bar.abandon();
                return Err(format!(
                    "{}: migration {}: {}; the VM stays here",
                    a.name,
                    if info.status == Status::Failed {
                        "failed"
                    } else {
                        "cancelled"
                    },
                    info.error.unwrap_or_default()
                ));
            }
            _ => {}
        }
        last = Some(info);
        std::thread::sleep(Duration::from_millis(100));
    }
}
