//! Which guest-physical pages hold decoded code, shared by every vCPU of a
//! machine, so that a write from any vCPU (or DMA from a device) to such a
//! page invalidates the decoded-instruction caches.
//!
//! One `AtomicU32` per page: bit 0 says "some CPU cached code from this
//! page", the other bits are a generation. A cached block remembers the
//! value it saw (odd); a write to a code page bumps it to the next even
//! value, which no cached block can match.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::bus::PAGE_SIZE;

pub struct CodeMap {
    pages: Vec<AtomicU32>,
}

impl CodeMap {
    /// Track pages below `phys_limit`; code above it is never cached.
    pub fn new(phys_limit: u64) -> Self {
        let n = phys_limit.div_ceil(PAGE_SIZE) as usize;
        CodeMap {
            pages: (0..n).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    #[inline(always)]
    fn slot(&self, phys: u64) -> Option<&AtomicU32> {
        self.pages.get((phys / PAGE_SIZE) as usize)
    }

    /// Mark a page as holding cached code; returns the tag a cached block
    /// keeps, or `None` when the page cannot be tracked (do not cache).
    pub fn mark_code(&self, phys: u64) -> Option<u32> {
        let slot = self.slot(phys)?;
        let v = slot.fetch_or(1, Ordering::AcqRel) | 1;
        Some(v)
    }

    /// The page array (one `AtomicU32` per page, bit 0 = holds code) and
    /// its length, for translated code's inline store check.
    pub(crate) fn raw(&self) -> (usize, usize) {
        (self.pages.as_ptr() as usize, self.pages.len())
    }

    /// Put back a page's tag as it was (lockstep's shadow runs leave the
    /// code map unchanged).
    #[cfg(all(target_arch = "x86_64", unix))]
    pub(crate) fn restore_tag(&self, phys: u64, tag: u32) {
        if let Some(slot) = self.slot(phys) {
            slot.store(tag, Ordering::Release);
        }
    }

    /// The current tag of a page, to validate a cached block.
    #[inline(always)]
    pub fn tag(&self, phys: u64) -> u32 {
        self.slot(phys).map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Note a write to `phys`. Returns true when it invalidated cached code.
    #[inline(always)]
    pub fn note_write(&self, phys: u64) -> bool {
        match self.slot(phys) {
            Some(slot) => {
                let v = slot.load(Ordering::Relaxed);
                if v & 1 != 0 {
                    // Odd -> next even: a new generation with no code.
                    let _ = slot.compare_exchange(v, v.wrapping_add(1), Ordering::AcqRel, Ordering::Relaxed);
                    true
                } else {
                    false
                }
            }
            None => false,
        }
    }

    /// Invalidate code in a physical range written by someone other than a
    /// CPU (device DMA, the VMM loading an image).
    pub fn invalidate_range(&self, phys: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = phys / PAGE_SIZE;
        let last = (phys.saturating_add(len - 1)) / PAGE_SIZE;
        for p in first..=last {
            self.note_write(p * PAGE_SIZE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_invalidates_marked_page_only() {
        let m = CodeMap::new(1 << 20);
        let tag = m.mark_code(0x3000).unwrap();
        assert_eq!(m.tag(0x3000), tag);
        assert!(!m.note_write(0x4000));
        assert_eq!(m.tag(0x3000), tag);
        assert!(m.note_write(0x3ff8));
        assert_ne!(m.tag(0x3000), tag);
        // Marking again yields a fresh tag different from the stale one.
        let tag2 = m.mark_code(0x3000).unwrap();
        assert_ne!(tag, tag2);
        m.invalidate_range(0x2fff, 2);
        assert_ne!(m.tag(0x3000), tag2);
        assert!(m.mark_code(1 << 30).is_none());
    }
}
