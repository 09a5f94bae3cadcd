//! The `kvm` engine: each vCPU runs `KVM_RUN` in the one vCPU loop
//! ([`crate::vcpu_loop`]), exits handed to
//! the machine's buses (`VcpuBus`, as under `emu`), and a real-time signal
//! to take vCPUs out of the guest (to stop or to pause).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvm_bindings::{kvm_clock_data, kvm_lapic_state};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use x86emu::state::CpuState;

use super::irqchip_state::{
    ioapic_from_kvm, ioapic_to_kvm, lapic_from_kvm, lapic_to_kvm, pic_from_kvm, pic_to_kvm, pit_from_kvm, pit_to_kvm,
    LapicExtras, MSR_TSC_DEADLINE,
};
use super::state::msr;
use super::vcpu::{restores_msr, KvmVcpu, Step, SNAPSHOT_MSRS};
use super::vm::{get_vm_state, set_vm_state, DirtyLogSlots, KvmVm, VmIrqchipState, VmOptions};
use crate::cpu_features::CpuFeatures;
use crate::devices::irq::RouterState;
use crate::devices::irq_line::InterruptLine;
use crate::engine::{Engine, EngineDirtyLog, EngineKind, EngineSave, EngineSetup, Ready};
use crate::machine::{guest_tsc, RunOutcome, Shared, VcpuBus, TSC_KHZ};
use crate::persist::{KvmState, MachineState, PersistError};
use crate::vcpu_loop::{run_vcpus, Kicker, Vcpu, VcpuExit};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::DmaObserver;
use crate::Result;

pub struct KvmEngine {
    vm: KvmVm,
    vcpus: Vec<KvmVcpu>,
    platform: Arc<KvmPlatform>,
}

/// What a parked vCPU leaves for a snapshot besides its `CpuState`.
#[derive(Clone)]
struct ParkedVcpu {
    lapic: kvm_lapic_state,
    xsave: Vec<u32>,
    /// The guest TSC's rate under KVM (0: unknown).
    tsc_khz: u32,
}

/// The kvm engine's side of a snapshot: the VM, and what each vCPU left
/// when it parked.
pub struct KvmPlatform {
    vm_fd: Arc<VmFd>,
    parked: Mutex<Vec<Option<ParkedVcpu>>>,
    /// KVM's dirty-page log, for live migration.
    dirty: DirtyLogSlots,
}

/// The vCPUs' writes to guest memory never reach the VMM under kvm: KVM
/// logs them (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`).
impl EngineDirtyLog for KvmPlatform {
    fn start(&self) -> std::result::Result<(), String> {
        // A log read clears it: what was logged before this start goes.
        self.dirty.set_logging(true).map_err(|e| e.to_string())
    }

    fn collect(&self, mark: &mut dyn FnMut(u64)) -> std::result::Result<(), String> {
        self.dirty.collect(mark).map_err(|e| e.to_string())
    }

    fn stop(&self) -> std::result::Result<(), String> {
        self.dirty.set_logging(false).map_err(|e| e.to_string())
    }
}

/// The host's CLOCK_MONOTONIC in ns: KVM's time base for the PIT.
fn host_monotonic_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec)
}

impl EngineSave for KvmPlatform {
    fn save(
        &self,
        cpus: &mut [CpuState],
        now_ns: u64,
    ) -> std::result::Result<(RouterState, Option<KvmState>), PersistError> {
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let save_err = |e: super::KvmError| PersistError::Save(e.to_string());
        let vm = get_vm_state(&self.vm_fd).map_err(save_err)?;
        let host_now = host_monotonic_ns();
        let mut lapics = Vec::with_capacity(cpus.len());
        let mut xsave = Vec::with_capacity(cpus.len());
        for (i, cpu) in cpus.iter_mut().enumerate() {
            let p = parked
                .get(i)
                .cloned()
                .flatten()
                .ok_or_else(|| PersistError::Save(format!("vcpu{i}'s LAPIC and XSAVE state are unreadable")))?;
            // Parked states hold the TSC itself (time base 0).
            let guest_tsc_now = cpu.msr.tsc_offset as u64;
            cpu.msr.tsc_offset = guest_tsc_now.wrapping_sub(guest_tsc(now_ns)) as i64;
            let mut tsc_deadline = 0;
            cpu.msr.other.retain(|&(index, value)| {
                if index == MSR_TSC_DEADLINE {
                    tsc_deadline = value;
                }
                index != MSR_TSC_DEADLINE
            });
            let tsc_khz = if p.tsc_khz == 0 { TSC_KHZ } else { p.tsc_khz };
            let mut lapic = lapic_from_kvm(
                &p.lapic,
                LapicExtras {
                    apic_base: cpu.apic_base,
                    tsc_deadline,
                    tsc_hz: u64::from(tsc_khz) * 1000,
                    guest_tsc: guest_tsc_now,
                },
                now_ns,
            );
            // Our model counts the deadline in the machine's TSC.
            lapic.tsc_hz = u64::from(TSC_KHZ) * 1000;
            lapics.push(lapic);
            xsave.push(p.xsave);
        }
        let interrupts = RouterState {
            pic: pic_from_kvm(&vm.pic_master, &vm.pic_slave),
            ioapic: ioapic_from_kvm(&vm.ioapic),
            pit: pit_from_kvm(&vm.pit, now_ns, host_now),
            extint_pending: vec![false; lapics.len()],
            lapics,
        };
        Ok((
            interrupts,
            Some(KvmState {
                clock_ns: vm.clock.clock,
                xsave,
            }),
        ))
    }
}

/// MTRRs on, default type write-back (as firmware leaves them).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

impl KvmEngine {
    /// A VM over `mem` with `count` vCPUs, all but the BSP waiting in the
    /// in-kernel LAPIC for INIT/SIPI.
    pub fn new(mem: &GuestMemoryMmap, count: u32) -> Result<Self> {
        Self::prepare(mem, count, None)
    }

    fn assemble(vm: KvmVm, vcpus: Vec<KvmVcpu>) -> Self {
        let platform = Arc::new(KvmPlatform {
            dirty: vm.dirty_log_slots(),
            vm_fd: vm.vm_fd(),
            parked: Mutex::new(vec![None; vcpus.len()]),
        });
        KvmEngine { vm, vcpus, platform }
    }

    /// A VM over `mem` with `count` vCPUs, for the machine to build
    /// around. `saw`, on a restore: the CPU features the guest saw, which
    /// this KVM must offer (refused, naming the missing ones, otherwise);
    /// the vCPUs' CPUID then offers no more than those.
    pub fn prepare(mem: &GuestMemoryMmap, count: u32, saw: Option<&CpuFeatures>) -> Result<Self> {
        let vm = KvmVm::new(mem, VmOptions { irqchip: true })?;
        if !vm.tsc_scaling() {
            tracing::info!(
                "kvm: no TSC scaling on this host: the guest's TSC runs at the host's rate, not the machine's {} kHz \
                 (a snapshot moved to the other engine sees its TSC rate change)",
                TSC_KHZ
            );
        }
        if let Some(saw) = saw {
            let missing = saw.missing_from(&vm.features(count)?);
            if !missing.is_empty() {
                return Err(crate::Error::Config(format!(
                    "the snapshot's guest saw CPU features that kvm here does not offer: {}",
                    missing.join(", ")
                )));
            }
        }
        let vcpus = (0..count)
            .map(|i| vm.create_vcpu_seeing(i, count, saw))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self::assemble(vm, vcpus))
    }

    /// Load the state a snapshot saved, under either engine, into the VM
    /// and its vCPUs.
    pub fn load_state(&self, state: &MachineState) -> Result<()> {
        let now = state.clock_ns;
        let r = &state.interrupts;
        let [pic_master, pic_slave] = pic_to_kvm(&r.pic);
        set_vm_state(
            &self.vm.fd,
            &VmIrqchipState {
                pic_master,
                pic_slave,
                ioapic: ioapic_to_kvm(&r.ioapic),
                pit: pit_to_kvm(&r.pit, now, host_monotonic_ns()),
                clock: kvm_clock_data {
                    clock: state.kvm.as_ref().map_or(now, |k| k.clock_ns),
                    ..Default::default()
                },
            },
        )?;
        for (i, (vcpu, cpu)) in self.vcpus.iter().zip(&state.cpus).enumerate() {
            let mut cpu = cpu.clone();
            cpu.msr.other.retain(|&(index, _)| restores_msr(index));
            vcpu.set_state(&cpu, guest_tsc(now))?;
            let lapic = r
                .lapics
                .get(i)
                .ok_or_else(|| crate::Error::Config(format!("snapshot: no LAPIC state for vcpu{i}")))?;
            let mut page = vcpu.get_lapic()?;
            lapic_to_kvm(lapic, now, &mut page);
            let deadline = if (lapic.lvt[0] >> 17) & 3 == 2 {
                lapic.tsc_deadline
            } else {
                0
            };
            let xsave = state.kvm.as_ref().and_then(|k| k.xsave.get(i)).map(Vec::as_slice);
            vcpu.set_platform_state(&cpu, &page, deadline, xsave)?;
        }
        Ok(())
    }

    /// Let queue notifications reach the devices' eventfds inside the
    /// kernel, without an exit (ioeventfd). Device i sits in window i.
    fn register_doorbells(&self, devices: &[MmioTransport]) -> Result<()> {
        for (i, dev) in devices.iter().enumerate() {
            let base = crate::virtio::MMIO_BASE + i as u64 * crate::virtio::MMIO_SIZE;
            for (q, evt) in dev.notifiers().iter().enumerate() {
                self.vm.register_mmio_doorbell(
                    evt,
                    base + virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64,
                    q as u32,
                )?;
            }
        }
        Ok(())
    }

    /// The engine's side of a snapshot (for the machine to keep).
    pub fn platform(&self) -> Arc<KvmPlatform> {
        self.platform.clone()
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

impl EngineSetup for KvmEngine {
    fn irq_line(&self, pin: u32) -> Result<Arc<dyn InterruptLine>> {
        KvmEngine::irq_line(self, pin)
    }

    /// Nothing caches guest code under kvm, so nobody listens.
    fn dma_observer(&self) -> DmaObserver {
        crate::virtio::no_dma_observer()
    }

    fn boot(mut self: Box<Self>, boot_state: &CpuState, devices: &[MmioTransport]) -> Result<Ready> {
        self.set_boot_state(boot_state)?;
        self.register_doorbells(devices)?;
        let cpu_features = self.vm.features(self.vcpus.len() as u32)?;
        let save: Arc<dyn EngineSave> = self.platform();
        let dirty_log: Arc<dyn EngineDirtyLog> = self.platform();
        Ok(Ready {
            engine: self,
            cpu_features,
            save: Some(save),
            dirty_log: Some(dirty_log),
        })
    }

    fn restore(self: Box<Self>, state: &MachineState, devices: &[MmioTransport]) -> Result<Ready> {
        self.load_state(state)?;
        self.register_doorbells(devices)?;
        let save: Arc<dyn EngineSave> = self.platform();
        let dirty_log: Arc<dyn EngineDirtyLog> = self.platform();
        // The vCPUs' CPUID is cut down to what the guest saw.
        Ok(Ready {
            engine: self,
            cpu_features: state.cpu_features,
            save: Some(save),
            dirty_log: Some(dirty_log),
        })
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

/// Send the kick signal to each of `threads`.
fn kick_all(threads: &[libc::pthread_t]) {
    for &t in threads {
        // SAFETY: `t` belongs to a vCPU thread that has not been joined yet
        // (the runner empties the list before joining), so the id is valid;
        // the signal's handler does nothing, it only interrupts KVM_RUN.
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
        let KvmEngine { vm, vcpus, platform } = *self;
        let vcpus = vcpus
            .into_iter()
            .map(|vcpu| KvmLoopVcpu {
                vcpu,
                platform: platform.clone(),
            })
            .collect();
        // A kick can land just before a vCPU enters KVM_RUN: the runner
        // kicks until every thread has seen the stop. While running, kick
        // twice a second so that vCPUs halted for good (HLT with interrupts
        // off, which KVM waits out in the kernel) are noticed.
        let kicker = Kicker {
            kick: Box::new(kick_all),
            watch: Some(Duration::from_millis(500)),
        };
        let outcome = run_vcpus(vcpus, shared, kicker);
        drop(vm);
        outcome
    }
}

/// Read vCPU state for a snapshot: `CpuState` (with [`SNAPSHOT_MSRS`]),
/// and the LAPIC, XSAVE and TSC rate into `platform`.
fn park_state(vcpu: &KvmVcpu, platform: &KvmPlatform) -> Option<CpuState> {
    let read = || -> std::result::Result<(CpuState, ParkedVcpu), super::KvmError> {
        let state = vcpu.get_state(0, SNAPSHOT_MSRS)?;
        let parked = ParkedVcpu {
            lapic: vcpu.get_lapic()?,
            xsave: vcpu.get_xsave()?,
            tsc_khz: vcpu.tsc_khz().unwrap_or(0),
        };
        Ok((state, parked))
    };
    let id = vcpu.id as usize;
    let (state, parked) = match read() {
        Ok((s, p)) => (Some(s), Some(p)),
        Err(e) => {
            tracing::warn!("vcpu{id}: reading its state: {e}");
            (None, None)
        }
    };
    if let Some(slot) = platform.parked.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
        *slot = parked;
    }
    state
}

/// One KVM vCPU for the vCPU loop.
struct KvmLoopVcpu {
    vcpu: KvmVcpu,
    platform: Arc<KvmPlatform>,
}

impl Vcpu for KvmLoopVcpu {
    fn id(&self) -> usize {
        self.vcpu.id as usize
    }

    fn run(&mut self, bus: &mut VcpuBus) -> VcpuExit {
        match self.vcpu.run_once(bus) {
            Step::Continue => VcpuExit::Ran,
            Step::Interrupted => VcpuExit::Interrupted,
            // Only without the in-kernel irqchip.
            Step::Halted => VcpuExit::Halted { interrupts: true },
            Step::TripleFault(regs) => VcpuExit::TripleFault(regs),
            Step::Reset => VcpuExit::Reset,
            Step::PowerOff => VcpuExit::PowerOff,
            Step::Fault(msg) => VcpuExit::Fault(msg),
        }
    }

    /// Asked of KVM only when a kick took the vCPU out (twice a second at
    /// least): the in-kernel LAPIC waits out HLT without an exit.
    fn idle_for_good(&self, last: Option<&VcpuExit>) -> Option<bool> {
        matches!(last, Some(VcpuExit::Interrupted)).then(|| self.vcpu.halted_for_good())
    }

    /// Only without the in-kernel irqchip (KVM waits itself otherwise):
    /// do not spin.
    fn wait_halted(&mut self, _: &Shared, _: bool) {
        std::thread::sleep(Duration::from_millis(1));
    }

    fn save_state(&mut self) -> Option<CpuState> {
        park_state(&self.vcpu, &self.platform)
    }

    fn load_state(&mut self, state: CpuState) -> std::result::Result<(), String> {
        self.vcpu.set_state(&state, 0).map_err(|e| e.to_string())
    }
}
