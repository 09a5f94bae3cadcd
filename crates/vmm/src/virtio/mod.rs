//! virtio devices on the virtio-mmio transport (virtio 1.x, "modern").
//!
//! A device is a [`VirtioDevice`]: it names its type, queues, features and
//! config space. The [`mmio::MmioTransport`] runs the register protocol
//! and, when the driver sets DRIVER_OK, hands the device its queues, one
//! notification [`EventFd`] per queue and its [`Interrupt`]. The device then
//! serves the queues on a worker thread of its own. Under `emu` a
//! QueueNotify write signals the eventfd; under `kvm` the same eventfd is an
//! ioeventfd. Devices never learn which engine runs.

pub mod blk;
pub mod console;
#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod dma_order_tests;
pub mod epoch_overlay;
#[doc(hidden)]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod tap;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use worker::Worker;

use crate::devices::irq_line::InterruptLine;

pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Where the first virtio-mmio device sits; each takes one 4 KiB window.
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC pin of the first device; pins 16..24 are free for virtio.
pub const FIRST_IRQ: u32 = 16;
/// How many virtio-mmio devices a machine can have.
pub const MAX_DEVICES: usize = 8;

/// The interrupt status register a device and its transport share.
pub struct Interrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

/// InterruptStatus bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed (or the device needs reset).
pub const INT_CONFIG: u32 = 2;

impl Interrupt {
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::AcqRel);
        self.line.trigger();
    }

    pub fn signal_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::AcqRel);
        self.line.trigger();
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }
}

/// Told of every guest-memory range a device wrote (DMA), so the engine
/// can drop what it derived from the old bytes: under `emu`, cached
/// decoded code; later, dirty-page tracking for migration.
pub type DmaObserver = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A [`DmaObserver`] for engines that need none.
pub fn no_dma_observer() -> DmaObserver {
    Arc::new(|_, _| {})
}

/// Report the device-writable buffers of `chain` as written. Call it
/// *after* the bytes are in guest memory: an engine that drops its decoded
/// code first could decode the old bytes again before the write lands.
pub fn note_dma_writes(chain: &queue::Chain<'_>, dma: &DmaObserver) {
    for d in chain.clone().writable() {
        dma(d.addr().0, u64::from(d.len()));
    }
}

/// Write into the device-writable buffers of `chain` with `write`, then
/// report them to `dma` (in that order, see [`note_dma_writes`]). `None`
/// when the chain cannot be written (its buffers are still reported).
pub fn write_chain<R>(
    mem: &GuestMemoryMmap,
    chain: queue::Chain<'_>,
    dma: &DmaObserver,
    write: impl FnOnce(&mut virtio_queue::Writer<'_>) -> R,
) -> Option<R> {
    let written = chain.clone();
    let r = virtio_queue::Writer::<()>::new(mem, chain)
        .ok()
        .map(|mut w| write(&mut w));
    note_dma_writes(&written, dma);
    r
}

/// What a device gets when the driver starts it.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub notifiers: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    /// Set when the device finds the driver broke the protocol (a bad
    /// ring index, say): the transport then shows NEEDS_RESET.
    pub broken: Arc<std::sync::atomic::AtomicBool>,
    pub dma: DmaObserver,
}

/// A virtio device model, behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 net, 2 block, 3 console, 4 entropy, 19 socket).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Read from the device's config space. Reads past its end give zeroes.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the config space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving the queues with the features the driver accepted:
    /// when the driver sets DRIVER_OK, and again when a paused machine
    /// resumes (the queues then continue from where they stopped).
    fn activate(&mut self, acked_features: u64, activation: Activation) -> std::io::Result<()>;
    /// Stop serving: hand over the worker, which the transport stops and
    /// joins ([`Worker::join`]). The worker finishes the request it is
    /// serving, then gives the queues back. Called when the machine pauses
    /// (the transport keeps the queues, with their positions, for the
    /// next [`VirtioDevice::activate`]), when the driver resets the device
    /// (the worker is joined outside the transport's lock) and when the
    /// machine stops.
    fn deactivate(&mut self) -> Option<Worker>;
    /// The driver reset the device (after [`VirtioDevice::deactivate`]):
    /// forget what earlier activations left behind.
    fn reset(&mut self) {}
    /// The device's transport was just restored from a snapshot or a
    /// migration stream (before the first activation): what the device
    /// could not carry over (vsock: its connections) is gone, and it may
    /// tell the driver so.
    fn restored(&mut self) {}
    /// Make what the device wrote to the host durable (virtio-blk:
    /// fdatasync). Called when the machine stops, once the worker ended.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// While paused: freeze the device's disk contents as the read-only
    /// layer `name` and carry on writing a new overlay (a qcow2 disk; see
    /// `disk::BlockBackend::freeze_top`). `None` when the device has no
    /// contents to freeze (not a disk, a raw or a read-only disk).
    fn freeze_disk(&self, _name: &str) -> std::io::Result<Option<std::path::PathBuf>> {
        Ok(None)
    }
    /// While paused, for a migration hand-over: let go of the host
    /// resource another process must take next (a disk image, flushed
    /// first, and its locks; a TAP). The device must not run again until
    /// [`VirtioDevice::attach_backend`] gives it one back.
    fn release_backend(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Take a host resource back after [`VirtioDevice::release_backend`]
    /// (a failed migration).
    fn attach_backend(&mut self, _backend: HostBackend) -> std::io::Result<()> {
        Err(std::io::Error::other("this device has no host backend"))
    }
    /// Take back a host resource the device opens itself (vsock's
    /// listening socket) after [`VirtioDevice::release_backend`].
    fn reopen_backend(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// virtio-net: the TAP and the MAC address the guest uses.
    fn net_identity(&self) -> Option<net::NetState> {
        None
    }
    /// virtio-net: announce the guest's MAC address on the host network
    /// (after a migration), as QEMU's announce-self does: one RARP frame.
    fn announce(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// Failover: send what goes to the outside world through `gate`
    /// (virtio-net's transmitted frames), so that it is held until the
    /// epoch that produced it is acknowledged.
    fn set_output_gate(&mut self, _gate: std::sync::Arc<crate::migration::failover::OutputGate>) {}
    /// Failover: a writable disk's overlay of held writes.
    fn epoch_overlay(&self) -> Option<std::sync::Arc<epoch_overlay::EpochOverlay>> {
        None
    }
}

/// A host resource a device serves the guest from.
pub enum HostBackend {
    Disk(Arc<dyn disk::BlockBackend>),
    Tap(tap::Tap),
}

/// Copy `src` (a device's config space) into `data` at `offset`; bytes
/// beyond the end read as zero. A hostile offset cannot index out of bounds.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
