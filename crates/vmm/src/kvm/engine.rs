//! The `kvm` engine: one thread per vCPU around `KVM_RUN`, exits handed to
//! the machine's buses (`VcpuBus`, as under `emu`), and a real-time signal
//! to take vCPUs out of the guest (to stop or to pause).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use x86emu::state::CpuState;

use super::state::msr;
use super::vcpu::{KvmVcpu, Step};
use super::vm::{KvmVm, VmOptions};
use crate::devices::irq_line::InterruptLine;
use crate::engine::{Engine, EngineKind};
use crate::machine::{RunOutcome, Shared, VcpuBus, RUNNING, STOP_HALTED, STOP_RESET, STOP_TRIPLE};
use crate::Result;

pub struct KvmEngine {
    vm: KvmVm,
    vcpus: Vec<KvmVcpu>,
}

/// MTRRs on, default type write-back (as firmware leaves them).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

impl KvmEngine {
    /// A VM over `mem` with `count` vCPUs, all but the BSP waiting in the
    /// in-kernel LAPIC for INIT/SIPI.
    pub fn new(mem: &GuestMemoryMmap, count: u32) -> Result<Self> {
        let vm = KvmVm::new(mem, VmOptions { irqchip: true })?;
        let vcpus = (0..count)
            .map(|i| vm.create_vcpu(i, count))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(KvmEngine { vm, vcpus })
    }

    /// Where the BSP starts.
    pub fn set_boot_state(&mut self, boot_state: &CpuState) -> Result<()> {
        let mut bsp = boot_state.clone();
        bsp.apic_base = 0xfee0_0000 | (1 << 11) | (1 << 8);
        if !bsp.msr.other.iter().any(|(i, _)| *i == msr::MTRR_DEF_TYPE) {
            bsp.msr.other.push((msr::MTRR_DEF_TYPE, MTRR_ENABLE_WB));
        }
        let bsp_vcpu = self
            .vcpus
            .first()
            .ok_or_else(|| super::KvmError::Setup("a machine without vCPUs".into()))?;
        bsp_vcpu.set_state(&bsp, 0)?;
        Ok(())
    }

    /// An interrupt line to the in-kernel irqchip's `gsi` (irqfd).
    pub fn irq_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        Ok(self.vm.irq_line(gsi)?)
    }

    /// The VM, for registering doorbells (ioeventfd) and more lines.
    pub fn vm(&self) -> &KvmVm {
        &self.vm
    }
}

/// The signal that takes a vCPU thread out of `KVM_RUN` (EINTR).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> std::result::Result<(), String> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
        })
        .clone()
}

type Threads = Arc<Mutex<Vec<libc::pthread_t>>>;

fn kick_all(threads: &Threads) {
    let threads = threads.lock().unwrap_or_else(|e| e.into_inner());
    for &t in threads.iter() {
        // SAFETY: `t` belongs to a vCPU thread that has not been joined yet
        // (the list is emptied before joining), so the id is valid; the
        // signal's handler does nothing, it only interrupts KVM_RUN.
        unsafe {
            libc::pthread_kill(t, kick_signal());
        }
    }
}

impl Engine for KvmEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Kvm
    }

    fn run(self: Box<Self>, shared: Arc<Shared>) -> RunOutcome {
        if let Err(e) = install_kick_handler() {
            shared.fail(e);
            return shared.outcome();
        }
        let threads: Threads = Arc::default();
        let kick_threads = threads.clone();
        shared.control.set_kick(Box::new(move || kick_all(&kick_threads)));
        let KvmEngine { vm, vcpus } = *self;
        let mut handles = Vec::new();
        for vcpu in vcpus {
            let id = vcpu.id;
            let s = shared.clone();
            shared.control.vcpu_started();
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(vcpu, s))
            {
                Ok(h) => {
                    threads.lock().unwrap_or_else(|e| e.into_inner()).push(h.as_pthread_t());
                    handles.push(h);
                }
                Err(e) => {
                    shared.control.vcpu_stopped();
                    shared.fail(format!("cannot start vcpu{id}: {e}"));
                }
            }
        }
        // A kick can land just before a vCPU enters KVM_RUN; keep kicking
        // until every thread has seen the stop. While running, kick twice a
        // second so that vCPUs halted for good (HLT with interrupts off,
        // which KVM waits out in the kernel) are noticed.
        let mut ticks = 0u32;
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
            ticks += 1;
            if shared.stop.load(Ordering::Acquire) != RUNNING || ticks.is_multiple_of(50) {
                shared.control.kick();
            }
        }
        threads.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for h in handles {
            let _ = h.join();
        }
        drop(vm);
        shared.outcome()
    }
}

fn vcpu_thread(mut vcpu: KvmVcpu, shared: Arc<Shared>) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
    let mut bus = VcpuBus {
        id: vcpu.id as usize,
        shared: shared.clone(),
    };
    let stopping = || shared.stop.load(Ordering::Acquire) != RUNNING;
    let ncpus = shared.irqs.num_cpus() as u32;
    let mut counted_dead = false;
    while !stopping() {
        // While paused, the vCPU's state is out of KVM as a CpuState (the
        // snapshot format of both engines), and it continues from that.
        let mut save = || match vcpu.get_state(0, &[]) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("vcpu{}: reading its state: {e}", vcpu.id);
                None
            }
        };
        let resumed = shared.control.park_if_paused(vcpu.id as usize, &stopping, &mut save);
        if stopping() {
            break;
        }
        if let Some(state) = resumed {
            if let Err(e) = vcpu.set_state(&state, 0) {
                shared.fail(format!("vcpu{}: loading its state after a pause: {e}", vcpu.id));
                break;
            }
        }
        match vcpu.run_once(&mut bus) {
            Step::Continue => {}
            Step::Interrupted => {
                // Every vCPU halted with interrupts off: the guest is done
                // (Linux's `reboot: System halted` without ACPI), as under emu.
                let dead = vcpu.halted_for_good();
                if dead && !counted_dead {
                    counted_dead = true;
                    if shared.dead.fetch_add(1, Ordering::AcqRel) + 1 == ncpus {
                        shared.request_stop(STOP_HALTED);
                    }
                } else if !dead && counted_dead {
                    counted_dead = false;
                    shared.dead.fetch_sub(1, Ordering::AcqRel);
                }
            }
            // Only without the in-kernel irqchip; do not spin.
            Step::Halted => std::thread::sleep(Duration::from_millis(1)),
            Step::TripleFault(regs) => {
                *shared.triple_fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(regs);
                shared.request_stop(STOP_TRIPLE);
            }
            Step::Reset => shared.request_stop(STOP_RESET),
            Step::PowerOff => shared.request_stop(STOP_HALTED),
            Step::Fault(msg) => shared.fail(msg),
        }
    }
    shared.control.vcpu_stopped();
}
