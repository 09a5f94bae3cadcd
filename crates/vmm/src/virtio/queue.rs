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
        let chains: Vec<Chain<'_>> = queue.iter(mem)?.collect();
        if chains.is_empty() && queue.avail_idx(mem, Ordering::Acquire)? != std::num::Wrapping(queue.next_avail()) {
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
