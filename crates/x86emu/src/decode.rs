//! Instruction fetch and the decoded-block cache.
//!
//! A block is a run of instructions from one guest-physical page, ending at
//! the first control-flow instruction or the page end. Blocks are keyed by
//! linear address and code size, and validated on every use against the
//! current translation of that address and the page's code-map tag, so that
//! remapping, self-modifying code and DMA all invalidate them.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};

use crate::bus::{Bus, PAGE_SIZE};
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::exec::{handler_for_instruction, Handler};
use crate::mmu::{self, Access};
use crate::state::Seg;

/// Most instructions in one block.
const MAX_BLOCK: usize = 64;

/// One decoded instruction with its handler resolved.
pub struct Decoded {
    pub ins: Instruction,
    pub handler: Handler,
}

pub struct Block {
    pub instrs: Vec<Decoded>,
    /// Linear address and code size the block was decoded for.
    key: u64,
    /// Physical page the block was decoded from.
    phys: u64,
    /// Code-map tag at decode time; `None` for uncacheable blocks.
    tag: Option<u32>,
    /// Mask that wraps RIP to the code size (16, 32 or 64 bits).
    pub ip_mask: u64,
    /// Runs so far, counted toward the JIT's threshold.
    pub(crate) hits: u32,
    /// The JIT declined this block; do not try again.
    pub(crate) jit_failed: bool,
    /// Host code for this block, if translated (dropped with the block).
    pub(crate) translation: crate::jit::Translation,
}

impl Block {
    /// Whether the block lives in the cache (only those get translated).
    pub(crate) fn cacheable(&self) -> bool {
        self.tag.is_some()
    }

    /// Physical address the block starts at.
    pub(crate) fn phys(&self) -> u64 {
        self.phys
    }
}

/// Direct-mapped cache of decoded blocks. A block is taken out of its slot
/// while it executes (so the CPU can be borrowed mutably) and put back
/// afterwards; no reference counting on the hot path.
pub struct DecodeCache {
    slots: Box<[Option<Box<Block>>]>,
    /// Bumped whenever a translated block is dropped: translated code follows
    /// a chain link only if it was made in the current epoch, so it never
    /// enters the code of a dropped block.
    pub(crate) epoch: u64,
}

/// 64 Ki slots (512 KiB of pointers per vCPU): with 16 Ki, two thirds of
/// the Debian kernel's boot decodes were blocks evicted by another block
/// of the same slot (1.03 M decodes; 0.47 M with 64 Ki, and 10% less CPU).
const SLOTS: usize = 1 << 16;

impl Default for DecodeCache {
    fn default() -> Self {
        DecodeCache {
            slots: empty_slots(),
            epoch: 1,
        }
    }
}

/// `SLOTS` empty slots in zeroed memory, which the allocator takes from
/// fresh zero pages: an idle vCPU pays only for the pages it uses.
fn empty_slots() -> Box<[Option<Box<Block>>]> {
    let layout = std::alloc::Layout::array::<Option<Box<Block>>>(SLOTS).expect("slot array layout");
    // SAFETY: the layout has a nonzero size. `Option<Box<T>>` is
    // guaranteed to be a nullable pointer with `None` as null, so zeroed
    // memory is `SLOTS` valid `None`s; the box takes ownership of exactly
    // that allocation with the same layout.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut Option<Box<Block>>;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, SLOTS))
    }
}

impl DecodeCache {
    /// Drop every block and give the slot array's pages back to the host
    /// (an idle vCPU's trim): they read as zeroes, that is `None`, again.
    pub fn release(&mut self) {
        self.clear();
        let start = self.slots.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(&*self.slots);
        let page = PAGE_SIZE as usize;
        let (first, last) = ((start + page - 1) & !(page - 1), end & !(page - 1));
        #[cfg(unix)]
        if last > first {
            // SAFETY: the range lies inside the slot array, which holds only
            // `None`s (null pointers) after `clear`; MADV_DONTNEED on this
            // private anonymous memory makes those pages read as zeroes,
            // the same values. No reference into the array is live.
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) };
        }
    }

    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            *s = None;
        }
        self.epoch += 1;
    }

    #[inline(always)]
    fn index(key: u64) -> usize {
        ((key ^ (key >> 16) ^ (key >> 32)) as usize) & (SLOTS - 1)
    }

    /// Return a block after execution; cacheable blocks go back to their slot.
    #[inline(always)]
    pub fn put_back(&mut self, block: Box<Block>) {
        if block.tag.is_some() {
            let i = Self::index(block.key);
            // Only a dropped translation can be the target of a chain link.
            if self.slots[i]
                .replace(block)
                .is_some_and(|old| old.translation.has_code())
            {
                self.epoch += 1;
            }
        }
    }
}

/// Cache key: linear address with the code size folded into the top bits
/// (linear addresses are at most 57 bits significant once canonical).
fn key(lin: u64, bits: u32) -> u64 {
    (lin & 0x00ff_ffff_ffff_ffff) | ((bits as u64) << 56)
}

impl Cpu {
    /// Linear address of RIP, checked against the CS limit outside 64-bit mode.
    fn code_linear(&self) -> ExecResult<u64> {
        let s = &self.state;
        if s.in_64bit() {
            if !crate::memory::is_canonical(s.rip) {
                return Err(Fault::gp0());
            }
            return Ok(s.rip);
        }
        let cs = s.seg(Seg::Cs);
        if s.rip > cs.limit as u64 {
            return Err(Fault::gp0());
        }
        Ok(cs.base.wrapping_add(s.rip) & 0xffff_ffff)
    }

    /// Find or decode the block at the current RIP. The caller hands it
    /// back with `cache.put_back` after executing it.
    #[inline]
    pub(crate) fn fetch_block(&mut self, bus: &mut dyn Bus) -> ExecResult<Box<Block>> {
        let lin = self.code_linear()?;
        let bits = self.state.code_bits();
        let user = self.state.cpl() == 3;
        let t = mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Execute, user)?;
        let k = key(lin, bits);
        let slot = &mut self.cache.slots[DecodeCache::index(k)];
        if let Some(b) = slot {
            if b.key == k && b.phys == t.phys && b.tag == Some(self.code_map.tag(t.phys)) {
                if let Some(b) = slot.take() {
                    return Ok(b);
                }
            }
        }
        let mut block = Box::new(self.decode_block(bus, lin, bits, t)?);
        block.key = k;
        block.ip_mask = match bits {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        };
        self.stats.blocks_decoded += 1;
        Ok(block)
    }

    fn decode_block(&mut self, bus: &mut dyn Bus, lin: u64, bits: u32, t: mmu::Translation) -> ExecResult<Block> {
        let off = (lin & (PAGE_SIZE - 1)) as usize;
        let ip = self.state.rip;
        if let Some(host) = t.host {
            // Mark before reading so a concurrent write after our read bumps the tag.
            let tag = self.code_map.mark_code(t.phys);
            // SAFETY: the bus guarantees PAGE_SIZE valid bytes at `host`;
            // we only read [off, PAGE_SIZE). Concurrent writers can change
            // bytes under us, which the code-map tag then reports.
            let bytes = unsafe { std::slice::from_raw_parts(host.as_ptr().add(off), PAGE_SIZE as usize - off) };
            let mut dec = Decoder::with_ip(bits, bytes, ip, DecoderOptions::NONE);
            let mut instrs = Vec::with_capacity(8);
            let mut ins = Instruction::default();
            while dec.can_decode() && instrs.len() < MAX_BLOCK {
                dec.decode_out(&mut ins);
                if ins.is_invalid() {
                    // Out of bytes at the page end: decode across the page
                    // boundary on its own, uncached.
                    if dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
                        if instrs.is_empty() {
                            return self.decode_slow(bus, lin, bits);
                        }
                        break;
                    }
                    instrs.push(Decoded {
                        ins,
                        handler: crate::exec::invalid,
                    });
                    break;
                }
                let flow = ins.flow_control();
                instrs.push(Decoded {
                    handler: handler_for_instruction(&ins),
                    ins,
                });
                if flow != FlowControl::Next {
                    break;
                }
                // Mode-changing instructions end blocks through `end_block`.
            }
            if instrs.is_empty() {
                return self.decode_slow(bus, lin, bits);
            }
            return Ok(Block {
                instrs,
                key: 0,
                phys: t.phys,
                tag,
                ip_mask: 0,
                hits: 0,
                jit_failed: false,
                translation: Default::default(),
            });
        }
        self.decode_slow(bus, lin, bits)
    }

    /// Decode one instruction byte by byte through the MMU (page-crossing
    /// instructions, code outside RAM). The result is not cached.
    fn decode_slow(&mut self, bus: &mut dyn Bus, lin: u64, bits: u32) -> ExecResult<Block> {
        let mut buf = [0u8; 15];
        let mut n = 0;
        let user = self.state.cpl() == 3;
        // Fetch up to 15 bytes; a fault past the first byte only matters if
        // the instruction really needs those bytes.
        let mut fetch_fault = None;
        while n < 15 {
            let a = if bits == 64 {
                lin.wrapping_add(n as u64)
            } else {
                lin.wrapping_add(n as u64) & 0xffff_ffff
            };
            match self.fetch_byte(bus, a, user) {
                Ok(b) => buf[n] = b,
                Err(f) => {
                    fetch_fault = Some(f);
                    break;
                }
            }
            n += 1;
        }
        if n == 0 {
            return Err(fetch_fault.unwrap_or_else(Fault::gp0));
        }
        let mut dec = Decoder::with_ip(bits, &buf[..n], self.state.rip, DecoderOptions::NONE);
        let ins = dec.decode();
        if ins.is_invalid() {
            if dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
                if let Some(f) = fetch_fault {
                    return Err(f);
                }
            }
            return Ok(Block {
                instrs: vec![Decoded {
                    ins,
                    handler: crate::exec::invalid,
                }],
                key: 0,
                phys: u64::MAX,
                tag: None,
                ip_mask: 0,
                hits: 0,
                jit_failed: false,
                translation: Default::default(),
            });
        }
        Ok(Block {
            instrs: vec![Decoded {
                handler: handler_for_instruction(&ins),
                ins,
            }],
            key: 0,
            phys: u64::MAX,
            tag: None,
            ip_mask: 0,
            hits: 0,
            jit_failed: false,
            translation: Default::default(),
        })
    }

    fn fetch_byte(&mut self, bus: &mut dyn Bus, lin: u64, user: bool) -> ExecResult<u8> {
        let t = mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Execute, user)?;
        let off = (lin & (PAGE_SIZE - 1)) as usize;
        match t.host {
            // SAFETY: the bus guarantees PAGE_SIZE valid bytes at `host`, off < PAGE_SIZE.
            Some(h) => Ok(unsafe { h.as_ptr().add(off).read_volatile() }),
            None => {
                let mut b = [0u8];
                bus.mmio_read(t.phys + off as u64, &mut b);
                Ok(b[0])
            }
        }
    }
}
