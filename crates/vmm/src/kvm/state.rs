//! x86emu's [`CpuState`] to and from KVM's vCPU structures.
//!
//! `CpuState` already follows KVM's layout field for field, so the mapping is
//! mostly a copy. Two places need care:
//! - the x87 registers: `CpuState` keeps them in physical order (R0..R7),
//!   `kvm_fpu` in stack order (ST0..ST7) as FXSAVE does, with an abridged
//!   tag byte;
//! - the TSC: `CpuState` holds an offset from the machine's time base, KVM
//!   the guest's TSC value, so the conversion takes that time base.

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    kvm_xcr, kvm_xcrs, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW, KVM_X86_SHADOW_INT_MOV_SS, KVM_X86_SHADOW_INT_STI,
};
use x86emu::state::{CpuState, DescriptorTable, EventState, FpuState, MsrState, Segment};

/// MSR numbers `CpuState` names.
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// Everything KVM holds for one vCPU that `CpuState` describes.
#[derive(Clone, Debug, Default)]
pub struct KvmVcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub debugregs: kvm_debugregs,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

// GPRs in encoding order, as kvm_regs names them.
macro_rules! gprs {
    ($m:ident) => {
        $m!(0 rax, 1 rcx, 2 rdx, 3 rbx, 4 rsp, 5 rbp, 6 rsi, 7 rdi, 8 r8, 9 r9, 10 r10, 11 r11, 12 r12, 13 r13, 14 r14,
            15 r15)
    };
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: s.unusable as u8,
        padding: 0,
    }
}

fn seg_from_kvm(k: &kvm_segment) -> Segment {
    Segment {
        base: k.base,
        limit: k.limit,
        selector: k.selector,
        type_: k.type_ & 0xf,
        present: k.present != 0,
        dpl: k.dpl & 3,
        db: k.db != 0,
        s: k.s != 0,
        l: k.l != 0,
        g: k.g != 0,
        avl: k.avl != 0,
        unusable: k.unusable != 0,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    let top = ((f.fsw >> 11) & 7) as usize;
    let mut k = kvm_fpu {
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.abridged_tags(),
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        mxcsr: f.mxcsr,
        ..Default::default()
    };
    for i in 0..8 {
        k.fpr[i][..10].copy_from_slice(&f.regs[(top + i) & 7]);
    }
    for (dst, x) in k.xmm.iter_mut().zip(f.xmm.iter()) {
        *dst = x.to_le_bytes();
    }
    k
}

fn fpu_from_kvm(k: &kvm_fpu) -> FpuState {
    let top = ((k.fsw >> 11) & 7) as usize;
    let mut f = FpuState {
        fcw: k.fcw,
        fsw: k.fsw,
        last_opcode: k.last_opcode,
        last_ip: k.last_ip,
        last_dp: k.last_dp,
        mxcsr: k.mxcsr,
        ..Default::default()
    };
    for i in 0..8 {
        f.regs[(top + i) & 7].copy_from_slice(&k.fpr[i][..10]);
    }
    for (dst, x) in f.xmm.iter_mut().zip(k.xmm.iter()) {
        *dst = u128::from_le_bytes(*x);
    }
    f.set_abridged_tags(k.ftwx);
    f
}

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSR list for `s`; `time_base` is the machine's TSC time base.
fn msrs_to_kvm(m: &MsrState, time_base: u64) -> Vec<kvm_msr_entry> {
    let mut v = vec![
        entry(msr::SYSENTER_CS, m.sysenter_cs),
        entry(msr::SYSENTER_ESP, m.sysenter_esp),
        entry(msr::SYSENTER_EIP, m.sysenter_eip),
        entry(msr::STAR, m.star),
        entry(msr::LSTAR, m.lstar),
        entry(msr::CSTAR, m.cstar),
        entry(msr::SFMASK, m.sfmask),
        entry(msr::KERNEL_GS_BASE, m.kernel_gs_base),
        entry(msr::PAT, m.pat),
        entry(msr::TSC_AUX, m.tsc_aux),
        entry(msr::MISC_ENABLE, m.misc_enable),
        entry(msr::TSC, time_base.wrapping_add(m.tsc_offset as u64)),
    ];
    v.extend(m.other.iter().map(|&(i, d)| entry(i, d)));
    v
}

fn msrs_from_kvm(entries: &[kvm_msr_entry], time_base: u64) -> MsrState {
    let mut m = MsrState::default();
    for e in entries {
        let d = e.data;
        match e.index {
            msr::SYSENTER_CS => m.sysenter_cs = d,
            msr::SYSENTER_ESP => m.sysenter_esp = d,
            msr::SYSENTER_EIP => m.sysenter_eip = d,
            msr::STAR => m.star = d,
            msr::LSTAR => m.lstar = d,
            msr::CSTAR => m.cstar = d,
            msr::SFMASK => m.sfmask = d,
            msr::KERNEL_GS_BASE => m.kernel_gs_base = d,
            msr::PAT => m.pat = d,
            msr::TSC_AUX => m.tsc_aux = d,
            msr::MISC_ENABLE => m.misc_enable = d,
            msr::TSC => m.tsc_offset = d.wrapping_sub(time_base) as i64,
            i => m.other.push((i, d)),
        }
    }
    m
}

/// The MSR indices to read back from KVM for a `CpuState`: the named ones
/// plus `extra` (the ones the guest's state keeps in `other`).
pub fn msr_indices(extra: &[u32]) -> Vec<u32> {
    let mut v = msrs_to_kvm(&MsrState::default(), 0)
        .iter()
        .map(|e| e.index)
        .collect::<Vec<_>>();
    v.extend_from_slice(extra);
    v
}

fn events_to_kvm(e: &EventState) -> (kvm_vcpu_events, kvm_mp_state) {
    let mut k = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    if let Some(v) = e.pending_interrupt {
        k.interrupt.injected = 1;
        k.interrupt.nr = v;
    }
    if e.interrupt_shadow {
        k.interrupt.shadow = KVM_X86_SHADOW_INT_STI as u8;
    }
    k.nmi.pending = e.nmi_pending as u8;
    k.nmi.masked = e.nmi_masked as u8;
    let mp_state = if e.wait_for_sipi {
        KVM_MP_STATE_INIT_RECEIVED
    } else if e.halted {
        KVM_MP_STATE_HALTED
    } else {
        KVM_MP_STATE_RUNNABLE
    };
    (k, kvm_mp_state { mp_state })
}

fn events_from_kvm(k: &kvm_vcpu_events, mp: &kvm_mp_state) -> EventState {
    EventState {
        pending_interrupt: (k.interrupt.injected != 0).then_some(k.interrupt.nr),
        nmi_pending: k.nmi.pending != 0 || k.nmi.injected != 0,
        nmi_masked: k.nmi.masked != 0,
        interrupt_shadow: k.interrupt.shadow as u32 & (KVM_X86_SHADOW_INT_STI | KVM_X86_SHADOW_INT_MOV_SS) != 0,
        halted: mp.mp_state == KVM_MP_STATE_HALTED,
        wait_for_sipi: mp.mp_state == KVM_MP_STATE_INIT_RECEIVED,
    }
}

/// `s` in KVM's terms. `time_base` is the machine's TSC time base now.
pub fn to_kvm(s: &CpuState, time_base: u64) -> KvmVcpuState {
    let mut regs = kvm_regs {
        rip: s.rip,
        rflags: s.rflags,
        ..Default::default()
    };
    macro_rules! put {
        ($($i:literal $n:ident),*) => { $( regs.$n = s.gpr[$i]; )* };
    }
    gprs!(put);
    let sregs = kvm_sregs {
        es: seg_to_kvm(&s.segs[0]),
        cs: seg_to_kvm(&s.segs[1]),
        ss: seg_to_kvm(&s.segs[2]),
        ds: seg_to_kvm(&s.segs[3]),
        fs: seg_to_kvm(&s.segs[4]),
        gs: seg_to_kvm(&s.segs[5]),
        tr: seg_to_kvm(&s.tr),
        ldt: seg_to_kvm(&s.ldtr),
        gdt: dt_to_kvm(&s.gdtr),
        idt: dt_to_kvm(&s.idtr),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    };
    let debugregs = kvm_debugregs {
        db: s.dr,
        dr6: s.dr6,
        dr7: s.dr7,
        ..Default::default()
    };
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: 0,
        reserved: 0,
        value: s.xcr0,
    };
    let (events, mp_state) = events_to_kvm(&s.events);
    KvmVcpuState {
        regs,
        sregs,
        fpu: fpu_to_kvm(&s.fpu),
        debugregs,
        xcrs,
        msrs: msrs_to_kvm(&s.msr, time_base),
        events,
        mp_state,
    }
}

/// KVM's vCPU state as a `CpuState`. `time_base` is the machine's TSC time
/// base at the moment the state was read.
pub fn from_kvm(k: &KvmVcpuState, time_base: u64) -> CpuState {
    let r = &k.regs;
    let mut gpr = [0u64; 16];
    macro_rules! get {
        ($($i:literal $n:ident),*) => { $( gpr[$i] = r.$n; )* };
    }
    gprs!(get);
    let sr = &k.sregs;
    let xcr0 = k.xcrs.xcrs[..(k.xcrs.nr_xcrs as usize).min(16)]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value);
    CpuState {
        gpr,
        rip: r.rip,
        rflags: r.rflags,
        segs: [sr.es, sr.cs, sr.ss, sr.ds, sr.fs, sr.gs].map(|s| seg_from_kvm(&s)),
        tr: seg_from_kvm(&sr.tr),
        ldtr: seg_from_kvm(&sr.ldt),
        gdtr: dt_from_kvm(&sr.gdt),
        idtr: dt_from_kvm(&sr.idt),
        cr0: sr.cr0,
        cr2: sr.cr2,
        cr3: sr.cr3,
        cr4: sr.cr4,
        cr8: sr.cr8,
        efer: sr.efer,
        apic_base: sr.apic_base,
        dr: k.debugregs.db,
        dr6: k.debugregs.dr6,
        dr7: k.debugregs.dr7,
        xcr0,
        msr: msrs_from_kvm(&k.msrs, time_base),
        fpu: fpu_from_kvm(&k.fpu),
        events: events_from_kvm(&k.events, &k.mp_state),
    }
}

#[cfg(test)]
mod tests {
    use x86emu::state::reg;

    use super::*;

    fn busy_state() -> CpuState {
        let mut s = CpuState::long_mode_flat(0x9000);
        for (i, g) in s.gpr.iter_mut().enumerate() {
            *g = 0x1111_1111_1111_1111u64.wrapping_mul(i as u64 + 1) ^ 0xdead;
        }
        s.rip = 0xffff_ffff_8100_0000;
        s.rflags = 0x246;
        s.segs[4].base = 0x7fff_1234_0000;
        s.segs[5].base = 0xffff_8880_0000_0000;
        s.gdtr = DescriptorTable { base: 0x500, limit: 31 };
        s.idtr = DescriptorTable {
            base: 0xffff_fe00_0000_0000,
            limit: 0xfff,
        };
        s.cr2 = 0x4000_1000;
        s.cr8 = 3;
        s.apic_base = 0xfee0_0900;
        s.dr = [1, 2, 3, 4];
        s.dr6 = 0xffff_4ff0;
        s.dr7 = 0x401;
        s.xcr0 = 7;
        s.msr.lstar = 0xffff_ffff_8180_0000;
        s.msr.star = 0x0023_0010_0000_0000;
        s.msr.sfmask = 0x4_7700;
        s.msr.kernel_gs_base = 0x1234;
        s.msr.tsc_aux = 1;
        s.msr.tsc_offset = -5000;
        s.msr.other = vec![(msr::MTRR_DEF_TYPE, 0x806), (0x4b56_4d01, 0x7f00_0001)];
        s.fpu.fsw = 6 << 11;
        s.fpu.regs[6] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f]; // ST0 = 1.0
        s.fpu.regs[7] = [0; 10]; // ST1 = +0.0
        s.fpu.ftw = 0x0fff | (1 << 14); // R6 valid, R7 zero, others empty
        s.fpu.xmm[15] = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
        s.fpu.mxcsr = 0x1fa0;
        s.events.pending_interrupt = Some(0x30);
        s.events.nmi_masked = true;
        s.events.interrupt_shadow = true;
        s
    }

    #[test]
    fn cpu_state_round_trips_through_kvm() {
        for s in [CpuState::reset(), CpuState::long_mode_flat(0x9000), busy_state()] {
            let k = to_kvm(&s, 1_000_000);
            assert_eq!(from_kvm(&k, 1_000_000), s);
        }
        let mut halted = CpuState::reset();
        halted.events.halted = true;
        assert_eq!(from_kvm(&to_kvm(&halted, 0), 0), halted);
        let mut waiting = CpuState::reset();
        waiting.events.wait_for_sipi = true;
        assert_eq!(from_kvm(&to_kvm(&waiting, 0), 0), waiting);
    }

    #[test]
    fn kvm_layout_is_what_kvm_expects() {
        let s = busy_state();
        let k = to_kvm(&s, 1_000_000);
        assert_eq!(k.regs.rbx, s.gpr[reg::RBX]);
        assert_eq!(k.regs.rsp, s.gpr[reg::RSP]);
        assert_eq!(k.regs.r15, s.gpr[15]);
        assert_eq!(k.sregs.cs.l, 1);
        assert_eq!(k.sregs.fs.base, 0x7fff_1234_0000);
        // ST0 is physical register TOP = 6 and comes first, as in FXSAVE.
        assert_eq!(&k.fpu.fpr[0][..10], &s.fpu.regs[6]);
        assert_eq!(k.fpu.ftwx, 0b1100_0000);
        // The same bytes FXSAVE would hold.
        let fx = s.fpu.to_fxsave();
        assert_eq!(&fx[32..42], &k.fpu.fpr[0][..10]);
        assert_eq!(&fx[160 + 15 * 16..176 + 15 * 16], &k.fpu.xmm[15]);
        let tsc = k.msrs.iter().find(|e| e.index == msr::TSC).unwrap().data;
        assert_eq!(tsc, 1_000_000 - 5000);
        assert_eq!(k.events.interrupt.nr, 0x30);
        assert_eq!(k.events.interrupt.injected, 1);
    }

    #[test]
    fn kvm_state_round_trips_through_cpu_state() {
        // What KVM hands back (a state with a bit pattern CpuState does not
        // produce itself) survives the trip through CpuState.
        let mut k = to_kvm(&busy_state(), 77);
        k.sregs.tr.type_ = 11;
        k.events.interrupt.shadow = KVM_X86_SHADOW_INT_STI as u8;
        let back = to_kvm(&from_kvm(&k, 77), 77);
        assert_eq!(back.regs, k.regs);
        assert_eq!(back.sregs, k.sregs);
        assert_eq!(back.fpu, k.fpu);
        assert_eq!(back.debugregs, k.debugregs);
        assert_eq!(back.xcrs, k.xcrs);
        assert_eq!(back.msrs, k.msrs);
        assert_eq!(back.events, k.events);
        assert_eq!(back.mp_state, k.mp_state);
    }

    #[test]
    fn hostile_kvm_values_do_not_panic() {
        let mut k = KvmVcpuState::default();
        k.xcrs.nr_xcrs = u32::MAX;
        k.sregs.cs.type_ = 0xff;
        k.sregs.cs.dpl = 0xff;
        k.fpu.fsw = 0xffff;
        let s = from_kvm(&k, u64::MAX);
        assert_eq!(s.segs[1].dpl, 3);
    }
}
