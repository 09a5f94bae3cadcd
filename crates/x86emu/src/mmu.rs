//! Linear-to-physical translation: page walks (32-bit, PAE and 4-level with
//! 4 KiB, 2/4 MiB and 1 GiB pages), permission checks, accessed/dirty bits,
//! and the TLB that caches the results together with host pointers.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::bus::{Bus, PAGE_SIZE};
use crate::exception::Fault;
use crate::state::{cr, flags, CpuState};

/// Physical address width we advertise in CPUID 0x80000008.
pub const PHYS_ADDR_BITS: u32 = 40;
const PHYS_MASK: u64 = (1 << PHYS_ADDR_BITS) - 1;

/// What a memory access wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Execute,
}

/// Page-fault error code bits.
pub mod pf {
    pub const PRESENT: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const USER: u32 = 4;
    pub const RSVD: u32 = 8;
    pub const FETCH: u32 = 16;
}

const PTE_P: u64 = 1;
const PTE_W: u64 = 2;
const PTE_U: u64 = 4;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;

/// Result of a walk: the physical page and the rights the walk granted.
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    pub phys: u64,
    pub user: bool,
    pub writable: bool,
    pub executable: bool,
    pub global: bool,
    /// The translation comes from a page larger than 4 KiB.
    pub large: bool,
}

/// Which TLB a lookup uses: the permission context of the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ctx {
    /// CPL 3.
    User = 0,
    /// CPL 0-2 with SMAP enforced (or no SMAP).
    Supervisor = 1,
    /// CPL 0-2 with EFLAGS.AC set, so SMAP is relaxed for data accesses.
    SupervisorAc = 2,
}

const TLB_BITS: usize = 9;
const TLB_SIZE: usize = 1 << TLB_BITS;
const INVALID: u64 = 1;

/// `repr(C)`: the JIT's inline data-TLB lookup reads it ([`JitTlb`]).
#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    /// Page-aligned linear address, or INVALID, per access kind.
    read_tag: u64,
    write_tag: u64,
    exec_tag: u64,
    phys: u64,
    /// Host pointer to the page when it is RAM.
    host: Option<NonNull<u8>>,
    global: bool,
    /// Part of a 2 MiB, 4 MiB or 1 GiB page (cached per 4 KiB piece).
    large: bool,
}

const EMPTY: Entry = Entry {
    read_tag: INVALID,
    write_tag: INVALID,
    exec_tag: INVALID,
    phys: 0,
    host: None,
    global: false,
    large: false,
};

/// What translated code needs to look up a data page inline: a set is
/// `TLB_SIZE` entries of `entry_size` bytes indexed by linear bits 12..;
/// a hit compares the page-aligned linear address with the read or write
/// tag, and RAM has a non-null host pointer. A miss takes the slow path
/// (`translate`), so write fills still call `Bus::note_write_mapping`.
pub(crate) struct JitTlb;

impl JitTlb {
    pub const INDEX_MASK: u64 = TLB_SIZE as u64 - 1;
    pub const ENTRY_SIZE: i32 = std::mem::size_of::<Entry>() as i32;
    pub const READ_TAG: i32 = std::mem::offset_of!(Entry, read_tag) as i32;
    pub const WRITE_TAG: i32 = std::mem::offset_of!(Entry, write_tag) as i32;
    pub const PHYS: i32 = std::mem::offset_of!(Entry, phys) as i32;
    pub const HOST: i32 = std::mem::offset_of!(Entry, host) as i32;
}

/// A direct-mapped TLB per permission context.
pub struct Tlb {
    sets: Vec<[Entry; TLB_SIZE]>,
}

/// A TLB hit or a fresh translation.
#[derive(Clone, Copy, Debug)]
pub struct Translation {
    pub phys: u64,
    pub host: Option<NonNull<u8>>,
}

// SAFETY: the host pointers in the TLB refer to guest RAM, which the bus
// keeps mapped for the CPU's lifetime and which is shared memory by design
// (every vCPU thread accesses it); moving the TLB to another thread does
// not change who may access it.
unsafe impl Send for Tlb {}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            sets: vec![[EMPTY; TLB_SIZE]; 6],
        }
    }
}

impl Tlb {
    #[inline(always)]
    fn index(lin: u64) -> usize {
        ((lin >> 12) as usize) & (TLB_SIZE - 1)
    }

    /// Code and data translations live in separate sets (like an ITLB and a
    /// DTLB), so a loop whose code and data share an index does not thrash.
    #[inline(always)]
    fn set(ctx: Ctx, access: Access) -> usize {
        ctx as usize * 2 + (access == Access::Execute) as usize
    }

    /// Look up a page; returns the physical page base and host pointer.
    #[inline(always)]
    pub fn lookup(&self, ctx: Ctx, lin: u64, access: Access) -> Option<Translation> {
        let page = lin & !(PAGE_SIZE - 1);
        let e = &self.sets[Self::set(ctx, access)][Self::index(lin)];
        let tag = match access {
            Access::Read => e.read_tag,
            Access::Write => e.write_tag,
            Access::Execute => e.exec_tag,
        };
        if tag == page {
            Some(Translation {
                phys: e.phys,
                host: e.host,
            })
        } else {
            None
        }
    }

    fn insert(&mut self, ctx: Ctx, lin: u64, walk: &Walk, access: Access, host: Option<NonNull<u8>>, state: &CpuState) {
        let page = lin & !(PAGE_SIZE - 1);
        let slot = &mut self.sets[Self::set(ctx, access)][Self::index(lin)];
        if slot.phys != walk.phys || (slot.read_tag != page && slot.exec_tag != page) {
            *slot = EMPTY;
        }
        slot.phys = walk.phys;
        slot.host = host;
        slot.global = walk.global;
        slot.large = walk.large;
        if access == Access::Execute {
            if allowed(ctx, walk, Access::Execute, state) {
                slot.exec_tag = page;
            }
            return;
        }
        // Reads are allowed once the walk succeeded for any data access,
        // except in the SMAP case, which `allowed` judges.
        if allowed(ctx, walk, Access::Read, state) {
            slot.read_tag = page;
        }
        // A write entry only after a write walk, so the dirty bit is set.
        if access == Access::Write {
            slot.write_tag = page;
        }
    }

    /// The data set that reads and writes at privilege `user` use now, for
    /// translated code's inline lookup (see [`JitTlb`]).
    pub(crate) fn data_set(&self, s: &CpuState, user: bool) -> usize {
        self.sets[Self::set(context(s, user), Access::Read)].as_ptr() as usize
    }

    /// Flush everything (CR0/CR4/EFER changes, INVLPG of a global page...).
    pub fn flush_all(&mut self) {
        for set in &mut self.sets {
            set.fill(EMPTY);
        }
    }

    /// Flush non-global entries (MOV to CR3).
    pub fn flush_non_global(&mut self) {
        for set in &mut self.sets {
            for e in set.iter_mut() {
                if !e.global {
                    *e = EMPTY;
                }
            }
        }
    }

    /// Flush one linear page (INVLPG). Large pages are cached per 4 KiB
    /// piece, and an entry does not record its page size, so every
    /// large-page entry in the same 1 GiB region is dropped too (a superset
    /// of the large page that contains `lin`).
    pub fn flush_page(&mut self, lin: u64) {
        let page = lin & !(PAGE_SIZE - 1);
        let region = lin >> 30;
        for set in &mut self.sets {
            let e = &mut set[Self::index(lin)];
            if e.read_tag == page || e.write_tag == page || e.exec_tag == page {
                *e = EMPTY;
            }
            for e in set.iter_mut().filter(|e| e.large) {
                let tags = [e.read_tag, e.write_tag, e.exec_tag];
                if tags.iter().any(|&t| t != INVALID && t >> 30 == region) {
                    *e = EMPTY;
                }
            }
        }
    }
}

fn allowed(ctx: Ctx, walk: &Walk, access: Access, s: &CpuState) -> bool {
    match ctx {
        Ctx::User => {
            walk.user
                && match access {
                    Access::Read => true,
                    Access::Write => walk.writable,
                    Access::Execute => walk.executable,
                }
        }
        Ctx::Supervisor | Ctx::SupervisorAc => match access {
            Access::Execute => walk.executable && !(walk.user && s.cr4 & cr::CR4_SMEP != 0),
            Access::Read | Access::Write => {
                if walk.user && s.cr4 & cr::CR4_SMAP != 0 && ctx == Ctx::Supervisor {
                    return false;
                }
                access == Access::Read || walk.writable || s.cr0 & cr::CR0_WP == 0
            }
        },
    }
}

/// The TLB context for an access at the current privilege level.
pub fn context(s: &CpuState, user: bool) -> Ctx {
    if user {
        Ctx::User
    } else if s.rflags & flags::AC != 0 {
        Ctx::SupervisorAc
    } else {
        Ctx::Supervisor
    }
}

/// Read a page-table entry atomically through the bus.
fn read_pte(bus: &mut dyn Bus, addr: u64, wide: bool) -> Option<(u64, Option<NonNull<u8>>)> {
    let page = addr & !(PAGE_SIZE - 1);
    let host = bus.ram_page(page)?;
    let off = (addr - page) as usize;
    // SAFETY: `ram_page` guarantees PAGE_SIZE valid bytes; entries are
    // naturally aligned (4 or 8 bytes) because the walker builds their
    // addresses from aligned table bases and scaled indices.
    let value = unsafe {
        if wide {
            (*(host.as_ptr().add(off) as *const AtomicU64)).load(Ordering::Acquire)
        } else {
            (*(host.as_ptr().add(off) as *const AtomicU32)).load(Ordering::Acquire) as u64
        }
    };
    Some((value, Some(host)))
}

/// Set accessed/dirty bits in a page-table entry with an atomic OR, as the
/// hardware does, so that concurrent vCPUs and the guest's own cmpxchg on
/// PTEs behave.
fn set_bits(host: Option<NonNull<u8>>, addr: u64, wide: bool, bits: u64) {
    let Some(host) = host else { return };
    let off = (addr & (PAGE_SIZE - 1)) as usize;
    // SAFETY: as in `read_pte`; the pointer is valid and aligned.
    unsafe {
        if wide {
            (*(host.as_ptr().add(off) as *const AtomicU64)).fetch_or(bits, Ordering::AcqRel);
        } else {
            (*(host.as_ptr().add(off) as *const AtomicU32)).fetch_or(bits as u32, Ordering::AcqRel);
        }
    }
}

/// Build the page-fault for a failed access.
fn page_fault(lin: u64, access: Access, user: bool, present: bool, rsvd: bool, s: &CpuState) -> Fault {
    let mut code = 0;
    if present {
        code |= pf::PRESENT;
    }
    if access == Access::Write {
        code |= pf::WRITE;
    }
    if user {
        code |= pf::USER;
    }
    if rsvd {
        code |= pf::RSVD | pf::PRESENT;
    }
    let nx_on = s.efer & cr::EFER_NXE != 0 || s.cr4 & cr::CR4_SMEP != 0;
    if access == Access::Execute && nx_on {
        code |= pf::FETCH;
    }
    Fault::page(lin, code)
}

/// Walk the page tables for `lin`. Sets A (and D for writes) bits.
pub fn walk(bus: &mut dyn Bus, s: &CpuState, lin: u64, access: Access, user: bool) -> Result<Walk, Fault> {
    if !s.paging() {
        return Ok(Walk {
            phys: lin & 0xffff_ffff & !(PAGE_SIZE - 1),
            user: true,
            writable: true,
            executable: true,
            global: false,
            large: false,
        });
    }
    let pae = s.cr4 & cr::CR4_PAE != 0;
    let nxe = s.efer & cr::EFER_NXE != 0;
    let rsvd_high = if nxe { !PHYS_MASK & !PTE_NX } else { !PHYS_MASK };
    let pf = |present, rsvd| page_fault(lin, access, user, present, rsvd, s);

    // Collect the entries along the walk and their rights.
    let mut writable = true;
    let mut usr = true;
    let mut exec = true;
    let mut path: [(u64, Option<NonNull<u8>>, u64); 4] = [(0, None, 0); 4];
    let mut depth = 0;
    let wide = pae;

    let (levels, mut table) = if s.long_mode() {
        (4, s.cr3 & PHYS_MASK & !0xfff)
    } else if pae {
        // PAE: the four PDPTEs are read at CR3 load time on hardware; we read
        // them on each walk, which only differs for guests that change them
        // without reloading CR3.
        let pdpte_addr = (s.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
        let (e, _) = read_pte(bus, pdpte_addr, true).ok_or_else(|| pf(false, false))?;
        if e & PTE_P == 0 {
            return Err(pf(false, false));
        }
        if e & rsvd_high != 0 || e & 0x1e6 != 0 {
            return Err(pf(true, true));
        }
        (2, e & PHYS_MASK & !0xfff)
    } else {
        (2, s.cr3 & 0xffff_f000)
    };

    let mut level = levels;
    let (phys_base, size_bits, global) = loop {
        let (shift, idx_mask, entry_size) = if wide {
            (12 + 9 * (level - 1), 0x1ff, 8)
        } else {
            (12 + 10 * (level - 1), 0x3ff, 4)
        };
        let addr = table + ((lin >> shift) & idx_mask) * entry_size;
        let Some((e, host)) = read_pte(bus, addr, wide) else {
            // Page tables outside RAM read as not present.
            return Err(pf(false, false));
        };
        if e & PTE_P == 0 {
            return Err(pf(false, false));
        }
        if wide && (e & rsvd_high != 0 || (!nxe && e & PTE_NX != 0)) {
            return Err(pf(true, true));
        }
        if s.long_mode() && level == 4 && e & PTE_PS != 0 {
            return Err(pf(true, true));
        }
        writable &= e & PTE_W != 0;
        usr &= e & PTE_U != 0;
        if nxe && e & PTE_NX != 0 {
            exec = false;
        }
        path[depth] = (addr, host, e);
        depth += 1;
        let large_ok = level == 2 && (wide || s.cr4 & cr::CR4_PSE != 0) || level == 3 && s.long_mode();
        if level == 1 || (e & PTE_PS != 0 && large_ok) {
            let size_bits = shift;
            let base = if wide {
                let mask = !((1u64 << size_bits) - 1) & PHYS_MASK;
                if level > 1 {
                    // Bits 12..size_bits of a large-page entry are reserved, bit 12 is PAT.
                    let rsvd = ((1u64 << size_bits) - 1) & !0x1fff & !0xfff;
                    if e & rsvd & PHYS_MASK != 0 {
                        return Err(pf(true, true));
                    }
                }
                e & mask
            } else if level == 2 {
                // 4 MiB page: bits 13..20 hold physical bits 32..39.
                (e & 0xffc0_0000) | ((e >> 13) & 0xff) << 32
            } else {
                e & 0xffff_f000
            };
            break (base, size_bits, e & PTE_G != 0 && s.cr4 & cr::CR4_PGE != 0);
        }
        table = if wide { e & PHYS_MASK & !0xfff } else { e & 0xffff_f000 };
        level -= 1;
    };

    let walk = Walk {
        phys: (phys_base | (lin & ((1u64 << size_bits) - 1))) & !(PAGE_SIZE - 1),
        user: usr,
        writable,
        executable: exec,
        global,
        large: size_bits > 12,
    };
    let ctx = if user {
        Ctx::User
    } else if s.rflags & flags::AC != 0 {
        Ctx::SupervisorAc
    } else {
        Ctx::Supervisor
    };
    // Implicit supervisor accesses (user == false with CPL 3) are checked as supervisor.
    if !allowed(ctx, &walk, access, s) {
        return Err(pf(true, false));
    }
    // Accessed bits along the path, dirty on the leaf for writes.
    for (i, &(addr, host, e)) in path[..depth].iter().enumerate() {
        let leaf = i == depth - 1;
        let mut bits = 0;
        if e & PTE_A == 0 {
            bits |= PTE_A;
        }
        if leaf && access == Access::Write && e & PTE_D == 0 {
            bits |= PTE_D;
        }
        if bits != 0 {
            bus.note_write_mapping(addr & !(PAGE_SIZE - 1));
            set_bits(host, addr, wide, bits);
        }
    }
    Ok(walk)
}

/// Translate with the TLB, walking on a miss and filling the TLB.
#[inline]
pub fn translate(
    tlb: &mut Tlb,
    bus: &mut dyn Bus,
    s: &CpuState,
    lin: u64,
    access: Access,
    user: bool,
) -> Result<Translation, Fault> {
    let ctx = context(s, user);
    if let Some(t) = tlb.lookup(ctx, lin, access) {
        return Ok(t);
    }
    let w = walk(bus, s, lin, access, user)?;
    if access == Access::Write {
        bus.note_write_mapping(w.phys);
    }
    let host = bus.ram_page(w.phys);
    tlb.insert(ctx, lin, &w, access, host, s);
    Ok(Translation { phys: w.phys, host })
}

#[cfg(test)]
#[allow(clippy::identity_op, clippy::erasing_op)]
mod tests {
    use super::*;
    use crate::testbus::TestBus;

    fn long_state(cr3: u64) -> CpuState {
        CpuState::long_mode_flat(cr3)
    }

    /// Build 4-level tables mapping `lin` to `phys` with the given leaf flags.
    fn map_4k(bus: &mut TestBus, lin: u64, phys: u64, leaf_flags: u64) -> u64 {
        let pml4 = 0x1000;
        let pdpt = 0x2000;
        let pd = 0x3000;
        let pt = 0x4000;
        let upper = PTE_P | PTE_W | PTE_U;
        bus.write_u64(pml4 + ((lin >> 39) & 0x1ff) * 8, pdpt | upper);
        bus.write_u64(pdpt + ((lin >> 30) & 0x1ff) * 8, pd | upper);
        bus.write_u64(pd + ((lin >> 21) & 0x1ff) * 8, pt | upper);
        bus.write_u64(pt + ((lin >> 12) & 0x1ff) * 8, phys | leaf_flags);
        pml4
    }

    /// A bus that records `note_write_mapping` calls.
    struct NotingBus {
        inner: TestBus,
        notes: Vec<u64>,
    }

    // SAFETY: every memory answer is the inner TestBus's.
    unsafe impl Bus for NotingBus {
        fn ram_page(&mut self, gpa: u64) -> Option<NonNull<u8>> {
            self.inner.ram_page(gpa)
        }
        fn note_write_mapping(&mut self, gpa: u64) {
            self.notes.push(gpa);
        }
        fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
            self.inner.mmio_read(gpa, data)
        }
        fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
            self.inner.mmio_write(gpa, data)
        }
        fn io_in(&mut self, port: u16, size: u8) -> u32 {
            self.inner.io_in(port, size)
        }
        fn io_out(&mut self, port: u16, size: u8, value: u32) {
            self.inner.io_out(port, size, value)
        }
    }

    /// Dirty tracking's contract: the first write to a page through the
    /// TLB is told to the bus (with the page-table pages whose A/D bits
    /// the walk set), later writes through the cached entry are not, and
    /// after a flush the next write is told again. Reads never are.
    #[test]
    fn write_fills_are_told_to_the_bus() {
        let mut inner = TestBus::new(1 << 20);
        let cr3 = map_4k(&mut inner, 0x40_0000, 0x9000, PTE_P | PTE_W);
        let mut bus = NotingBus {
            inner,
            notes: Vec::new(),
        };
        let s = long_state(cr3);
        let mut tlb = Tlb::default();
        translate(&mut tlb, &mut bus, &s, 0x40_0010, Access::Read, false).unwrap();
        assert!(!bus.notes.contains(&0x9000), "{:x?}", bus.notes);
        bus.notes.clear();
        translate(&mut tlb, &mut bus, &s, 0x40_0010, Access::Write, false).unwrap();
        assert!(
            bus.notes.contains(&0x9000) && bus.notes.contains(&0x4000),
            "{:x?}",
            bus.notes
        );
        bus.notes.clear();
        translate(&mut tlb, &mut bus, &s, 0x40_0ff0, Access::Write, false).unwrap();
        assert!(bus.notes.is_empty(), "{:x?}", bus.notes);
        tlb.flush_all();
        translate(&mut tlb, &mut bus, &s, 0x40_0020, Access::Write, false).unwrap();
        assert_eq!(bus.notes, vec![0x9000]);
    }

    #[test]
    fn four_level_walk_sets_accessed_and_dirty() {
        let mut bus = TestBus::new(1 << 20);
        let cr3 = map_4k(&mut bus, 0x7fff_1234_5000, 0x9000, PTE_P | PTE_W);
        let s = long_state(cr3);
        let w = walk(&mut bus, &s, 0x7fff_1234_5678, Access::Read, false).unwrap();
        assert_eq!(w.phys, 0x9000);
        let pte = bus.read_u64(0x4000 + ((0x7fff_1234_5000u64 >> 12) & 0x1ff) * 8);
        assert!(pte & PTE_A != 0 && pte & PTE_D == 0);
        walk(&mut bus, &s, 0x7fff_1234_5678, Access::Write, false).unwrap();
        let pte = bus.read_u64(0x4000 + ((0x7fff_1234_5000u64 >> 12) & 0x1ff) * 8);
        assert!(pte & PTE_D != 0);
    }

    #[test]
    fn not_present_and_protection_error_codes() {
        let mut bus = TestBus::new(1 << 20);
        let cr3 = map_4k(&mut bus, 0x40_0000, 0x9000, PTE_P); // read-only, supervisor
        let mut s = long_state(cr3);
        let e = walk(&mut bus, &s, 0x40_1000, Access::Read, false).unwrap_err();
        assert_eq!(e.error_code, Some(0));
        let e = walk(&mut bus, &s, 0x40_0000, Access::Write, true).unwrap_err();
        assert_eq!(e.error_code, Some(pf::PRESENT | pf::WRITE | pf::USER));
        assert_eq!(e.cr2, Some(0x40_0000));
        // WP=0 lets the supervisor write to a read-only page.
        s.cr0 &= !cr::CR0_WP;
        assert!(walk(&mut bus, &s, 0x40_0000, Access::Write, false).is_ok());
    }

    #[test]
    fn nx_and_reserved_bits() {
        let mut bus = TestBus::new(1 << 20);
        let cr3 = map_4k(&mut bus, 0x40_0000, 0x9000, PTE_P | PTE_NX);
        let mut s = long_state(cr3);
        let e = walk(&mut bus, &s, 0x40_0000, Access::Execute, false).unwrap_err();
        assert_eq!(e.error_code, Some(pf::PRESENT | pf::FETCH));
        s.efer &= !cr::EFER_NXE;
        let e = walk(&mut bus, &s, 0x40_0000, Access::Read, false).unwrap_err();
        assert_eq!(e.error_code, Some(pf::PRESENT | pf::RSVD));
    }

    #[test]
    fn large_pages() {
        let mut bus = TestBus::new(1 << 20);
        let pml4 = 0x1000;
        let pdpt = 0x2000;
        let pd = 0x3000;
        bus.write_u64(pml4, pdpt | 3);
        bus.write_u64(pdpt, pd | 3); // 0..1G through a PD
        bus.write_u64(pdpt + 8, 0x4000_0000 | 3 | PTE_PS); // 1G..2G one 1 GiB page
        bus.write_u64(pd + 8, 0x0060_0000 | 3 | PTE_PS); // 2M..4M -> 6M
        let s = long_state(pml4);
        assert_eq!(
            walk(&mut bus, &s, 0x0021_2345, Access::Read, false).unwrap().phys,
            0x0061_2000
        );
        assert_eq!(
            walk(&mut bus, &s, 0x4567_8abc, Access::Read, false).unwrap().phys,
            0x4567_8000
        );
    }

    #[test]
    fn smep_and_smap() {
        let mut bus = TestBus::new(1 << 20);
        let cr3 = map_4k(&mut bus, 0x40_0000, 0x9000, PTE_P | PTE_W | PTE_U);
        let mut s = long_state(cr3);
        s.cr4 |= cr::CR4_SMEP | cr::CR4_SMAP;
        assert!(walk(&mut bus, &s, 0x40_0000, Access::Execute, false).is_err());
        assert!(walk(&mut bus, &s, 0x40_0000, Access::Read, false).is_err());
        s.rflags |= flags::AC;
        assert!(walk(&mut bus, &s, 0x40_0000, Access::Read, false).is_ok());
        assert!(walk(&mut bus, &s, 0x40_0000, Access::Execute, true).is_ok());
    }

    #[test]
    fn legacy_32bit_paging_with_4m_page() {
        let mut bus = TestBus::new(1 << 20);
        let mut s = CpuState::reset();
        s.cr0 |= cr::CR0_PE | cr::CR0_PG;
        s.cr4 |= cr::CR4_PSE;
        s.cr3 = 0x1000;
        bus.write_u32(0x1000 + 4 * 1, 0x0080_0000 | 0x83); // 4M..8M -> 8M, 4 MiB page
        bus.write_u32(0x1000, 0x2000 | 3);
        bus.write_u32(0x2000 + 5 * 4, 0x7000 | 3);
        assert_eq!(
            walk(&mut bus, &s, 0x0041_2345, Access::Read, false).unwrap().phys,
            0x0081_2000
        );
        assert_eq!(walk(&mut bus, &s, 0x5123, Access::Write, false).unwrap().phys, 0x7000);
    }

    #[test]
    fn tlb_caches_until_flushed() {
        let mut bus = TestBus::new(1 << 20);
        let cr3 = map_4k(&mut bus, 0x40_0000, 0x9000, PTE_P | PTE_W);
        let s = long_state(cr3);
        let mut tlb = Tlb::default();
        let t = translate(&mut tlb, &mut bus, &s, 0x40_0010, Access::Read, false).unwrap();
        assert_eq!(t.phys, 0x9000);
        // Remap behind the TLB's back: the stale entry stays until INVLPG.
        bus.write_u64(0x4000 + ((0x40_0000u64 >> 12) & 0x1ff) * 8, 0xa000 | 3);
        assert_eq!(
            translate(&mut tlb, &mut bus, &s, 0x40_0010, Access::Read, false)
                .unwrap()
                .phys,
            0x9000
        );
        tlb.flush_page(0x40_0000);
        assert_eq!(
            translate(&mut tlb, &mut bus, &s, 0x40_0010, Access::Read, false)
                .unwrap()
                .phys,
            0xa000
        );
        // A read fill does not allow writes until a write walk set D.
        assert!(tlb.lookup(Ctx::Supervisor, 0x40_0000, Access::Write).is_none());
    }
}
