//! Local APIC in xAPIC mode (Intel SDM vol. 3, chapter 11 "Advanced
//! Programmable Interrupt Controller").
//!
//! One per vCPU. The registers live at `LAPIC_BASE` (4 KiB, 16-byte aligned
//! 32-bit registers). Time is always a parameter (`now_ns`, nanoseconds on
//! the machine's monotonic clock) so the model is deterministic; the timer
//! counts at [`APIC_BUS_HZ`] (1 GHz like QEMU: one tick per nanosecond before
//! the divider).
//!
//! Outgoing messages (IPIs from ICR writes, EOI broadcasts for
//! level-triggered vectors) are returned to the caller as a [`WriteEffect`];
//! the interrupt router delivers them. NMI, INIT and SIPI received by this
//! APIC are latched in the state for the vCPU thread to take
//! ([`Lapic::take_nmi`], [`Lapic::take_init`], [`Lapic::take_sipi`]).
//!
//! x2APIC: the MSR interface (0x800-0x8ff) is implemented by
//! [`Lapic::x2apic_rdmsr`]/[`Lapic::x2apic_wrmsr`] but answers only when
//! x2APIC mode has been enabled via [`Lapic::set_apic_base`] (bit 10), which
//! a guest can only do if CPUID advertises x2APIC. We do not advertise it yet.

use serde::{Deserialize, Serialize};

/// Default guest-physical base of the xAPIC registers.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC register page.
pub const LAPIC_SIZE: u64 = 0x1000;
/// Rate of the APIC timer before the divider.
pub const APIC_BUS_HZ: u64 = x86emu::config::CRYSTAL_HZ as u64;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First and last MSR of the x2APIC register range.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
pub const X2APIC_MSR_LAST: u32 = 0x8ff;

/// Version register: version 0x14, max LVT entry 5 (six LVTs), no EOI
/// broadcast suppression.
pub const APIC_VERSION: u32 = 0x0005_0014;

// Register offsets.
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_RRD: u32 = 0xc0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
const REG_SELF_IPI: u32 = 0x3f0; // x2APIC only

/// Index into `LapicState::lvt`, in register order (0x320..0x370).
pub const LVT_TIMER: usize = 0;
pub const LVT_THERMAL: usize = 1;
pub const LVT_PERF: usize = 2;
pub const LVT_LINT0: usize = 3;
pub const LVT_LINT1: usize = 4;
pub const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;

const LVT_MASKED: u32 = 1 << 16;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_REMOTE_IRR: u32 = 1 << 14;
/// Writable bits of each LVT.
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff, // timer: vector, mask, mode (incl. TSC deadline)
    0x0001_07ff, // thermal: vector, delivery mode, mask
    0x0001_07ff, // perf
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
];

const SVR_ENABLE: u32 = 1 << 8;
/// Vector, enable, focus processor checking (bit 9, ignored).
const SVR_WRITABLE: u32 = 0x3ff;

// ESR bits.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

/// How an interrupt message is delivered (ICR / LVT / IOAPIC bits 8-10).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    /// Encoding 3 (reserved).
    Reserved,
}

impl DeliveryMode {
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// Who an interrupt message goes to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Physical destination mode: an APIC id (0xff = broadcast in xAPIC).
    Physical(u32),
    /// Logical destination mode: matched against each APIC's LDR/DFR.
    Logical(u32),
    /// Shorthand "self" (from ICR): the sending APIC only.
    SelfOnly(u32),
    /// Shorthand "all including self".
    All,
    /// Shorthand "all excluding self": every APIC but the sender.
    AllButSelf(u32),
}

/// An interrupt message between APICs (from an ICR write or the IOAPIC).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptMessage {
    pub dest: Destination,
    pub mode: DeliveryMode,
    pub vector: u8,
    /// Level-triggered (sets the TMR bit so EOI is broadcast).
    pub level: bool,
}

/// What an MMIO/MSR write asks the rest of the machine to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// Send this message to the matching local APICs.
    Ipi(InterruptMessage),
    /// EOI of a level-triggered vector: the IOAPICs clear remote IRR.
    EoiBroadcast(u8),
}

/// The whole architectural and timer state of one local APIC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LapicState {
    /// APIC id (bits 31:24 of the xAPIC ID register; full 32 bits in x2APIC).
    pub id: u32,
    /// IA32_APIC_BASE as last set by [`Lapic::set_apic_base`].
    pub apic_base: u64,
    pub tpr: u8,
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    /// ESR as last latched by a write to it (what reads return).
    pub esr: u32,
    /// Errors collected since the last latch.
    pub esr_pending: u32,
    pub icr_low: u32,
    pub icr_high: u32,
    /// Timer, thermal, perf, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    pub timer_initial: u32,
    pub timer_divide: u32,
    /// When the current count was (re)loaded with `timer_initial`.
    pub timer_start_ns: u64,
    /// When the timer next fires, if armed.
    pub timer_expire_ns: Option<u64>,
    /// IA32_TSC_DEADLINE (0 when disarmed or after it fired).
    pub tsc_deadline: u64,
    /// Guest TSC frequency, to turn a TSC deadline into a time.
    pub tsc_hz: u64,
    /// Latched incoming NMI / INIT / SIPI for the vCPU thread.
    pub nmi_pending: bool,
    pub init_pending: bool,
    pub sipi_vector: Option<u8>,
}

impl LapicState {
    /// The state after power-on/reset of the APIC with this id.
    pub fn reset(id: u32, tsc_hz: u64) -> Self {
        LapicState {
            id,
            apic_base: LAPIC_BASE | APIC_BASE_ENABLE | if id == 0 { 1 << 8 } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            timer_initial: 0,
            timer_divide: 0,
            timer_start_ns: 0,
            timer_expire_ns: None,
            tsc_deadline: 0,
            tsc_hz: tsc_hz.max(1),
            nmi_pending: false,
            init_pending: false,
            sipi_vector: None,
        }
    }
}

fn highest_bit(bits: &[u32; 8]) -> Option<u8> {
    for i in (0..8).rev() {
        if bits[i] != 0 {
            return Some((i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8);
        }
    }
    None
}

fn set_bit(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v >> 5)] |= 1 << (v & 31);
}

fn clear_bit(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v >> 5)] &= !(1 << (v & 31));
}

fn test_bit(bits: &[u32; 8], v: u8) -> bool {
    bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

/// One local APIC.
#[derive(Clone, Debug, PartialEq)]
pub struct Lapic {
    s: LapicState,
}

impl Lapic {
    pub fn new(id: u32, tsc_hz: u64) -> Self {
        Lapic {
            s: LapicState::reset(id, tsc_hz),
        }
    }

    pub fn state(&self) -> LapicState {
        self.s.clone()
    }

    pub fn from_state(state: LapicState) -> Self {
        let mut s = state;
        s.tsc_hz = s.tsc_hz.max(1);
        Lapic { s }
    }

    pub fn id(&self) -> u32 {
        self.s.id
    }

    /// Software enabled (SVR bit 8).
    pub fn software_enabled(&self) -> bool {
        self.s.svr & SVR_ENABLE != 0
    }

    /// Hardware enabled (IA32_APIC_BASE bit 11).
    pub fn hardware_enabled(&self) -> bool {
        self.s.apic_base & APIC_BASE_ENABLE != 0
    }

    pub fn x2apic_mode(&self) -> bool {
        self.s.apic_base & (APIC_BASE_ENABLE | APIC_BASE_X2APIC) == APIC_BASE_ENABLE | APIC_BASE_X2APIC
    }

    /// The guest wrote IA32_APIC_BASE (the CPU validates reserved bits).
    /// Enabling x2APIC mode turns on the MSR interface; hardware-disabling
    /// resets the APIC (SDM 11.4.3).
    pub fn set_apic_base(&mut self, value: u64) {
        let was_enabled = self.hardware_enabled();
        self.s.apic_base = value;
        if was_enabled && !self.hardware_enabled() {
            let keep = (self.s.id, self.s.apic_base, self.s.tsc_hz);
            self.s = LapicState::reset(keep.0, keep.2);
            self.s.apic_base = keep.1;
        }
        if self.x2apic_mode() {
            // x2APIC logical id is derived from the APIC id (SDM 11.12.10.2).
            self.s.ldr = ((self.s.id >> 4) << 16) | (1 << (self.s.id & 0xf));
        }
    }

    /// Where the xAPIC registers are mapped now (None if hardware-disabled
    /// or in x2APIC mode, when MMIO no longer reaches them).
    pub fn mmio_base(&self) -> Option<u64> {
        if self.hardware_enabled() && !self.x2apic_mode() {
            Some(self.s.apic_base & 0xf_ffff_f000)
        } else {
            None
        }
    }

    /// Priority class the CPU is running at.
    pub fn ppr(&self) -> u8 {
        let isrv = highest_bit(&self.s.isr).unwrap_or(0);
        if self.s.tpr >> 4 >= isrv >> 4 {
            self.s.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// CR8 as the CPU sees it.
    pub fn cr8(&self) -> u64 {
        u64::from(self.s.tpr >> 4)
    }

    /// The guest wrote CR8.
    pub fn set_cr8(&mut self, cr8: u64) {
        self.s.tpr = ((cr8 & 0xf) << 4) as u8;
    }

    /// A fixed interrupt above the current priority is waiting in the IRR.
    pub fn has_pending(&self) -> bool {
        if !self.hardware_enabled() || !self.software_enabled() {
            return false;
        }
        match highest_bit(&self.s.irr) {
            Some(v) => v & 0xf0 > self.ppr() & 0xf0,
            None => false,
        }
    }

    /// INTA: move the highest pending vector from IRR to ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if !self.has_pending() {
            return None;
        }
        let v = highest_bit(&self.s.irr)?;
        clear_bit(&mut self.s.irr, v);
        set_bit(&mut self.s.isr, v);
        Some(v)
    }

    /// Highest vector in service, if any.
    pub fn in_service(&self) -> Option<u8> {
        highest_bit(&self.s.isr)
    }

    /// Whether `vector` is requested (IRR bit set).
    pub fn irr_bit(&self, vector: u8) -> bool {
        test_bit(&self.s.irr, vector)
    }

    /// LINT0 is unmasked and programmed for ExtINT (virtual wire mode): the
    /// 8259 PIC's output reaches the CPU through it.
    pub fn accepts_extint(&self) -> bool {
        // A hardware-disabled APIC passes INTR straight through (as QEMU's
        // apic_accept_pic_intr). After reset LINT0 is masked: Linux programs
        // it (virtual wire) before it relies on PIC interrupts.
        if !self.hardware_enabled() {
            return true;
        }
        let l = self.s.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && DeliveryMode::from_bits(l >> 8) == DeliveryMode::ExtInt
    }

    fn record_error(&mut self, bit: u32) {
        self.s.esr_pending |= bit;
        let lvt = self.s.lvt[LVT_ERROR];
        let vector = (lvt & 0xff) as u8;
        if lvt & LVT_MASKED == 0 && vector >= 16 {
            set_bit(&mut self.s.irr, vector);
            clear_bit(&mut self.s.tmr, vector);
        }
    }

    /// Put a fixed interrupt in the IRR (from an IPI, the IOAPIC or an LVT).
    pub fn accept_fixed(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        set_bit(&mut self.s.irr, vector);
        if level {
            set_bit(&mut self.s.tmr, vector);
        } else {
            clear_bit(&mut self.s.tmr, vector);
        }
    }

    /// Receive an interrupt message addressed to this APIC.
    pub fn deliver(&mut self, mode: DeliveryMode, vector: u8, level: bool) {
        if !self.hardware_enabled() {
            return;
        }
        match mode {
            // A software-disabled APIC keeps what its IRR holds but takes no
            // new fixed interrupts (as KVM); NMI, INIT and SIPI still work.
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if self.software_enabled() {
                    self.accept_fixed(vector, level);
                }
            }
            DeliveryMode::Nmi => self.s.nmi_pending = true,
            DeliveryMode::Init => {
                // INIT resets the APIC except its id and base (SDM 11.4.7.3).
                let keep = (self.s.id, self.s.apic_base, self.s.tsc_hz);
                self.s = LapicState::reset(keep.0, keep.2);
                self.s.apic_base = keep.1;
                self.s.init_pending = true;
            }
            DeliveryMode::StartUp => self.s.sipi_vector = Some(vector),
            // SMI is not modelled; ExtINT is only meaningful on LINT0.
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    /// An edge on LINT0/LINT1 (`pin` 0 or 1) that the PIC/ExtINT path does
    /// not handle: NMI (LINT1 in virtual wire mode) or a fixed vector.
    pub fn lint_edge(&mut self, pin: usize) {
        let Some(&l) = self.s.lvt.get(LVT_LINT0 + pin.min(1)) else {
            return;
        };
        if l & LVT_MASKED != 0 || !self.hardware_enabled() {
            return;
        }
        match DeliveryMode::from_bits(l >> 8) {
            DeliveryMode::Nmi => self.s.nmi_pending = true,
            DeliveryMode::Fixed => self.accept_fixed((l & 0xff) as u8, l & LVT_LEVEL != 0),
            _ => {}
        }
    }

    /// What firmware does before booting Linux (SeaBIOS, and Firecracker's
    /// `set_lint`): LINT0 as ExtINT and LINT1 as NMI, both unmasked, so the
    /// PIC reaches the CPU (virtual wire mode) and Linux keeps ExtINT on
    /// the BSP until the IOAPIC takes over. SVR is left alone, as under
    /// KVM: LINT0 passes ExtINT even while the APIC is software-disabled.
    pub fn firmware_virtual_wire(&mut self) {
        self.s.lvt[LVT_LINT0] = 0x700;
        self.s.lvt[LVT_LINT1] = 0x400;
    }

    /// An NMI, INIT or SIPI waits for the vCPU thread.
    pub fn has_events(&self) -> bool {
        self.s.nmi_pending || self.s.init_pending || self.s.sipi_vector.is_some()
    }

    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.s.nmi_pending)
    }

    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.s.init_pending)
    }

    pub fn take_sipi(&mut self) -> Option<u8> {
        self.s.sipi_vector.take()
    }

    /// Does a message with this destination reach this APIC? (`Physical`
    /// and `Logical` only; shorthands are resolved by the router.)
    pub fn matches(&self, dest: Destination) -> bool {
        match dest {
            Destination::Physical(d) => {
                if self.x2apic_mode() {
                    d == 0xffff_ffff || d == self.s.id
                } else {
                    let d = d & 0xff;
                    d == 0xff || d == self.s.id & 0xff
                }
            }
            Destination::Logical(d) => {
                if self.x2apic_mode() {
                    if d == 0xffff_ffff {
                        return true;
                    }
                    (d >> 16) == (self.s.ldr >> 16) && (d & self.s.ldr & 0xffff) != 0
                } else {
                    let d = d & 0xff;
                    let ldr = self.s.ldr >> 24;
                    if self.s.dfr >> 28 == 0xf {
                        // Flat model.
                        d & ldr != 0
                    } else {
                        // Cluster model: high nibble cluster, low nibble mask.
                        if d == 0xff {
                            return true;
                        }
                        (d >> 4 == ldr >> 4 || d >> 4 == 0xf) && (d & ldr & 0xf) != 0
                    }
                }
            }
            Destination::SelfOnly(src) => src == self.s.id,
            Destination::All => true,
            Destination::AllButSelf(src) => src != self.s.id,
        }
    }

    // ---- timer ----

    fn timer_mode(&self) -> u32 {
        (self.s.lvt[LVT_TIMER] >> 17) & 3
    }

    fn divide_shift(&self) -> u32 {
        let d = self.s.timer_divide;
        let v = (d & 3) | ((d >> 1) & 4);
        (v + 1) & 7
    }

    /// Nanoseconds per timer count.
    fn ns_per_count(&self) -> u64 {
        (1_000_000_000 / APIC_BUS_HZ).max(1) << self.divide_shift()
    }

    /// Timer current-count register at `now_ns`.
    pub fn timer_current(&self, now_ns: u64) -> u32 {
        if self.s.timer_initial == 0 || self.timer_mode() == TIMER_TSC_DEADLINE {
            return 0;
        }
        // Wrapping: a divide change may put the start "before" time 0.
        let elapsed = now_ns.wrapping_sub(self.s.timer_start_ns) / self.ns_per_count();
        let initial = u64::from(self.s.timer_initial);
        match self.timer_mode() {
            TIMER_PERIODIC => (initial - elapsed % initial) as u32,
            _ => initial.saturating_sub(elapsed) as u32,
        }
    }

    fn timer_load(&mut self, initial: u32, now_ns: u64) {
        self.s.timer_initial = initial;
        self.s.timer_start_ns = now_ns;
        self.s.timer_expire_ns = if initial == 0 {
            None
        } else {
            Some(now_ns.saturating_add(u64::from(initial).saturating_mul(self.ns_per_count())))
        };
    }

    /// When the timer next fires (a halted vCPU sleeps until then).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.s.timer_expire_ns
    }

    /// Advance the timer to `now_ns`. Returns whether it fired (an
    /// interrupt may have been put in the IRR, unless the LVT is masked).
    pub fn tick(&mut self, now_ns: u64) -> bool {
        let Some(expire) = self.s.timer_expire_ns else {
            return false;
        };
        if now_ns < expire {
            return false;
        }
        let lvt = self.s.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_fixed((lvt & 0xff) as u8, false);
        }
        match self.timer_mode() {
            TIMER_PERIODIC if self.s.timer_initial != 0 => {
                // Skip the periods we missed: at most one interrupt per tick.
                let period = u64::from(self.s.timer_initial).saturating_mul(self.ns_per_count());
                let missed = (now_ns - expire) / period;
                self.s.timer_expire_ns = Some(expire.saturating_add(period.saturating_mul(missed.saturating_add(1))));
            }
            TIMER_TSC_DEADLINE => {
                self.s.tsc_deadline = 0;
                self.s.timer_expire_ns = None;
            }
            _ => self.s.timer_expire_ns = None,
        }
        true
    }

    /// The guest wrote IA32_TSC_DEADLINE. `guest_tsc` is the guest's TSC
    /// now. Ignored unless the timer is in TSC-deadline mode.
    pub fn write_tsc_deadline(&mut self, value: u64, now_ns: u64, guest_tsc: u64) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return;
        }
        self.s.tsc_deadline = value;
        self.s.timer_expire_ns = if value == 0 {
            None
        } else if value <= guest_tsc {
            Some(now_ns)
        } else {
            let delta = u128::from(value - guest_tsc) * 1_000_000_000 / u128::from(self.s.tsc_hz.max(1));
            Some(now_ns.saturating_add(u64::try_from(delta).unwrap_or(u64::MAX)))
        };
    }

    /// IA32_TSC_DEADLINE as read by the guest (0 outside TSC-deadline mode).
    pub fn read_tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.s.tsc_deadline
        } else {
            0
        }
    }

    // ---- registers ----

    /// Read the 32-bit register at `offset` (16-byte aligned).
    pub fn read_reg(&self, offset: u32, now_ns: u64) -> u32 {
        match offset {
            REG_ID => {
                if self.x2apic_mode() {
                    self.s.id
                } else {
                    self.s.id << 24
                }
            }
            REG_VERSION => APIC_VERSION,
            REG_TPR => u32::from(self.s.tpr),
            REG_APR => 0,
            REG_PPR => u32::from(self.ppr()),
            REG_LDR => self.s.ldr,
            REG_DFR => self.s.dfr | 0x0fff_ffff,
            REG_SVR => self.s.svr,
            0x100..=0x170 => self.s.isr[((offset - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.s.tmr[((offset - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.s.irr[((offset - REG_IRR) >> 4) as usize],
            REG_ESR => self.s.esr,
            REG_ICR_LOW => self.s.icr_low & !(1 << 12), // delivery is instantaneous: idle
            REG_ICR_HIGH => self.s.icr_high,
            0x320..=0x370 => self.s.lvt[((offset - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.s.timer_initial,
            REG_TIMER_CURRENT => self.timer_current(now_ns),
            REG_TIMER_DIVIDE => self.s.timer_divide,
            _ => 0,
        }
    }

    /// Write the 32-bit register at `offset` (16-byte aligned).
    pub fn write_reg(&mut self, offset: u32, value: u32, now_ns: u64) -> WriteEffect {
        match offset {
            REG_ID => {
                // Writable in xAPIC mode on most implementations; Linux
                // never changes it. Keep the 8-bit id.
                if !self.x2apic_mode() {
                    self.s.id = value >> 24;
                }
            }
            REG_TPR => self.s.tpr = value as u8,
            REG_EOI => return self.eoi(),
            REG_LDR => {
                if !self.x2apic_mode() {
                    self.s.ldr = value & 0xff00_0000;
                }
            }
            REG_DFR => {
                if !self.x2apic_mode() {
                    self.s.dfr = value | 0x0fff_ffff;
                }
            }
            REG_SVR => {
                self.s.svr = value & SVR_WRITABLE;
                if !self.software_enabled() {
                    for l in self.s.lvt.iter_mut() {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.s.esr = std::mem::take(&mut self.s.esr_pending);
            }
            REG_ICR_LOW => {
                self.s.icr_low = value & 0x000c_cfff;
                return self.send_ipi();
            }
            REG_ICR_HIGH => self.s.icr_high = value & 0xff00_0000,
            0x320..=0x370 => {
                let i = ((offset - REG_LVT_TIMER) >> 4) as usize;
                let mut v = (value & LVT_WRITABLE[i]) | (self.s.lvt[i] & LVT_REMOTE_IRR);
                if !self.software_enabled() {
                    v |= LVT_MASKED;
                }
                if i == LVT_TIMER {
                    let old_mode = self.timer_mode();
                    if (v >> 17) & 3 == 3 {
                        v &= !(1 << 18); // reserved mode: treat as one-shot/periodic
                    }
                    self.s.lvt[i] = v;
                    if self.timer_mode() != old_mode {
                        // A mode change disarms the timer (SDM 11.5.4.1).
                        self.s.timer_expire_ns = None;
                        self.s.timer_initial = 0;
                        self.s.tsc_deadline = 0;
                    }
                } else {
                    self.s.lvt[i] = v;
                }
            }
            REG_TIMER_INITIAL => {
                if self.timer_mode() != TIMER_TSC_DEADLINE {
                    self.timer_load(value, now_ns);
                }
            }
            REG_TIMER_DIVIDE => {
                // Keep the current count and continue at the new rate.
                let current = self.timer_current(now_ns);
                let initial = self.s.timer_initial;
                let periodic = self.timer_mode() == TIMER_PERIODIC;
                self.s.timer_divide = value & 0xb;
                if self.s.timer_expire_ns.is_some() && self.timer_mode() != TIMER_TSC_DEADLINE {
                    let per = self.ns_per_count();
                    // Pretend the count started so that `current` remains.
                    let consumed = u64::from(initial.wrapping_sub(current)).saturating_mul(per);
                    self.s.timer_start_ns = now_ns.wrapping_sub(consumed);
                    let left = u64::from(current).saturating_mul(per);
                    self.s.timer_expire_ns = Some(now_ns.saturating_add(left));
                    if !periodic && current == 0 {
                        self.s.timer_expire_ns = Some(now_ns);
                    }
                }
            }
            REG_SELF_IPI if self.x2apic_mode() => {
                return WriteEffect::Ipi(InterruptMessage {
                    dest: Destination::SelfOnly(self.s.id),
                    mode: DeliveryMode::Fixed,
                    vector: value as u8,
                    level: false,
                });
            }
            REG_VERSION | REG_APR | REG_PPR | REG_RRD | 0x100..=0x270 | REG_TIMER_CURRENT => {}
            _ => self.record_error(ESR_ILLEGAL_REGISTER),
        }
        WriteEffect::None
    }

    fn eoi(&mut self) -> WriteEffect {
        let Some(v) = highest_bit(&self.s.isr) else {
            return WriteEffect::None;
        };
        clear_bit(&mut self.s.isr, v);
        if test_bit(&self.s.tmr, v) {
            clear_bit(&mut self.s.tmr, v);
            return WriteEffect::EoiBroadcast(v);
        }
        WriteEffect::None
    }

    fn send_ipi(&mut self) -> WriteEffect {
        let low = self.s.icr_low;
        let vector = (low & 0xff) as u8;
        let mode = DeliveryMode::from_bits(low >> 8);
        let logical = low & (1 << 11) != 0;
        let assert = low & (1 << 14) != 0;
        let level = low & (1 << 15) != 0;
        let dest_field = if self.x2apic_mode() {
            self.s.icr_high
        } else {
            self.s.icr_high >> 24
        };
        if mode == DeliveryMode::Init && level && !assert {
            // INIT level de-assert: only synchronises arbitration ids.
            return WriteEffect::None;
        }
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.record_error(ESR_SEND_ILLEGAL_VECTOR);
            return WriteEffect::None;
        }
        let me = self.s.id;
        let dest = match (low >> 18) & 3 {
            0 if logical => Destination::Logical(dest_field),
            0 => Destination::Physical(dest_field),
            1 => Destination::SelfOnly(me),
            2 => Destination::All,
            _ => Destination::AllButSelf(me),
        };
        WriteEffect::Ipi(InterruptMessage {
            dest,
            mode,
            vector,
            level: level && matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority),
        })
    }

    /// MMIO read at `offset` within the APIC page (any size; registers are
    /// 32 bits wide at 16-byte strides).
    pub fn mmio_read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        let reg = (offset & 0xff0) as u32;
        let v = u64::from(self.read_reg(reg, now_ns)) >> ((offset & 3) * 8);
        // Bytes 4..15 of each 16-byte slot read as zero.
        let v = if offset & 0xc == 0 { v } else { 0 };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset` within the APIC page. Only aligned writes of
    /// at least 32 bits reach a register (others are dropped).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> WriteEffect {
        if offset & 0xf != 0 || data.len() < 4 {
            return WriteEffect::None;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg((offset & 0xff0) as u32, value, now_ns)
    }

    /// RDMSR in the x2APIC range. `None` (#GP) unless in x2APIC mode.
    pub fn x2apic_rdmsr(&self, index: u32, now_ns: u64) -> Option<u64> {
        if !self.x2apic_mode() || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&index) {
            return None;
        }
        let reg = (index - X2APIC_MSR_FIRST) << 4;
        match reg {
            REG_ICR_LOW => Some(u64::from(self.s.icr_low) | (u64::from(self.s.icr_high) << 32)),
            REG_DFR | REG_ICR_HIGH | REG_EOI | REG_SELF_IPI => None,
            REG_ID
            | REG_VERSION
            | REG_TPR
            | REG_PPR
            | REG_LDR
            | REG_SVR
            | REG_ESR
            | REG_TIMER_INITIAL
            | REG_TIMER_CURRENT
            | REG_TIMER_DIVIDE
            | 0x100..=0x270
            | 0x320..=0x370 => Some(u64::from(self.read_reg(reg, now_ns))),
            _ => None,
        }
    }

    /// WRMSR in the x2APIC range. `None` means #GP.
    pub fn x2apic_wrmsr(&mut self, index: u32, value: u64, now_ns: u64) -> Option<WriteEffect> {
        if !self.x2apic_mode() || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&index) {
            return None;
        }
        let reg = (index - X2APIC_MSR_FIRST) << 4;
        match reg {
            REG_ICR_LOW => {
                self.s.icr_high = (value >> 32) as u32;
                Some(self.write_reg(REG_ICR_LOW, value as u32, now_ns))
            }
            REG_TPR
            | REG_EOI
            | REG_SVR
            | REG_ESR
            | REG_TIMER_INITIAL
            | REG_TIMER_DIVIDE
            | REG_SELF_IPI
            | 0x320..=0x370 => Some(self.write_reg(reg, value as u32, now_ns)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(id: u32) -> Lapic {
        let mut l = Lapic::new(id, 2_000_000_000);
        l.write_reg(REG_SVR, 0x1ff, 0);
        l
    }

    #[test]
    fn reset_values() {
        let l = Lapic::new(3, 1);
        assert_eq!(l.read_reg(REG_ID, 0), 3 << 24);
        assert_eq!(l.read_reg(REG_VERSION, 0), 0x50014);
        assert_eq!(l.read_reg(REG_DFR, 0), 0xffff_ffff);
        assert_eq!(l.read_reg(REG_SVR, 0), 0xff);
        for i in 0..6u32 {
            assert_eq!(l.read_reg(0x320 + i * 16, 0), 0x10000);
        }
        assert!(!l.software_enabled());
        assert!(!l.accepts_extint());
    }

    #[test]
    fn irr_isr_priority_and_eoi() {
        let mut l = enabled(0);
        l.accept_fixed(0x31, false);
        l.accept_fixed(0x52, true);
        assert!(l.has_pending());
        assert_eq!(l.read_reg(REG_IRR + 0x10, 0), 1 << 0x11);
        assert_eq!(l.read_reg(REG_IRR + 0x20, 0), 1 << 0x12);
        assert_eq!(l.acknowledge(), Some(0x52));
        assert_eq!(l.ppr(), 0x50);
        // 0x31 is below the in-service class.
        assert!(!l.has_pending());
        assert_eq!(l.acknowledge(), None);
        // Level-triggered EOI is broadcast.
        assert_eq!(l.write_reg(REG_EOI, 0, 0), WriteEffect::EoiBroadcast(0x52));
        assert!(l.has_pending());
        assert_eq!(l.acknowledge(), Some(0x31));
        assert_eq!(l.write_reg(REG_EOI, 0, 0), WriteEffect::None);
        assert_eq!(l.write_reg(REG_EOI, 0, 0), WriteEffect::None);
        assert_eq!(l.ppr(), 0);
    }

    #[test]
    fn tpr_blocks_lower_classes() {
        let mut l = enabled(0);
        l.write_reg(REG_TPR, 0x40, 0);
        l.accept_fixed(0x45, false);
        assert!(!l.has_pending());
        l.accept_fixed(0x50, false);
        assert!(l.has_pending());
        assert_eq!(l.read_reg(REG_PPR, 0), 0x40);
        l.set_cr8(0);
        assert_eq!(l.read_reg(REG_TPR, 0), 0);
        l.set_cr8(0x1f);
        assert_eq!(l.cr8(), 0xf);
    }

    #[test]
    fn software_disabled_holds_interrupts_and_masks_lvts() {
        let mut l = Lapic::new(0, 1);
        l.accept_fixed(0x40, false);
        assert!(!l.has_pending());
        l.write_reg(REG_LVT_TIMER, 0x20, 0);
        assert_eq!(l.read_reg(REG_LVT_TIMER, 0) & LVT_MASKED, LVT_MASKED);
        l.write_reg(REG_SVR, 0x1ff, 0);
        assert!(l.has_pending());
        l.write_reg(REG_LVT_TIMER, 0x20, 0);
        assert_eq!(l.read_reg(REG_LVT_TIMER, 0), 0x20);
        l.write_reg(REG_SVR, 0xff, 0);
        assert_eq!(l.read_reg(REG_LVT_TIMER, 0), 0x10020);
    }

    #[test]
    fn illegal_vectors_and_esr() {
        let mut l = enabled(0);
        l.write_reg(0x370, 0xfe, 0);
        l.accept_fixed(3, false);
        assert_eq!(l.read_reg(REG_ESR, 0), 0);
        l.write_reg(REG_ESR, 0, 0);
        assert_eq!(l.read_reg(REG_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert!(l.irr_bit(0xfe));
        assert_eq!(l.write_reg(REG_ICR_LOW, 0x05, 0), WriteEffect::None);
        l.write_reg(REG_ESR, 0, 0);
        assert_eq!(l.read_reg(REG_ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
        l.write_reg(REG_ESR, 0, 0);
        assert_eq!(l.read_reg(REG_ESR, 0), 0);
    }

    #[test]
    fn ipi_encoding() {
        let mut l = enabled(1);
        l.write_reg(REG_ICR_HIGH, 2 << 24, 0);
        let e = l.write_reg(REG_ICR_LOW, 0x4030, 0);
        assert_eq!(
            e,
            WriteEffect::Ipi(InterruptMessage {
                dest: Destination::Physical(2),
                mode: DeliveryMode::Fixed,
                vector: 0x30,
                level: false
            })
        );
        // Delivery status always idle.
        assert_eq!(l.read_reg(REG_ICR_LOW, 0) & (1 << 12), 0);
        // INIT assert, logical.
        l.write_reg(REG_ICR_HIGH, 0x0f << 24, 0);
        match l.write_reg(REG_ICR_LOW, 0x4d00, 0) {
            WriteEffect::Ipi(m) => {
                assert_eq!(m.mode, DeliveryMode::Init);
                assert_eq!(m.dest, Destination::Logical(0x0f));
            }
            e => panic!("{e:?}"),
        }
        // INIT de-assert is a no-op.
        assert_eq!(l.write_reg(REG_ICR_LOW, 0x8500, 0), WriteEffect::None);
        // SIPI to all but self.
        match l.write_reg(REG_ICR_LOW, 0xc0608, 0) {
            WriteEffect::Ipi(m) => {
                assert_eq!(m.mode, DeliveryMode::StartUp);
                assert_eq!(m.vector, 0x08);
                assert_eq!(m.dest, Destination::AllButSelf(1));
            }
            e => panic!("{e:?}"),
        }
        // Self and all shorthands, NMI.
        match l.write_reg(REG_ICR_LOW, 0x40400, 0) {
            WriteEffect::Ipi(m) => {
                assert_eq!(m.mode, DeliveryMode::Nmi);
                assert_eq!(m.dest, Destination::SelfOnly(1));
            }
            e => panic!("{e:?}"),
        }
        match l.write_reg(REG_ICR_LOW, 0x80041, 0) {
            WriteEffect::Ipi(m) => assert_eq!(m.dest, Destination::All),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn destination_matching() {
        let mut l = enabled(2);
        assert!(l.matches(Destination::Physical(2)));
        assert!(l.matches(Destination::Physical(0xff)));
        assert!(!l.matches(Destination::Physical(3)));
        l.write_reg(REG_LDR, 0x04 << 24, 0);
        assert!(l.matches(Destination::Logical(0x04)));
        assert!(l.matches(Destination::Logical(0x0f)));
        assert!(!l.matches(Destination::Logical(0x03)));
        // Cluster model.
        l.write_reg(REG_DFR, 0x0fff_ffff, 0);
        l.write_reg(REG_LDR, 0x21 << 24, 0);
        assert!(l.matches(Destination::Logical(0x21)));
        assert!(l.matches(Destination::Logical(0x23)));
        assert!(!l.matches(Destination::Logical(0x11)));
        assert!(l.matches(Destination::Logical(0xf1)));
        assert!(l.matches(Destination::AllButSelf(1)));
        assert!(!l.matches(Destination::AllButSelf(2)));
        assert!(l.matches(Destination::SelfOnly(2)));
    }

    #[test]
    fn nmi_init_sipi_latch() {
        let mut l = enabled(1);
        l.write_reg(REG_TPR, 0x20, 0);
        l.deliver(DeliveryMode::Nmi, 0, false);
        assert!(l.has_events());
        assert!(l.take_nmi());
        assert!(!l.has_events());
        assert!(!l.take_nmi());
        l.deliver(DeliveryMode::Init, 0, false);
        assert!(l.take_init());
        // INIT reset the APIC but kept the id.
        assert_eq!(l.read_reg(REG_TPR, 0), 0);
        assert!(!l.software_enabled());
        assert_eq!(l.id(), 1);
        // Software-disabled after INIT: fixed messages are dropped.
        l.deliver(DeliveryMode::Fixed, 0x40, false);
        assert!(!l.irr_bit(0x40));
        l.deliver(DeliveryMode::StartUp, 0x9a, false);
        assert_eq!(l.take_sipi(), Some(0x9a));
        assert_eq!(l.take_sipi(), None);
    }

    #[test]
    fn firmware_virtual_wire_mode() {
        let mut l = Lapic::new(0, 1);
        l.firmware_virtual_wire();
        assert!(!l.software_enabled());
        assert!(l.accepts_extint());
        assert_eq!(l.read_reg(0x350, 0), 0x700);
        assert_eq!(l.read_reg(0x360, 0), 0x400);
        l.lint_edge(1);
        assert!(l.take_nmi());
    }

    #[test]
    fn lint_modes() {
        let mut l = enabled(0);
        l.write_reg(0x350, 0x700, 0); // LINT0 ExtINT unmasked
        l.write_reg(0x360, 0x400, 0); // LINT1 NMI
        assert!(l.accepts_extint());
        l.lint_edge(1);
        assert!(l.take_nmi());
        l.write_reg(0x350, 0x10700, 0);
        assert!(!l.accepts_extint());
        l.write_reg(0x350, 0x41, 0);
        l.lint_edge(0);
        assert!(l.irr_bit(0x41));
        l.lint_edge(7); // out of range pin: no panic
    }

    #[test]
    fn oneshot_timer() {
        let mut l = enabled(0);
        l.write_reg(REG_TIMER_DIVIDE, 0x3, 1000); // divide by 16
        l.write_reg(REG_LVT_TIMER, 0xec, 1000);
        l.write_reg(REG_TIMER_INITIAL, 100, 1000);
        assert_eq!(l.next_deadline_ns(), Some(1000 + 1600));
        assert_eq!(l.read_reg(REG_TIMER_CURRENT, 1000), 100);
        assert_eq!(l.read_reg(REG_TIMER_CURRENT, 1000 + 160), 90);
        assert!(!l.tick(2599));
        assert!(l.tick(2600));
        assert!(l.irr_bit(0xec));
        assert_eq!(l.next_deadline_ns(), None);
        assert_eq!(l.read_reg(REG_TIMER_CURRENT, 5000), 0);
        assert!(!l.tick(10_000));
        // Writing 0 stops it.
        l.write_reg(REG_TIMER_INITIAL, 5, 10_000);
        l.write_reg(REG_TIMER_INITIAL, 0, 10_001);
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn divide_values() {
        let mut l = enabled(0);
        for (d, div) in [
            (0b0000, 2),
            (0b0001, 4),
            (0b0010, 8),
            (0b0011, 16),
            (0b1000, 32),
            (0b1001, 64),
            (0b1010, 128),
            (0b1011, 1),
        ] {
            l.write_reg(REG_TIMER_DIVIDE, d, 0);
            l.write_reg(REG_TIMER_INITIAL, 10, 0);
            assert_eq!(l.next_deadline_ns(), Some(10 * div), "divide {d:#b}");
        }
        // Changing the divider keeps the current count.
        l.write_reg(REG_TIMER_DIVIDE, 0b1011, 0);
        l.write_reg(REG_TIMER_INITIAL, 100, 0);
        l.write_reg(REG_TIMER_DIVIDE, 0b0000, 40);
        assert_eq!(l.read_reg(REG_TIMER_CURRENT, 40), 60);
        assert_eq!(l.next_deadline_ns(), Some(40 + 120));
        assert_eq!(l.read_reg(REG_TIMER_CURRENT, 60), 50);
    }

    #[test]
    fn periodic_timer_skips_missed_periods() {
        let mut l = enabled(0);
        l.write_reg(REG_TIMER_DIVIDE, 0xb, 0); // by 1
        l.write_reg(REG_LVT_TIMER, (1 << 17) | 0x30, 0);
        l.write_reg(REG_TIMER_INITIAL, 1000, 0);
        assert_eq!(l.read_reg(REG_TIMER_CURRENT, 2500), 500);
        assert!(l.tick(1000));
        assert_eq!(l.next_deadline_ns(), Some(2000));
        assert_eq!(l.acknowledge(), Some(0x30));
        l.write_reg(REG_EOI, 0, 0);
        assert!(l.tick(5500));
        assert_eq!(l.next_deadline_ns(), Some(6000));
        assert_eq!(l.acknowledge(), Some(0x30));
        l.write_reg(REG_EOI, 0, 0);
        // Masked: still counts, no interrupt.
        l.write_reg(REG_LVT_TIMER, (1 << 17) | 0x30 | LVT_MASKED, 6000);
        assert!(l.tick(6000));
        assert!(!l.has_pending());
        assert_eq!(l.next_deadline_ns(), Some(7000));
    }

    #[test]
    fn hostile_timer_values() {
        for mode in [0u32, 1, 2, 3] {
            let mut l = enabled(0);
            l.write_reg(REG_LVT_TIMER, (mode << 17) | 0x40, 0);
            for (div, init, now) in [(0xa, u32::MAX, u64::MAX), (0xb, 1, u64::MAX - 1), (0xff, 7, 0)] {
                l.write_reg(REG_TIMER_DIVIDE, div, now);
                l.write_reg(REG_TIMER_INITIAL, init, now);
                l.write_reg(REG_TIMER_DIVIDE, div ^ 1, now);
                l.read_reg(REG_TIMER_CURRENT, 0);
                l.read_reg(REG_TIMER_CURRENT, u64::MAX);
                l.tick(u64::MAX);
                l.tick(0);
                l.write_tsc_deadline(u64::MAX, now, 0);
                l.write_tsc_deadline(1, now, u64::MAX);
                l.tick(u64::MAX);
            }
        }
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut l = enabled(0); // 2 GHz TSC
                                // Ignored outside TSC-deadline mode.
        l.write_tsc_deadline(1000, 0, 0);
        assert_eq!(l.read_tsc_deadline(), 0);
        assert_eq!(l.next_deadline_ns(), None);
        l.write_reg(REG_LVT_TIMER, (2 << 17) | 0xef, 0);
        // Initial count writes are ignored in this mode.
        l.write_reg(REG_TIMER_INITIAL, 10, 0);
        assert_eq!(l.next_deadline_ns(), None);
        l.write_tsc_deadline(10_000 + 2000, 500, 10_000);
        assert_eq!(l.read_tsc_deadline(), 12_000);
        assert_eq!(l.next_deadline_ns(), Some(1500));
        assert!(!l.tick(1499));
        assert!(l.tick(1500));
        assert!(l.irr_bit(0xef));
        assert_eq!(l.read_tsc_deadline(), 0);
        // A deadline in the past fires at once.
        l.write_tsc_deadline(5, 3000, 10_000);
        assert_eq!(l.next_deadline_ns(), Some(3000));
        // Disarm with 0.
        l.write_tsc_deadline(0, 3000, 10_000);
        assert_eq!(l.next_deadline_ns(), None);
        // Mode change disarms.
        l.write_tsc_deadline(u64::MAX, 0, 0);
        assert!(l.next_deadline_ns().is_some());
        l.write_reg(REG_LVT_TIMER, 0xef, 0);
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn mmio_access_sizes() {
        let mut l = enabled(5);
        let mut b4 = [0u8; 4];
        l.mmio_read(0x20, &mut b4, 0);
        assert_eq!(u32::from_le_bytes(b4), 5 << 24);
        let mut b1 = [0u8; 1];
        l.mmio_read(0x23, &mut b1, 0);
        assert_eq!(b1[0], 5);
        let mut b8 = [0u8; 8];
        l.mmio_read(0x30, &mut b8, 0);
        assert_eq!(u64::from_le_bytes(b8), 0x50014);
        l.mmio_write(0x80, &0x30u32.to_le_bytes(), 0);
        assert_eq!(l.read_reg(REG_TPR, 0), 0x30);
        // Unaligned or narrow writes are dropped.
        l.mmio_write(0x81, &0x50u32.to_le_bytes(), 0);
        l.mmio_write(0x80, &[0x50], 0);
        assert_eq!(l.read_reg(REG_TPR, 0), 0x30);
        // Every offset, every size: no panic.
        for off in 0..0x1000u64 {
            for n in [1usize, 2, 4, 8] {
                let mut d = vec![0u8; n];
                l.mmio_read(off, &mut d, 7);
                let _ = l.mmio_write(off, &[0xff; 8][..n], 7);
            }
        }
    }

    #[test]
    fn x2apic_hook() {
        let mut l = enabled(3);
        assert_eq!(l.x2apic_rdmsr(0x802, 0), None);
        assert!(l.x2apic_wrmsr(0x808, 0x20, 0).is_none());
        l.set_apic_base(LAPIC_BASE | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        assert_eq!(l.mmio_base(), None);
        assert_eq!(l.x2apic_rdmsr(0x802, 0), Some(3));
        assert_eq!(l.x2apic_rdmsr(0x80d, 0), Some(0x8));
        assert_eq!(l.x2apic_wrmsr(0x808, 0x20, 0), Some(WriteEffect::None));
        assert_eq!(l.read_reg(REG_TPR, 0), 0x20);
        match l.x2apic_wrmsr(0x830, (7u64 << 32) | 0x4031, 0) {
            Some(WriteEffect::Ipi(m)) => assert_eq!(m.dest, Destination::Physical(7)),
            e => panic!("{e:?}"),
        }
        match l.x2apic_wrmsr(0x83f, 0x44, 0) {
            Some(WriteEffect::Ipi(m)) => assert_eq!(m.dest, Destination::SelfOnly(3)),
            e => panic!("{e:?}"),
        }
        assert!(l.x2apic_wrmsr(0x80e, 0, 0).is_none()); // no DFR in x2APIC
    }

    #[test]
    fn hardware_disable_resets() {
        let mut l = enabled(2);
        l.write_reg(REG_TPR, 0x70, 0);
        l.set_apic_base(LAPIC_BASE);
        assert!(!l.hardware_enabled());
        assert_eq!(l.read_reg(REG_TPR, 0), 0);
        assert_eq!(l.id(), 2);
        l.deliver(DeliveryMode::Fixed, 0x40, false);
        assert!(!l.irr_bit(0x40));
    }

    #[test]
    fn state_round_trip() {
        let mut l = enabled(1);
        l.write_reg(REG_LVT_TIMER, (1 << 17) | 0x30, 0);
        l.write_reg(REG_TIMER_INITIAL, 1000, 0);
        l.accept_fixed(0x99, true);
        let s = l.state();
        let l2 = Lapic::from_state(s.clone());
        assert_eq!(l2, l);
        // Divide by 2 (the reset divide configuration).
        assert_eq!(l2.read_reg(REG_TIMER_CURRENT, 250), 875);
        assert_eq!(l2.state(), s);
    }
}
