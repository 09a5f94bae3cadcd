//! A self-contained bus with flat RAM from address 0, used by unit tests,
//! the differential tests, the fuzz target and the benchmark.

use std::collections::VecDeque;
use std::ptr::NonNull;

use crate::bus::{Bus, PAGE_SIZE};

/// Flat RAM plus recorded port and MMIO traffic.
pub struct TestBus {
    /// Backing store, page aligned (u64 elements keep 8-byte alignment; the
    /// allocation is over-sized and the base rounded up to a page).
    storage: Vec<u64>,
    base: usize,
    size: u64,
    /// Port writes, in order: (port, size, value).
    pub io_writes: Vec<(u16, u8, u32)>,
    /// Values that port reads return, in order; all ones when empty.
    pub io_reads: VecDeque<u32>,
    /// MMIO writes: (address, bytes).
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
    /// Interrupt vectors waiting to be acknowledged.
    pub interrupts: VecDeque<u8>,
    /// MSRs the bus answers.
    pub msrs: Vec<(u32, u64)>,
}

impl TestBus {
    /// `size` bytes of zeroed RAM (rounded up to whole pages).
    pub fn new(size: u64) -> Self {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let words = (size + PAGE_SIZE) as usize / 8;
        let storage = vec![0u64; words];
        let addr = storage.as_ptr() as usize;
        let base = (addr.div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize) - addr;
        TestBus {
            storage,
            base,
            size,
            io_writes: Vec::new(),
            io_reads: VecDeque::new(),
            mmio_writes: Vec::new(),
            interrupts: VecDeque::new(),
            msrs: Vec::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM as bytes.
    pub fn ram(&self) -> &[u8] {
        // SAFETY: `storage` holds at least base + size bytes (one extra page
        // was allocated for alignment) and u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts((self.storage.as_ptr() as *const u8).add(self.base), self.size as usize) }
    }

    pub fn ram_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `ram`, and we hold `&mut self`.
        unsafe {
            std::slice::from_raw_parts_mut(
                (self.storage.as_mut_ptr() as *mut u8).add(self.base),
                self.size as usize,
            )
        }
    }

    pub fn load(&mut self, addr: u64, bytes: &[u8]) {
        self.ram_mut()[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.ram()[addr as usize..addr as usize + 8].try_into().unwrap())
    }

    pub fn write_u64(&mut self, addr: u64, v: u64) {
        self.load(addr, &v.to_le_bytes());
    }

    pub fn read_u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.ram()[addr as usize..addr as usize + 4].try_into().unwrap())
    }

    pub fn write_u32(&mut self, addr: u64, v: u32) {
        self.load(addr, &v.to_le_bytes());
    }
}

// SAFETY: `ram_page` returns pointers into `storage`, which is never resized
// or freed while the bus lives, and every returned page lies fully inside it.
unsafe impl Bus for TestBus {
    fn ram_page(&mut self, gpa: u64) -> Option<NonNull<u8>> {
        if gpa >= self.size {
            return None;
        }
        let page = gpa & !(PAGE_SIZE - 1);
        NonNull::new(self.ram_mut()[page as usize..].as_mut_ptr())
    }

    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.mmio_writes.push((gpa, data.to_vec()));
    }

    fn io_in(&mut self, _port: u16, size: u8) -> u32 {
        let mask = if size >= 4 { u32::MAX } else { (1u32 << (size * 8)) - 1 };
        self.io_reads.pop_front().unwrap_or(u32::MAX) & mask
    }

    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        self.io_writes.push((port, size, value));
    }

    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.0 == index).map(|m| m.1)
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> bool {
        if let Some(m) = self.msrs.iter_mut().find(|m| m.0 == index) {
            m.1 = value;
            true
        } else {
            false
        }
    }

    fn interrupt_pending(&mut self) -> bool {
        !self.interrupts.is_empty()
    }

    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.interrupts.pop_front()
    }
}
