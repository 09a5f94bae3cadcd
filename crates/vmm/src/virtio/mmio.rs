//! The virtio-mmio transport, version 2 (virtio 1.x register layout).
//!
//! Every value here comes from the guest driver and is checked: a write in
//! the wrong state, an invalid queue or a feature the device never offered
//! marks the device NEEDS_RESET instead of reaching the device model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::Retiring;
use super::{Activation, DmaObserver, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4c53_5356; // "VSSL"

/// One queue's registers and ring positions, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueRegs {
    fn from(s: QueueState) -> Self {
        QueueRegs {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

/// The transport's state (the device model keeps its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegs>,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// A virtio device behind its virtio-mmio registers.
///
/// The device's worker runs while the driver has it started (DRIVER_OK)
/// and the machine is not paused. [`MmioTransport::pause`] stops the worker
/// after its request in flight and keeps the queues here, so the state is
/// complete and still; [`MmioTransport::resume`] starts it again where it
/// stopped.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// Queues while no worker runs; empty while one does (the worker owns
    /// them then).
    queues: Vec<Queue>,
    /// Queue register shadows, so that reads work while the worker runs.
    /// The ring positions in them are current while no worker runs.
    regs: Vec<QueueRegs>,
    notifiers: Vec<EventFd>,
    broken: Arc<AtomicBool>,
    dma: DmaObserver,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// The driver started the device (DRIVER_OK) and has not reset it.
    active: bool,
    /// The machine is paused: no worker runs, even when `active`.
    paused: bool,
    /// The worker a reset stopped, until someone waits for it.
    retiring: Option<Retiring>,
    /// Set once the worker the last reset stopped has ended.
    retired: Arc<AtomicBool>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        dma: DmaObserver,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let notifiers = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut t = MmioTransport {
            device,
            mem,
            interrupt,
            queues: Vec::new(),
            regs: Vec::new(),
            notifiers,
            broken: Arc::new(AtomicBool::new(false)),
            dma,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            paused: false,
            retiring: None,
            retired: Arc::new(AtomicBool::new(true)),
        };
        t.reset_queues();
        Ok(t)
    }

    fn reset_queues(&mut self) {
        let sizes = self.device.queue_max_sizes().to_vec();
        self.queues = sizes
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        self.regs = self.queues.iter().map(|q| QueueRegs::from(q.state())).collect();
    }

    /// The eventfds that a QueueNotify write signals, with the value written
    /// (the queue index); the kvm engine registers them as ioeventfds.
    pub fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The transport's registers and queues. The ring positions
    /// (`next_avail`, `next_used`) are current while the device is stopped
    /// or paused; while a worker runs they lag behind.
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.regs.clone(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
        }
    }

    fn status_reg(&self) -> u32 {
        let mut s = self.status;
        if self.broken.load(Ordering::Acquire) {
            s |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        s
    }

    /// The driver broke the protocol: tell it through NEEDS_RESET and a
    /// config interrupt (virtio 1.x, 2.1.2).
    fn mark_broken(&mut self, why: &str) {
        tracing::warn!(
            "virtio-mmio device type {}: {why}; needs reset",
            self.device.device_type()
        );
        if !self.broken.swap(true, Ordering::AcqRel) && self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt.signal_config();
        }
    }

    fn selected_queue(&mut self) -> Option<usize> {
        let i = self.queue_sel as usize;
        (i < self.regs.len()).then_some(i)
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            self.device.read_config(offset - VIRTIO_MMIO_CONFIG as u64, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let q = self.selected_queue();
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |i| self.regs[i].max_size as u32),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |i| self.regs[i].ready as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status_reg(),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.map_or(0, |i| self.regs[i].desc_table as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.map_or(0, |i| (self.regs[i].desc_table >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.map_or(0, |i| self.regs[i].avail_ring as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.map_or(0, |i| (self.regs[i].avail_ring >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.map_or(0, |i| self.regs[i].used_ring as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.map_or(0, |i| (self.regs[i].used_ring >> 32) as u32),
            // No shared memory regions: a length of all ones says so.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - VIRTIO_MMIO_CONFIG as u64, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let s = self.status;
        let configuring_features = s & VIRTIO_CONFIG_S_DRIVER != 0 && s & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        let configuring_queues = s & VIRTIO_CONFIG_S_FEATURES_OK != 0 && s & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if !configuring_features {
                    return self.mark_broken("driver features written outside feature negotiation");
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32),
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
            | VIRTIO_MMIO_QUEUE_READY => {
                let Some(i) = self.selected_queue() else { return };
                if offset as u32 == VIRTIO_MMIO_QUEUE_READY && v == 0 && !configuring_queues {
                    // Linux clears QueueReady when it tears queues down;
                    // harmless in any state.
                    return;
                }
                if !configuring_queues {
                    return self.mark_broken("queue registers written outside queue set-up");
                }
                self.write_queue_reg(i, offset as u32, v);
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if self.active => {
                if let Some(evt) = self.notifiers.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, i: usize, reg: u32, v: u32) {
        // The queues are with the worker only after DRIVER_OK, when
        // `write` no longer lets queue registers through.
        let Some(q) = self.queues.get_mut(i) else { return };
        match reg {
            // An invalid size (not a power of two, above the maximum) is
            // refused by the queue and caught by the validity check at
            // DRIVER_OK.
            VIRTIO_MMIO_QUEUE_NUM => q.set_size(v as u16),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
            _ => {}
        }
        self.regs[i] = QueueRegs::from(q.state());
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits (virtio 1.x, 3.1.1).
        if v & old != old {
            return self.mark_broken("status bits cleared without a reset");
        }
        let added = v & !old;
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED;
        if added & !known != 0 {
            return self.mark_broken("unknown status bits");
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = v & VIRTIO_CONFIG_S_DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK & !VIRTIO_CONFIG_S_DRIVER_OK;
                return;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                return self.mark_broken("DRIVER_OK before FEATURES_OK");
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            self.regs[i] = QueueRegs::from(q.state());
        }
        if let Some(i) = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
            return self.mark_broken(&format!("queue {i} is invalid (size or ring addresses)"));
        }
        // Nobody waited for the worker of the last reset (a caller other
        // than the machine's vCPU loop): wait for it now.
        drop(self.retiring.take());
        if !self.retired.load(Ordering::Acquire) {
            // Another vCPU still waits for it (the driver raced its own
            // reset from a second CPU): refuse rather than run two workers
            // on the rings.
            return self.mark_broken("DRIVER_OK while the worker of the last reset still runs");
        }
        self.active = true;
        if !self.paused {
            self.start_worker();
        }
    }

    /// Hand the queues to a new worker (the device is active, not paused).
    fn start_worker(&mut self) {
        let notifiers = match self.notifiers.iter().map(|e| e.try_clone()).collect() {
            Ok(n) => n,
            Err(e) => {
                self.active = false;
                return self.mark_broken(&format!("cannot clone eventfds: {e}"));
            }
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues: std::mem::take(&mut self.queues),
            notifiers,
            interrupt: self.interrupt.clone(),
            broken: self.broken.clone(),
            dma: self.dma.clone(),
        };
        if let Err(e) = self.device.activate(self.driver_features, activation) {
            self.active = false;
            self.reset_queues();
            self.mark_broken(&format!("activation failed: {e}"));
        }
    }

    /// Stop the worker and take the queues back, with their positions
    /// after the last request it completed.
    fn stop_worker(&mut self) {
        let Some(worker) = self.device.deactivate() else {
            return;
        };
        match worker.join() {
            Some(queues) if queues.len() == self.regs.len() => {
                self.regs = queues.iter().map(|q| QueueRegs::from(q.state())).collect();
                self.queues = queues;
            }
            _ => {
                self.active = false;
                self.reset_queues();
                self.mark_broken("the device's worker failed");
            }
        }
    }

    /// Quiesce the device for a machine pause: its worker finishes the
    /// request in flight and stops, and the queues (with their positions)
    /// stay here. Until [`MmioTransport::resume`] the device touches
    /// neither guest memory nor its state; doorbells the driver rings
    /// meanwhile stay pending in their eventfds. A driver that starts the
    /// device while paused gets its worker on resume.
    ///
    /// Blocks until the worker has ended: call it with the vCPUs stopped.
    pub fn pause(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        drop(self.retiring.take());
        if self.active {
            self.stop_worker();
        }
    }

    /// Undo [`MmioTransport::pause`]: the worker starts again where the
    /// queues stopped, and serves what the driver queued meanwhile.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        if self.active {
            self.start_worker();
        }
    }

    /// Put a transport fresh from [`MmioTransport::new`] (same device, same
    /// queues) into a saved state, paused: the worker starts when the
    /// machine resumes. A state that does not fit the device (queue count
    /// or sizes, features it never offered, rings outside memory) is
    /// refused and leaves the transport as it was.
    pub fn restore_state(&mut self, s: &MmioState) -> Result<(), String> {
        if s.queues.len() != self.regs.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.regs.len()
            ));
        }
        if s.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "driver features {:#x} include some the device does not offer ({:#x})",
                s.driver_features,
                self.device.features()
            ));
        }
        let active = s.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && s.status & VIRTIO_CONFIG_S_FAILED == 0;
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (r, cur)) in s.queues.iter().zip(&self.regs).enumerate() {
            if r.max_size != cur.max_size {
                return Err(format!(
                    "queue {i}: saved maximum size {}, the device's is {}",
                    r.max_size, cur.max_size
                ));
            }
            let q = Queue::try_from(QueueState {
                max_size: r.max_size,
                next_avail: r.next_avail,
                next_used: r.next_used,
                event_idx_enabled: r.event_idx,
                size: r.size,
                ready: r.ready,
                desc_table: r.desc_table,
                avail_ring: r.avail_ring,
                used_ring: r.used_ring,
            })
            .map_err(|e| format!("queue {i}: {e:?}"))?;
            if active && q.ready() && !q.is_valid(&self.mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            queues.push(q);
        }
        self.regs = queues.iter().map(|q| QueueRegs::from(q.state())).collect();
        self.queues = queues;
        self.status = s.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt
            .set_status(s.interrupt_status & (super::INT_VRING | super::INT_CONFIG));
        self.broken
            .store(s.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0, Ordering::Release);
        self.paused = true;
        self.active = active;
        self.device.restored();
        Ok(())
    }

    /// Whether [`MmioTransport::pause`] holds the device.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The worker that the last device reset stopped, still finishing its
    /// request in flight. The caller waits for it ([`Retiring::wait`], or
    /// drops it) after releasing the transport's lock, so that a long
    /// request holds up only the vCPU that reset the device, not every
    /// vCPU that touches the device's registers. A transport whose caller
    /// never takes it waits for it itself at the next DRIVER_OK, pause or
    /// drop.
    pub fn take_retiring(&mut self) -> Option<Retiring> {
        self.retiring.take()
    }

    /// Make what the device wrote to the host durable (while paused, for a
    /// snapshot).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.device.flush()
    }

    /// While paused: freeze the device's disk as layer `name`
    /// ([`VirtioDevice::freeze_disk`]).
    pub fn freeze_disk(&self, name: &str) -> std::io::Result<Option<std::path::PathBuf>> {
        self.device.freeze_disk(name)
    }

    /// While paused: let go of the host resource for a migration
    /// hand-over ([`VirtioDevice::release_backend`]).
    pub fn release_backend(&mut self) -> std::io::Result<()> {
        debug_assert!(self.paused);
        self.device.release_backend()
    }

    /// Take a host resource back ([`VirtioDevice::attach_backend`]).
    pub fn attach_backend(&mut self, backend: super::HostBackend) -> std::io::Result<()> {
        self.device.attach_backend(backend)
    }

    /// Reopen a resource the device opens itself ([`VirtioDevice::reopen_backend`]).
    pub fn reopen_backend(&mut self) -> std::io::Result<()> {
        self.device.reopen_backend()
    }

    /// virtio-net's TAP and MAC ([`VirtioDevice::net_identity`]).
    pub fn net_identity(&self) -> Option<super::net::NetState> {
        self.device.net_identity()
    }

    /// Failover's output gate ([`VirtioDevice::set_output_gate`]).
    pub fn set_output_gate(&mut self, gate: std::sync::Arc<crate::migration::failover::OutputGate>) {
        self.device.set_output_gate(gate);
    }

    /// A writable disk's failover overlay ([`VirtioDevice::epoch_overlay`]).
    pub fn epoch_overlay(&self) -> Option<std::sync::Arc<super::epoch_overlay::EpochOverlay>> {
        self.device.epoch_overlay()
    }

    /// Announce the guest's MAC ([`VirtioDevice::announce`]).
    pub fn announce(&self) -> std::io::Result<()> {
        self.device.announce()
    }

    /// Stop the device for good (the machine stopped): the worker ends
    /// after its request in flight, and what the device wrote to the host
    /// is made durable (virtio-blk: fdatasync).
    pub fn shutdown(&mut self) -> std::io::Result<()> {
        drop(self.retiring.take());
        if self.active && !self.paused {
            self.stop_worker();
        }
        self.paused = true;
        self.device.flush()
    }

    /// Device reset: the worker is told to stop (see
    /// [`MmioTransport::take_retiring`]), and every register returns to
    /// its initial value.
    pub fn reset(&mut self) {
        if self.active {
            if let Some(worker) = self.device.deactivate() {
                // Not expected (one activation at a time), but a worker
                // from an earlier reset must still end before this one.
                drop(self.retiring.take());
                let done = Arc::new(AtomicBool::new(false));
                self.retired = done.clone();
                self.retiring = Some(Retiring::new(worker, done));
            }
            self.active = false;
        }
        self.device.reset();
        for evt in &self.notifiers {
            let _ = evt.read();
        }
        self.reset_queues();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
        self.broken.store(false, Ordering::Release);
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        // Dropping a worker (or a retiring one) stops and joins it.
        drop(self.retiring.take());
        drop(self.device.deactivate());
    }
}
