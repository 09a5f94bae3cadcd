//! Guest memory accesses from instructions: segmentation, paging through
//! the TLB, RAM through host pointers, MMIO through the bus, atomic
//! read-modify-write for locked instructions, and code-page invalidation.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::bus::{Bus, PAGE_SIZE};
use crate::cpu::Cpu;
use crate::exception::{vector, ExecResult, Fault};
use crate::mmu::{self, Access};
use crate::state::{cr, flags, Seg};

/// Serializes locked accesses that cannot be done with one host atomic
/// (split across pages, misaligned, or MMIO).
static SPLIT_LOCK: Mutex<()> = Mutex::new(());

/// Copy `len` bytes between guest RAM and a buffer. The usual operand
/// sizes are one host load and store; `copy_nonoverlapping` with a length
/// known only at run time is a call into libc's memmove (4% of a boot).
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping`: `src` readable and `dst` writable
/// for `len` bytes, not overlapping.
#[inline(always)]
unsafe fn copy_small(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's guarantee, for each width; unaligned accesses
    // are allowed by read_unaligned/write_unaligned.
    unsafe {
        match len {
            1 => *dst = *src,
            2 => (dst as *mut u16).write_unaligned((src as *const u16).read_unaligned()),
            4 => (dst as *mut u32).write_unaligned((src as *const u32).read_unaligned()),
            8 => (dst as *mut u64).write_unaligned((src as *const u64).read_unaligned()),
            16 => (dst as *mut u128).write_unaligned((src as *const u128).read_unaligned()),
            _ => std::ptr::copy_nonoverlapping(src, dst, len),
        }
    }
}

pub fn is_canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

impl Cpu {
    /// Linear address of `seg:off` for an access of `size` bytes, with the
    /// segment checks of the current mode.
    #[inline]
    pub fn linear(&self, seg: Seg, off: u64, size: u64, write: bool) -> ExecResult<u64> {
        let s = &self.state;
        if s.in_64bit() {
            let base = match seg {
                Seg::Fs | Seg::Gs => s.seg(seg).base,
                _ => 0,
            };
            let lin = base.wrapping_add(off);
            if !is_canonical(lin) {
                return Err(if seg == Seg::Ss { Fault::ss0() } else { Fault::gp0() });
            }
            return Ok(lin);
        }
        let sr = s.seg(seg);
        let fault = || if seg == Seg::Ss { Fault::ss0() } else { Fault::gp0() };
        if s.protected_mode() && s.rflags & flags::VM == 0 {
            if sr.unusable || !sr.present {
                return Err(fault());
            }
            // Writable data, or readable code for reads.
            if write && (sr.type_ & 8 != 0 || sr.type_ & 2 == 0) {
                return Err(fault());
            }
            if !write && sr.type_ & 8 != 0 && sr.type_ & 2 == 0 {
                return Err(fault());
            }
        }
        let last = off.wrapping_add(size.saturating_sub(1));
        let expand_down = sr.s && sr.type_ & 0xc == 0x4;
        if expand_down {
            let upper = if sr.db { 0xffff_ffff } else { 0xffff };
            if off <= sr.limit as u64 || last > upper {
                return Err(fault());
            }
        } else if last > sr.limit as u64 || last < off {
            return Err(fault());
        }
        Ok(sr.base.wrapping_add(off) & 0xffff_ffff)
    }

    #[inline(always)]
    fn user_access(&self) -> bool {
        self.state.cpl() == 3
    }

    #[inline(always)]
    fn alignment_check(&self, lin: u64, size: usize) -> ExecResult {
        if self.state.rflags & flags::AC != 0
            && self.state.cr0 & cr::CR0_AM != 0
            && self.state.cpl() == 3
            && size > 1
            && lin & (size as u64 - 1).min(7) != 0
        {
            return Err(Fault::with_code(vector::AC, 0));
        }
        Ok(())
    }

    /// Before a guest store to physical `phys`: if its page holds decoded
    /// code, that code is invalid now and the running block must end.
    /// Every path that stores into guest RAM through a host pointer calls
    /// this.
    #[inline(always)]
    pub(crate) fn note_code_write(&mut self, phys: u64) {
        if self.code_map.note_write(phys) {
            self.code_written = true;
            self.stats.code_writes += 1;
        }
    }

    /// Read `buf.len()` bytes at a linear address.
    pub fn read_linear(&mut self, bus: &mut dyn Bus, lin: u64, buf: &mut [u8], user: bool) -> ExecResult {
        let len = buf.len();
        let off = (lin & (PAGE_SIZE - 1)) as usize;
        if off + len <= PAGE_SIZE as usize {
            let t = mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Read, user)?;
            match t.host {
                // SAFETY: the bus guarantees PAGE_SIZE valid bytes at `host`,
                // and off + len <= PAGE_SIZE.
                Some(h) => unsafe { copy_small(h.as_ptr().add(off), buf.as_mut_ptr(), len) },
                None => bus.mmio_read(t.phys + off as u64, buf),
            }
            return Ok(());
        }
        // Page-crossing: translate both pages before touching anything.
        let first = PAGE_SIZE as usize - off;
        let next = self.wrap_linear(lin.wrapping_add(first as u64));
        mmu::translate(&mut self.tlb, bus, &self.state, next, Access::Read, user)?;
        let (a, b) = buf.split_at_mut(first);
        self.read_linear(bus, lin, a, user)?;
        self.read_linear(bus, next, b, user)
    }

    /// Write `data` at a linear address.
    pub fn write_linear(&mut self, bus: &mut dyn Bus, lin: u64, data: &[u8], user: bool) -> ExecResult {
        let len = data.len();
        let off = (lin & (PAGE_SIZE - 1)) as usize;
        if off + len <= PAGE_SIZE as usize {
            let t = mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Write, user)?;
            match t.host {
                Some(h) => {
                    self.note_code_write(t.phys);
                    // SAFETY: the bus guarantees PAGE_SIZE valid bytes at
                    // `host`, and off + len <= PAGE_SIZE.
                    unsafe { copy_small(data.as_ptr(), h.as_ptr().add(off), len) }
                }
                None => bus.mmio_write(t.phys + off as u64, data),
            }
            return Ok(());
        }
        let first = PAGE_SIZE as usize - off;
        let next = self.wrap_linear(lin.wrapping_add(first as u64));
        // Both pages must be writable before either is written.
        mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Write, user)?;
        mmu::translate(&mut self.tlb, bus, &self.state, next, Access::Write, user)?;
        self.write_linear(bus, lin, &data[..first], user)?;
        self.write_linear(bus, next, &data[first..], user)
    }

    /// Host address of the `len` bytes at linear `lin` for a bulk access
    /// with the current privilege, translated through the TLB (faulting as
    /// a read or write of that page would), with the physical address of
    /// the page. `None` when the range is not inside one page or the page is
    /// not RAM. The pointer is valid for `len` bytes. A caller that writes
    /// through it must call `note_code_write` itself.
    pub(crate) fn host_range(
        &mut self,
        bus: &mut dyn Bus,
        lin: u64,
        len: usize,
        write: bool,
    ) -> ExecResult<Option<(NonNull<u8>, u64)>> {
        let off = (lin & (PAGE_SIZE - 1)) as usize;
        if len == 0 || off + len > PAGE_SIZE as usize {
            return Ok(None);
        }
        let access = if write { Access::Write } else { Access::Read };
        let user = self.user_access();
        let t = mmu::translate(&mut self.tlb, bus, &self.state, lin, access, user)?;
        // SAFETY: the bus guarantees PAGE_SIZE valid bytes at `host`, and
        // off < PAGE_SIZE, so the result is inside that page and non-null.
        Ok(t.host
            .map(|h| (unsafe { NonNull::new_unchecked(h.as_ptr().add(off)) }, t.phys)))
    }

    fn wrap_linear(&self, lin: u64) -> u64 {
        if self.state.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }

    /// Read N bytes at seg:off with the current privilege.
    #[inline]
    pub fn read_bytes<const N: usize>(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64) -> ExecResult<[u8; N]> {
        let lin = self.linear(seg, off, N as u64, false)?;
        self.alignment_check(lin, N)?;
        let mut buf = [0u8; N];
        let user = self.user_access();
        self.read_linear(bus, lin, &mut buf, user)?;
        Ok(buf)
    }

    #[inline]
    pub fn write_bytes(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, data: &[u8]) -> ExecResult {
        let lin = self.linear(seg, off, data.len() as u64, true)?;
        self.alignment_check(lin, data.len())?;
        let user = self.user_access();
        self.write_linear(bus, lin, data, user)
    }

    pub fn read_u8(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64) -> ExecResult<u8> {
        Ok(self.read_bytes::<1>(bus, seg, off)?[0])
    }
    pub fn read_u16(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64) -> ExecResult<u16> {
        Ok(u16::from_le_bytes(self.read_bytes(bus, seg, off)?))
    }
    pub fn read_u32(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64) -> ExecResult<u32> {
        Ok(u32::from_le_bytes(self.read_bytes(bus, seg, off)?))
    }
    pub fn read_u64(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64) -> ExecResult<u64> {
        Ok(u64::from_le_bytes(self.read_bytes(bus, seg, off)?))
    }
    pub fn read_u128(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64) -> ExecResult<u128> {
        Ok(u128::from_le_bytes(self.read_bytes(bus, seg, off)?))
    }
    pub fn write_u8(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, v: u8) -> ExecResult {
        self.write_bytes(bus, seg, off, &[v])
    }
    pub fn write_u16(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, v: u16) -> ExecResult {
        self.write_bytes(bus, seg, off, &v.to_le_bytes())
    }
    pub fn write_u32(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, v: u32) -> ExecResult {
        self.write_bytes(bus, seg, off, &v.to_le_bytes())
    }
    pub fn write_u64(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, v: u64) -> ExecResult {
        self.write_bytes(bus, seg, off, &v.to_le_bytes())
    }
    pub fn write_u128(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, v: u128) -> ExecResult {
        self.write_bytes(bus, seg, off, &v.to_le_bytes())
    }

    /// Read a value of `size` bytes (1, 2, 4 or 8), zero-extended.
    pub fn read_sized(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, size: u32) -> ExecResult<u64> {
        Ok(match size {
            1 => self.read_u8(bus, seg, off)? as u64,
            2 => self.read_u16(bus, seg, off)? as u64,
            4 => self.read_u32(bus, seg, off)? as u64,
            _ => self.read_u64(bus, seg, off)?,
        })
    }

    /// Write the low `size` bytes (1, 2, 4 or 8) of `v`.
    pub fn write_sized(&mut self, bus: &mut dyn Bus, seg: Seg, off: u64, size: u32, v: u64) -> ExecResult {
        self.write_bytes(bus, seg, off, &v.to_le_bytes()[..size as usize])
    }

    /// Supervisor-mode read of a system structure (GDT, IDT, TSS) at a
    /// linear address, regardless of CPL.
    pub fn read_system(&mut self, bus: &mut dyn Bus, lin: u64, buf: &mut [u8]) -> ExecResult {
        self.read_linear(bus, lin, buf, false)
    }

    pub fn write_system(&mut self, bus: &mut dyn Bus, lin: u64, data: &[u8]) -> ExecResult {
        self.write_linear(bus, lin, data, false)
    }

    /// Read-modify-write of `size` bytes at seg:off. `f` maps the old value
    /// to the new one and may be called more than once when `locked` (it
    /// retries on contention). Returns the old value. With `locked`, the
    /// update is atomic with respect to other vCPUs.
    pub fn rmw(
        &mut self,
        bus: &mut dyn Bus,
        seg: Seg,
        off: u64,
        size: u32,
        locked: bool,
        f: &mut dyn FnMut(u64) -> u64,
    ) -> ExecResult<u64> {
        let lin = self.linear(seg, off, size as u64, true)?;
        self.alignment_check(lin, size as usize)?;
        let user = self.user_access();
        let in_page = (lin & (PAGE_SIZE - 1)) + size as u64 <= PAGE_SIZE;
        if locked && in_page && lin & (size as u64 - 1) == 0 {
            let t = mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Write, user)?;
            if let Some(h) = t.host {
                self.note_code_write(t.phys);
                let off_in_page = (lin & (PAGE_SIZE - 1)) as usize;
                // SAFETY: the pointer is inside the RAM page the bus vouched
                // for, and naturally aligned for `size` (checked above).
                let p = unsafe { h.as_ptr().add(off_in_page) };
                return Ok(atomic_update(p, size, f));
            }
        }
        let _guard = if locked {
            Some(SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
        } else {
            None
        };
        let mut buf = [0u8; 8];
        // Check write permission first so a read-only page faults as a write.
        mmu::translate(&mut self.tlb, bus, &self.state, lin, Access::Write, user)?;
        self.read_linear(bus, lin, &mut buf[..size as usize], user)?;
        let old = u64::from_le_bytes(buf);
        let new = f(old);
        self.write_linear(bus, lin, &new.to_le_bytes()[..size as usize], user)?;
        Ok(old)
    }
}

/// Apply `f` atomically at `p` with a compare-exchange loop.
fn atomic_update(p: *mut u8, size: u32, f: &mut dyn FnMut(u64) -> u64) -> u64 {
    macro_rules! cas_loop {
        ($atomic:ty, $int:ty) => {{
            // SAFETY: caller guarantees `p` is valid and aligned for this width.
            let a = unsafe { &*(p as *const $atomic) };
            let mut cur = a.load(Ordering::Acquire);
            loop {
                let new = f(cur as u64) as $int;
                match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return cur as u64,
                    Err(actual) => cur = actual,
                }
            }
        }};
    }
    match size {
        1 => cas_loop!(AtomicU8, u8),
        2 => cas_loop!(AtomicU16, u16),
        4 => cas_loop!(AtomicU32, u32),
        _ => cas_loop!(AtomicU64, u64),
    }
}
