//! The CPU's only window on the world: physical memory, port I/O, MMIO,
//! MSRs it does not implement itself, interrupts and time.

use std::ptr::NonNull;

/// Size of a guest page as the CPU's TLB and code cache see it.
pub const PAGE_SIZE: u64 = 4096;

/// What the CPU is connected to.
///
/// # Safety
///
/// `ram_page` hands out raw pointers that the CPU dereferences later without
/// asking again (they are cached in its TLB until the next flush). An
/// implementation must guarantee that a pointer it returns for a page points
/// to `PAGE_SIZE` bytes of readable and writable memory that stays mapped for
/// as long as this bus object lives.
pub unsafe trait Bus {
    /// Host address of the RAM page at guest-physical `gpa` (page aligned),
    /// or `None` if the page is not RAM (MMIO or a hole).
    fn ram_page(&mut self, gpa: u64) -> Option<NonNull<u8>>;

    /// The CPU is about to cache a pointer for writing to the RAM page at
    /// `gpa` (a TLB fill for a write), or set accessed/dirty bits in a
    /// page table there: later writes may go through the cached pointer
    /// without asking again. For dirty-page tracking (live migration);
    /// costs a call per TLB write fill, nothing per write.
    fn note_write_mapping(&mut self, _gpa: u64) {}

    /// Read from a non-RAM physical address (MMIO). `data.len()` is 1, 2, 4 or 8.
    /// Unclaimed addresses read as all ones.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);

    /// Write to a non-RAM physical address (MMIO). Unclaimed writes are dropped.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);

    /// Port input of `size` bytes (1, 2 or 4). Unclaimed ports read as all ones.
    fn io_in(&mut self, port: u16, size: u8) -> u32;

    /// Port output of `size` bytes (1, 2 or 4).
    fn io_out(&mut self, port: u16, size: u8, value: u32);

    /// An MSR the CPU does not hold itself (APIC, TSC deadline, ...).
    /// `None` makes RDMSR raise #GP.
    fn rdmsr(&mut self, _index: u32) -> Option<u64> {
        None
    }

    /// `false` makes WRMSR raise #GP.
    fn wrmsr(&mut self, _index: u32, _value: u64) -> bool {
        false
    }

    /// The time base the guest TSC is derived from (before the CPU's offset).
    /// `instret` is the CPU's retired-instruction count, which a
    /// deterministic bus may use instead of the host clock.
    fn tsc(&mut self, instret: u64) -> u64 {
        instret
    }

    /// Whether an external interrupt is waiting (cheap check, called often).
    fn interrupt_pending(&mut self) -> bool {
        false
    }

    /// Accept the highest-priority pending external interrupt and return its
    /// vector. Called only when the CPU is about to deliver it.
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        None
    }

    /// The guest wrote CR8 (task priority).
    fn set_task_priority(&mut self, _tpr: u8) {}

    /// Ask the CPU to return from `run` at the next instruction boundary.
    fn exit_requested(&mut self) -> bool {
        false
    }
}
