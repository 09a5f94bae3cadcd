//! The in-kernel irqchip's state (LAPIC, PIC, IOAPIC, PIT) to and from the
//! emu models' state types, so that a snapshot holds one engine-neutral
//! [`crate::devices::irq::RouterState`] whichever engine ran the VM.
//!
//! Time: the emu models keep absolute times on the machine clock (`now_ns`,
//! ns since the machine started, going on across restores); KVM keeps
//! remaining counts (the LAPIC timer's current count) or host monotonic
//! times (the PIT's load time). Each conversion takes the machine clock at
//! the moment of the save or restore, and the PIT's also the host's
//! `CLOCK_MONOTONIC` then.
//!
//! What one model holds and the other cannot (documented in
//! docs/SNAPSHOTS.md): the LAPIC's ESR errors collected since the last ESR
//! write (KVM shows them at once), a latched NMI/INIT/SIPI in our LAPIC
//! (under KVM they are vCPU events, carried in `CpuState`); the PIC's
//! single mode (KVM has none); the PIT's "no count written since the
//! control word" and "gate triggered" flags (KVM counts from the last count
//! it was given), port 0x61's speaker bits, and the phase of a running
//! PIT counter, which KVM restarts on `KVM_SET_PIT2`.

use kvm_bindings::{
    kvm_ioapic_state, kvm_irqchip, kvm_lapic_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};

use crate::devices::ioapic::{IoapicState, IOAPIC_BASE, NUM_PINS};
use crate::devices::lapic::{LapicState, APIC_BUS_HZ};
use crate::devices::pic::{PicChipState, PicState};
use crate::devices::pit::{PitChannelState, PitState};

// xAPIC register offsets in the `kvm_lapic_state` page.
const APIC_ID: usize = 0x20;
const APIC_TPR: usize = 0x80;
const APIC_LDR: usize = 0xd0;
const APIC_DFR: usize = 0xe0;
const APIC_SVR: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_TMR: usize = 0x180;
const APIC_IRR: usize = 0x200;
const APIC_ESR: usize = 0x280;
const APIC_ICR_LOW: usize = 0x300;
const APIC_ICR_HIGH: usize = 0x310;
const APIC_LVT_FIRST: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;

const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

/// IA32_TSC_DEADLINE, which KVM keeps as an MSR rather than in the page.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

fn reg(page: &kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes([0, 1, 2, 3].map(|i| page.regs[off + i] as u8))
}

fn set_reg(page: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        page.regs[off + i] = b as std::os::raw::c_char;
    }
}

/// Nanoseconds per timer count for divide configuration `tdcr` (the timer
/// counts at [`APIC_BUS_HZ`] before the divider, in both models).
fn ns_per_count(tdcr: u32) -> u64 {
    let v = (tdcr & 3) | ((tdcr >> 1) & 4);
    (1_000_000_000 / APIC_BUS_HZ).max(1) << ((v + 1) & 7)
}

fn timer_mode(lvt_timer: u32) -> u32 {
    (lvt_timer >> 17) & 3
}

/// Our LAPIC written into `page` (a page read from KVM, so registers we do
/// not model, such as the version, keep KVM's values). `now_ns` is the
/// machine clock now: the timer's current count is taken then, and KVM
/// restarts the timer from it on `KVM_SET_LAPIC`. The TSC deadline goes to
/// KVM as the MSR [`MSR_TSC_DEADLINE`], not here.
pub fn lapic_to_kvm(s: &LapicState, now_ns: u64, page: &mut kvm_lapic_state) {
    set_reg(page, APIC_ID, s.id << 24);
    set_reg(page, APIC_TPR, u32::from(s.tpr));
    set_reg(page, APIC_LDR, s.ldr);
    set_reg(page, APIC_DFR, s.dfr | 0x0fff_ffff);
    set_reg(page, APIC_SVR, s.svr);
    for i in 0..8 {
        set_reg(page, APIC_ISR + 16 * i, s.isr[i]);
        set_reg(page, APIC_TMR + 16 * i, s.tmr[i]);
        set_reg(page, APIC_IRR + 16 * i, s.irr[i]);
    }
    set_reg(page, APIC_ESR, s.esr);
    set_reg(page, APIC_ICR_LOW, s.icr_low);
    set_reg(page, APIC_ICR_HIGH, s.icr_high);
    for (i, lvt) in s.lvt.iter().enumerate() {
        set_reg(page, APIC_LVT_FIRST + 16 * i, *lvt);
    }
    set_reg(page, APIC_TMICT, s.timer_initial);
    set_reg(page, APIC_TDCR, s.timer_divide);
    set_reg(page, APIC_TMCCT, timer_current(s, now_ns));
}

/// Our model's current count at `now_ns` (0 when disarmed or expired).
fn timer_current(s: &LapicState, now_ns: u64) -> u32 {
    let mode = timer_mode(s.lvt[0]);
    if s.timer_initial == 0 || mode == TIMER_TSC_DEADLINE || s.timer_expire_ns.is_none() {
        return 0;
    }
    let elapsed = now_ns.wrapping_sub(s.timer_start_ns) / ns_per_count(s.timer_divide);
    let initial = u64::from(s.timer_initial);
    if mode == TIMER_PERIODIC {
        (initial - elapsed % initial) as u32
    } else {
        initial.saturating_sub(elapsed) as u32
    }
}

/// What our LAPIC model needs besides KVM's register page.
#[derive(Clone, Copy, Debug)]
pub struct LapicExtras {
    /// IA32_APIC_BASE (the vCPU's `sregs.apic_base`).
    pub apic_base: u64,
    /// IA32_TSC_DEADLINE as KVM reported it.
    pub tsc_deadline: u64,
    /// The guest TSC's rate and value at `now_ns`.
    pub tsc_hz: u64,
    pub guest_tsc: u64,
}

/// KVM's LAPIC page as our model's state, at machine time `now_ns`.
pub fn lapic_from_kvm(page: &kvm_lapic_state, x: LapicExtras, now_ns: u64) -> LapicState {
    let lvt: [u32; 6] = std::array::from_fn(|i| reg(page, APIC_LVT_FIRST + 16 * i));
    let bits = |first: usize| -> [u32; 8] { std::array::from_fn(|i| reg(page, first + 16 * i)) };
    let timer_initial = reg(page, APIC_TMICT);
    let timer_divide = reg(page, APIC_TDCR) & 0xb;
    let current = u64::from(reg(page, APIC_TMCCT));
    let npc = ns_per_count(timer_divide);
    let mode = timer_mode(lvt[0]);
    let tsc_hz = x.tsc_hz.max(1);
    let (timer_start_ns, timer_expire_ns, tsc_deadline) = if mode == TIMER_TSC_DEADLINE {
        let expire = match x.tsc_deadline {
            0 => None,
            d if d <= x.guest_tsc => Some(now_ns),
            d => {
                let delta = u128::from(d - x.guest_tsc) * 1_000_000_000 / u128::from(tsc_hz);
                Some(now_ns.saturating_add(u64::try_from(delta).unwrap_or(u64::MAX)))
            }
        };
        (0, expire, x.tsc_deadline)
    } else if timer_initial == 0 || current == 0 {
        // Disarmed, or a one-shot count that ran out.
        (0, None, 0)
    } else {
        let current = current.min(u64::from(timer_initial));
        let consumed = (u64::from(timer_initial) - current).saturating_mul(npc);
        (
            now_ns.wrapping_sub(consumed),
            Some(now_ns.saturating_add(current.saturating_mul(npc))),
            0,
        )
    };
    LapicState {
        id: reg(page, APIC_ID) >> 24,
        apic_base: x.apic_base,
        tpr: reg(page, APIC_TPR) as u8,
        ldr: reg(page, APIC_LDR),
        dfr: reg(page, APIC_DFR) | 0x0fff_ffff,
        svr: reg(page, APIC_SVR) & 0x3ff,
        isr: bits(APIC_ISR),
        tmr: bits(APIC_TMR),
        irr: bits(APIC_IRR),
        esr: reg(page, APIC_ESR),
        esr_pending: 0,
        icr_low: reg(page, APIC_ICR_LOW),
        icr_high: reg(page, APIC_ICR_HIGH),
        lvt,
        timer_initial,
        timer_divide,
        timer_start_ns,
        timer_expire_ns,
        tsc_deadline,
        tsc_hz,
        nmi_pending: false,
        init_pending: false,
        sipi_vector: None,
    }
}

fn pic_chip_to_kvm(c: &PicChipState, elcr_mask: u8) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: c.lines,
        irr: c.irr,
        imr: c.imr,
        isr: c.isr,
        priority_add: c.priority_base & 7,
        irq_base: c.vector_base & 0xf8,
        read_reg_select: c.read_isr as u8,
        poll: c.poll as u8,
        special_mask: c.special_mask as u8,
        // Ours counts the ICW expected next (2..=4), KVM's from 1.
        init_state: c.init_step.saturating_sub(1).min(3),
        auto_eoi: c.auto_eoi as u8,
        rotate_on_auto_eoi: c.rotate_on_auto_eoi as u8,
        special_fully_nested_mode: c.special_fully_nested as u8,
        init4: c.needs_icw4 as u8,
        elcr: c.elcr & elcr_mask,
        elcr_mask,
    }
}

fn pic_chip_from_kvm(k: &kvm_pic_state) -> PicChipState {
    PicChipState {
        irr: k.irr,
        isr: k.isr,
        imr: k.imr,
        lines: k.last_irr,
        vector_base: k.irq_base & 0xf8,
        init_step: match k.init_state & 3 {
            0 => 0,
            s => s + 1,
        },
        needs_icw4: k.init4 != 0,
        single: false,
        auto_eoi: k.auto_eoi != 0,
        rotate_on_auto_eoi: k.rotate_on_auto_eoi != 0,
        special_fully_nested: k.special_fully_nested_mode != 0,
        special_mask: k.special_mask != 0,
        read_isr: k.read_reg_select != 0,
        poll: k.poll != 0,
        priority_base: k.priority_add & 7,
        elcr: k.elcr & k.elcr_mask,
    }
}

/// Edge/level control bits that exist on each chip (IRQs 0-2, 8 and 13
/// are always edge), as KVM and our model agree.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// Our PIC pair as the two `KVM_SET_IRQCHIP` arguments (master, slave).
pub fn pic_to_kvm(s: &PicState) -> [kvm_irqchip; 2] {
    [
        (KVM_IRQCHIP_PIC_MASTER, &s.master, ELCR_MASK[0]),
        (KVM_IRQCHIP_PIC_SLAVE, &s.slave, ELCR_MASK[1]),
    ]
    .map(|(chip_id, c, mask)| {
        let mut k = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        k.chip.pic = pic_chip_to_kvm(c, mask);
        k
    })
}

/// KVM's PIC pair (from `KVM_GET_IRQCHIP` of the master and the slave).
pub fn pic_from_kvm(master: &kvm_irqchip, slave: &kvm_irqchip) -> PicState {
    // SAFETY: the chips were read for KVM_IRQCHIP_PIC_MASTER/SLAVE, for
    // which KVM fills the `pic` member; it is plain bytes, any value valid.
    let (m, s) = unsafe { (master.chip.pic, slave.chip.pic) };
    PicState {
        master: pic_chip_from_kvm(&m),
        slave: pic_chip_from_kvm(&s),
    }
}

/// Our IOAPIC as the `KVM_SET_IRQCHIP` argument.
pub fn ioapic_to_kvm(s: &IoapicState) -> kvm_irqchip {
    let mut io = kvm_ioapic_state {
        base_address: IOAPIC_BASE,
        ioregsel: s.ioregsel,
        id: s.id >> 24,
        irr: s.lines,
        ..Default::default()
    };
    for (dst, &rte) in io.redirtbl.iter_mut().zip(s.redirtbl.iter()) {
        dst.bits = rte;
    }
    let mut k = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    k.chip.ioapic = io;
    k
}

/// KVM's IOAPIC (from `KVM_GET_IRQCHIP` of the IOAPIC).
pub fn ioapic_from_kvm(k: &kvm_irqchip) -> IoapicState {
    // SAFETY: read for KVM_IRQCHIP_IOAPIC, for which KVM fills the `ioapic`
    // member; it is plain integers, any value valid.
    let io = unsafe { k.chip.ioapic };
    let mut redirtbl = [0u64; NUM_PINS];
    for (dst, rte) in redirtbl.iter_mut().zip(io.redirtbl.iter()) {
        // SAFETY: `bits` spans the whole union, plain integer.
        *dst = unsafe { rte.bits };
    }
    IoapicState {
        id: (io.id & 0xff) << 24,
        ioregsel: io.ioregsel & 0xff,
        redirtbl,
        lines: io.irr & ((1 << NUM_PINS) - 1),
    }
}

// KVM's PIT read/write states.
const RW_STATE_LSB: u8 = 1;
const RW_STATE_MSB: u8 = 2;
const RW_STATE_WORD0: u8 = 3;
const RW_STATE_WORD1: u8 = 4;

fn rw_state(access: u8, msb_next: bool) -> u8 {
    match access {
        1 => RW_STATE_LSB,
        2 => RW_STATE_MSB,
        _ if msb_next => RW_STATE_WORD1,
        _ => RW_STATE_WORD0,
    }
}

/// Our PIT as `KVM_SET_PIT2`'s argument. `now_ns` is the machine clock and
/// `host_now_ns` the host's `CLOCK_MONOTONIC` (KVM's time base) now.
pub fn pit_to_kvm(s: &PitState, now_ns: u64, host_now_ns: i64) -> kvm_pit_state2 {
    let mut k = kvm_pit_state2::default();
    for (dst, c) in k.channels.iter_mut().zip(s.channels.iter()) {
        let since_load = now_ns.saturating_sub(c.load_ns).min(i64::MAX as u64) as i64;
        *dst = kvm_pit_channel_state {
            count: c.reload,
            latched_count: c.latched_count.unwrap_or(0),
            count_latched: if c.latched_count.is_some() {
                rw_state(c.access, c.read_msb)
            } else {
                0
            },
            status_latched: c.latched_status.is_some() as u8,
            status: c.latched_status.unwrap_or(0),
            read_state: rw_state(c.access, c.read_msb),
            write_state: rw_state(c.access, c.write_msb),
            write_latch: c.write_lsb,
            rw_mode: c.access,
            mode: c.mode,
            bcd: c.bcd as u8,
            gate: c.gate as u8,
            count_load_time: host_now_ns.saturating_sub(since_load),
        };
    }
    k
}

/// KVM's PIT as ours; the times as for [`pit_to_kvm`].
pub fn pit_from_kvm(k: &kvm_pit_state2, now_ns: u64, host_now_ns: i64) -> PitState {
    let channels: [PitChannelState; 3] = std::array::from_fn(|i| {
        let c = &k.channels[i];
        let access = match c.rw_mode {
            1 | 2 => c.rw_mode,
            _ => 3,
        };
        let since_load = host_now_ns.saturating_sub(c.count_load_time).max(0) as u64;
        let mut ch = PitChannelState {
            mode: match c.mode & 7 {
                m @ 0..=5 => m,
                m => m - 4,
            },
            access,
            bcd: c.bcd != 0,
            reload: match c.count {
                1..=0xffff => c.count,
                _ => 0x10000,
            },
            load_ns: now_ns.saturating_sub(since_load),
            // KVM counts from the last count given; gates trigger at once.
            loaded: true,
            triggered: matches!(c.mode & 7, 1 | 5),
            gate: c.gate != 0,
            read_msb: if c.count_latched != 0 {
                c.count_latched == RW_STATE_WORD1
            } else {
                c.read_state == RW_STATE_WORD1
            },
            write_msb: c.write_state == RW_STATE_WORD1,
            write_lsb: c.write_latch,
            latched_count: (c.count_latched != 0).then_some(c.latched_count),
            latched_status: (c.status_latched != 0).then_some(c.status),
            next_edge_ns: None,
        };
        ch.refresh_next_edge(now_ns);
        ch
    });
    let port_b = u8::from(channels[2].gate);
    PitState { channels, port_b }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::InterruptRouter;
    use crate::devices::pic::Pic;
    use crate::devices::pit::Pit;

    const TSC_HZ: u64 = 2_000_000_000;

    fn busy_lapic(now: u64) -> LapicState {
        let mut s = LapicState::reset(3, TSC_HZ);
        s.tpr = 0x20;
        s.ldr = 0x0800_0000;
        s.svr = 0x1ff;
        s.isr[1] = 1 << 3;
        s.tmr[2] = 1 << 7;
        s.irr[7] = 0x8000_0001;
        s.esr = 0x40;
        s.icr_low = 0x4_40ec;
        s.icr_high = 0x0200_0000;
        s.lvt = [0x2_00ec, 0x1_0000, 0x1_0000, 0x700, 0x400, 0xfe];
        // Periodic, divide by 16, 700 of 1000 counts gone.
        s.timer_initial = 1000;
        s.timer_divide = 3;
        let npc = ns_per_count(3);
        s.timer_start_ns = now - 700 * npc;
        s.timer_expire_ns = Some(s.timer_start_ns + 1000 * npc);
        s
    }

    fn extras(s: &LapicState) -> LapicExtras {
        LapicExtras {
            apic_base: s.apic_base,
            tsc_deadline: s.tsc_deadline,
            tsc_hz: s.tsc_hz,
            guest_tsc: 7_000_000,
        }
    }

    fn lapic_round_trip(s: &LapicState, now: u64) -> LapicState {
        let mut page = kvm_lapic_state::default();
        lapic_to_kvm(s, now, &mut page);
        lapic_from_kvm(&page, extras(s), now)
    }

    #[test]
    fn lapic_round_trips_through_kvm() {
        let now = 5_000_000_000;
        let fresh = LapicState::reset(0, TSC_HZ);
        assert_eq!(lapic_round_trip(&fresh, now), fresh);
        let busy = busy_lapic(now);
        assert_eq!(lapic_round_trip(&busy, now), busy);
        // One-shot, not run out.
        let mut oneshot = busy_lapic(now);
        oneshot.lvt[0] = 0xec;
        assert_eq!(lapic_round_trip(&oneshot, now), oneshot);
        // TSC deadline 1 ms after the guest TSC now.
        let mut deadline = busy_lapic(now);
        deadline.lvt[0] = 0x4_00ec;
        deadline.timer_initial = 0;
        deadline.timer_start_ns = 0;
        deadline.tsc_deadline = 7_000_000 + TSC_HZ / 1000;
        deadline.timer_expire_ns = Some(now + 1_000_000);
        assert_eq!(lapic_round_trip(&deadline, now), deadline);
    }

    #[test]
    fn lapic_page_is_laid_out_as_kvm_reads_it() {
        let now = 5_000_000_000;
        let s = busy_lapic(now);
        let mut page = kvm_lapic_state::default();
        lapic_to_kvm(&s, now, &mut page);
        assert_eq!(reg(&page, 0x20), 3 << 24);
        assert_eq!(reg(&page, 0x350), 0x700); // LINT0 ExtINT
        assert_eq!(reg(&page, 0x200 + 7 * 16), 0x8000_0001);
        assert_eq!(reg(&page, 0x390), 300); // current count
                                            // And the model reads its own registers the same.
        let lapic = crate::devices::lapic::Lapic::from_state(s);
        for off in [
            0x80, 0xd0, 0xe0, 0xf0, 0x100, 0x180, 0x200, 0x300, 0x320, 0x350, 0x380, 0x390, 0x3e0,
        ] {
            assert_eq!(reg(&page, off), lapic.read_reg(off as u32, now), "register {off:#x}");
        }
    }

    #[test]
    fn expired_oneshot_and_hostile_pages() {
        let now = 1_000_000;
        let mut s = busy_lapic(now);
        s.lvt[0] = 0xec;
        s.timer_expire_ns = None; // fired
        let back = lapic_round_trip(&s, now);
        assert_eq!(back.timer_expire_ns, None);
        let mut page = kvm_lapic_state::default();
        page.regs.fill(-1);
        let l = lapic_from_kvm(
            &page,
            LapicExtras {
                apic_base: 0,
                tsc_deadline: u64::MAX,
                tsc_hz: 0,
                guest_tsc: 0,
            },
            u64::MAX,
        );
        assert!(l.svr <= 0x3ff);
    }

    fn busy_pic() -> PicState {
        let mut p = Pic::new();
        // Linux's init: ICW1 edge+ICW4, ICW2 0x30/0x38, ICW3, ICW4 8086.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xfb),
            (0xa1, 0xff),
            (0x20, 0x0b), // OCW3: read ISR
            (0x4d0, 0x20),
        ] {
            if port == 0x4d0 {
                let mut s = p.state();
                s.master.elcr = v;
                p = Pic::from_state(s);
            } else {
                p.write(port, v);
            }
        }
        p.set_irq(1, true);
        let mut s = p.state();
        s.slave.init_step = 3; // mid-init: ICW3 next
        s.slave.priority_base = 5;
        s
    }

    #[test]
    fn pic_round_trips_through_kvm() {
        for s in [Pic::new().state(), busy_pic()] {
            let [m, sl] = pic_to_kvm(&s);
            assert_eq!(m.chip_id, KVM_IRQCHIP_PIC_MASTER);
            assert_eq!(sl.chip_id, KVM_IRQCHIP_PIC_SLAVE);
            assert_eq!(pic_from_kvm(&m, &sl), s);
        }
        let [m, _] = pic_to_kvm(&busy_pic());
        // SAFETY: written as `pic` just above.
        let k = unsafe { m.chip.pic };
        assert_eq!((k.irq_base, k.imr, k.read_reg_select, k.init4), (0x30, 0xfb, 1, 1));
    }

    #[test]
    fn ioapic_round_trips_through_kvm() {
        let mut router = InterruptRouter::new(2, TSC_HZ);
        router.setup_virtual_wire();
        let mut s = router.state().ioapic;
        s.redirtbl[4] = 0x0100_0000_0000_e034; // level, remote IRR, vector 0x34
        s.redirtbl[23] = 0xff00_0000_0001_0000;
        s.lines = 1 << 4;
        s.ioregsel = 0x18;
        let k = ioapic_to_kvm(&s);
        assert_eq!(k.chip_id, KVM_IRQCHIP_IOAPIC);
        // SAFETY: written as `ioapic` just above.
        let io = unsafe { k.chip.ioapic };
        assert_eq!(io.id, 2);
        assert_eq!(io.base_address, IOAPIC_BASE);
        assert_eq!(ioapic_from_kvm(&k), s);
    }

    fn busy_pit(now: u64) -> PitState {
        let mut p = Pit::new();
        let t0 = now - 3_000_000;
        // Channel 0: mode 2, 1193 (1 kHz), as Linux programs it.
        p.write(0x43, 0x34, t0);
        p.write(0x40, 0xa9, t0);
        p.write(0x40, 0x04, t0);
        // Channel 2: mode 0 LSB only, gate on, a latched count.
        p.write(0x61, 0x01, t0);
        p.write(0x43, 0x90, t0);
        p.write(0x42, 0x50, t0 + 1000);
        p.write(0x43, 0x80, now - 500);
        // Channel 1: word access, half written.
        p.write(0x43, 0x74, t0);
        p.write(0x41, 0x12, t0);
        p.write(0x41, 0x34, t0);
        p.write(0x41, 0x99, t0);
        p.state()
    }

    #[test]
    fn pit_round_trips_through_kvm() {
        let now = 9_000_000_000;
        let host = 123_456_789_000;
        let s = busy_pit(now);
        let k = pit_to_kvm(&s, now, host);
        assert_eq!(k.channels[0].count, 1193);
        assert_eq!(k.channels[0].mode, 2);
        assert_eq!(k.channels[0].count_load_time, host - 3_000_000);
        assert_eq!(k.channels[1].write_state, RW_STATE_WORD1);
        assert_eq!(k.channels[2].count_latched, RW_STATE_LSB);
        // When OUT next rises is derived state: the same, taken now.
        let mut expected = s.clone();
        for c in expected.channels.iter_mut() {
            c.refresh_next_edge(now);
        }
        assert_eq!(pit_from_kvm(&k, now, host), expected);
    }

    #[test]
    fn hostile_pit_and_ioapic_values_do_not_panic() {
        let mut k = kvm_pit_state2::default();
        for c in k.channels.iter_mut() {
            c.mode = 0xff;
            c.rw_mode = 0xff;
            c.count = u32::MAX;
            c.count_load_time = i64::MIN;
        }
        let s = pit_from_kvm(&k, 0, i64::MAX);
        assert!(s.channels.iter().all(|c| c.mode <= 5 && c.reload <= 0x10000));
        let mut io = kvm_irqchip::default();
        io.chip.ioapic = kvm_ioapic_state {
            id: u32::MAX,
            irr: u32::MAX,
            ioregsel: u32::MAX,
            ..Default::default()
        };
        let s = ioapic_from_kvm(&io);
        assert_eq!(s.lines, (1 << NUM_PINS) - 1);
    }
}
