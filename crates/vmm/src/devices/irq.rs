//! How devices raise interrupts and how they reach the vCPUs (`emu` engine).
//!
//! [`InterruptRouter`] owns the interrupt controllers of a PC: the 8259A
//! pair, the IOAPIC, one local APIC per vCPU, and the 8254 PIT (whose IRQ0
//! and deadline are tied to the same routing). It is plain, deterministic
//! state: time is a parameter, nothing blocks.
//!
//! Lines: ISA IRQs 0-15 go to both the PIC and the IOAPIC, IRQ0 to IOAPIC
//! pin 2 (the MP table's interrupt override), IRQ2 only to the PIC cascade,
//! the others to the pin of the same number. Lines 16-23 go to the IOAPIC
//! only. The PIC's INTR output is also wired to IOAPIC pin 0, as on a PC,
//! and to LINT0 of every local APIC (taken when LINT0 is unmasked in ExtINT
//! mode: virtual wire mode).
//!
//! [`Interrupts`] wraps the router for several threads: a `Mutex` around
//! it, and per vCPU an atomic "something to deliver" hint (read on every
//! `Bus::interrupt_pending`, no lock), the vCPU's next timer deadline, and
//! a `Condvar` that halted vCPUs sleep on. Every change that may make an
//! interrupt deliverable to a vCPU, or bring its deadline closer, wakes it.
//!
//! # Wiring into the machine
//!
//! Build: `let mut r = InterruptRouter::new(cpus, tsc_hz); r.setup_virtual_wire();`
//! then `Arc<Interrupts>` from `Interrupts::new(r)`, and write the MP table
//! (`mptable::setup_mptable`). Each vCPU's bus holds the `Arc`, its index
//! `cpu`, and the machine clock `now_ns()`:
//! - `io_in/io_out`: `irqs.with(|r| r.io_read(port, now))` (`None`: not
//!   ours) and `r.io_write(port, value as u8, now)` for ports 0x20, 0x21,
//!   0xa0, 0xa1, 0x4d0, 0x4d1, 0x40-0x43, 0x61.
//! - `mmio_read/mmio_write`: `r.mmio_read(cpu, gpa, data, now)` (`false`:
//!   not ours) covers the vCPU's own LAPIC page and the IOAPIC.
//! - `rdmsr/wrmsr`: if `InterruptRouter::handles_msr(index)`,
//!   `r.rdmsr(cpu, index, now)` / `r.wrmsr(cpu, index, value, now, guest_tsc)`.
//!   IA32_APIC_BASE stays with the CPU; report changes with `set_apic_base`.
//! - `interrupt_pending`: `irqs.tick(cpu, now); irqs.interrupt_pending(cpu)`
//!   (both lock-free unless a deadline passed); `acknowledge_interrupt`:
//!   `irqs.acknowledge(cpu)`; `set_task_priority`:
//!   `irqs.with(|r| r.set_task_priority(cpu, cr8))`.
//! - `exit_requested`: `irqs.events_pending(cpu)` (then `take_events`:
//!   NMI → `cpu.inject_nmi()`, INIT → reset to wait-for-SIPI, SIPI → start
//!   at `vector << 12` if waiting; otherwise drop it).
//! - On `Exit::Halted`: `irqs.halt(cpu, &now_ns, max, if_flag)` and run
//!   again; on `Exit::WaitForSipi`: `irqs.halt(cpu, &now_ns, max, false)`.
//! - Devices: `irqs.set_irq(line, level)` for level sources (held until
//!   the guest clears the cause), `irqs.pulse_irq(line)` for edges.
//!
//! The RTC has no interrupt and lives outside the router.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ioapic::{self, Ioapic, IoapicState};
use super::lapic::{
    DeliveryMode, InterruptMessage, Lapic, LapicState, WriteEffect, LAPIC_SIZE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
};
use super::mptable::isa_irq_to_pin;
use super::pic::{self, Pic, PicState};
use super::pit::{self, Pit, PitState};

/// The 8259 pair's command/data ports and its edge/level control registers.
fn is_pic_port(port: u16) -> bool {
    matches!(
        port,
        pic::MASTER_CMD | pic::MASTER_DATA | pic::SLAVE_CMD | pic::SLAVE_DATA | pic::ELCR_MASTER | pic::ELCR_SLAVE
    )
}

/// Number of interrupt lines devices can use (the IOAPIC's pins).
pub const NUM_LINES: u32 = ioapic::NUM_PINS as u32;

/// NMI, INIT and SIPI received by a vCPU's local APIC, for its thread to
/// act on (inject an NMI, reset the CPU, start it at `vector << 12`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuEvents {
    pub nmi: bool,
    pub init: bool,
    pub sipi: Option<u8>,
}

impl VcpuEvents {
    pub fn any(&self) -> bool {
        self.nmi || self.init || self.sipi.is_some()
    }
}

/// Saved state of all interrupt controllers and the PIT.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RouterState {
    pub pic: PicState,
    pub ioapic: IoapicState,
    pub pit: PitState,
    pub lapics: Vec<LapicState>,
    /// An ExtINT message from the IOAPIC waits for the vCPU's INTA.
    pub extint_pending: Vec<bool>,
}

#[derive(Clone, Debug)]
pub struct InterruptRouter {
    pic: Pic,
    ioapic: Ioapic,
    pit: Pit,
    lapics: Vec<Lapic>,
    extint_pending: Vec<bool>,
    /// vCPUs whose deliverable interrupts or deadline may have changed
    /// since the last [`InterruptRouter::take_touched`] (not state).
    touched: Vec<bool>,
    /// PIT ticks missed while vCPU 0 was late (its thread waited for a
    /// host core), still to be delivered: one more each time the guest
    /// takes the timer interrupt, as KVM reinjects PIT ticks. Without this
    /// an overcommitted guest sees too few ticks in Linux's timer check and
    /// panics ("IO-APIC + timer doesn't work!"). Not state: a restored
    /// machine starts without a backlog.
    pit_backlog: u64,
}

/// The most missed PIT ticks kept for delivery (a second at HZ=1000); a
/// longer stall (a paused VM) is not replayed tick by tick.
const MAX_PIT_BACKLOG: u64 = 1000;

impl InterruptRouter {
    /// Controllers after reset for `num_cpus` vCPUs (APIC ids 0..N-1, the
    /// IOAPIC id N as in the MP table); `tsc_hz` is the guest TSC rate
    /// (for the TSC-deadline timer).
    pub fn new(num_cpus: usize, tsc_hz: u64) -> Self {
        let n = num_cpus.max(1);
        InterruptRouter {
            pic: Pic::new(),
            ioapic: Ioapic::new(n.min(254) as u8),
            pit: Pit::new(),
            lapics: (0..n).map(|i| Lapic::new(i as u32, tsc_hz)).collect(),
            extint_pending: vec![false; n],
            touched: vec![true; n],
            pit_backlog: 0,
        }
    }

    /// Program the BSP's LINT0/LINT1 as firmware would (virtual wire mode:
    /// the PIC reaches vCPU 0 through LINT0). Call once when building a
    /// machine that boots Linux directly, not after restoring a snapshot.
    /// The APs' LINT0 stays masked, so only the BSP takes PIC interrupts.
    pub fn setup_virtual_wire(&mut self) {
        if let Some(l) = self.lapics.first_mut() {
            l.firmware_virtual_wire();
        }
        self.pic_changed();
    }

    pub fn state(&self) -> RouterState {
        RouterState {
            pic: self.pic.state(),
            ioapic: self.ioapic.state(),
            pit: self.pit.state(),
            lapics: self.lapics.iter().map(Lapic::state).collect(),
            extint_pending: self.extint_pending.clone(),
        }
    }

    pub fn from_state(state: RouterState) -> Self {
        let mut lapics: Vec<Lapic> = state.lapics.into_iter().map(Lapic::from_state).collect();
        if lapics.is_empty() {
            lapics.push(Lapic::new(0, 1));
        }
        let n = lapics.len();
        let mut extint_pending = state.extint_pending;
        extint_pending.resize(n, false);
        InterruptRouter {
            pic: Pic::from_state(state.pic),
            ioapic: Ioapic::from_state(state.ioapic),
            pit: Pit::from_state(state.pit),
            lapics,
            extint_pending,
            touched: vec![true; n],
            pit_backlog: 0,
        }
    }

    pub fn num_cpus(&self) -> usize {
        self.lapics.len()
    }

    pub fn lapic(&self, cpu: usize) -> Option<&Lapic> {
        self.lapics.get(cpu)
    }

    fn touch(&mut self, cpu: usize) {
        if let Some(t) = self.touched.get_mut(cpu) {
            *t = true;
        }
    }

    /// The vCPUs touched since the last call (for [`Interrupts`]).
    pub fn take_touched(&mut self) -> Vec<usize> {
        let out = (0..self.touched.len()).filter(|&i| self.touched[i]).collect();
        self.touched.iter_mut().for_each(|t| *t = false);
        out
    }

    // ---- lines ----

    /// Set interrupt line `line` (ISA IRQ 0-15, or 16-23) to `level`
    /// (`true` = asserted). Level-triggered sources hold it; edge sources
    /// use [`InterruptRouter::pulse_irq`]. Unknown lines are ignored.
    pub fn set_irq(&mut self, line: u32, level: bool) {
        if line < 16 {
            self.pic.set_irq(line, level);
            self.pic_changed();
            if let Some(pin) = isa_irq_to_pin(line as u8) {
                self.ioapic_line(usize::from(pin), level);
            }
        } else if line < NUM_LINES {
            self.ioapic_line(line as usize, level);
        }
    }

    /// A rising then falling edge on `line`.
    pub fn pulse_irq(&mut self, line: u32) {
        self.set_irq(line, true);
        self.set_irq(line, false);
    }

    fn ioapic_line(&mut self, pin: usize, level: bool) {
        if let Some(m) = self.ioapic.set_irq(pin, level) {
            self.deliver(m);
        }
    }

    /// The PIC's output may have changed: IOAPIC pin 0 follows it, and the
    /// vCPUs that take ExtINT must look again.
    fn pic_changed(&mut self) {
        let out = self.pic.output();
        self.ioapic_line(0, out);
        for cpu in 0..self.lapics.len() {
            if self.extint_pending[cpu] || self.lapics[cpu].accepts_extint() {
                self.touch(cpu);
            }
        }
    }

    /// Send an interrupt message to the local APICs it addresses.
    pub fn deliver(&mut self, m: InterruptMessage) {
        let lowest = m.mode == DeliveryMode::LowestPriority;
        for cpu in 0..self.lapics.len() {
            if !self.lapics[cpu].matches(m.dest) {
                continue;
            }
            if m.mode == DeliveryMode::ExtInt {
                self.extint_pending[cpu] = true;
            } else {
                self.lapics[cpu].deliver(m.mode, m.vector, m.level);
            }
            self.touch(cpu);
            if lowest {
                break; // lowest priority: the first target, like fixed
            }
        }
    }

    fn apply(&mut self, effect: WriteEffect) {
        match effect {
            WriteEffect::None => {}
            WriteEffect::Ipi(m) => self.deliver(m),
            WriteEffect::EoiBroadcast(v) => {
                for m in self.ioapic.eoi(v) {
                    self.deliver(m);
                }
            }
        }
    }

    // ---- the vCPU's side ----

    fn extint_ready(&self, cpu: usize) -> bool {
        (self.extint_pending[cpu] || self.lapics[cpu].accepts_extint()) && self.pic.output()
    }

    /// An external interrupt can be taken by `cpu` now (if its IF allows).
    pub fn interrupt_pending(&self, cpu: usize) -> bool {
        match self.lapics.get(cpu) {
            Some(l) => l.has_pending() || self.extint_ready(cpu),
            None => false,
        }
    }

    /// INTA: the vector `cpu` takes (local APIC first, then ExtINT from the
    /// PIC, as QEMU does).
    pub fn acknowledge(&mut self, cpu: usize) -> Option<u8> {
        if cpu >= self.lapics.len() {
            return None;
        }
        self.touch(cpu);
        if let Some(v) = self.lapics[cpu].acknowledge() {
            if self.pit_backlog > 0 && self.is_pit_ioapic_vector(v) {
                self.redeliver_pit_tick();
            }
            return Some(v);
        }
        if self.extint_ready(cpu) {
            self.extint_pending[cpu] = false;
            let v = self.pic.acknowledge();
            self.pic_changed();
            if self.pit_backlog > 0 && v == self.pic.state().master.vector_base {
                self.redeliver_pit_tick();
            }
            return Some(v);
        }
        None
    }

    /// Whether `vector` is what the IOAPIC pin of ISA IRQ 0 sends.
    fn is_pit_ioapic_vector(&self, vector: u8) -> bool {
        let Some(pin) = isa_irq_to_pin(0) else {
            return false;
        };
        self.ioapic
            .entry(usize::from(pin))
            .is_some_and(|e| e & (1 << 16) == 0 && (e & 0xff) as u8 == vector)
    }

    /// The guest took a timer interrupt: raise the next missed tick. It
    /// waits in the IRR until the guest's EOI ends the one in service.
    fn redeliver_pit_tick(&mut self) {
        self.pit_backlog -= 1;
        self.pulse_irq(0);
    }

    /// PIT ticks still to be delivered (see `pit_backlog`).
    pub fn pit_backlog(&self) -> u64 {
        self.pit_backlog
    }

    /// NMI, INIT or SIPI wait for `cpu`.
    pub fn events_pending(&self, cpu: usize) -> bool {
        self.lapics.get(cpu).is_some_and(Lapic::has_events)
    }

    /// Take the NMI, INIT and SIPI that arrived for `cpu`.
    pub fn take_events(&mut self, cpu: usize) -> VcpuEvents {
        self.touch(cpu);
        match self.lapics.get_mut(cpu) {
            Some(l) => VcpuEvents {
                nmi: l.take_nmi(),
                init: l.take_init(),
                sipi: l.take_sipi(),
            },
            None => VcpuEvents::default(),
        }
    }

    /// The guest wrote CR8.
    pub fn set_task_priority(&mut self, cpu: usize, cr8: u64) {
        if let Some(l) = self.lapics.get_mut(cpu) {
            l.set_cr8(cr8);
            self.touch(cpu);
        }
    }

    /// The CPU's IA32_APIC_BASE changed (the CPU owns the MSR; tell us).
    pub fn set_apic_base(&mut self, cpu: usize, value: u64) {
        if let Some(l) = self.lapics.get_mut(cpu) {
            l.set_apic_base(value);
            self.touch(cpu);
        }
    }

    /// When `cpu` must next call [`InterruptRouter::tick`]: its local APIC
    /// timer, and for vCPU 0 also the PIT.
    pub fn next_deadline_ns(&self, cpu: usize) -> Option<u64> {
        let lapic = self.lapics.get(cpu)?.next_deadline_ns();
        let pit = if cpu == 0 { self.pit.next_irq_ns() } else { None };
        match (lapic, pit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Run `cpu`'s timers up to `now_ns` (and the PIT, from vCPU 0).
    pub fn tick(&mut self, cpu: usize, now_ns: u64) {
        if let Some(l) = self.lapics.get_mut(cpu) {
            l.tick(now_ns);
            self.touch(cpu);
        }
        if cpu == 0 {
            let edges = self.pit.tick_count(now_ns);
            if edges > 0 {
                self.pit_backlog = (self.pit_backlog + edges - 1).min(MAX_PIT_BACKLOG);
                self.pulse_irq(0);
            }
        }
    }

    // ---- register access ----

    /// Port read for the PIC (0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1) and PIT
    /// (0x40-0x43, 0x61). `None`: not one of ours.
    pub fn io_read(&mut self, port: u16, now_ns: u64) -> Option<u8> {
        match port {
            _ if is_pic_port(port) => {
                let v = self.pic.read(port);
                self.pic_changed(); // a poll read acknowledges
                Some(v)
            }
            pit::PIT_PORT_FIRST..=pit::PIT_PORT_LAST | pit::PORT_B => Some(self.pit.read(port, now_ns)),
            _ => None,
        }
    }

    /// Port write; `false`: not one of ours.
    pub fn io_write(&mut self, port: u16, value: u8, now_ns: u64) -> bool {
        match port {
            _ if is_pic_port(port) => {
                self.pic.write(port, value);
                self.pic_changed();
                true
            }
            pit::PIT_PORT_FIRST..=pit::PIT_PORT_LAST | pit::PORT_B => {
                if port != pit::PORT_B {
                    // Reprogrammed: ticks of the old period are moot.
                    self.pit_backlog = 0;
                }
                self.pit.write(port, value, now_ns);
                self.touch(0); // the PIT deadline is vCPU 0's
                true
            }
            _ => false,
        }
    }

    fn lapic_offset(&self, cpu: usize, gpa: u64) -> Option<u64> {
        let base = self.lapics.get(cpu)?.mmio_base()?;
        gpa.checked_sub(base).filter(|&o| o < LAPIC_SIZE)
    }

    /// MMIO read by `cpu` (its own local APIC page, the IOAPIC). `false`:
    /// not ours.
    pub fn mmio_read(&mut self, cpu: usize, gpa: u64, data: &mut [u8], now_ns: u64) -> bool {
        if let Some(off) = self.lapic_offset(cpu, gpa) {
            self.lapics[cpu].mmio_read(off, data, now_ns);
            return true;
        }
        match gpa.checked_sub(ioapic::IOAPIC_BASE) {
            Some(off) if off < ioapic::IOAPIC_SIZE => {
                self.ioapic.mmio_read(off, data);
                true
            }
            _ => false,
        }
    }

    /// MMIO write by `cpu`. `false`: not ours.
    pub fn mmio_write(&mut self, cpu: usize, gpa: u64, data: &[u8], now_ns: u64) -> bool {
        if let Some(off) = self.lapic_offset(cpu, gpa) {
            let effect = self.lapics[cpu].mmio_write(off, data, now_ns);
            self.touch(cpu);
            self.apply(effect);
            if matches!(off & 0xff0, 0xf0 | 0x350) {
                // SVR or LINT0 can open or close the ExtINT path.
                self.pic_changed();
            }
            return true;
        }
        match gpa.checked_sub(ioapic::IOAPIC_BASE) {
            Some(off) if off < ioapic::IOAPIC_SIZE => {
                for m in self.ioapic.mmio_write(off, data) {
                    self.deliver(m);
                }
                true
            }
            _ => false,
        }
    }

    /// MSRs served here: TSC deadline and the x2APIC range.
    pub fn handles_msr(index: u32) -> bool {
        index == MSR_TSC_DEADLINE || (X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&index)
    }

    /// RDMSR of an MSR in [`InterruptRouter::handles_msr`]; `None` = #GP.
    pub fn rdmsr(&mut self, cpu: usize, index: u32, now_ns: u64) -> Option<u64> {
        let l = self.lapics.get(cpu)?;
        if index == MSR_TSC_DEADLINE {
            return Some(l.read_tsc_deadline());
        }
        l.x2apic_rdmsr(index, now_ns)
    }

    /// WRMSR; `false` = #GP. `guest_tsc` is the guest's TSC now.
    pub fn wrmsr(&mut self, cpu: usize, index: u32, value: u64, now_ns: u64, guest_tsc: u64) -> bool {
        let Some(l) = self.lapics.get_mut(cpu) else {
            return false;
        };
        if index == MSR_TSC_DEADLINE {
            l.write_tsc_deadline(value, now_ns, guest_tsc);
            self.touch(cpu);
            return true;
        }
        match l.x2apic_wrmsr(index, value, now_ns) {
            Some(effect) => {
                self.touch(cpu);
                self.apply(effect);
                true
            }
            None => false,
        }
    }
}

/// Per-vCPU signalling.
#[derive(Debug, Default)]
struct VcpuSignal {
    /// An external interrupt may be deliverable (lock-free hint).
    pending: AtomicBool,
    /// An NMI, INIT or SIPI waits.
    events: AtomicBool,
    /// Next timer deadline, `u64::MAX` for none.
    deadline: AtomicU64,
    kicked: Mutex<bool>,
    cond: Condvar,
}

/// The router shared by vCPU and device threads.
#[derive(Debug)]
pub struct Interrupts {
    router: Mutex<InterruptRouter>,
    vcpus: Vec<VcpuSignal>,
}

impl Interrupts {
    /// Number of vCPUs the router serves.
    pub fn num_cpus(&self) -> usize {
        self.vcpus.len()
    }

    pub fn new(router: InterruptRouter) -> Self {
        let vcpus = (0..router.num_cpus()).map(|_| VcpuSignal::default()).collect();
        let me = Interrupts {
            router: Mutex::new(router),
            vcpus,
        };
        me.with(|_| ());
        me
    }

    fn lock(&self) -> MutexGuard<'_, InterruptRouter> {
        // A panic elsewhere must not take interrupts down with it.
        self.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the router, then publish what changed and wake vCPUs.
    pub fn with<R>(&self, f: impl FnOnce(&mut InterruptRouter) -> R) -> R {
        let mut r = self.lock();
        let out = f(&mut r);
        for cpu in r.take_touched() {
            let Some(sig) = self.vcpus.get(cpu) else { continue };
            let pending = r.interrupt_pending(cpu);
            let events = r.events_pending(cpu);
            let deadline = r.next_deadline_ns(cpu).unwrap_or(u64::MAX);
            sig.pending.store(pending, Ordering::Release);
            sig.events.store(events, Ordering::Release);
            let old = sig.deadline.swap(deadline, Ordering::AcqRel);
            if pending || events || deadline < old {
                self.kick(cpu);
            }
        }
        out
    }

    pub fn state(&self) -> RouterState {
        self.lock().state()
    }

    pub fn set_irq(&self, line: u32, level: bool) {
        self.with(|r| r.set_irq(line, level));
    }

    pub fn pulse_irq(&self, line: u32) {
        self.with(|r| r.pulse_irq(line));
    }

    /// Cheap check for `Bus::interrupt_pending`: an external interrupt may
    /// be waiting. [`Interrupts::acknowledge`] gives the vector.
    pub fn interrupt_pending(&self, cpu: usize) -> bool {
        self.vcpus.get(cpu).is_some_and(|s| s.pending.load(Ordering::Acquire))
    }

    /// Cheap check: an NMI, INIT or SIPI waits ([`Interrupts::take_events`]).
    /// The machine can answer `Bus::exit_requested` with it so the run loop
    /// returns and it injects the NMI or resets/starts the CPU.
    pub fn events_pending(&self, cpu: usize) -> bool {
        self.vcpus.get(cpu).is_some_and(|s| s.events.load(Ordering::Acquire))
    }

    pub fn acknowledge(&self, cpu: usize) -> Option<u8> {
        self.with(|r| r.acknowledge(cpu))
    }

    pub fn take_events(&self, cpu: usize) -> VcpuEvents {
        self.with(|r| r.take_events(cpu))
    }

    /// `cpu`'s next timer deadline (lock-free).
    pub fn next_deadline_ns(&self, cpu: usize) -> Option<u64> {
        let d = self.vcpus.get(cpu)?.deadline.load(Ordering::Acquire);
        (d != u64::MAX).then_some(d)
    }

    /// Run `cpu`'s timers if its deadline has passed (cheap otherwise).
    pub fn tick(&self, cpu: usize, now_ns: u64) {
        if self.next_deadline_ns(cpu).is_some_and(|d| d <= now_ns) {
            self.with(|r| r.tick(cpu, now_ns));
        }
    }

    /// Wake `cpu` if it sleeps in [`Interrupts::wait`] (or make its next
    /// wait return at once). For interrupts, and for pause/stop requests.
    pub fn kick(&self, cpu: usize) {
        if let Some(sig) = self.vcpus.get(cpu) {
            *sig.kicked.lock().unwrap_or_else(|e| e.into_inner()) = true;
            sig.cond.notify_all();
        }
    }

    /// Sleep until `cpu` is kicked or `timeout` passes (forever if `None`).
    /// Returns whether it was kicked. No busy waiting; a kick that came
    /// before the call is not lost.
    pub fn wait(&self, cpu: usize, timeout: Option<Duration>) -> bool {
        let Some(sig) = self.vcpus.get(cpu) else {
            return false;
        };
        let mut kicked = sig.kicked.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            None => {
                while !*kicked {
                    kicked = sig.cond.wait(kicked).unwrap_or_else(|e| e.into_inner());
                }
            }
            Some(t) => {
                if !*kicked {
                    kicked = sig
                        .cond
                        .wait_timeout_while(kicked, t, |k| !*k)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        std::mem::take(&mut *kicked)
    }

    /// What a halted vCPU (or one waiting for SIPI, with `if_set` false)
    /// does: sleep, running its timers at their deadlines, until an NMI,
    /// INIT or SIPI waits, or (if `if_set`, the CPU's IF) an external
    /// interrupt, or `max_wait` passed (so the caller can check for
    /// pause/stop; [`Interrupts::kick`] also ends the wait early). `now`
    /// reads the machine clock in ns.
    pub fn halt(&self, cpu: usize, now: &dyn Fn() -> u64, max_wait: Duration, if_set: bool) {
        let start = now();
        let limit = start.saturating_add(u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX));
        loop {
            let t = now();
            self.tick(cpu, t);
            if (if_set && self.interrupt_pending(cpu)) || self.events_pending(cpu) || t >= limit {
                return;
            }
            let until = self.next_deadline_ns(cpu).unwrap_or(u64::MAX).min(limit);
            self.wait(cpu, Some(Duration::from_nanos(until.saturating_sub(t))));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::devices::ioapic::IOAPIC_BASE;
    use crate::devices::lapic::LAPIC_BASE;

    fn lapic_write(r: &mut InterruptRouter, cpu: usize, reg: u64, v: u32) {
        assert!(r.mmio_write(cpu, LAPIC_BASE + reg, &v.to_le_bytes(), 0));
    }

    fn ioapic_write(r: &mut InterruptRouter, index: u32, v: u32) {
        r.mmio_write(0, IOAPIC_BASE, &index.to_le_bytes(), 0);
        r.mmio_write(0, IOAPIC_BASE + 0x10, &v.to_le_bytes(), 0);
    }

    fn linux_pic_init(r: &mut InterruptRouter) {
        for (p, v) in [
            (0x21, 0xff),
            (0xa1, 0xff),
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xfa),
        ] {
            assert!(r.io_write(p, v, 0));
        }
    }

    #[test]
    fn pic_through_lint0_virtual_wire() {
        let mut r = InterruptRouter::new(2, 1_000_000_000);
        linux_pic_init(&mut r);
        r.pulse_irq(0);
        // LINT0 masked after reset: nothing reaches the CPU.
        assert!(!r.interrupt_pending(0));
        lapic_write(&mut r, 0, 0xf0, 0x1ff);
        lapic_write(&mut r, 0, 0x350, 0x700);
        assert!(r.interrupt_pending(0));
        assert!(!r.interrupt_pending(1));
        assert_eq!(r.acknowledge(1), None);
        assert_eq!(r.acknowledge(0), Some(0x30));
        assert!(!r.interrupt_pending(0));
        r.io_write(0x20, 0x20, 0);
        // The PIT drives IRQ0 from vCPU 0's tick.
        r.io_write(0x43, 0x34, 0);
        r.io_write(0x40, 0xa9, 0);
        r.io_write(0x40, 0x04, 0);
        let d = r.next_deadline_ns(0).unwrap();
        assert_eq!(r.next_deadline_ns(1), None);
        r.tick(0, d);
        assert_eq!(r.acknowledge(0), Some(0x30));
    }

    #[test]
    fn firmware_virtual_wire_before_linux_touches_the_apic() {
        let mut r = InterruptRouter::new(2, 1);
        r.setup_virtual_wire();
        linux_pic_init(&mut r);
        r.pulse_irq(0);
        assert!(r.interrupt_pending(0));
        assert!(!r.interrupt_pending(1));
        assert_eq!(r.acknowledge(0), Some(0x30));
    }

    #[test]
    fn isa_irq_through_ioapic() {
        let mut r = InterruptRouter::new(2, 1);
        for cpu in 0..2 {
            lapic_write(&mut r, cpu, 0xf0, 0x1ff);
        }
        // IRQ0 is on pin 2: vector 0x30 to APIC 1.
        ioapic_write(&mut r, 0x10 + 2 * 2, 0x30);
        ioapic_write(&mut r, 0x11 + 2 * 2, 1 << 24);
        // IRQ4 on pin 4: 0x34 to APIC 0.
        ioapic_write(&mut r, 0x10 + 2 * 4, 0x34);
        r.pulse_irq(0);
        assert!(!r.interrupt_pending(0));
        assert!(r.interrupt_pending(1));
        assert_eq!(r.acknowledge(1), Some(0x30));
        lapic_write(&mut r, 1, 0xb0, 0);
        r.pulse_irq(4);
        assert_eq!(r.acknowledge(0), Some(0x34));
        // Lines 16-23 reach the IOAPIC only.
        ioapic_write(&mut r, 0x10 + 2 * 20, 0x60);
        r.pulse_irq(20);
        assert!(r.lapic(0).unwrap().irr_bit(0x60));
        // Out-of-range lines are ignored.
        r.set_irq(24, true);
        r.set_irq(u32::MAX, true);
    }

    #[test]
    fn level_line_eoi_redelivers() {
        let mut r = InterruptRouter::new(1, 1);
        lapic_write(&mut r, 0, 0xf0, 0x1ff);
        ioapic_write(&mut r, 0x10 + 2 * 5, 0x8045);
        r.set_irq(5, true);
        assert_eq!(r.acknowledge(0), Some(0x45));
        assert!(!r.interrupt_pending(0));
        // EOI while the line is still high: delivered again.
        lapic_write(&mut r, 0, 0xb0, 0);
        assert_eq!(r.acknowledge(0), Some(0x45));
        r.set_irq(5, false);
        lapic_write(&mut r, 0, 0xb0, 0);
        assert!(!r.interrupt_pending(0));
        assert_eq!(r.ioapic.entry(5).unwrap() & (1 << 14), 0);
    }

    #[test]
    fn ipis() {
        let mut r = InterruptRouter::new(4, 1);
        for cpu in 0..4 {
            lapic_write(&mut r, cpu, 0xf0, 0x1ff);
            lapic_write(&mut r, cpu, 0xd0, (1 << cpu) << 24);
        }
        // Fixed, physical, to APIC 2.
        lapic_write(&mut r, 0, 0x310, 2 << 24);
        lapic_write(&mut r, 0, 0x300, 0x40);
        assert!(r.interrupt_pending(2));
        assert!(!r.interrupt_pending(1));
        // Logical flat to APICs 1 and 3.
        lapic_write(&mut r, 0, 0x310, 0x0a << 24);
        lapic_write(&mut r, 0, 0x300, 0x841);
        assert!(r.lapic(1).unwrap().irr_bit(0x41));
        assert!(r.lapic(3).unwrap().irr_bit(0x41));
        // Lowest priority to the same set: the first target only.
        lapic_write(&mut r, 0, 0x300, 0x942);
        assert!(r.lapic(1).unwrap().irr_bit(0x42));
        assert!(!r.lapic(3).unwrap().irr_bit(0x42));
        // INIT and SIPI to all but self.
        lapic_write(&mut r, 0, 0x300, 0xc4500);
        lapic_write(&mut r, 0, 0x300, 0xc4609);
        for cpu in 1..4 {
            assert!(r.events_pending(cpu));
            assert_eq!(
                r.take_events(cpu),
                VcpuEvents {
                    nmi: false,
                    init: true,
                    sipi: Some(9)
                }
            );
        }
        assert!(!r.events_pending(0));
        // NMI to self.
        lapic_write(&mut r, 0, 0x300, 0x40400);
        assert!(r.take_events(0).nmi);
        // Self IPI, fixed, all including self.
        lapic_write(&mut r, 0, 0x300, 0x80050);
        assert!(r.lapic(0).unwrap().irr_bit(0x50));
        // INIT left APIC 1 software-disabled: it takes no fixed interrupts.
        assert!(!r.lapic(1).unwrap().irr_bit(0x50));
    }

    #[test]
    fn tsc_deadline_and_msrs() {
        let mut r = InterruptRouter::new(1, 1_000_000_000);
        lapic_write(&mut r, 0, 0xf0, 0x1ff);
        lapic_write(&mut r, 0, 0x320, (2 << 17) | 0xec);
        assert!(InterruptRouter::handles_msr(0x6e0));
        assert!(InterruptRouter::handles_msr(0x830));
        assert!(!InterruptRouter::handles_msr(0x1b));
        assert!(r.wrmsr(0, 0x6e0, 5000, 100, 1000));
        assert_eq!(r.rdmsr(0, 0x6e0, 0), Some(5000));
        assert_eq!(r.next_deadline_ns(0), Some(4100));
        r.tick(0, 4100);
        assert_eq!(r.acknowledge(0), Some(0xec));
        // x2APIC MSRs #GP in xAPIC mode; bad cpus are refused.
        assert_eq!(r.rdmsr(0, 0x802, 0), None);
        assert!(!r.wrmsr(0, 0x808, 0, 0, 0));
        assert!(!r.wrmsr(9, 0x6e0, 0, 0, 0));
        assert_eq!(r.rdmsr(9, 0x6e0, 0), None);
    }

    #[test]
    fn claims_only_its_addresses_and_ports() {
        let mut r = InterruptRouter::new(1, 1);
        let mut b = [0u8; 4];
        assert!(r.mmio_read(0, LAPIC_BASE + 0x30, &mut b, 0));
        assert_eq!(u32::from_le_bytes(b), 0x50014);
        assert!(r.mmio_read(0, IOAPIC_BASE + 0x10, &mut b, 0));
        assert!(!r.mmio_read(0, LAPIC_BASE + 0x1000, &mut b, 0));
        assert!(!r.mmio_read(0, 0xd000_0000, &mut b, 0));
        assert!(!r.mmio_read(5, LAPIC_BASE, &mut b, 0));
        assert!(!r.mmio_write(5, LAPIC_BASE, &b, 0));
        assert_eq!(r.io_read(0x3f8, 0), None);
        assert!(!r.io_write(0x3f8, 0, 0));
        assert!(r.io_read(0x61, 0).is_some());
        assert_eq!(r.acknowledge(7), None);
        assert_eq!(r.take_events(7), VcpuEvents::default());
        r.tick(7, 0);
        r.set_task_priority(7, 3);
        r.set_task_priority(0, 3);
        assert_eq!(r.lapic(0).unwrap().cr8(), 3);
    }

    #[test]
    fn state_round_trip() {
        let mut r = InterruptRouter::new(2, 1);
        linux_pic_init(&mut r);
        lapic_write(&mut r, 1, 0xf0, 0x1ff);
        ioapic_write(&mut r, 0x10, 0x700);
        r.pulse_irq(0);
        let s = r.state();
        let r2 = InterruptRouter::from_state(s.clone());
        assert_eq!(r2.state(), s);
        let empty = InterruptRouter::from_state(RouterState {
            lapics: vec![],
            extint_pending: vec![true; 9],
            ..s
        });
        assert_eq!(empty.num_cpus(), 1);
    }

    #[test]
    fn halted_vcpu_wakes_on_ipi() {
        let irqs = Arc::new(Interrupts::new(InterruptRouter::new(2, 1)));
        for cpu in 0..2 {
            irqs.with(|r| lapic_write(r, cpu, 0xf0, 0x1ff));
        }
        let epoch = Instant::now();
        let t = {
            let irqs = irqs.clone();
            std::thread::spawn(move || {
                let now = move || epoch.elapsed().as_nanos() as u64;
                let started = Instant::now();
                while !irqs.interrupt_pending(1) {
                    irqs.halt(1, &now, Duration::from_secs(10), true);
                }
                (irqs.acknowledge(1), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        irqs.with(|r| {
            lapic_write(r, 0, 0x310, 1 << 24);
            lapic_write(r, 0, 0x300, 0x77);
        });
        let (v, waited) = t.join().unwrap();
        assert_eq!(v, Some(0x77));
        assert!(waited < Duration::from_secs(5));
    }

    #[test]
    fn halted_vcpu_wakes_at_its_timer() {
        let irqs = Interrupts::new(InterruptRouter::new(1, 1));
        let epoch = Instant::now();
        let now = move || epoch.elapsed().as_nanos() as u64;
        irqs.with(|r| {
            lapic_write(r, 0, 0xf0, 0x1ff);
            lapic_write(r, 0, 0x3e0, 0xb); // divide by 1: 1 count per ns
            lapic_write(r, 0, 0x320, 0x31);
            r.mmio_write(0, LAPIC_BASE + 0x380, &20_000_000u32.to_le_bytes(), now());
        });
        assert!(irqs.next_deadline_ns(0).is_some());
        let start = Instant::now();
        while !irqs.interrupt_pending(0) {
            irqs.halt(0, &now, Duration::from_secs(10), true);
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(19), "{waited:?}");
        assert!(waited < Duration::from_secs(5));
        assert_eq!(irqs.acknowledge(0), Some(0x31));
        // A kick that came first is not lost; a plain wait times out.
        irqs.kick(0);
        assert!(irqs.wait(0, None));
        assert!(!irqs.wait(0, Some(Duration::from_millis(1))));
    }

    #[test]
    fn device_thread_raises_line() {
        let irqs = Arc::new(Interrupts::new(InterruptRouter::new(1, 1)));
        irqs.with(|r| {
            lapic_write(r, 0, 0xf0, 0x1ff);
            ioapic_write(r, 0x10 + 2 * 4, 0x34);
        });
        assert!(!irqs.interrupt_pending(0));
        let dev = {
            let irqs = irqs.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                irqs.pulse_irq(4);
            })
        };
        let now = || 0u64;
        while !irqs.interrupt_pending(0) {
            irqs.halt(0, &now, Duration::from_secs(10), true);
        }
        dev.join().unwrap();
        assert_eq!(irqs.acknowledge(0), Some(0x34));
        assert!(!irqs.interrupt_pending(0));
    }
}
