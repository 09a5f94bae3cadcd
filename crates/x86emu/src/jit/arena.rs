//! Executable memory for translated code: one anonymous mapping per CPU,
//! filled front to back, never writable and executable at once (W^X: the
//! pages being written are switched to read-write, then back to
//! read-execute). When full, it starts over at the front and bumps its
//! generation, which drops every translation made before.

/// Size of one CPU's code arena.
const SIZE: usize = 16 << 20;
const PAGE: usize = 4096;

pub struct Arena {
    base: *mut u8,
    used: usize,
    generation: u64,
}

// SAFETY: the arena is plain memory owned by one CPU; it moves with the
// CPU to whichever thread runs it and is never shared.
unsafe impl Send for Arena {}

impl Arena {
    /// A new arena, or `None` if the host refuses the mapping.
    pub fn new() -> Option<Arena> {
        // SAFETY: an anonymous private mapping at an address of the
        // kernel's choice; nothing else refers to that range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Arena {
            base: p as *mut u8,
            used: 0,
            generation: 1,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Drop all code (a new generation) and give the used pages back to
    /// the host.
    pub fn release(&mut self) {
        let used = (self.used + PAGE - 1) & !(PAGE - 1);
        if used > 0 {
            // SAFETY: the range is the start of our own mapping; the code in
            // it belongs to the current generation, which ends here, so no
            // translation that could run it is used again.
            unsafe { libc::madvise(self.base as *mut libc::c_void, used, libc::MADV_DONTNEED) };
        }
        self.used = 0;
        self.generation += 1;
    }

    /// Copy position-independent `code` (translated blocks use only
    /// relative jumps inside themselves and absolute calls) into the
    /// arena. Returns its entry and generation, or `None` if the host
    /// refuses the protection change.
    pub fn place(&mut self, code: &[u8]) -> Option<(usize, u64)> {
        if code.len() > SIZE {
            return None;
        }
        let mut start = self.used;
        if start + code.len() > SIZE {
            // Full: start over; everything translated before is gone.
            start = 0;
            self.generation += 1;
        }
        let first = start & !(PAGE - 1);
        let end = (start + code.len() + PAGE - 1) & !(PAGE - 1);
        // SAFETY: [first, end) lies inside our mapping; no translated code
        // runs while a block is being placed (single-threaded per CPU), so
        // taking execute away from those pages for the copy is harmless.
        unsafe {
            let page = self.base.add(first) as *mut libc::c_void;
            if libc::mprotect(page, end - first, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return None;
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(start), code.len());
            if libc::mprotect(page, end - first, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return None;
            }
        }
        self.used = (start + code.len() + 15) & !15;
        Some((self.base as usize + start, self.generation))
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no translation of this CPU can
        // run any more (the CPU owns the arena).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, SIZE);
        }
    }
}
