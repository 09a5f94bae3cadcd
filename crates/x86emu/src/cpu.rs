//! The CPU: architectural state plus the machinery that runs it (TLB,
//! decoded-instruction cache, statistics), and the run loop.

use std::sync::Arc;

use iced_x86::{Instruction, Mnemonic};

use crate::bus::Bus;
use crate::codemap::CodeMap;
use crate::config::CpuConfig;
use crate::decode::DecodeCache;
use crate::exception::{vector, Fault};
use crate::interrupt::EventKind;
use crate::mmu::Tlb;
use crate::state::{flags, CpuState};

/// Why `run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The instruction budget ran out.
    Budget,
    /// HLT with nothing to deliver: wait for an interrupt, then run again.
    Halted,
    /// An application processor waits for INIT/SIPI.
    WaitForSipi,
    /// The bus asked the CPU to stop.
    ExitRequested,
    /// A fault during double-fault delivery: the machine must reset or stop.
    TripleFault,
    /// The guest executed an instruction the caller wants to see (reserved
    /// for engines that trap on specific instructions).
    Shutdown,
}

/// Counters that show what the guest did and what is missing.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub instructions: u64,
    pub blocks_decoded: u64,
    pub exceptions: u64,
    pub interrupts: u64,
    /// Blocks the JIT translated, the time it took, and the instructions
    /// run in translated code.
    pub jit_blocks: u64,
    pub jit_translate_ns: u64,
    pub jit_instructions: u64,
    /// Chain links made between translated blocks.
    pub jit_links: u64,
    /// Entries into translated code from the dispatcher (chained and
    /// looping runs inside it do not count).
    pub jit_entries: u64,
    /// Guest stores into a page that holds decoded (or translated) code.
    pub code_writes: u64,
    /// Instructions that raised #UD because they are not implemented, by mnemonic.
    pub unimplemented: std::collections::BTreeMap<String, u64>,
}

/// One software x86-64 CPU.
pub struct Cpu {
    pub state: CpuState,
    pub config: CpuConfig,
    pub stats: Stats,
    pub(crate) tlb: Tlb,
    pub(crate) cache: DecodeCache,
    pub(crate) code_map: Arc<CodeMap>,
    /// Address of the instruction being executed (its RIP).
    pub(crate) cur_ip: u64,
    /// Set by an instruction to end the current block (mode change, STI,
    /// write to code, ...).
    pub(crate) end_block: bool,
    /// Set when an instruction's own write hit a code page.
    pub(crate) code_written: bool,
    /// A triple fault happened.
    pub(crate) triple_fault: bool,
    /// Instructions retired (drives the deterministic time base).
    pub instret: u64,
    /// The JIT tier (x86-64 hosts, when `config.jit` asks for it).
    #[cfg(all(target_arch = "x86_64", unix))]
    pub(crate) jit: Option<Box<crate::jit::Jit>>,
    /// The interpreter checking the JIT (`jit::lockstep`), if asked for.
    #[cfg(all(target_arch = "x86_64", unix))]
    pub(crate) lockstep: Option<Box<crate::jit::lockstep::Lockstep>>,
}

impl Cpu {
    /// A CPU at reset state. `code_map` is shared by all vCPUs of a machine.
    pub fn new(config: CpuConfig, code_map: Arc<CodeMap>) -> Self {
        let mut state = CpuState::reset();
        state.apic_base = 0xfee0_0000 | (1 << 11) | if config.apic_id == 0 { 1 << 8 } else { 0 };
        let mut cpu = Cpu {
            state,
            config,
            stats: Stats::default(),
            tlb: Tlb::default(),
            cache: DecodeCache::default(),
            code_map,
            cur_ip: 0,
            end_block: false,
            code_written: false,
            triple_fault: false,
            instret: 0,
            #[cfg(all(target_arch = "x86_64", unix))]
            jit: None,
            #[cfg(all(target_arch = "x86_64", unix))]
            lockstep: None,
        };
        cpu.set_jit(cpu.config.jit);
        cpu
    }

    /// A CPU with its own code map covering `phys_limit` bytes; convenient
    /// for single-CPU uses such as tests.
    pub fn standalone(phys_limit: u64) -> Self {
        Self::new(CpuConfig::default(), Arc::new(CodeMap::new(phys_limit)))
    }

    /// Turn the JIT tier on (translating blocks after `threshold` runs) or
    /// off. Off where the host is not x86-64 or refuses executable memory.
    pub fn set_jit(&mut self, threshold: Option<u32>) {
        self.config.jit = threshold;
        #[cfg(all(target_arch = "x86_64", unix))]
        {
            self.jit = threshold.and_then(crate::jit::Jit::new).map(Box::new);
            self.lockstep = match self.jit {
                Some(_) => crate::jit::lockstep::Lockstep::from_env(self),
                None => None,
            };
        }
    }

    /// Whether translated code can run (the JIT is on and available).
    pub fn jit_active(&self) -> bool {
        #[cfg(all(target_arch = "x86_64", unix))]
        {
            self.jit.is_some()
        }
        #[cfg(not(all(target_arch = "x86_64", unix)))]
        {
            false
        }
    }

    /// Replace the whole architectural state (restore, or boot set-up).
    pub fn set_state(&mut self, state: CpuState) {
        self.state = state;
        self.flush_translations();
    }

    /// Drop the cached translations (and their host pointers), keeping
    /// decoded code: the next access to each page walks and asks the bus
    /// again (dirty-page tracking needs the next write seen).
    pub fn flush_tlb(&mut self) {
        self.tlb.flush_all();
    }

    /// Drop all cached translations and decoded code.
    pub fn flush_translations(&mut self) {
        self.tlb.flush_all();
        self.cache.clear();
    }

    /// As `flush_translations`, and give the memory they took back to the
    /// host: the decode cache's slot pages and the JIT's code pages. For a
    /// vCPU that has been idle (an idle VM's memory is mostly this).
    pub fn release_code_memory(&mut self) {
        self.tlb.flush_all();
        self.cache.release();
        #[cfg(all(target_arch = "x86_64", unix))]
        if let Some(jit) = self.jit.as_mut() {
            jit.release();
        }
    }

    /// Inject an external interrupt (like KVM_INTERRUPT). It is delivered
    /// when RFLAGS.IF allows and no interrupt shadow is active.
    pub fn inject_interrupt(&mut self, vector: u8) {
        self.state.events.pending_interrupt = Some(vector);
    }

    /// Inject a non-maskable interrupt.
    pub fn inject_nmi(&mut self) {
        self.state.events.nmi_pending = true;
    }

    /// Whether an external interrupt could be delivered right now.
    pub fn interrupts_enabled(&self) -> bool {
        self.state.rflags & flags::IF != 0 && !self.state.events.interrupt_shadow
    }

    /// Run until the budget of instructions is spent, the CPU halts, or
    /// something else makes it return. Never panics on guest behaviour.
    pub fn run(&mut self, bus: &mut dyn Bus, budget: u64) -> Exit {
        let end = self.instret.saturating_add(budget.max(1));
        loop {
            if self.triple_fault {
                self.triple_fault = false;
                return Exit::TripleFault;
            }
            if self.state.events.wait_for_sipi {
                return Exit::WaitForSipi;
            }
            // Events are taken at instruction boundaries, outside a shadow.
            // The shadow stays in the state until the instruction it covers
            // runs: returning here (budget, exit request) must keep it, or
            // an interrupt could land between STI and HLT and the CPU would
            // halt with the work that interrupt brought pending (a guest
            // idle loop that never wakes).
            // A halted CPU is past the instruction a shadow covers (a
            // restored state may still carry one): it wakes as usual.
            if self.state.events.halted {
                self.state.events.interrupt_shadow = false;
            }
            let shadow = self.state.events.interrupt_shadow;
            if !shadow {
                if let Some(exit) = self.take_events(bus) {
                    return exit;
                }
                // An event whose delivery failed shuts the CPU down at
                // once: running on would make the instructions executed
                // before the exit depend on how blocks are chained.
                if self.triple_fault {
                    continue;
                }
            }
            if self.state.events.halted {
                return Exit::Halted;
            }
            if self.instret >= end {
                return Exit::Budget;
            }
            if bus.exit_requested() {
                return Exit::ExitRequested;
            }
            self.state.events.interrupt_shadow = false;
            // In a shadow, run exactly one instruction so the check above
            // happens right after it.
            let limit = if shadow { 1 } else { end - self.instret };
            self.run_block(bus, limit);
        }
    }

    /// Deliver a pending NMI or external interrupt if allowed.
    fn take_events(&mut self, bus: &mut dyn Bus) -> Option<Exit> {
        let ev = &mut self.state.events;
        if ev.nmi_pending && !ev.nmi_masked {
            ev.nmi_pending = false;
            ev.halted = false;
            self.deliver_event(bus, EventKind::Nmi, vector::NMI, None);
            return None;
        }
        if self.state.rflags & flags::IF == 0 {
            return None;
        }
        let vector = match self.state.events.pending_interrupt.take() {
            Some(v) => Some(v),
            None if bus.interrupt_pending() => bus.acknowledge_interrupt(),
            None => None,
        };
        if let Some(v) = vector {
            self.state.events.halted = false;
            self.stats.interrupts += 1;
            self.deliver_event(bus, EventKind::External, v, None);
        }
        None
    }

    /// Execute blocks, chained, until `limit` instructions ran, an
    /// instruction ended the chain (mode change, fault, STI, HLT, write to
    /// code), or enough blocks ran that events must be looked at again.
    fn run_block(&mut self, bus: &mut dyn Bus, limit: u64) {
        const MAX_CHAIN: u32 = 32;
        let mut executed = 0u64;
        self.end_block = false;
        for _ in 0..MAX_CHAIN {
            #[allow(unused_mut)]
            let mut block = match self.fetch_block(bus) {
                Ok(b) => b,
                Err(fault) => {
                    self.raise(bus, fault);
                    break;
                }
            };
            self.code_written = false;
            #[cfg(all(target_arch = "x86_64", unix))]
            if let Some(n) = self.run_translated(bus, &mut block, limit - executed) {
                executed += n;
                self.cache.put_back(block);
                if executed >= limit || self.end_block || self.code_written {
                    break;
                }
                continue;
            }
            let mask = block.ip_mask;
            for d in block.instrs.iter() {
                if executed >= limit {
                    break;
                }
                let tf = self.state.rflags & flags::TF != 0;
                executed += 1;
                if !self.step_decoded(bus, &d.ins, d.handler, mask) {
                    break;
                }
                if tf {
                    self.single_step_trap(bus);
                    break;
                }
                if self.end_block | self.code_written {
                    break;
                }
            }
            self.cache.put_back(block);
            if executed >= limit || self.end_block || self.code_written {
                break;
            }
        }
        self.instret += executed;
        self.stats.instructions += executed;
    }

    /// Execute one decoded instruction. Returns false if it faulted.
    #[inline(always)]
    pub(crate) fn step_decoded(
        &mut self,
        bus: &mut dyn Bus,
        ins: &Instruction,
        handler: crate::exec::Handler,
        ip_mask: u64,
    ) -> bool {
        self.cur_ip = self.state.rip;
        self.state.rip = self.state.rip.wrapping_add(ins.len() as u64) & ip_mask;
        match handler(self, bus, ins) {
            Ok(()) => true,
            Err(fault) => {
                self.state.rip = self.cur_ip;
                self.raise(bus, fault);
                false
            }
        }
    }

    fn single_step_trap(&mut self, bus: &mut dyn Bus) {
        self.state.dr6 |= 1 << 14;
        self.deliver_event(bus, EventKind::Exception, vector::DB, None);
    }

    /// Deliver an exception raised by an instruction (RIP already points at
    /// the faulting instruction for faults).
    pub(crate) fn raise(&mut self, bus: &mut dyn Bus, fault: Fault) {
        self.stats.exceptions += 1;
        if let Some(addr) = fault.cr2 {
            self.state.cr2 = addr;
        }
        self.end_block = true;
        self.deliver_event(bus, EventKind::Exception, fault.vector, fault.error_code);
    }

    /// Record an unimplemented instruction and raise #UD, as hardware does
    /// for an opcode it does not know.
    pub(crate) fn unimplemented(&mut self, mnemonic: Mnemonic) -> Fault {
        *self.stats.unimplemented.entry(format!("{mnemonic:?}")).or_default() += 1;
        Fault::ud()
    }

    /// Execute exactly one instruction (for tests and debuggers): events
    /// are not taken, and a fault is delivered through the IDT.
    pub fn step(&mut self, bus: &mut dyn Bus) {
        self.run_block(bus, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbus::TestBus;

    #[test]
    fn cpu_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Cpu>();
    }

    #[test]
    fn budget_always_returns() {
        // An endless `jmp $` loop in real mode.
        let mut bus = TestBus::new(1 << 20);
        bus.load(0x7c00, &[0xeb, 0xfe]);
        let mut cpu = Cpu::standalone(1 << 20);
        cpu.state.segs[1] = crate::state::Segment::real_mode(0, true);
        cpu.state.rip = 0x7c00;
        assert_eq!(cpu.run(&mut bus, 1000), Exit::Budget);
        assert_eq!(cpu.state.rip, 0x7c00);
        assert!(cpu.instret >= 1000);
    }
}
