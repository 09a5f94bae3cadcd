//! virtio-net over a TAP interface. No offloads are offered: the guest
//! computes its own checksums and sends whole frames, so every frame
//! crosses unchanged and nothing depends on offload code being right.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{report_broken, serve, QueueError};
use super::tap::Tap;
use super::worker::{Poller, Worker, STOP_TOKEN};
use super::{
    read_config_bytes, write_chain, Activation, DmaObserver, HostBackend, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::migration::failover::OutputGate;

const QUEUE_SIZE: u16 = 256;
/// struct virtio_net_hdr_v1: every frame is preceded by one.
const HDR_LEN: usize = 12;
/// The largest frame a TAP gives without offloads (64 KiB MTU).
const MAX_FRAME: usize = 65536;
const RX: usize = 0;
const TX: usize = 1;
const TAP_TOKEN: u64 = 2;

#[derive(Debug, Default)]
pub struct NetMetrics {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub tap: String,
}

pub struct Net {
    /// `None` once handed over to a migration's destination.
    tap: Option<Arc<Tap>>,
    tap_name: String,
    mac: [u8; 6],
    worker: Option<Worker>,
    /// A frame the last worker had read from the tap but not delivered
    /// when it stopped (pause): the next worker delivers it first.
    carry: Arc<Mutex<Option<Vec<u8>>>>,
    /// Failover's output gate, once the VM was protected: transmitted
    /// frames go through it (held until their epoch is acknowledged).
    gate: Arc<OnceLock<Arc<OutputGate>>>,
    pub metrics: Arc<NetMetrics>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap_name: tap.name().to_string(),
            tap: Some(Arc::new(tap)),
            mac,
            worker: None,
            carry: Arc::default(),
            gate: Arc::default(),
            metrics: Arc::default(),
        }
    }

    pub fn state(&self) -> NetState {
        NetState {
            mac: self.mac,
            tap: self.tap_name.clone(),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_NET_F_MAC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, _acked: u64, a: Activation) -> std::io::Result<()> {
        let tap = self.tap.clone().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the TAP was handed over (migration)")
        })?;
        let metrics = self.metrics.clone();
        let carry = self.carry.clone();
        let gate = self.gate.clone();
        let Activation {
            mem,
            queues,
            notifiers,
            interrupt,
            broken,
            dma,
        } = a;
        self.worker = Some(Worker::spawn("virtio-net", move |poller| {
            let mut port = Port {
                tap,
                gate,
                mem,
                queues,
                interrupt,
                metrics,
                dma,
                pending: None,
                buf: vec![0u8; HDR_LEN + MAX_FRAME],
                tap_watched: true,
            };
            // A frame read from the tap before a pause, still waiting for
            // a receive buffer.
            if let Some(frame) = carry.lock().unwrap_or_else(|e| e.into_inner()).take() {
                port.buf[HDR_LEN..HDR_LEN + frame.len()].copy_from_slice(&frame);
                port.pending = Some(frame.len());
            }
            if let Err(e) = port.serve(&poller, &notifiers) {
                report_broken(&broken, &port.interrupt, "virtio-net", &e);
            }
            if let Some(n) = port.pending {
                *carry.lock().unwrap_or_else(|e| e.into_inner()) = Some(port.buf[HDR_LEN..HDR_LEN + n].to_vec());
            }
            port.queues
        })?);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Worker> {
        self.worker.take()
    }

    fn reset(&mut self) {
        // The stopped worker may still be finishing and park its frame in
        // the old slot: the next activation starts with an empty one.
        self.carry = Arc::default();
    }

    fn release_backend(&mut self) -> std::io::Result<()> {
        // Paused: the worker, which held the other reference, has ended,
        // so dropping ours closes the TAP's file (a non-multiqueue TAP
        // takes one process at a time).
        match self.tap.take().map(Arc::try_unwrap) {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(still_shared)) => {
                self.tap = Some(still_shared);
                Err(std::io::Error::other(format!("tap {} is still in use", self.tap_name)))
            }
        }
    }

    fn attach_backend(&mut self, backend: HostBackend) -> std::io::Result<()> {
        match backend {
            HostBackend::Tap(tap) => {
                self.tap_name = tap.name().to_string();
                self.tap = Some(Arc::new(tap));
                Ok(())
            }
            HostBackend::Disk(_) => Err(std::io::Error::other("virtio-net takes a TAP, not a disk")),
        }
    }

    fn net_identity(&self) -> Option<NetState> {
        Some(self.state())
    }

    fn announce(&self) -> std::io::Result<()> {
        let tap = self
            .tap
            .as_ref()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "no TAP"))?;
        tap.write_frame(&rarp_frame(self.mac)).map(|_| ())
    }

    fn set_output_gate(&mut self, gate: Arc<OutputGate>) {
        // Once per machine: a second protection uses the same gate.
        let _ = self.gate.set(gate);
    }
}

/// What QEMU's announce-self sends for a NIC: a RARP request ("reverse
/// request", opcode 3) from the guest's MAC to the broadcast address, so
/// that switches (and bridges) learn the port the MAC is behind now.
/// Padded to Ethernet's 60-byte minimum.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff); // destination: broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac); // sender MAC; sender IP 0
    f[32..38].copy_from_slice(&mac); // target MAC; target IP 0
    f
}

/// The RARP EtherType.
pub const ETH_P_RARP: u16 = 0x8035;

/// The worker's side of the device.
struct Port {
    tap: Arc<Tap>,
    gate: Arc<OnceLock<Arc<OutputGate>>>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    metrics: Arc<NetMetrics>,
    dma: DmaObserver,
    /// A frame read from the tap that waits for a receive buffer.
    pending: Option<usize>,
    buf: Vec<u8>,
    tap_watched: bool,
}

impl Port {
    /// Serve the queues and the tap until told to stop (`Ok`) or the
    /// driver breaks the protocol (`Err`).
    fn serve(&mut self, poller: &Poller, notifiers: &[EventFd]) -> Result<(), QueueError> {
        poller
            .add(notifiers[RX].as_raw_fd(), RX as u64, EventSet::IN)
            .and_then(|_| poller.add(notifiers[TX].as_raw_fd(), TX as u64, EventSet::IN))
            .and_then(|_| poller.add(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::IN))
            .map_err(|e| {
                tracing::error!("virtio-net: cannot watch the queues and tap: {e}");
                QueueError::Io(e)
            })?;
        if self.pending.is_some() {
            self.receive(poller)?;
        }
        loop {
            for token in poller.wait() {
                match token {
                    STOP_TOKEN => return Ok(()),
                    t if t == RX as u64 => {
                        let _ = notifiers[RX].read();
                        self.receive(poller)?;
                    }
                    t if t == TX as u64 => {
                        let _ = notifiers[TX].read();
                        if self.transmit()? {
                            let _ = notifiers[TX].write(1);
                        }
                    }
                    _ => self.receive(poller)?,
                }
            }
        }
    }

    /// Move frames from the tap into receive buffers until either runs out.
    fn receive(&mut self, poller: &Poller) -> Result<(), QueueError> {
        let mem = &self.mem;
        let rx = &mut self.queues[RX];
        if !rx.ready() {
            return Ok(());
        }
        let mut delivered = false;
        let mut want_tap = true;
        // Bounded, so that overlapping rings cannot hold the worker; the
        // tap stays readable and brings us back.
        for _ in 0..4 * usize::from(QUEUE_SIZE) {
            if self.pending.is_none() {
                match self.tap.read_frame(&mut self.buf[HDR_LEN..]) {
                    Ok(n) => self.pending = Some(n),
                    Err(_) => break,
                }
            }
            let len = self.pending.unwrap_or(0);
            let Some(chain) = rx.iter(mem)?.next() else {
                // No buffer: ask the driver to notify when it adds one, and
                // check again in case it just did.
                if rx.enable_notification(mem)? {
                    continue;
                }
                want_tap = false;
                break;
            };
            let head = chain.head_index();
            // virtio_net_hdr_v1: no offloads, num_buffers = 1.
            self.buf[..HDR_LEN].fill(0);
            self.buf[10] = 1;
            let frame = &self.buf[..HDR_LEN + len];
            let written = write_chain(mem, chain, &self.dma, |w| {
                (w.available_bytes() >= frame.len())
                    .then(|| w.write_all(frame).ok().map(|_| frame.len()))
                    .flatten()
            })
            .flatten();
            match written {
                Some(n) => {
                    self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    rx.add_used(mem, head, n as u32)?;
                }
                None => {
                    // Too small or unreadable: the frame is dropped, the
                    // buffer returned empty.
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    rx.add_used(mem, head, 0)?;
                }
            }
            delivered = true;
            self.pending = None;
        }
        if delivered && rx.needs_notification(mem)? {
            self.interrupt.signal_used_queue();
        }
        if want_tap != self.tap_watched {
            let events = if want_tap { EventSet::IN } else { EventSet::empty() };
            if poller.modify(self.tap.as_raw_fd(), TAP_TOKEN, events).is_ok() {
                self.tap_watched = want_tap;
            }
        }
        Ok(())
    }

    /// Send the frames the driver queued; true when some are left for
    /// another round.
    fn transmit(&mut self) -> Result<bool, QueueError> {
        let tx = &mut self.queues[TX];
        if !tx.ready() {
            return Ok(false);
        }
        let tap = &self.tap;
        let gate = self.gate.get();
        let metrics = &self.metrics;
        let buf = &mut self.buf;
        serve(tx, &self.mem, &self.interrupt, |chain| {
            let sent = Reader::<()>::new(&self.mem, chain).ok().and_then(|mut r| {
                let total = r.available_bytes();
                if !(HDR_LEN..=HDR_LEN + MAX_FRAME).contains(&total) {
                    return None;
                }
                r.read_exact(&mut buf[..total]).ok()?;
                let frame = &buf[HDR_LEN..total];
                match gate {
                    Some(g) => g.send_frame(tap, frame).ok(),
                    None => tap.write_frame(frame).ok().map(|_| ()),
                }
            });
            match sent {
                Some(_) => metrics.tx_frames.fetch_add(1, Ordering::Relaxed),
                None => metrics.tx_dropped.fetch_add(1, Ordering::Relaxed),
            };
            0
        })
    }
}

/// A locally administered MAC for a NIC the user gave none.
pub fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 3];
    // SAFETY: getrandom writes at most 3 bytes into `b`, which is 3 long.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The announce frame is QEMU's: broadcast, RARP, reverse request,
    /// the MAC as sender and target, IPs zero, 60 bytes.
    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(f[0..6], [0xff; 6]);
        assert_eq!(f[6..12], mac);
        assert_eq!(f[12..14], [0x80, 0x35]);
        assert_eq!(f[14..22], [0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(f[22..28], mac);
        assert_eq!(f[28..32], [0; 4]);
        assert_eq!(f[32..38], mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }
}
