//! The `emu` engine: x86emu runs each vCPU on its own thread, with our
//! LAPIC/IOAPIC/PIC/PIT (`devices::irq`) as the interrupt controller.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use x86emu::state::{flags, CpuState, Segment};
use x86emu::{CodeMap, Cpu, CpuConfig, Exit};

use crate::cpu_features::CpuFeatures;
use crate::devices::irq::Interrupts;
use crate::devices::irq_line::{EmuLine, InterruptLine};
use crate::engine::{Engine, EngineKind, EngineSetup, Ready};
use crate::machine::{RunOutcome, Shared, VcpuBus, RUNNING, STOP_HALTED, STOP_TRIPLE, TSC_KHZ};
use crate::persist::MachineState;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::DmaObserver;

/// Instructions a vCPU runs between checks of machine-wide state.
const SLICE: u64 = 200_000;

pub struct EmuEngine {
    cpus: Vec<Cpu>,
}

impl EmuEngine {
    /// `count` vCPUs sharing `code_map` (decoded code of the guest's
    /// physical memory); the BSP starts in `boot_state`, the others wait
    /// for INIT/SIPI.
    pub fn new(count: u32, code_map: Arc<CodeMap>, boot_state: &CpuState) -> Self {
        let cpus = (0..count)
            .map(|i| {
                let config = CpuConfig {
                    apic_id: i,
                    cpu_count: count,
                    tsc_khz: TSC_KHZ,
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
    pub fn from_states(code_map: Arc<CodeMap>, states: &[CpuState]) -> Self {
        let count = states.len() as u32;
        let cpus = states
            .iter()
            .enumerate()
            .map(|(i, state)| {
                let config = CpuConfig {
                    apic_id: i as u32,
                    cpu_count: count,
                    tsc_khz: TSC_KHZ,
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
}

impl EmuSetup {
    /// Refused when the guest saw (`saw`, on a restore) CPU features emu
    /// does not offer.
    pub fn new(
        cpus: u32,
        irqs: Arc<Interrupts>,
        code_map: Arc<CodeMap>,
        saw: Option<&CpuFeatures>,
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
        Ok(EmuSetup { cpus, irqs, code_map })
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
            engine: Box::new(EmuEngine::new(self.cpus, self.code_map, boot_state)),
            cpu_features: CpuFeatures::emu(self.cpus),
            save: None,
        })
    }

    fn restore(self: Box<Self>, state: &MachineState, _: &[MmioTransport]) -> crate::Result<Ready> {
        Ok(Ready {
            engine: Box::new(EmuEngine::from_states(self.code_map, &state.cpus)),
            cpu_features: CpuFeatures::emu(self.cpus),
            save: None,
        })
    }
}

impl Engine for EmuEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Emu
    }

    fn run(self: Box<Self>, shared: Arc<Shared>) -> RunOutcome {
        let n = self.cpus.len();
        let irqs = shared.irqs.clone();
        shared.control.set_kick(Box::new(move || {
            for cpu in 0..irqs.num_cpus() {
                irqs.kick(cpu);
            }
        }));
        let handles: Vec<_> = self
            .cpus
            .into_iter()
            .enumerate()
            .filter_map(|(id, cpu)| {
                let s = shared.clone();
                shared.control.vcpu_started();
                let spawned = std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || vcpu_thread(id, cpu, s, n));
                match spawned {
                    Ok(h) => Some(h),
                    Err(e) => {
                        shared.control.vcpu_stopped();
                        shared.fail(format!("cannot start vcpu{id}: {e}"));
                        None
                    }
                }
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        shared.outcome()
    }
}

fn vcpu_thread(id: usize, mut cpu: Cpu, shared: Arc<Shared>, ncpus: usize) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
    let mut bus = VcpuBus {
        id,
        shared: shared.clone(),
    };
    let now = || shared.now_ns();
    let mut counted_dead = false;
    while shared.stop.load(Ordering::Acquire) == RUNNING {
        let resumed =
            shared
                .control
                .park_if_paused(id, &|| shared.stop.load(Ordering::Acquire) != RUNNING, &mut || {
                    Some(cpu.state.clone())
                });
        if let Some(state) = resumed {
            cpu.set_state(state);
        }
        // Live migration harvested the dirty pages: drop the cached write
        // pointers so the next write to each page is seen.
        shared.dirty.vcpu_check(id, || cpu.flush_tlb());
        if shared.irqs.events_pending(id) {
            let ev = shared.irqs.take_events(id);
            if ev.init && id != 0 {
                let apic_base = cpu.state.apic_base;
                cpu.set_state(CpuState::reset());
                cpu.state.apic_base = apic_base;
                cpu.state.events.wait_for_sipi = true;
            }
            if let Some(vector) = ev.sipi {
                if cpu.state.events.wait_for_sipi {
                    start_at_sipi(&mut cpu, vector);
                }
            }
            if ev.nmi {
                cpu.inject_nmi();
            }
            // Started by a SIPI: no longer done, before it runs a thing.
            if counted_dead && !cpu.state.events.halted && !cpu.state.events.wait_for_sipi {
                counted_dead = false;
                shared.dead.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let throttle = shared.dirty.throttle();
        let slice_start = (throttle > 0).then(std::time::Instant::now);
        let exit = cpu.run(&mut bus, SLICE);
        // Auto-converge: sit out `throttle` percent of the time.
        if let Some(t) = slice_start {
            std::thread::sleep(t.elapsed() * u32::from(throttle) / u32::from(100 - throttle));
        }
        // While a migration tracks pages, a halted vCPU wakes often enough
        // to answer its flush requests.
        let halt_wait = if shared.dirty.enabled() {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(100)
        };
        match exit {
            Exit::Budget | Exit::ExitRequested | Exit::Shutdown => {}
            Exit::Halted => {
                let if_set = cpu.state.rflags & flags::IF != 0;
                if !if_set {
                    count_dead(&shared, &mut counted_dead, ncpus);
                }
                if !shared.control.pause_requested() {
                    shared.irqs.halt(id, &now, halt_wait, if_set);
                }
            }
            Exit::WaitForSipi => {
                // A vCPU that was never started (or was sent INIT) runs
                // nothing until a SIPI: with `nosmp`, the APs stay here for
                // good, and must count as done when the BSP halts.
                count_dead(&shared, &mut counted_dead, ncpus);
                if !shared.control.pause_requested() {
                    shared.irqs.halt(id, &now, halt_wait, false)
                }
            }
            Exit::TripleFault => {
                *shared.triple_fault.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("vcpu{id}: {}", format_regs(&cpu)));
                shared.request_stop(STOP_TRIPLE);
            }
        }
        if counted_dead && !cpu.state.events.halted && !cpu.state.events.wait_for_sipi {
            counted_dead = false;
            shared.dead.fetch_sub(1, Ordering::AcqRel);
        }
    }
    shared.control.vcpu_stopped();
    let st = &cpu.stats;
    tracing::info!(
        "vcpu{id}: {} instructions, {} blocks decoded, {} exceptions, {} interrupts; unimplemented (raised #UD): {:?}",
        st.instructions,
        st.blocks_decoded,
        st.exceptions,
        st.interrupts,
        st.unimplemented
    );
}

/// This vCPU will run nothing more unless an NMI, INIT or SIPI comes (it
/// halted with interrupts off, or waits for a SIPI): count it once, and
/// when every vCPU is so, the guest is done (for example `reboot: System
/// halted`, with or without `nosmp`).
fn count_dead(shared: &Shared, counted: &mut bool, ncpus: usize) {
    if std::mem::replace(counted, true) {
        return;
    }
    if shared.dead.fetch_add(1, Ordering::AcqRel) + 1 == ncpus as u32 {
        shared.request_stop(STOP_HALTED);
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
