//! The seam between the machine and the CPU: an [`Engine`] runs the
//! machine's vCPUs, one thread each, over the same memory, devices and
//! buses. `emu` (x86emu, [`crate::emu`]) and `kvm` ([`crate::kvm::engine`])
//! implement it; nothing else in the VMM knows which one runs.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use x86emu::state::CpuState;

use crate::cpu_features::CpuFeatures;
use crate::devices::irq::Interrupts;
use crate::devices::irq_line::InterruptLine;
use crate::machine::{RunOutcome, Shared};
use crate::persist::MachineState;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::DmaObserver;
use crate::{Error, Result};

/// Which engine runs the vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Emu,
    Kvm,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Emu => "emu",
            EngineKind::Kvm => "kvm",
        })
    }
}

/// What the user asked for with `--accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Emu,
    Kvm,
    /// kvm when /dev/kvm can run ordinary guests, emu otherwise.
    Auto,
}

impl FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "emu" => Ok(Accel::Emu),
            "kvm" => Ok(Accel::Kvm),
            "auto" => Ok(Accel::Auto),
            _ => Err(Error::Config(format!("--accel must be kvm, emu or auto, not {s:?}"))),
        }
    }
}

/// Pick the engine for `accel`, with one line saying which and why.
/// `--accel kvm` on a host whose KVM cannot run ordinary guests is an error.
pub fn choose(accel: Accel) -> Result<(EngineKind, String)> {
    choose_with(accel, crate::kvm::probe())
}

/// [`choose`] given the answer of [`crate::kvm::probe`].
pub fn choose_with(accel: Accel, probe: std::result::Result<(), String>) -> Result<(EngineKind, String)> {
    match (accel, probe) {
        (Accel::Emu, _) => Ok((EngineKind::Emu, "engine: emu (asked for with --accel emu)".into())),
        (Accel::Kvm, Ok(())) => Ok((EngineKind::Kvm, "engine: kvm (asked for with --accel kvm)".into())),
        (Accel::Kvm, Err(why)) => Err(Error::Config(format!("--accel kvm: {why}"))),
        (Accel::Auto, Ok(())) => Ok((
            EngineKind::Kvm,
            "engine: kvm (--accel auto: /dev/kvm can run ordinary guests)".into(),
        )),
        (Accel::Auto, Err(why)) => Ok((EngineKind::Emu, format!("engine: emu (--accel auto: {why})"))),
    }
}

/// An engine ready to run: it owns the vCPUs.
pub trait Engine: Send {
    fn kind(&self) -> EngineKind;
    /// Run every vCPU on its own thread until the guest ends.
    fn run(self: Box<Self>, shared: Arc<Shared>) -> RunOutcome;
}

/// What an engine itself holds of a machine's state, beyond the vCPUs'
/// `CpuState`s: under kvm the in-kernel LAPICs, PIC, IOAPIC and PIT, the
/// kvmclock and the XSAVE areas. (Under emu those are the machine's own
/// models, which need no engine to read.)
pub trait EngineSave: Send + Sync {
    /// While paused: the interrupt controllers as the engine-neutral
    /// state, the parked `cpus` brought to the snapshot's conventions (the
    /// TSC as an offset from the machine clock's `guest_tsc(now_ns)`), and
    /// what only this engine can restore.
    fn save(
        &self,
        cpus: &mut [CpuState],
        now_ns: u64,
    ) -> std::result::Result<
        (crate::devices::irq::RouterState, Option<crate::persist::KvmState>),
        crate::persist::PersistError,
    >;
}

/// Dirty-page logging an engine does itself (kvm: `KVM_MEM_LOG_DIRTY_PAGES`
/// with `KVM_GET_DIRTY_LOG`): the vCPUs' own writes to guest memory, for
/// live migration. [`crate::migration::dirty::DirtyLog`] merges what
/// `collect` reports into the one bitmap that emu's TLB fills and the
/// devices' DMA observer mark. An engine with this keeps no write
/// translations of its own in the vCPUs, so no TLB flush is needed after
/// a harvest (the kernel write-protects the pages it reported again).
pub trait EngineDirtyLog: Send + Sync {
    /// Log writes from now on (nothing logged yet).
    fn start(&self) -> std::result::Result<(), String>;
    /// Hand every page (guest-physical address) written since `start` or
    /// the last `collect` to `mark`, and clear the engine's log.
    fn collect(&self, mark: &mut dyn FnMut(u64)) -> std::result::Result<(), String>;
    /// Stop logging.
    fn stop(&self) -> std::result::Result<(), String>;
}

/// An engine while the machine is built around it: it gives the devices
/// their interrupt lines and DMA observer, then takes the vCPUs' start
/// (a boot, or a snapshot) and becomes the [`Engine`] that runs them. The
/// machine builds itself the same way whatever the engine; [`prepare`] is
/// the one place that picks by kind.
pub trait EngineSetup {
    /// An interrupt line into the engine's interrupt controller at `pin`.
    fn irq_line(&self, pin: u32) -> Result<Arc<dyn InterruptLine>>;
    /// Who hears of device writes to guest memory.
    fn dma_observer(&self) -> DmaObserver;
    /// A fresh boot: the BSP starts in `boot_state`, the others wait for
    /// INIT/SIPI; `devices` are the machine's virtio devices, in window order.
    fn boot(self: Box<Self>, boot_state: &CpuState, devices: &[MmioTransport]) -> Result<Ready>;
    /// A restore: everything the engine holds comes from `state`.
    fn restore(self: Box<Self>, state: &MachineState, devices: &[MmioTransport]) -> Result<Ready>;
}

/// An engine ready to run, with what the machine keeps of it.
pub struct Ready {
    pub engine: Box<dyn Engine>,
    /// The CPU features the guest is offered.
    pub cpu_features: CpuFeatures,
    /// The engine's side of a snapshot, when it holds state of its own.
    pub save: Option<Arc<dyn EngineSave>>,
    /// The engine's own dirty-page log, when the vCPUs' writes bypass the
    /// VMM (kvm); `None` when the VMM sees them (emu marks on TLB fills).
    pub dirty_log: Option<Arc<dyn EngineDirtyLog>>,
}

/// The engine `kind` for a machine of `cpus` vCPUs over `mem`, whose own
/// interrupt controllers are `irqs` and decoded-code cache `code_map`.
/// `saw`: for a restore, the CPU features the guest saw, which the engine
/// must offer (refused, naming the missing ones, otherwise). `jit`: emu
/// runs hot code through x86emu's JIT tier.
pub fn prepare(
    kind: EngineKind,
    mem: &vm_memory::GuestMemoryMmap,
    cpus: u32,
    irqs: &Arc<Interrupts>,
    code_map: &Arc<x86emu::CodeMap>,
    saw: Option<&CpuFeatures>,
    jit: bool,
) -> Result<Box<dyn EngineSetup>> {
    Ok(match kind {
        EngineKind::Emu => Box::new(crate::emu::EmuSetup::new(
            cpus,
            irqs.clone(),
            code_map.clone(),
            saw,
            jit,
        )?),
        EngineKind::Kvm => Box::new(crate::kvm::engine::KvmEngine::prepare(mem, cpus, saw)?),
    })
}

/// Machine-wide control of the vCPU threads, the same for both engines:
/// a way to get every vCPU out of guest code (the engine installs it), and
/// the pause gate vCPUs wait at.
#[derive(Default)]
pub struct Control {
    kick: OnceLock<Box<dyn Fn() + Send + Sync>>,
    pause_requested: AtomicBool,
    gate: Mutex<Gate>,
    changed: Condvar,
    /// Each parked vCPU's state, in the one format both engines share.
    states: Mutex<Vec<Option<CpuState>>>,
}

#[derive(Default)]
struct Gate {
    paused: bool,
    parked: usize,
    running_vcpus: usize,
}

impl Control {
    /// The engine's way to take all vCPUs out of guest code (set once).
    pub fn set_kick(&self, kick: Box<dyn Fn() + Send + Sync>) {
        let _ = self.kick.set(kick);
    }

    pub fn kick(&self) {
        if let Some(k) = self.kick.get() {
            k();
        }
    }

    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::Acquire)
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU thread starts (it will answer pause requests).
    pub fn vcpu_started(&self) {
        self.gate().running_vcpus += 1;
        self.changed.notify_all();
    }

    /// A vCPU thread ends.
    pub fn vcpu_stopped(&self) {
        let mut g = self.gate();
        g.running_vcpus = g.running_vcpus.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Called by vCPU `id` outside guest code: wait here while paused.
    /// `stopping` says when to give up waiting (the machine is ending).
    /// `save` reads the vCPU's state, which is published while parked; the
    /// state to continue from is returned (the engine loads it back).
    pub fn park_if_paused(
        &self,
        id: usize,
        stopping: &dyn Fn() -> bool,
        save: &mut dyn FnMut() -> Option<CpuState>,
    ) -> Option<CpuState> {
        if !self.pause_requested() {
            return None;
        }
        let saved = save();
        {
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            if states.len() <= id {
                states.resize(id + 1, None);
            }
            states[id] = saved;
        }
        let mut g = self.gate();
        g.parked += 1;
        self.changed.notify_all();
        while g.paused && !stopping() {
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.parked -= 1;
        self.changed.notify_all();
        drop(g);
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.get_mut(id).and_then(Option::take)
    }

    /// The parked vCPUs' states (while paused), by vCPU number.
    pub fn vcpu_states(&self) -> Vec<Option<CpuState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Take every vCPU out of guest code and hold it. Returns once all
    /// running vCPUs are parked (or `timeout` passed: `false`).
    pub fn pause(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        self.gate().paused = true;
        self.pause_requested.store(true, Ordering::Release);
        loop {
            self.kick();
            let g = self.gate();
            if g.parked >= g.running_vcpus {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            let _ = self
                .changed
                .wait_timeout(g, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Let the vCPUs run again.
    pub fn resume(&self) {
        self.pause_requested.store(false, Ordering::Release);
        self.gate().paused = false;
        self.changed.notify_all();
    }

    /// Whether every running vCPU is parked.
    pub fn all_parked(&self) -> bool {
        let g = self.gate();
        g.paused && g.parked >= g.running_vcpus
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_choice() {
        let pvm = || Err("/dev/kvm is a PVM-type KVM".to_string());
        assert_eq!(choose_with(Accel::Auto, Ok(())).unwrap().0, EngineKind::Kvm);
        let (kind, why) = choose_with(Accel::Auto, pvm()).unwrap();
        assert_eq!(kind, EngineKind::Emu);
        assert!(why.contains("PVM") && !why.contains('\n'), "{why}");
        let err = choose_with(Accel::Kvm, pvm()).unwrap_err().to_string();
        assert!(err.contains("--accel kvm") && err.contains("PVM"), "{err}");
        assert_eq!(choose_with(Accel::Emu, Ok(())).unwrap().0, EngineKind::Emu);
        assert!("fast".parse::<Accel>().is_err());
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
    }

    #[test]
    fn pause_waits_for_every_vcpu() {
        let c = Arc::new(Control::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (c, stop) = (c.clone(), stop.clone());
                c.vcpu_started();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        c.park_if_paused(0, &|| stop.load(Ordering::Acquire), &mut || None);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    c.vcpu_stopped();
                })
            })
            .collect();
        assert!(c.pause(Duration::from_secs(5)));
        assert!(c.all_parked());
        c.resume();
        assert!(c.pause(Duration::from_secs(5)));
        c.resume();
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
    }
}
