//! Serving a virtqueue: take every available chain, hand it to the
//! device, put it on the used ring, and interrupt the driver if it wants.

use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::Interrupt;

pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Why a queue stopped being served.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("virtqueue: the driver made chains available that cannot be read")]
    NoProgress,
    #[error("virtqueue: {0}")]
    Io(#[from] std::io::Error),
}

/// Chains served in one call at most, in queue lengths: a driver that
/// keeps the queue full (or rings that overlap, so that every used entry
/// looks like a new available one) cannot hold the worker forever.
const BUDGET_ROUNDS: usize = 4;

/// Serve the chains available on `queue`. `handle` returns the number of
/// bytes it wrote into the chain's device-writable buffers. Returns true
/// when the budget ran out with work left: the caller must come back (by
/// signalling the queue's eventfd to itself).
///
/// A driver that breaks the ring protocol (an available index running more
/// than a queue's length ahead, a head outside the table) gets an error
/// instead of a device that spins.
pub fn serve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: impl FnMut(Chain<'_>) -> u32,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    let mut budget = BUDGET_ROUNDS * usize::from(queue.size().max(1));
    let result = (|| loop {
        if budget == 0 {
            return Ok(true);
        }
        queue.disable_notification(mem)?;
        // Read before iterating: a chain the driver adds meanwhile (from
        // another vCPU) must not look like one the iterator refused.
        let avail_before = queue.avail_idx(mem, Ordering::Acquire)?;
        let chains: Vec<Chain<'_>> = queue.iter(mem)?.collect();
        if chains.is_empty() && avail_before != std::num::Wrapping(queue.next_avail()) {
            return Err(QueueError::NoProgress);
        }
        budget = budget.saturating_sub(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(mem, head, len)?;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            return Ok(false);
        }
    })();
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
    result
}

/// Mark the device broken once and tell the driver (NEEDS_RESET shows in
/// the status register; a config interrupt draws its attention).
pub fn report_broken(broken: &AtomicBool, interrupt: &Interrupt, device: &str, err: &QueueError) {
    if !broken.swap(true, Ordering::AcqRel) {
        tracing::warn!("{device}: {err}; the device needs a reset");
        interrupt.signal_config();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::serve;
    use crate::devices::irq_line::InterruptLine;
    use crate::virtio::Interrupt;

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x8000;

    struct NoLine;
    impl InterruptLine for NoLine {
        fn trigger(&self) {}
    }

    /// A driver on another vCPU adds chains while the device serves the
    /// queue: no moment of that may look like a chain the device refused
    /// (which marks the device broken).
    #[test]
    fn chains_added_while_serving_are_not_refusals() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for slot in 0..u64::from(SIZE) {
            let d = GuestAddress(DESC + 16 * slot);
            mem.write_obj(BUF, d).unwrap();
            mem.write_obj(16u32, GuestAddress(d.0 + 8)).unwrap();
            mem.write_obj(0u16, GuestAddress(d.0 + 12)).unwrap();
        }
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        const CHAINS: u32 = 200_000;
        let driver_mem = mem.clone();
        let driver = std::thread::spawn(move || {
            let mut avail: u16 = 0;
            for _ in 0..CHAINS {
                // Keep at most SIZE chains outstanding, as a driver must.
                loop {
                    let used: u16 = driver_mem.read_obj(GuestAddress(USED + 2)).unwrap();
                    if avail.wrapping_sub(used) < SIZE {
                        break;
                    }
                    std::hint::spin_loop();
                }
                let slot = avail % SIZE;
                let entry = GuestAddress(AVAIL + 4 + 2 * u64::from(slot));
                driver_mem.write_obj(slot, entry).unwrap();
                avail = avail.wrapping_add(1);
                std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
                driver_mem.write_obj(avail, GuestAddress(AVAIL + 2)).unwrap();
            }
        });
        let interrupt = Interrupt::new(Arc::new(NoLine));
        let mut served = 0u32;
        let deadline = Instant::now() + Duration::from_secs(120);
        while served < CHAINS {
            assert!(Instant::now() < deadline, "served {served} of {CHAINS} chains");
            if let Err(e) = serve(&mut q, &mem, &interrupt, |_| {
                served += 1;
                0
            }) {
                panic!("after {served} chains: {e}");
            }
        }
        driver.join().unwrap();
    }
}
