//! virtio-vsock (device ID 19) with its back end in user space: guest
//! sockets reach host Unix sockets the way Firecracker's hybrid vsock does
//! (see [`backend`] and docs/VSOCK.md). Our hosts have no
//! `/dev/vhost-vsock`, and a VMM that does not depend on it runs anywhere.
//!
//! The header is hand-decoded (44 bytes, [`packet`]): rust-vmm's
//! `virtio-vsock` crate is not among our dependencies and its packet type
//! brings nothing the queue readers and writers do not already give us.

pub mod backend;
pub mod packet;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::backend::{Backend, BackendError};
use self::packet::{Hdr, EVENT_TRANSPORT_RESET, HDR_LEN};
use super::queue::{report_broken, QueueError};
use super::worker::{Poller, Worker, STOP_TOKEN};
use super::{write_chain, Activation, DmaObserver, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// The virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// The largest payload of a packet from the guest we read (Linux sends at
/// most 64 KiB); longer claims are bogus.
const MAX_PKT_DATA: usize = 64 * 1024;

/// A vsock device's state: its configuration. Connections do not survive
/// a snapshot (as in Firecracker): the restored device tells the guest
/// its transport was reset, and the listening socket is bound anew.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

pub struct Vsock {
    /// The configuration, outside the back end's lock: the worker holds
    /// that lock while it runs, and a vCPU reading `guest_cid` from the
    /// config space (the driver does on a transport reset) must not wait
    /// for it.
    config: VsockState,
    backend: Arc<Mutex<Backend>>,
    worker: Option<Worker>,
    /// Tell the guest at the next activation that all connections are
    /// gone (set by a restore).
    reset_event: Arc<AtomicBool>,
    /// The driver reset the device: the next activation starts with no
    /// connections.
    drop_connections: Arc<AtomicBool>,
    /// Failover's output gate (the back end's), set without its lock.
    gate: Arc<std::sync::OnceLock<Arc<crate::migration::failover::OutputGate>>>,
}

impl Vsock {
    /// A device for guest CID `cid`, listening on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, BackendError> {
        let backend = Backend::new(cid, uds_path)?;
        Ok(Vsock {
            config: VsockState {
                guest_cid: cid,
                uds_path: uds_path.to_path_buf(),
            },
            gate: backend.gate_slot(),
            backend: Arc::new(Mutex::new(backend)),
            worker: None,
            reset_event: Arc::new(AtomicBool::new(false)),
            drop_connections: Arc::new(AtomicBool::new(false)),
        })
    }

    fn backend(&self) -> MutexGuard<'_, Backend> {
        self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::persist::Persist for Vsock {
    type State = VsockState;
    type Args = ();
    fn save(&self) -> VsockState {
        self.config.clone()
    }
    fn restore(_: (), state: &VsockState) -> Result<Self, crate::persist::PersistError> {
        let mut v = Vsock::new(state.guest_cid, &state.uds_path)
            .map_err(|e| crate::persist::PersistError::Invalid(e.to_string()))?;
        v.restored();
        Ok(v)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _acked: u64, a: Activation) -> std::io::Result<()> {
        if self.drop_connections.swap(false, Ordering::AcqRel) {
            self.backend().reset_connections();
        }
        let backend = self.backend.clone();
        let reset_event = self.reset_event.clone();
        let Activation {
            mem,
            queues,
            notifiers,
            interrupt,
            broken,
            dma,
        } = a;
        self.worker = Some(Worker::spawn("virtio-vsock", move |poller| {
            let mut port = Port {
                mem,
                queues,
                interrupt,
                dma,
                backend,
                reset_event,
                reset_unacked: None,
                tx_waits_for_rx: false,
                buf: vec![0u8; HDR_LEN + MAX_PKT_DATA],
            };
            if let Err(e) = port.run(&poller, &notifiers) {
                report_broken(&broken, &port.interrupt, "virtio-vsock", &e);
            }
            port.queues
        })?);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Worker> {
        self.worker.take()
    }

    fn reset(&mut self) {
        // The old worker may still be finishing: the next activation
        // drops the connections, once it has ended.
        self.drop_connections.store(true, Ordering::Release);
        self.reset_event.store(false, Ordering::Release);
    }

    fn restored(&mut self) {
        self.reset_event.store(true, Ordering::Release);
    }

    fn set_output_gate(&mut self, gate: Arc<crate::migration::failover::OutputGate>) {
        // Once per machine: a second protection uses the same gate.
        let _ = self.gate.set(gate);
    }

    fn release_backend(&mut self) -> std::io::Result<()> {
        // Paused: the worker has ended. The connections go (what the gate
        // still holds for them is never written), the listener too, so
        // that the standby can bind `uds_path`; the guest hears of it as
        // after a snapshot restore (a transport reset) if it runs here
        // again.
        self.backend().release_host();
        self.reset_event.store(true, Ordering::Release);
        Ok(())
    }

    fn reopen_backend(&mut self) -> std::io::Result<()> {
        self.backend().reacquire_host().map_err(std::io::Error::other)
    }
}

/// The worker's side of the device.
struct Port {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    dma: DmaObserver,
    backend: Arc<Mutex<Backend>>,
    reset_event: Arc<AtomicBool>,
    /// The event queue's avail index when the reset event went out, until
    /// the driver moves it (it gives the buffer back after handling the
    /// event). Until then nothing goes to the guest: Linux resets every
    /// connected socket when it handles the event, so a host connection
    /// set up before that would be reset with the old ones.
    reset_unacked: Option<std::num::Wrapping<u16>>,
    /// The tx queue stopped because the guest owes too many replies; its
    /// notifications are off, so once rx drains the backlog we must go
    /// back to it ourselves.
    tx_waits_for_rx: bool,
    buf: Vec<u8>,
}

impl Port {
    fn run(&mut self, poller: &Poller, notifiers: &[EventFd]) -> Result<(), QueueError> {
        for (q, n) in notifiers.iter().enumerate() {
            poller.add(n.as_raw_fd(), q as u64, EventSet::IN)?;
        }
        let backend = self.backend.clone();
        let mut b = backend.lock().unwrap_or_else(|e| e.into_inner());
        b.register(poller)?;
        loop {
            self.send_reset_event()?;
            let more_tx = self.process_tx(&mut b, poller)?;
            let more_rx = if self.reset_handled()? {
                self.process_rx(&mut b, poller)?
            } else {
                false
            };
            let more_tx = more_tx || (self.tx_waits_for_rx && !b.rx_backlog_full());
            let now = Instant::now();
            let timeout = if more_tx || more_rx {
                Some(std::time::Duration::ZERO)
            } else {
                b.next_deadline(now)
            };
            for (token, events) in poller.wait_events(timeout) {
                match token {
                    STOP_TOKEN => return Ok(()),
                    t if (t as usize) < notifiers.len() => {
                        let _ = notifiers[t as usize].read();
                    }
                    t => b.on_event(poller, t, events),
                }
            }
            b.expire(Some(poller), Instant::now());
        }
    }

    /// After a restore: tell the driver its connections are gone.
    fn send_reset_event(&mut self) -> Result<(), QueueError> {
        if !self.reset_event.load(Ordering::Acquire) {
            return Ok(());
        }
        let mem = &self.mem;
        let q = &mut self.queues[EVT];
        if !q.ready() {
            return Ok(());
        }
        let Some(chain) = q.iter(mem)?.next() else {
            // No buffer yet: ask for a notification when one comes.
            q.enable_notification(mem)?;
            return Ok(());
        };
        let head = chain.head_index();
        let n = write_chain(mem, chain, &self.dma, |w| {
            w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                .map(|_| 4)
                .unwrap_or(0)
        })
        .unwrap_or(0);
        q.add_used(mem, head, n)?;
        self.reset_unacked = Some(q.avail_idx(mem, Ordering::Acquire)?);
        self.reset_event.store(false, Ordering::Release);
        if q.needs_notification(mem)? {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Whether the driver has handled the reset event (if one was sent):
    /// it has put a buffer back on the event queue since.
    fn reset_handled(&mut self) -> Result<bool, QueueError> {
        let Some(idx) = self.reset_unacked else {
            return Ok(true);
        };
        if self.queues[EVT].avail_idx(&self.mem, Ordering::Acquire)? == idx {
            return Ok(false);
        }
        self.reset_unacked = None;
        Ok(true)
    }

    /// Take the guest's packets. True when the budget ran out with more
    /// left. While the guest leaves us no rx buffers for our replies,
    /// its packets wait (it cannot pile up replies without bound).
    fn process_tx(&mut self, b: &mut Backend, poller: &Poller) -> Result<bool, QueueError> {
        let mem = &self.mem;
        let q = &mut self.queues[TX];
        if !q.ready() {
            return Ok(false);
        }
        let mut used = false;
        let mut budget = 4 * usize::from(q.size().max(1));
        let more = loop {
            if budget == 0 {
                break true;
            }
            if b.rx_backlog_full() {
                self.tx_waits_for_rx = true;
                break false;
            }
            self.tx_waits_for_rx = false;
            q.disable_notification(mem)?;
            // Read before iterating: a packet the driver adds meanwhile
            // must not look like a chain the iterator refused.
            let avail_before = q.avail_idx(mem, Ordering::Acquire)?;
            let Some(chain) = q.iter(mem)?.next() else {
                if avail_before != std::num::Wrapping(q.next_avail()) {
                    return Err(QueueError::NoProgress);
                }
                if q.enable_notification(mem)? {
                    continue;
                }
                break false;
            };
            budget -= 1;
            let head = chain.head_index();
            if let Ok(mut r) = Reader::<()>::new(mem, chain) {
                let mut hdr = [0u8; HDR_LEN];
                if r.read_exact(&mut hdr).is_ok() {
                    let hdr = Hdr::parse(&hdr);
                    let n = (hdr.len as usize).min(r.available_bytes()).min(MAX_PKT_DATA);
                    if r.read_exact(&mut self.buf[..n]).is_ok() {
                        b.handle_guest_packet(Some(poller), &hdr, &self.buf[..n]);
                    }
                } else {
                    b.stats.bogus_packets += 1;
                }
            }
            q.add_used(mem, head, 0)?;
            used = true;
        };
        if used && q.needs_notification(mem)? {
            self.interrupt.signal_used_queue();
        }
        Ok(more)
    }

    /// Hand the guest what the back end has for it, while it gives us rx
    /// buffers. True when the budget ran out with more to send.
    fn process_rx(&mut self, b: &mut Backend, poller: &Poller) -> Result<bool, QueueError> {
        let mem = &self.mem;
        let q = &mut self.queues[RX];
        if !q.ready() {
            return Ok(false);
        }
        let mut used = false;
        let mut budget = 4 * usize::from(q.size().max(1));
        while b.has_rx() && budget > 0 {
            budget -= 1;
            let Some(chain) = q.iter(mem)?.next() else {
                if q.enable_notification(mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let buf = &mut self.buf;
            let written = write_chain(mem, chain, &self.dma, |w| {
                let room = w.available_bytes().min(buf.len());
                if room < HDR_LEN {
                    // Too small for a header: returned empty.
                    return Some(0);
                }
                let n = b.next_rx(Some(poller), &mut buf[..room])?;
                w.write_all(&buf[..n]).ok().map(|_| n as u32)
            });
            match written {
                Some(Some(n)) => {
                    q.add_used(mem, head, n)?;
                    used = true;
                }
                // Nothing to send after all: the buffer stays the guest's.
                Some(None) => {
                    q.go_to_previous_position();
                    break;
                }
                None => {
                    q.add_used(mem, head, 0)?;
                    used = true;
                }
            }
        }
        if used && q.needs_notification(mem)? {
            self.interrupt.signal_used_queue();
        }
        Ok(budget == 0 && b.has_rx())
    }
}
