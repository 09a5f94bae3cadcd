//! The one vCPU loop both engines run: a thread per vCPU that parks while
//! paused, runs guest code until an exit, waits out halts, counts vCPUs
//! that can run nothing more, and turns the guest's ends (triple fault,
//! reset, power-off, a fault) into the machine's stop. An engine supplies
//! a [`Vcpu`] (the small per-vCPU interface, after Cloud Hypervisor's
//! `hypervisor::Vcpu`) and a way to kick its threads out of guest code.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use x86emu::state::CpuState;

use crate::machine::{RunOutcome, Shared, VcpuBus, RUNNING, STOP_HALTED, STOP_RESET, STOP_TRIPLE};

/// Why a vCPU came out of guest code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// Guest code ran (a time slice, or an exit the bus handled): go on.
    Ran,
    /// Taken out of guest code by a kick (a signal, `immediate_exit`):
    /// go on.
    Interrupted,
    /// HLT, for the loop to wait out; `interrupts`: whether an interrupt
    /// can end it (IF set).
    Halted {
        interrupts: bool,
    },
    /// An application processor that waits for INIT/SIPI (never started,
    /// as with `nosmp`, or sent INIT).
    WaitForSipi,
    /// Triple fault: the registers, formatted.
    TripleFault(String),
    /// The guest asked for a reset or a power-off.
    Reset,
    PowerOff,
    /// The engine could not run the guest: what happened.
    Fault(String),
}

/// One vCPU as the loop sees it. The engine's vCPU thread owns it; it is
/// used only from that thread.
pub trait Vcpu: Send + 'static {
    fn id(&self) -> usize;
    /// Before each run, outside guest code: act on what the machine's
    /// interrupt controllers hold for this vCPU that only the engine can
    /// (INIT, SIPI and NMI under emu; KVM's in-kernel LAPIC does this
    /// itself).
    fn take_events(&mut self, _shared: &Shared) {}
    /// Run guest code until an exit (or the engine's time slice ends).
    fn run(&mut self, bus: &mut VcpuBus) -> VcpuExit;
    /// Whether this vCPU can run nothing more until an NMI, INIT or SIPI
    /// (HLT with interrupts off, or an AP waiting for SIPI), when the
    /// engine can tell cheaply: before a run (`last` is `None`) or after
    /// the exit `last`. `None`: no news.
    fn idle_for_good(&self, last: Option<&VcpuExit>) -> Option<bool>;
    /// Wait outside guest code for something to end a halt (`interrupts`:
    /// whether an interrupt can), for a short while at most.
    fn wait_halted(&mut self, shared: &Shared, interrupts: bool);
    /// The vCPU's state, in the format both engines share, when it parks
    /// for a pause (a snapshot reads it there).
    fn save_state(&mut self) -> Option<CpuState>;
    /// Go on from `state` (after a pause).
    fn load_state(&mut self, state: CpuState) -> Result<(), String>;
    /// The thread ends.
    fn finish(&mut self) {}
}

/// Kick every vCPU; the live vCPU threads' ids are given.
pub type KickFn = Box<dyn Fn(&[libc::pthread_t]) + Send + Sync>;

/// How the engine takes its vCPU threads out of guest code.
pub struct Kicker {
    pub kick: KickFn,
    /// When a kick can be lost (a signal just before entering the guest)
    /// or the engine cannot see a vCPU idle unless kicked (KVM waits out
    /// HLT in the kernel): how often to kick while the guest runs. The
    /// runner then also kicks until every thread has seen a stop.
    pub watch: Option<Duration>,
}

/// Run each of `vcpus` on its own thread until the guest ends.
pub fn run_vcpus<V: Vcpu>(vcpus: Vec<V>, shared: Arc<Shared>, kicker: Kicker) -> RunOutcome {
    let threads: Arc<Mutex<Vec<libc::pthread_t>>> = Arc::default();
    let kick_threads = threads.clone();
    let kick = kicker.kick;
    shared.control.set_kick(Box::new(move || {
        kick(&kick_threads.lock().unwrap_or_else(|e| e.into_inner()))
    }));
    let count = vcpus.len();
    let mut handles = Vec::with_capacity(count);
    for vcpu in vcpus {
        let id = vcpu.id();
        let s = shared.clone();
        shared.control.vcpu_started();
        match std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_thread(vcpu, s, count))
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
    if let Some(period) = kicker.watch {
        const POLL: Duration = Duration::from_millis(10);
        let every = (period.as_millis() / POLL.as_millis()).max(1) as u32;
        let mut ticks = 0u32;
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(POLL);
            ticks = ticks.wrapping_add(1);
            // While auto-converge throttles, a vCPU sits out its share
            // after each exit: kick often, or a guest that seldom exits
            // (under kvm) would run on unthrottled.
            if shared.stop.load(Ordering::Acquire) != RUNNING
                || ticks.is_multiple_of(every)
                || shared.dirty.throttle() > 0
            {
                shared.control.kick();
            }
        }
    }
    // A finished thread's id may be reused once joined: kick no more.
    threads.lock().unwrap_or_else(|e| e.into_inner()).clear();
    for h in handles {
        let _ = h.join();
    }
    shared.outcome()
}

/// vCPUs that can run nothing more until an NMI, INIT or SIPI: when all
/// are, the guest is done (`reboot: System halted`, with or without
/// `nosmp`). Each vCPU counts itself at most once.
struct IdleForGood {
    counted: bool,
    vcpus: u32,
}

impl IdleForGood {
    fn update(&mut self, shared: &Shared, idle: Option<bool>) {
        match idle {
            Some(true) if !self.counted => {
                self.counted = true;
                if shared.dead.fetch_add(1, Ordering::AcqRel) + 1 == self.vcpus {
                    shared.request_stop(STOP_HALTED);
                }
            }
            Some(false) if self.counted => {
                self.counted = false;
                shared.dead.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }
}

fn vcpu_thread<V: Vcpu>(mut vcpu: V, shared: Arc<Shared>, count: usize) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
    let id = vcpu.id();
    let mut bus = VcpuBus {
        id,
        shared: shared.clone(),
    };
    let stopping = || shared.stop.load(Ordering::Acquire) != RUNNING;
    let mut idle = IdleForGood {
        counted: false,
        vcpus: count as u32,
    };
    while !stopping() {
        // While paused, the vCPU's state is out of the engine as a
        // CpuState (the snapshot format of both engines), and it goes on
        // from that.
        let resumed = shared.control.park_if_paused(id, &stopping, &mut || vcpu.save_state());
        if stopping() {
            break;
        }
        if let Some(state) = resumed {
            if let Err(e) = vcpu.load_state(state) {
                shared.fail(format!("vcpu{id}: loading its state after a pause: {e}"));
                break;
            }
        }
        vcpu.take_events(&shared);
        // Started by a SIPI: no longer done, before it runs a thing.
        idle.update(&shared, vcpu.idle_for_good(None));
        // Auto-converge (live migration) sits out a share of the time.
        let throttle = shared.dirty.throttle();
        let started = (throttle > 0).then(Instant::now);
        let exit = vcpu.run(&mut bus);
        if let Some(started) = started {
            std::thread::sleep(throttle_pause(started.elapsed(), throttle));
        }
        idle.update(&shared, vcpu.idle_for_good(Some(&exit)));
        match exit {
            VcpuExit::Ran | VcpuExit::Interrupted => {}
            VcpuExit::Halted { interrupts } => {
                if !shared.control.pause_requested() {
                    vcpu.wait_halted(&shared, interrupts);
                }
            }
            VcpuExit::WaitForSipi => {
                if !shared.control.pause_requested() {
                    vcpu.wait_halted(&shared, false);
                }
            }
            VcpuExit::TripleFault(regs) => {
                *shared.triple_fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(regs);
                shared.request_stop(STOP_TRIPLE);
            }
            VcpuExit::Reset => shared.request_stop(STOP_RESET),
            VcpuExit::PowerOff => shared.request_stop(STOP_HALTED),
            VcpuExit::Fault(msg) => shared.fail(msg),
        }
    }
    shared.control.vcpu_stopped();
    vcpu.finish();
}

/// How long to sit out after running for `ran`, so that the vCPU runs
/// `100 - percent` percent of the time.
pub(crate) fn throttle_pause(ran: Duration, percent: u8) -> Duration {
    let percent = u32::from(percent.min(99));
    ran * percent / (100 - percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_sits_out_its_share() {
        let ms = Duration::from_millis;
        assert_eq!(throttle_pause(ms(10), 0), Duration::ZERO);
        assert_eq!(throttle_pause(ms(10), 50), ms(10));
        assert_eq!(throttle_pause(ms(10), 75), ms(30));
        // Never all of it: 99 % at most.
        assert_eq!(throttle_pause(ms(1), 100), ms(99));
    }
}
