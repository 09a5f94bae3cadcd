//! The host side of virtio-vsock, Firecracker's hybrid way: guest
//! connections become Unix-socket connections.
//!
//! - Host to guest: a host program connects to `uds_path` and writes
//!   `CONNECT <port>\n`; the guest is asked to accept on that port, and on
//!   success the host reads `OK <hostport>\n`, then the byte stream. With
//!   no guest listener the host socket is closed.
//! - Guest to host: a guest connection to CID 2, port P, reaches the host
//!   listener at `<uds_path>_<P>`; the guest gets a reset if none listens.
//!
//! Everything from the guest is hostile: a packet that breaks the protocol
//! (unknown connection, credit overrun, bad type) resets that connection
//! and no other. Limits: [`MAX_CONNECTIONS`] connections, each buffering
//! at most [`BUF_SIZE`] bytes on its way to the host.
//!
//! Failover (docs/FAILOVER.md): once the VM is protected, what the guest
//! sends on a connection goes through the output gate, which holds it
//! until its epoch is acknowledged and then hands it back here
//! ([`Released`]) to be written to the host socket. Held bytes count
//! against the connection's credit, so the guest stalls (no credit) rather
//! than the held bytes growing: at most [`BUF_SIZE`] per connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::*;
use crate::migration::failover::{OutputGate, OutputSink};
use crate::virtio::worker::Poller;

/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
/// Connections open at once at most (Firecracker's limit).
pub const MAX_CONNECTIONS: usize = 1023;
/// Bytes each connection buffers towards the host at most: the credit
/// the guest is given (`buf_alloc`).
pub const BUF_SIZE: u32 = 64 * 1024;
/// How long a guest has to answer a connection request, and a host client
/// to send its `CONNECT` line (Firecracker: 2 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Resets for unknown connections waiting for an rx buffer; more are
/// dropped (the guest that floods us with bogus packets loses them).
const MAX_ORPHAN_RESETS: usize = 1024;
/// The token of the listening socket; connections get tokens above it.
pub const LISTENER_TOKEN: u64 = 16;
/// The token of [`Released`]'s eventfd.
pub const RELEASED_TOKEN: u64 = LISTENER_TOKEN - 1;
/// Report our forwarded count to the guest when this much went unreported.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_SIZE / 4;
/// Host-side ports of host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Why the back end could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("vsock uds_path {0}: {1}")]
    Bind(PathBuf, io::Error),
    #[error("vsock uds_path {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("vsock uds_path {0}: another process listens on it")]
    InUse(PathBuf),
    #[error("vsock guest_cid {0}: must be at least 3 and below 2^32 - 1")]
    BadCid(u64),
    #[error("vsock: eventfd: {0}")]
    EventFd(io::Error),
}

/// Guest bytes the output gate released (their epoch was acknowledged),
/// by connection token, for the worker to write to the host sockets; the
/// eventfd wakes the worker.
pub struct Released {
    chunks: Mutex<VecDeque<(u64, Vec<u8>)>>,
    wake: EventFd,
}

impl Released {
    fn take(&self) -> VecDeque<(u64, Vec<u8>)> {
        std::mem::take(&mut *self.chunks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One connection's way out through the gate.
struct ConnSink {
    token: u64,
    released: Arc<Released>,
}

impl OutputSink for ConnSink {
    fn emit(&self, data: &[u8]) {
        let mut q = self.released.chunks.lock().unwrap_or_else(|e| e.into_inner());
        // A connection's chunks follow each other: join them.
        match q.back_mut() {
            Some((t, d)) if *t == self.token => d.extend_from_slice(data),
            _ => q.push_back((self.token, data.to_vec())),
        }
        drop(q);
        let _ = self.released.wake.write(1);
    }
}

/// One connection: `local` is the host-side port, `peer` the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    local: u32,
    peer: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting(Instant),
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Guest bytes not yet written to the host socket (and released by
    /// the gate, when there is one).
    to_host: VecDeque<u8>,
    /// Bytes the guest sent us: with `fwd_cnt`, what is on its way (held
    /// by the gate or in `to_host`), which the credit bounds.
    from_guest: u32,
    /// The way through the output gate.
    sink: Arc<dyn OutputSink>,
    /// Bytes of the guest's we passed on (our `fwd_cnt`), and the value
    /// the guest last heard.
    fwd_cnt: u32,
    fwd_reported: u32,
    /// The guest's buffer and what it consumed of what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent the guest.
    rx_cnt: u32,
    /// The guest said it sends (receives) no more.
    guest_done_sending: bool,
    guest_done_receiving: bool,
    /// The host socket gave EOF; the guest was told (SHUTDOWN).
    host_eof: bool,
    /// The host socket has data we have not read yet.
    readable: bool,
    /// Control packets owed to the guest.
    owe_request: bool,
    owe_response: bool,
    owe_credit: bool,
    /// Reset: tell the guest, then forget the connection.
    owe_rst: bool,
    /// In the `ready` queue already.
    queued: bool,
    /// The epoll interest last set; the socket is in the epoll set only
    /// while it is not empty (a closed peer's HUP would fire forever).
    interest: EventSet,
}

impl Conn {
    fn new(
        stream: UnixStream,
        token: u64,
        state: State,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
        released: &Arc<Released>,
    ) -> Conn {
        Conn {
            stream,
            token,
            state,
            to_host: VecDeque::new(),
            from_guest: 0,
            sink: Arc::new(ConnSink {
                token,
                released: released.clone(),
            }),
            fwd_cnt: 0,
            fwd_reported: 0,
            peer_buf_alloc,
            peer_fwd_cnt,
            rx_cnt: 0,
            guest_done_sending: false,
            guest_done_receiving: false,
            host_eof: false,
            readable: false,
            owe_request: false,
            owe_response: false,
            owe_credit: false,
            owe_rst: false,
            queued: false,
            interest: EventSet::empty(),
        }
    }

    /// Bytes the guest can take now. A guest that lies about its counters
    /// gets at most its rx buffers' worth per packet anyway.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes not yet written to the host socket, held or not.
    fn on_the_way(&self) -> usize {
        self.from_guest.wrapping_sub(self.fwd_cnt) as usize
    }

    fn wants_to_read_host(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_done_receiving
            && !self.owe_rst
            && self.peer_credit() > 0
    }

    fn has_work(&self) -> bool {
        self.owe_rst
            || self.owe_request
            || self.owe_response
            || self.owe_credit
            || (self.readable && self.wants_to_read_host())
    }
}

/// A host client that connected to `uds_path` and has not finished its
/// `CONNECT` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub resets_sent: u64,
    pub bogus_packets: u64,
    pub refused: u64,
}

/// The connection table and the listening socket.
pub struct Backend {
    cid: u64,
    uds_path: PathBuf,
    /// `None` while let go of (a fenced failover primary).
    listener: Option<UnixListener>,
    /// The listener's inode, so that drop removes only our socket file.
    listener_ino: (u64, u64),
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    pending: HashMap<u64, Pending>,
    /// Connections with something for the guest, in turn.
    ready: VecDeque<Key>,
    /// Resets for packets that belong to no connection.
    orphan_rsts: VecDeque<Hdr>,
    next_token: u64,
    next_local_port: u32,
    /// Failover's output gate, once the VM was protected.
    gate: Arc<OnceLock<Arc<OutputGate>>>,
    released: Arc<Released>,
    pub stats: BackendStats,
}

impl Backend {
    /// Listen on `uds_path`. A stale socket file there (nobody listening)
    /// is replaced; a live one or a file of another kind is an error.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Backend, BackendError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(BackendError::BadCid(cid));
        }
        let (listener, listener_ino) = bind(uds_path)?;
        Ok(Backend {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener: Some(listener),
            listener_ino,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: first_local_port(),
            gate: Arc::default(),
            released: Arc::new(Released {
                chunks: Mutex::default(),
                wake: EventFd::new(EFD_NONBLOCK).map_err(BackendError::EventFd)?,
            }),
            stats: BackendStats::default(),
        })
    }

    /// Where failover's output gate goes, once set (shared with the
    /// device, which sets it without this back end's lock).
    pub fn gate_slot(&self) -> Arc<OnceLock<Arc<OutputGate>>> {
        self.gate.clone()
    }

    /// Let go of the listening socket and every connection (a fenced
    /// failover primary: the standby binds `uds_path` when it takes over).
    pub fn release_host(&mut self) {
        self.reset_connections();
        self.released.take();
        if let Some(l) = self.listener.take() {
            drop(l);
            self.remove_socket_file();
        }
    }

    /// Listen again after [`Backend::release_host`].
    pub fn reacquire_host(&mut self) -> Result<(), BackendError> {
        if self.listener.is_none() {
            let (listener, ino) = bind(&self.uds_path)?;
            self.listener = Some(listener);
            self.listener_ino = ino;
        }
        Ok(())
    }

    fn remove_socket_file(&self) {
        // Only if it is still ours (a restored clone may have replaced it).
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.uds_path) {
            if (m.dev(), m.ino()) == self.listener_ino {
                let _ = std::fs::remove_file(&self.uds_path);
            }
        }
    }

    /// Move what the gate released into the connections' host buffers.
    fn take_released(&mut self, poller: Option<&Poller>) {
        let _ = self.released.wake.read();
        for (token, data) in self.released.take() {
            let Some(&key) = self.by_token.get(&token) else {
                continue;
            };
            let Some(c) = self.conns.get_mut(&key) else { continue };
            if c.owe_rst {
                continue;
            }
            c.to_host.extend(&data);
            if !Self::flush_to_host(c, true) {
                self.reset(poller, key);
                continue;
            }
            self.after_change(poller, key);
        }
    }
}

/// Listen on `uds_path`: a stale socket file there (nobody listening) is
/// replaced; a live one or a file of another kind is an error.
fn bind(uds_path: &Path) -> Result<(UnixListener, (u64, u64)), BackendError> {
    let bind_err = |e| BackendError::Bind(uds_path.to_path_buf(), e);
    if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
        if !meta.file_type().is_socket() {
            return Err(BackendError::NotASocket(uds_path.to_path_buf()));
        }
        if UnixStream::connect(uds_path).is_ok() {
            return Err(BackendError::InUse(uds_path.to_path_buf()));
        }
        std::fs::remove_file(uds_path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let meta = std::fs::metadata(uds_path).map_err(bind_err)?;
    use std::os::unix::fs::MetadataExt;
    Ok((listener, (meta.dev(), meta.ino())))
}

impl Backend {
    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open connections (established or being set up).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Drop every connection (driver reset, restore): host sockets close.
    pub fn reset_connections(&mut self) {
        self.conns.clear();
        self.by_token.clear();
        self.pending.clear();
        self.ready.clear();
        self.orphan_rsts.clear();
    }

    /// Watch the listener and every socket with `poller` (a new worker).
    pub fn register(&mut self, poller: &Poller) -> io::Result<()> {
        if let Some(l) = &self.listener {
            poller.add(l.as_raw_fd(), LISTENER_TOKEN, EventSet::IN)?;
        }
        poller.add(self.released.wake.as_raw_fd(), RELEASED_TOKEN, EventSet::IN)?;
        // Released while no worker ran.
        let _ = self.released.wake.write(1);
        for (token, p) in &self.pending {
            poller.add(p.stream.as_raw_fd(), *token, EventSet::IN)?;
        }
        for c in self.conns.values_mut() {
            c.interest = EventSet::empty();
        }
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.update_interest(poller, k);
        }
        Ok(())
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn reply_hdr(&self, key: Key, op: u16) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_SIZE,
            fwd_cnt: 0,
        }
    }

    fn orphan_rst(&mut self, key: Key) {
        self.stats.resets_sent += 1;
        if self.orphan_rsts.len() < MAX_ORPHAN_RESETS {
            let h = self.reply_hdr(key, OP_RST);
            self.orphan_rsts.push_back(h);
        }
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_work() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Reset a connection: the host socket closes now, the guest hears RST.
    fn reset(&mut self, poller: Option<&Poller>, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.owe_rst = true;
            c.to_host.clear();
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            if !c.interest.is_empty() {
                let _ = poller.map(|p| p.remove(c.stream.as_raw_fd()));
            }
            c.interest = EventSet::empty();
        }
        self.enqueue(key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_token.remove(&c.token);
        }
    }

    /// Set the epoll interest of a connection to what it can use now.
    fn update_interest(&mut self, poller: &Poller, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        let mut want = EventSet::empty();
        if c.owe_rst {
            // Closed already.
        } else {
            if c.wants_to_read_host() && !c.readable {
                want |= EventSet::IN;
            }
            if !c.to_host.is_empty() {
                want |= EventSet::OUT;
            }
        }
        if want == c.interest {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let done = if want.is_empty() {
            poller.remove(fd)
        } else if c.interest.is_empty() {
            poller.add(fd, c.token, want)
        } else {
            poller.modify(fd, c.token, want)
        };
        if done.is_ok() {
            c.interest = want;
        }
    }

    /// Whether the guest owes us so many replies that reading more of its
    /// packets should wait until it gives us rx buffers.
    pub fn rx_backlog_full(&self) -> bool {
        self.orphan_rsts.len() >= MAX_ORPHAN_RESETS || self.ready.len() > 2 * MAX_CONNECTIONS
    }

    /// Whether there is something for the guest.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.ready.is_empty()
    }

    /// A packet from the guest (tx queue): `data` is its payload, at most
    /// `hdr.len` bytes (what the descriptor chain really held).
    pub fn handle_guest_packet(&mut self, poller: Option<&Poller>, hdr: &Hdr, data: &[u8]) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            // Not from our guest or not for the host: dropped, as Firecracker does.
            self.stats.bogus_packets += 1;
            return;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if hdr.op == OP_RST {
            match self.conns.get_mut(&key) {
                // Bytes the guest sent before are still held: the host
                // socket closes once they are written (after their epoch's
                // acknowledgement), never before.
                Some(c) if c.on_the_way() > 0 && !c.owe_rst => {
                    c.guest_done_sending = true;
                    c.guest_done_receiving = true;
                }
                _ => self.remove(key),
            }
            return;
        }
        if hdr.kind != TYPE_STREAM || data.len() != hdr.len as usize {
            self.stats.bogus_packets += 1;
            if self.conns.contains_key(&key) {
                self.reset(poller, key);
            } else {
                self.orphan_rst(key);
            }
            return;
        }
        if hdr.op == OP_REQUEST {
            self.guest_connect(poller, key, hdr);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.stats.bogus_packets += 1;
            self.orphan_rst(key);
            return;
        };
        if c.owe_rst {
            return;
        }
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        match (hdr.op, &c.state) {
            (OP_RESPONSE, State::Connecting(_)) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", key.local);
                // A fresh socket's buffer takes these few bytes.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(poller, key);
                }
            }
            (OP_RW, State::Established) if !c.guest_done_sending => {
                if c.on_the_way() + data.len() > BUF_SIZE as usize {
                    // More than the credit we gave: the guest broke the protocol.
                    self.stats.bogus_packets += 1;
                    self.reset(poller, key);
                    return;
                }
                c.from_guest = c.from_guest.wrapping_add(data.len() as u32);
                match self.gate.get() {
                    // Comes back through `released` (at once, unprotected).
                    Some(g) => g.send_to(&c.sink, data),
                    None => {
                        c.to_host.extend(data);
                        if !Self::flush_to_host(c, false) {
                            self.reset(poller, key);
                            return;
                        }
                    }
                }
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => c.owe_credit = true,
            (OP_SHUTDOWN, State::Established) => {
                c.guest_done_receiving |= hdr.flags & SHUTDOWN_RCV != 0;
                c.guest_done_sending |= hdr.flags & SHUTDOWN_SEND != 0;
                if !Self::flush_to_host(c, false) {
                    self.reset(poller, key);
                    return;
                }
            }
            _ => {
                self.stats.bogus_packets += 1;
                self.reset(poller, key);
                return;
            }
        }
        self.after_change(poller, key);
    }

    /// Write what the guest sent to the host socket as far as it takes it
    /// (`drained_on_event`: the socket became writable); false when the
    /// host side is gone. Finishes a guest's shutdown once
    /// everything is written.
    fn flush_to_host(c: &mut Conn, drained_on_event: bool) -> bool {
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match (&c.stream).write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        let unreported = c.fwd_cnt.wrapping_sub(c.fwd_reported);
        // The guest stalls only once its credit is used up: report as the
        // count grows, and when a backlog (which used up credit) drained.
        let drained = drained_on_event && c.to_host.is_empty() && unreported > 0;
        if !c.guest_done_sending && (unreported >= CREDIT_UPDATE_THRESHOLD || drained) {
            c.owe_credit = true;
        }
        // The guest's shutdown only after all it sent (none held).
        if c.on_the_way() == 0 && c.guest_done_sending {
            if c.guest_done_receiving {
                // Closed by the guest both ways: Linux waits for our RST.
                c.owe_rst = true;
            } else {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        true
    }

    fn after_change(&mut self, poller: Option<&Poller>, key: Key) {
        if let Some(p) = poller {
            self.update_interest(p, key);
        }
        self.enqueue(key);
    }

    /// The guest connects to host port `key.local`: the host listener at
    /// `<uds_path>_<port>`.
    fn guest_connect(&mut self, poller: Option<&Poller>, key: Key, hdr: &Hdr) {
        if self.conns.contains_key(&key) {
            self.stats.bogus_packets += 1;
            self.reset(poller, key);
            return;
        }
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            self.stats.refused += 1;
            self.orphan_rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                self.stats.refused += 1;
                self.orphan_rst(key);
                return;
            }
        };
        let token = self.token();
        let mut c = Conn::new(
            stream,
            token,
            State::Established,
            hdr.buf_alloc,
            hdr.fwd_cnt,
            &self.released,
        );
        c.owe_response = true;
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.after_change(poller, key);
    }

    /// Something happened on one of our sockets.
    pub fn on_event(&mut self, poller: &Poller, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept(poller);
            return;
        }
        if token == RELEASED_TOKEN {
            self.take_released(Some(poller));
            return;
        }
        if self.pending.contains_key(&token) {
            self.read_connect_line(poller, token);
            return;
        }
        let Some(&key) = self.by_token.get(&token) else { return };
        let Some(c) = self.conns.get_mut(&key) else { return };
        let writable = events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP);
        if writable && !c.to_host.is_empty() && !Self::flush_to_host(c, true) {
            self.reset(Some(poller), key);
            return;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
            c.readable = true;
        }
        self.after_change(Some(poller), key);
    }

    fn accept(&mut self, poller: &Poller) {
        loop {
            let stream = match self.listener.as_ref().map(|l| l.accept()) {
                Some(Ok((s, _))) => s,
                _ => return,
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                self.stats.refused += 1;
                continue;
            }
            let token = self.token();
            if poller.add(stream.as_raw_fd(), token, EventSet::IN).is_err() {
                continue;
            }
            self.pending.insert(
                token,
                Pending {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + CONNECT_TIMEOUT,
                },
            );
        }
    }

    /// Read a host client's `CONNECT <port>\n`, a byte at a time so that
    /// nothing after the line is taken from the stream.
    fn read_connect_line(&mut self, poller: &Poller, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match (&p.stream).read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EOF, an overlong line, an error.
                _ => break None,
            }
        };
        let Some(p) = self.pending.remove(&token) else { return };
        let Some(port) = port else {
            self.stats.refused += 1;
            return;
        };
        let local = self.free_local_port(port);
        let key = Key { local, peer: port };
        let mut c = Conn::new(
            p.stream,
            token,
            State::Connecting(Instant::now() + CONNECT_TIMEOUT),
            0,
            0,
            &self.released,
        );
        c.owe_request = true;
        let _ = poller.remove(c.stream.as_raw_fd());
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.after_change(Some(poller), key);
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&Key { local: port, peer }) {
                return port;
            }
        }
    }

    /// How long until the next deadline (a connection set-up that may
    /// time out), if any.
    pub fn next_deadline(&self, now: Instant) -> Option<Duration> {
        let conns = self.conns.values().filter_map(|c| match c.state {
            State::Connecting(d) => Some(d),
            State::Established => None,
        });
        conns
            .chain(self.pending.values().map(|p| p.deadline))
            .min()
            .map(|d| d.saturating_duration_since(now))
    }

    /// Give up on set-ups past their deadline: a host client that never
    /// sent its line, a guest that never answered (it gets a reset, the
    /// host client a closed socket).
    pub fn expire(&mut self, poller: Option<&Poller>, now: Instant) {
        self.pending.retain(|_, p| p.deadline > now);
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Connecting(d) if d <= now) && !c.owe_rst)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            self.reset(poller, k);
        }
    }

    /// The next packet for the guest, into `out` (header first, then at
    /// most `out.len() - HDR_LEN` bytes of data). Returns the packet's
    /// length, or `None` when there is nothing to send.
    pub fn next_rx(&mut self, poller: Option<&Poller>, out: &mut [u8]) -> Option<usize> {
        if out.len() < HDR_LEN {
            return None;
        }
        if let Some(h) = self.orphan_rsts.pop_front() {
            out[..HDR_LEN].copy_from_slice(&h.bytes());
            return Some(HDR_LEN);
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else { continue };
            c.queued = false;
            let mut hdr = Hdr {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: key.local,
                dst_port: key.peer,
                kind: TYPE_STREAM,
                buf_alloc: BUF_SIZE,
                fwd_cnt: c.fwd_cnt,
                ..Hdr::default()
            };
            let mut len = 0usize;
            if c.owe_rst {
                hdr.op = OP_RST;
                self.stats.resets_sent += 1;
                self.remove(key);
                out[..HDR_LEN].copy_from_slice(&hdr.bytes());
                return Some(HDR_LEN);
            } else if c.owe_request {
                c.owe_request = false;
                hdr.op = OP_REQUEST;
            } else if c.owe_response {
                c.owe_response = false;
                hdr.op = OP_RESPONSE;
            } else if c.readable && c.wants_to_read_host() {
                let room = (out.len() - HDR_LEN).min(c.peer_credit() as usize);
                match (&c.stream).read(&mut out[HDR_LEN..HDR_LEN + room]) {
                    Ok(0) => {
                        c.host_eof = true;
                        c.readable = false;
                        hdr.op = OP_SHUTDOWN;
                        hdr.flags = SHUTDOWN_SEND;
                    }
                    Ok(n) => {
                        hdr.op = OP_RW;
                        len = n;
                        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                        c.readable = false;
                    }
                    Err(_) => {
                        c.owe_rst = true;
                    }
                }
            } else if c.owe_credit {
                hdr.op = OP_CREDIT_UPDATE;
            }
            if hdr.op != 0 {
                c.owe_credit = false;
                c.fwd_reported = c.fwd_cnt;
            }
            if let Some(p) = poller {
                self.update_interest(p, key);
            }
            self.enqueue(key);
            if hdr.op != 0 {
                hdr.len = len as u32;
                out[..HDR_LEN].copy_from_slice(&hdr.bytes());
                return Some(HDR_LEN + len);
            }
        }
        None
    }
}

/// Where host-side ports start: at a random place above 2^30, so that a
/// VM restored from a snapshot (whose guest may still hold the old
/// connections until it handles the transport reset) or a second clone
/// does not reuse the ports of connections the guest knew.
fn first_local_port() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into `b`, which is 4 long.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    FIRST_LOCAL_PORT + (u32::from_le_bytes(b) >> 2)
}

/// Connect to the Unix socket at `path` without blocking: a listener whose
/// backlog is full refuses (EAGAIN) instead of holding the worker, so a
/// guest that floods a host listener with requests gets resets.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own alone.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call,
    // and `len` does not exceed its size.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// `CONNECT <port>` (the newline already taken off), as Firecracker reads
/// it: the keyword, one space, a decimal port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.listener.is_some() {
            self.remove_socket_file();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
