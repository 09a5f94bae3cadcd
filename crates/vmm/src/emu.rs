//! The `emu` engine: x86emu runs each vCPU on its own thread, with our
//! LAPIC/IOAPIC/PIC/PIT (`devices::irq`) as the interrupt controller.

use std::sync::Arc;
use std::time::Duration;

use x86emu::state::{flags, CpuState, Segment};
use x86emu::{CodeMap, Cpu, CpuConfig, Exit};

use crate::cpu_features::CpuFeatures;
use crate::devices::irq::Interrupts;
use crate::devices::irq_line::{EmuLine, InterruptLine};
use crate::engine::{Engine, EngineKind, EngineSetup, Ready};
use crate::machine::{RunOutcome, Shared, VcpuBus, TSC_KHZ};
use crate::persist::MachineState;
use crate::vcpu_loop::{run_vcpus, Kicker, Vcpu, VcpuExit};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::DmaObserver;

/// Instructions a vCPU runs between checks of machine-wide state.
const SLICE: u64 = 200_000;

/// Runs of a decoded block before the JIT translates it. Translation costs
/// about as much as interpreting some thousand instructions (iced's
/// assembler), and boot code is mostly cold.
pub const JIT_THRESHOLD: u32 = 1000;

pub struct EmuEngine {
    cpus: Vec<Cpu>,
}

impl EmuEngine {
    /// `count` vCPUs sharing `code_map` (decoded code of the guest's
    /// physical memory); the BSP starts in `boot_state`, the others wait
    /// for INIT/SIPI.
    pub fn new(count: u32, code_map: Arc<CodeMap>, boot_state: &CpuState, jit: bool) -> Self {
        let cpus = (0..count)
            .map(|i| {
                let config = CpuConfig {
                    apic_id: i,
                    cpu_count: count,
                    tsc_khz: TSC_KHZ,
                    jit: jit.then_some(JIT_THRESHOLD),
                    ..CpuConfig::default()
                };
                let mut cpu = Cpu::new(config, code_map.clone());
                if i == 0 {
                    cpu.set_state(boot_state.clone());
                    cpu.state.apic_base = 0xfee0_0000 | (1 << 11) | (1 << 8);
                } else {
                    // Application processors wait for INIT/SIPI.
                    cpu.state.events.wait_for_sipi = true;
                }
                cpu
            })
            .collect();
        EmuEngine { cpus }
    }

    /// vCPUs that go on from saved states (a snapshot), one per state.
    pub fn from_states(code_map: Arc<CodeMap>, states: &[CpuState], jit: bool) -> Self {
        let count = states.len() as u32;
        let cpus = states
            .iter()
            .enumerate()
            .map(|(i, state)| {
                let config = CpuConfig {
                    apic_id: i as u32,
                    cpu_count: count,
                    tsc_khz: TSC_KHZ,
                    jit: jit.then_some(JIT_THRESHOLD),
                    ..CpuConfig::default()
                };
                let mut cpu = Cpu::new(config, code_map.clone());
                cpu.set_state(state.clone());
                cpu
            })
            .collect();
        EmuEngine { cpus }
    }
}

/// The emu engine while the machine is built: device lines go to the
/// machine's own interrupt controllers, device writes to guest memory drop
/// the decoded code cached there.
pub struct EmuSetup {
    cpus: u32,
    irqs: Arc<Interrupts>,
    code_map: Arc<CodeMap>,
    jit: bool,
}

impl EmuSetup {
    /// Refused when the guest saw (`saw`, on a restore) CPU features emu
    /// does not offer.
    pub fn new(
        cpus: u32,
        irqs: Arc<Interrupts>,
        code_map: Arc<CodeMap>,
        saw: Option<&CpuFeatures>,
        jit: bool,
    ) -> crate::Result<Self> {
        if let Some(saw) = saw {
            let missing = saw.missing_from(&CpuFeatures::emu(cpus));
            if !missing.is_empty() {
                return Err(crate::Error::Config(format!(
                    "the snapshot's guest saw CPU features that emu does not offer: {}",
                    missing.join(", ")
                )));
            }
        }
        Ok(EmuSetup {
            cpus,
            irqs,
            code_map,
            jit,
        })
    }
}

impl EngineSetup for EmuSetup {
    fn irq_line(&self, pin: u32) -> crate::Result<Arc<dyn InterruptLine>> {
        Ok(Arc::new(EmuLine {
            irqs: self.irqs.clone(),
            pin,
        }))
    }

    fn dma_observer(&self) -> DmaObserver {
        let code_map = self.code_map.clone();
        Arc::new(move |gpa, len| code_map.invalidate_range(gpa, len))
    }

    fn boot(self: Box<Self>, boot_state: &CpuState, _: &[MmioTransport]) -> crate::Result<Ready> {
        Ok(Ready {
            engine: Box::new(EmuEngine::new(self.cpus, self.code_map, boot_state, self.jit)),
            cpu_features: CpuFeatures::emu(self.cpus),
            save: None,
            dirty_log: None,
        })
    }

    fn restore(self: Box<Self>, state: &MachineState, _: &[MmioTransport]) -> crate::Result<Ready> {
        Ok(Ready {
            engine: Box::new(EmuEngine::from_states(self.code_map, &state.cpus, self.jit)),
            cpu_features: CpuFeatures::emu(self.cpus),
            save: None,
            dirty_log: None,
        })
    }
}

impl Engine for EmuEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Emu
    }

    fn run(self: Box<Self>, shared: Arc<Shared>) -> RunOutcome {
        let irqs = shared.irqs.clone();
        // A vCPU checks for kicks between instructions, and its halts wait
        // on the interrupt controller, which a kick wakes: none is lost.
        let kicker = Kicker {
            kick: Box::new(move |_| {
                for cpu in 0..irqs.num_cpus() {
                    irqs.kick(cpu);
                }
            }),
            watch: None,
        };
        let vcpus = self
            .cpus
            .into_iter()
            .enumerate()
            .map(|(id, cpu)| EmuVcpu {
                id,
                cpu,
                idle: IdleTrim::new(),
            })
            .collect();
        run_vcpus(vcpus, shared, kicker)
    }
}

/// One x86emu vCPU for the vCPU loop.
struct EmuVcpu {
    id: usize,
    cpu: Cpu,
    idle: IdleTrim,
}

/// An idle VM should cost (almost) no host memory beyond its RAM. The
/// decoded-code cache is most of the VMM's own heap (several MiB), and an
/// idle guest runs only its idle loop and timer handlers. So a vCPU that
/// spent nearly all of a window halted drops its decoded code and
/// translations, and the heap's free pages go back to the host
/// (`malloc_trim`). The few blocks an idle guest runs are decoded again
/// at once.
struct IdleTrim {
    window_start: std::time::Instant,
    halted: Duration,
}

impl IdleTrim {
    /// How long a window is, and the share of it spent halted that counts
    /// as idle.
    const WINDOW: Duration = Duration::from_secs(5);
    const IDLE_SHARE: f64 = 0.95;

    fn new() -> Self {
        IdleTrim {
            window_start: std::time::Instant::now(),
            halted: Duration::ZERO,
        }
    }

    /// Count a halt; true when a window ends that was idle enough.
    fn note_halt(&mut self, halted: Duration) -> bool {
        self.halted += halted;
        let window = self.window_start.elapsed();
        if window < Self::WINDOW {
            return false;
        }
        let idle = self.halted.as_secs_f64() >= window.as_secs_f64() * Self::IDLE_SHARE;
        *self = IdleTrim::new();
        idle
    }
}

impl Vcpu for EmuVcpu {
    fn id(&self) -> usize {
        self.id
    }

    fn take_events(&mut self, shared: &Shared) {
        let (id, cpu) = (self.id, &mut self.cpu);
        // Live migration harvested the dirty pages: drop the cached write
        // pointers so the next write to each page is seen.
        shared.dirty.vcpu_check(id, || cpu.flush_tlb());
        if !shared.irqs.events_pending(id) {
            return;
        }
        let ev = shared.irqs.take_events(id);
        if ev.init && id != 0 {
            let apic_base = cpu.state.apic_base;
            cpu.set_state(CpuState::reset());
            cpu.state.apic_base = apic_base;
            cpu.state.events.wait_for_sipi = true;
        }
        if let Some(vector) = ev.sipi {
            if cpu.state.events.wait_for_sipi {
                start_at_sipi(cpu, vector);
            }
        }
        if ev.nmi {
            cpu.inject_nmi();
        }
    }

    fn run(&mut self, bus: &mut VcpuBus) -> VcpuExit {
        match self.cpu.run(bus, SLICE) {
            Exit::Budget | Exit::ExitRequested | Exit::Shutdown => VcpuExit::Ran,
            Exit::Halted => VcpuExit::Halted {
                interrupts: self.cpu.state.rflags & flags::IF != 0,
            },
            Exit::WaitForSipi => VcpuExit::WaitForSipi,
            Exit::TripleFault => VcpuExit::TripleFault(format!("vcpu{}: {}", self.id, format_regs(&self.cpu))),
        }
    }

    fn idle_for_good(&self, last: Option<&VcpuExit>) -> Option<bool> {
        // Halted with interrupts off, or (never started, as with `nosmp`,
        // or sent INIT) waiting for a SIPI; running once out of either.
        match last {
            Some(VcpuExit::Halted { interrupts: false } | VcpuExit::WaitForSipi) => Some(true),
            _ => {
                let e = &self.cpu.state.events;
                (!e.halted && !e.wait_for_sipi).then_some(false)
            }
        }
    }

    fn wait_halted(&mut self, shared: &Shared, interrupts: bool) {
        // While a migration tracks pages, a halted vCPU wakes often enough
        // to answer its flush requests.
        let wait = if shared.dirty.enabled() {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(100)
        };
        let start = std::time::Instant::now();
        shared.irqs.halt(self.id, &|| shared.now_ns(), wait, interrupts);
        if self.idle.note_halt(start.elapsed()) {
            self.cpu.release_code_memory();
            // SAFETY: malloc_trim only returns free heap pages to the
            // kernel (madvise); it touches no memory still allocated.
            unsafe { libc::malloc_trim(0) };
        }
    }

    fn save_state(&mut self) -> Option<CpuState> {
        Some(self.cpu.state.clone())
    }

    fn load_state(&mut self, state: CpuState) -> Result<(), String> {
        self.cpu.set_state(state);
        Ok(())
    }

    fn finish(&mut self) {
        let st = &self.cpu.stats;
        tracing::info!(
            "vcpu{}: {} instructions, {} blocks decoded, {} exceptions, {} interrupts; unimplemented (raised #UD): {:?}",
            self.id,
            st.instructions,
            st.blocks_decoded,
            st.exceptions,
            st.interrupts,
            st.unimplemented
        );
        if self.cpu.jit_active() {
            tracing::info!(
                "vcpu{}: JIT: {} blocks translated in {:.1} ms, {} chain links, {:.1}% of instructions run in translated code, {:.1} instructions per entry into translated code",
                self.id,
                st.jit_blocks,
                st.jit_translate_ns as f64 / 1e6,
                st.jit_links,
                st.jit_instructions as f64 * 100.0 / st.instructions.max(1) as f64,
                st.jit_instructions as f64 / st.jit_entries.max(1) as f64
            );
        }
    }
}

/// Start an application processor in real mode at `vector << 12`.
fn start_at_sipi(cpu: &mut Cpu, vector: u8) {
    let mut s = cpu.state.clone();
    s.segs[1] = Segment::real_mode((vector as u16) << 8, true);
    s.rip = 0;
    s.events.wait_for_sipi = false;
    s.events.halted = false;
    cpu.set_state(s);
}

/// The vCPU's registers, for error reports.
pub fn format_regs(cpu: &Cpu) -> String {
    let s = &cpu.state;
    let names = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    ];
    let mut out = format!(
        "rip={:#018x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        s.rip, s.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    );
    for (n, v) in names.iter().zip(s.gpr.iter()) {
        out.push_str(&format!(" {n}={v:#x}"));
    }
    out.push_str(&format!(
        " cs={:#x} unimplemented={:?}",
        s.segs[1].selector, cpu.stats.unimplemented
    ));
    out
}
