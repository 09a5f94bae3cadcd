//! The baseline JIT: hot decoded blocks of 64-bit code become host code.
//!
//! A translated block keeps the interpreter's data model: the guest
//! registers and RFLAGS stay in `CpuState` (no register caching), so any
//! point between two guest instructions is an exact interpreter state.
//! Simple forms that cannot fault (register MOV, LEA, ALU on 32/64-bit
//! registers, IMUL r,r, INC/DEC) are emitted inline; the guest flags of an
//! inline ALU instruction are the host's own flags for the same operation,
//! stored only when a later instruction (or the block end) can read them.
//! Every other instruction is a call to its interpreter handler with the
//! decoded instruction's address baked in (as Blink's first tier does),
//! after storing its RIP, and the block exits after any instruction that
//! faulted, ended the block (mode change, STI, ...), wrote to a code page,
//! or set TF. A block whose last instruction jumps back to its own start
//! loops in host code, bounded by the instruction budget and
//! [`MAX_LOOPS`], so events are looked at as often as the interpreter
//! looks at them.
//!
//! The code lives in a per-CPU arena; a translation belongs to its decoded
//! block, so everything that invalidates decoded blocks (code-map tags:
//! guest stores to code pages, DMA's `invalidate_range`, remapping)
//! invalidates translations too. When the arena is full it is reset and
//! every translation is dropped (generation counter).

mod arena;
mod emit;
pub(crate) mod lockstep;

use std::time::Instant;

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::decode::Block;
use crate::state::flags;

pub(crate) use arena::Arena;

/// Self-loop iterations a translated block runs per entry at most.
pub const MAX_LOOPS: u64 = 64;

/// A translation owned by a decoded block.
#[derive(Debug, Default)]
pub struct Translation {
    /// Entry point in the arena (0: none).
    entry: usize,
    /// Where a chained jump from another block enters (past the prologue).
    body: usize,
    /// Arena generation the code belongs to.
    generation: u64,
    /// The chain links of the block's static successors (see
    /// `emit::chain_targets`), read by its code; boxed so their address is
    /// fixed while the block moves in and out of the cache.
    links: Option<Box<[Link; 2]>>,
    /// The guest addresses those links lead to (`emit::chain_targets`),
    /// worked out once at translation.
    targets: [Option<u64>; 2],
}

/// A chain link: translated code jumps to `body` of the successor block
/// instead of returning to the dispatcher, if `epoch` is the decode
/// cache's current epoch (the successor is still alive) and `len`
/// instructions are still allowed. `body` 0: not linked.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct Link {
    body: u64,
    len: u64,
    epoch: u64,
}

impl Translation {
    /// Whether there is host code (of any arena generation) that chain
    /// links may lead into.
    pub(crate) fn has_code(&self) -> bool {
        self.entry != 0
    }
}

impl Link {
    pub(crate) const BODY: i32 = std::mem::offset_of!(Link, body) as i32;
    pub(crate) const LEN: i32 = std::mem::offset_of!(Link, len) as i32;
    pub(crate) const EPOCH: i32 = std::mem::offset_of!(Link, epoch) as i32;
}

/// A link to make once the block at `target` runs translated: the cell,
/// the physical page of the block that owns it, and the decode-cache
/// epoch when it was noted (the owner is alive while the epoch holds).
struct PendingLink {
    /// Address of the `Link`.
    cell: usize,
    target: u64,
    page: u64,
    epoch: u64,
}

/// What the JIT keeps per CPU.
pub struct Jit {
    arena: Arena,
    /// Runs of a block before it is translated.
    threshold: u32,
    /// The exit of the last translated run, to be linked to its successor.
    pending_link: Option<PendingLink>,
}

/// Passed to generated code and from it to the handler calls: the CPU and
/// the bus of this run.
struct Context<'a> {
    cpu: *mut Cpu,
    bus: *mut (dyn Bus + 'a),
    /// The data-TLB set for the current privilege, or 0 when inline
    /// accesses must take the slow path (alignment checking is on).
    /// Refreshed after every handler call (CPL, AC may change).
    dtlb: usize,
    /// The code map's page array and length (stores check bit 0).
    code_map: usize,
    code_map_len: usize,
    /// The decode cache's epoch (chain links of other epochs are stale).
    epoch: u64,
}

impl Context<'_> {
    pub(crate) const DTLB: i32 = std::mem::offset_of!(Context<'static>, dtlb) as i32;
    pub(crate) const CODE_MAP: i32 = std::mem::offset_of!(Context<'static>, code_map) as i32;
    pub(crate) const CODE_MAP_LEN: i32 = std::mem::offset_of!(Context<'static>, code_map_len) as i32;
    pub(crate) const EPOCH: i32 = std::mem::offset_of!(Context<'static>, epoch) as i32;
}

/// The data-TLB set translated code may use inline now (see `Context`).
fn inline_dtlb(cpu: &Cpu) -> usize {
    let s = &cpu.state;
    let user = s.cpl() == 3;
    if user && s.rflags & flags::AC != 0 && s.cr0 & crate::state::cr::CR0_AM != 0 {
        return 0;
    }
    cpu.tlb.data_set(s, user)
}

/// Signature of a translated block: (context, cpu, instructions allowed)
/// -> instructions executed.
type Entry = extern "sysv64" fn(usize, usize, u64) -> u64;

impl Jit {
    /// Drop all host code (the decode cache must have been cleared, so no
    /// translation refers to it) and give its pages back.
    pub(crate) fn release(&mut self) {
        self.arena.release();
        self.pending_link = None;
    }

    /// A JIT with a fresh code arena, or `None` when the host refuses
    /// executable memory (the interpreter then runs everything).
    pub fn new(threshold: u32) -> Option<Jit> {
        Some(Jit {
            arena: Arena::new()?,
            threshold,
            pending_link: None,
        })
    }
}

/// Offsets of the fields generated code touches, relative to the `Cpu`.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub gpr: i32,
    pub rip: i32,
    pub rflags: i32,
    /// The segment registers (`CpuState::segs`).
    pub segs: i32,
    pub cr0: i32,
    pub cr4: i32,
    /// The XMM register file (`Fpu::xmm`, 16 bytes each).
    pub xmm: i32,
}

impl Layout {
    fn of(cpu: &Cpu) -> Layout {
        let base = cpu as *const Cpu as usize;
        let off = |p: *const u64| (p as usize - base) as i32;
        Layout {
            gpr: off(cpu.state.gpr.as_ptr()),
            rip: off(&cpu.state.rip),
            rflags: off(&cpu.state.rflags),
            segs: (cpu.state.segs.as_ptr() as usize - base) as i32,
            cr0: off(&cpu.state.cr0),
            cr4: off(&cpu.state.cr4),
            xmm: (cpu.state.fpu.xmm.as_ptr() as usize - base) as i32,
        }
    }
}

impl Cpu {
    /// Run `block` as translated code if it is (or now becomes) translated
    /// and may run here. Returns the instructions executed, or `None` when
    /// the interpreter must run it.
    pub(crate) fn run_translated(&mut self, bus: &mut dyn Bus, block: &mut Block, allowed: u64) -> Option<u64> {
        let jit = self.jit.as_mut()?;
        let link = jit.pending_link.take();
        if block.ip_mask != u64::MAX
            || !block.cacheable()
            || (block.instrs.len() as u64) > allowed
            || self.state.rflags & flags::TF != 0
            || !self.state.in_64bit()
        {
            return None;
        }
        let t = &block.translation;
        let (entry, body) = if t.entry != 0 && t.generation == jit.arena.generation() {
            (t.entry, t.body)
        } else {
            if block.jit_failed {
                return None;
            }
            block.hits += 1;
            if block.hits <= jit.threshold {
                return None;
            }
            let start = Instant::now();
            let layout = Layout::of(self);
            let jit = self.jit.as_mut()?;
            let links: Box<[Link; 2]> = Box::default();
            let code = emit::block(block, layout, jit_step as *const () as usize, links.as_ptr() as usize);
            let generation = jit.arena.generation();
            let placed = code.and_then(|(c, body)| Some((jit.arena.place(&c)?, body)));
            self.stats.jit_translate_ns += start.elapsed().as_nanos() as u64;
            let Some(((entry, new_generation), body)) = placed else {
                block.jit_failed = true;
                return None;
            };
            if new_generation != generation {
                // The arena started over: every other translation is gone,
                // and with it every link into it.
                self.cache.epoch += 1;
            }
            block.translation = Translation {
                entry,
                body: entry + body,
                generation: new_generation,
                links: Some(links),
                targets: emit::chain_targets(block),
            };
            self.stats.jit_blocks += 1;
            (entry, entry + body)
        };
        // Link the previous translated block's exit to this block: same
        // physical page (so one code-map tag covers both) and both alive.
        if let Some(l) = link {
            if l.epoch == self.cache.epoch
                && l.target == block.instrs[0].ins.ip()
                && l.page == block.phys() & !0xfff
                && self.lockstep.is_none()
            {
                // SAFETY: the cell belongs to a block that is still alive
                // (no cached block was dropped since the epoch was noted),
                // and no translated code runs now.
                unsafe {
                    *(l.cell as *mut Link) = Link {
                        body: body as u64,
                        len: block.instrs.len() as u64,
                        epoch: self.cache.epoch,
                    };
                }
                self.stats.jit_links += 1;
            }
        }
        let pending = match self.lockstep.take() {
            Some(mut ls) => {
                let p = ls.shadow_run(self, bus, block, allowed);
                self.lockstep = Some(ls);
                p
            }
            None => None,
        };
        let (code_map, code_map_len) = self.code_map.raw();
        let mut ctx = Context {
            dtlb: inline_dtlb(self),
            code_map,
            code_map_len,
            epoch: self.cache.epoch,
            cpu: self as *mut Cpu,
            bus: bus as *mut (dyn Bus + '_),
        };
        // SAFETY: `entry` is code emitted by `emit::block` for this very
        // block (same arena generation, so not overwritten since), with the
        // `Entry` signature; it only touches the CPU through the pointers
        // in `ctx` and the handler calls, and the `Decoded` entries it
        // points at live in `block`, which we hold for the whole call.
        let executed = unsafe {
            let f: Entry = std::mem::transmute::<usize, Entry>(entry);
            f(&mut ctx as *mut Context as usize, ctx.cpu as usize, allowed)
        };
        self.stats.jit_instructions += executed;
        self.stats.jit_entries += 1;
        // Note the exit for linking if it left through a static successor.
        if !(self.end_block | self.code_written) {
            let page = block.phys() & !0xfff;
            let targets = block.translation.targets;
            if let Some(links) = block.translation.links.as_mut() {
                for (k, target) in targets.into_iter().enumerate() {
                    // Unlinked, or linked in an epoch that has ended (the
                    // link is dead then, and is made again).
                    if target == Some(self.state.rip) && (links[k].body == 0 || links[k].epoch != self.cache.epoch) {
                        if let Some(jit) = self.jit.as_mut() {
                            jit.pending_link = Some(PendingLink {
                                cell: &mut links[k] as *mut Link as usize,
                                target: self.state.rip,
                                page,
                                epoch: self.cache.epoch,
                            });
                        }
                    }
                }
            }
        }
        if let (Some(p), Some(mut ls)) = (pending, self.lockstep.take()) {
            ls.compare(self, bus, block, p, executed);
            self.lockstep = Some(ls);
        }
        Some(executed)
    }
}

/// Called from translated code for an instruction that is not inline:
/// execute it with its interpreter handler. Returns nonzero if the
/// translated block must stop after it.
extern "sysv64" fn jit_step(ctx: usize, decoded: usize) -> u64 {
    // SAFETY: translated code passes the `Context` built by
    // `run_translated`, alive for the whole call, and a pointer to a
    // `Decoded` of the block being run (see there). No other reference
    // to the CPU or the bus is live while translated code runs.
    let (ctx, cpu, bus, d) = unsafe {
        let ctx = &mut *(ctx as *mut Context<'_>);
        let (cpu, bus) = (&mut *ctx.cpu, &mut *ctx.bus);
        (ctx, cpu, bus, &*(decoded as *const crate::decode::Decoded))
    };
    if !cpu.step_decoded(bus, &d.ins, d.handler, u64::MAX) {
        return 1;
    }
    ctx.dtlb = inline_dtlb(cpu);
    (cpu.end_block | cpu.code_written | (cpu.state.rflags & flags::TF != 0)) as u64
}

#[cfg(test)]
mod tests;
