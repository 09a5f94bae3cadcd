//! Issue 14, hole 6: a device must report its guest-memory writes to the
//! DMA observer *after* the bytes are in memory. The observer is how `emu`
//! drops decoded code; told first, a vCPU could decode the old bytes again
//! in between and run them after the write. The observer here takes a
//! snapshot of the range it is told about: it must already hold the bytes
//! the device wrote.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use super::rng::Rng;
use super::{write_chain, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::irq_line::InterruptLine;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x8000;
const LEN: u32 = 256;
const OLD: u8 = 0xaa;

struct NoLine;
impl InterruptLine for NoLine {
    fn trigger(&self) {}
}

type Snapshots = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// An observer that copies each range it is told about.
fn snapshotting(mem: &GuestMemoryMmap) -> (super::DmaObserver, Snapshots) {
    let seen: Snapshots = Arc::default();
    let (m, s) = (mem.clone(), seen.clone());
    let obs: super::DmaObserver = Arc::new(move |gpa, len| {
        let mut b = vec![0u8; len as usize];
        m.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        s.lock().unwrap().push((gpa, b));
    });
    (obs, seen)
}

fn w(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

/// Start queue 0 of `device` the way Linux does, offer one writable
/// buffer of LEN bytes filled with OLD, notify, and wait for it to be used.
fn one_request(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap, dma: super::DmaObserver) {
    let mut t = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(Arc::new(NoLine))), dma).unwrap();
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, VIRTIO_MMIO_STATUS, s);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
    w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
    w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    mem.write_slice(&[OLD; LEN as usize], GuestAddress(BUF)).unwrap();
    mem.write_obj(BUF, GuestAddress(DESC)).unwrap();
    mem.write_obj(LEN, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap(); // device-writable
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let t0 = Instant::now();
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the device did not complete");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn rng_reports_its_write_after_the_bytes_are_in_memory() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (dma, seen) = snapshotting(&mem);
    one_request(Box::new(Rng::default()), &mem, dma);
    let mut now = vec![0u8; LEN as usize];
    mem.read_slice(&mut now, GuestAddress(BUF)).unwrap();
    assert_ne!(now, vec![OLD; LEN as usize], "the device wrote nothing");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one buffer reported");
    assert_eq!(seen[0].0, BUF);
    assert!(
        seen[0].1 == now,
        "the observer was told before the write: it saw the old bytes"
    );
}

/// virtio-net's receive path writes through the same helper; without a
/// TAP to receive from, the helper itself is checked.
#[test]
fn write_chain_reports_after_writing() {
    use std::io::Write;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(&[OLD; LEN as usize], GuestAddress(BUF)).unwrap();
    mem.write_obj(BUF, GuestAddress(DESC)).unwrap();
    mem.write_obj(LEN, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
    let (dma, seen) = snapshotting(&mem);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let mut q = Queue::new(8).unwrap();
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let chain = q.iter(&mem).unwrap().next().expect("a chain");
    let n = write_chain(&mem, chain, &dma, |w| w.write_all(&[0x42; 100]).map(|_| 100)).unwrap();
    assert_eq!(n.unwrap(), 100);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].1[..100], &[0x42; 100][..]);
    assert_eq!(&seen[0].1[100..], &[OLD; (LEN - 100) as usize][..]);
}
