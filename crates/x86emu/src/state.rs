//! Architectural state of one x86-64 CPU, as plain serde data.
//!
//! The layout follows KVM's view (`kvm_regs`, `kvm_sregs`, `kvm_fpu`,
//! MSR list, `kvm_vcpu_events`) field for field, so that the kvm engine can
//! convert both ways without loss and a snapshot taken under one engine
//! loads under the other.

use serde::{Deserialize, Serialize};

/// General register numbers, in the order of the instruction encoding.
pub mod reg {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
}

/// RFLAGS bits.
pub mod flags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// Control register bits.
pub mod cr {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_EM: u64 = 1 << 2;
    pub const CR0_TS: u64 = 1 << 3;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_AM: u64 = 1 << 18;
    pub const CR0_NW: u64 = 1 << 29;
    pub const CR0_CD: u64 = 1 << 30;
    pub const CR0_PG: u64 = 1 << 31;

    pub const CR4_VME: u64 = 1 << 0;
    pub const CR4_PVI: u64 = 1 << 1;
    pub const CR4_TSD: u64 = 1 << 2;
    pub const CR4_DE: u64 = 1 << 3;
    pub const CR4_PSE: u64 = 1 << 4;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_MCE: u64 = 1 << 6;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const CR4_PCE: u64 = 1 << 8;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_UMIP: u64 = 1 << 11;
    pub const CR4_FSGSBASE: u64 = 1 << 16;
    pub const CR4_PCIDE: u64 = 1 << 17;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const CR4_SMEP: u64 = 1 << 20;
    pub const CR4_SMAP: u64 = 1 << 21;

    pub const EFER_SCE: u64 = 1 << 0;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
}

/// Segment register index, in encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

/// A segment register with its hidden part, as `kvm_segment`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B bit: default operand size 32 (code) or big stack (data).
    pub db: bool,
    /// S bit: code/data (true) or system (false).
    pub s: bool,
    /// L bit: 64-bit code segment.
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// A real-mode style segment: base = selector * 16, 64 KiB limit.
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            base: (selector as u64) << 4,
            limit: 0xffff,
            selector,
            type_: if code { 0xb } else { 0x3 },
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: false,
            g: false,
            avl: false,
            unusable: false,
        }
    }

    /// Decode a segment from the two 32-bit halves of a GDT/LDT descriptor.
    pub fn from_descriptor(selector: u16, raw: u64) -> Self {
        let lo = raw as u32;
        let hi = (raw >> 32) as u32;
        let base = ((lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000)) as u64;
        let mut limit = (lo & 0xffff) | (hi & 0x000f_0000);
        let g = hi & (1 << 23) != 0;
        if g {
            limit = (limit << 12) | 0xfff;
        }
        Segment {
            base,
            limit,
            selector,
            type_: ((hi >> 8) & 0xf) as u8,
            s: hi & (1 << 12) != 0,
            dpl: ((hi >> 13) & 3) as u8,
            present: hi & (1 << 15) != 0,
            avl: hi & (1 << 20) != 0,
            l: hi & (1 << 21) != 0,
            db: hi & (1 << 22) != 0,
            g,
            unusable: false,
        }
    }

    /// Whether this is a code segment (S=1, type bit 3 set).
    pub fn is_code(&self) -> bool {
        self.s && self.type_ & 8 != 0
    }
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// x87, MMX and SSE state in the FXSAVE image's terms (as `kvm_fpu`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0..ST7 as 80-bit values in the low 10 bytes, *physical* register
    /// order (R0..R7); MMX registers alias the low 8 bytes.
    pub regs: [[u8; 10]; 8],
    pub fcw: u16,
    /// Status word; TOP lives in bits 11..13.
    pub fsw: u16,
    /// Full 16-bit tag word (2 bits per register, 11 = empty).
    pub ftw: u16,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
}

impl Default for FpuState {
    fn default() -> Self {
        // Power-on state as after FNINIT, MXCSR at its reset value.
        FpuState {
            regs: [[0; 10]; 8],
            fcw: 0x037f,
            fsw: 0,
            ftw: 0xffff,
            last_opcode: 0,
            last_ip: 0,
            last_dp: 0,
            xmm: [0; 16],
            mxcsr: 0x1f80,
        }
    }
}

impl FpuState {
    /// Tag of one 80-bit register value: 0 valid, 1 zero, 2 special.
    fn classify(reg: &[u8; 10]) -> u16 {
        let exp = u16::from_le_bytes([reg[8], reg[9]]) & 0x7fff;
        let mant = u64::from_le_bytes(reg[..8].try_into().unwrap_or([0; 8]));
        if exp == 0 {
            if mant == 0 {
                1
            } else {
                2
            }
        } else if exp == 0x7fff || mant >> 63 == 0 {
            2
        } else {
            0
        }
    }

    /// The abridged (one bit per register, 1 = valid) tag byte of FXSAVE.
    pub fn abridged_tags(&self) -> u8 {
        (0..8).fold(0u8, |acc, i| {
            if (self.ftw >> (2 * i)) & 3 != 3 {
                acc | (1 << i)
            } else {
                acc
            }
        })
    }

    /// Rebuild the full tag word from an abridged tag byte and the values.
    pub fn set_abridged_tags(&mut self, tags: u8) {
        let mut ftw = 0u16;
        for i in 0..8 {
            let t = if tags & (1 << i) == 0 {
                3
            } else {
                Self::classify(&self.regs[i])
            };
            ftw |= t << (2 * i);
        }
        self.ftw = ftw;
    }

    /// The 512-byte FXSAVE image (64-bit format: FIP/FDP as 64-bit).
    pub fn to_fxsave(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        b[4] = self.abridged_tags();
        b[6..8].copy_from_slice(&self.last_opcode.to_le_bytes());
        b[8..16].copy_from_slice(&self.last_ip.to_le_bytes());
        b[16..24].copy_from_slice(&self.last_dp.to_le_bytes());
        b[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK: all bits we support
                                                             // ST0..ST7 are stored in stack order, starting from TOP.
        let top = ((self.fsw >> 11) & 7) as usize;
        for i in 0..8 {
            let phys = (top + i) & 7;
            b[32 + i * 16..32 + i * 16 + 10].copy_from_slice(&self.regs[phys]);
        }
        for (i, x) in self.xmm.iter().enumerate() {
            b[160 + i * 16..176 + i * 16].copy_from_slice(&x.to_le_bytes());
        }
        b
    }

    /// Load from a 512-byte FXSAVE image. Returns `None` when MXCSR has
    /// reserved bits set (FXRSTOR raises #GP then).
    pub fn from_fxsave(b: &[u8; 512]) -> Option<Self> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let mxcsr = u32_at(24);
        if mxcsr & !0xffff != 0 {
            return None;
        }
        let mut f = FpuState {
            fcw: u16_at(0),
            fsw: u16_at(2),
            last_opcode: u16_at(6),
            last_ip: u64_at(8),
            last_dp: u64_at(16),
            mxcsr,
            ..Default::default()
        };
        let top = ((f.fsw >> 11) & 7) as usize;
        for i in 0..8 {
            let phys = (top + i) & 7;
            f.regs[phys].copy_from_slice(&b[32 + i * 16..32 + i * 16 + 10]);
        }
        for i in 0..16 {
            let mut x = [0u8; 16];
            x.copy_from_slice(&b[160 + i * 16..176 + i * 16]);
            f.xmm[i] = u128::from_le_bytes(x);
        }
        f.set_abridged_tags(b[4]);
        Some(f)
    }
}

/// MSRs the CPU itself implements. Others go to the bus.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrState {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_aux: u64,
    pub misc_enable: u64,
    /// Added to the bus's time base to give the guest's TSC.
    pub tsc_offset: i64,
    /// MTRRs and other MSRs that just hold values (index, value).
    pub other: Vec<(u32, u64)>,
}

/// Events that are pending or in progress, as `kvm_vcpu_events`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventState {
    /// An external interrupt injected by the VMM and not yet delivered.
    pub pending_interrupt: Option<u8>,
    pub nmi_pending: bool,
    /// NMIs are blocked until the next IRET.
    pub nmi_masked: bool,
    /// Interrupts are inhibited for one instruction (after STI or MOV SS).
    pub interrupt_shadow: bool,
    /// The CPU executed HLT and waits for an interrupt.
    pub halted: bool,
    /// Waiting for INIT/SIPI (an application processor before start-up).
    pub wait_for_sipi: bool,
}

/// The whole architectural state of one CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX..R15 in encoding order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (indexed by [`Seg`]).
    pub segs: [Segment; 6],
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// DR0..DR3.
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub xcr0: u64,
    pub msr: MsrState,
    pub fpu: FpuState,
    pub events: EventState,
}

impl Default for CpuState {
    fn default() -> Self {
        Self::reset()
    }
}

impl CpuState {
    /// The state after RESET/INIT: real mode at F000:FFF0.
    pub fn reset() -> Self {
        let mut cs = Segment::real_mode(0xf000, true);
        cs.base = 0xffff_0000;
        let data = Segment::real_mode(0, false);
        let ldtr = Segment {
            type_: 2,
            present: true,
            limit: 0xffff,
            ..Default::default()
        };
        let tr = Segment {
            type_: 11,
            present: true,
            limit: 0xffff,
            ..Default::default()
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: flags::FIXED1,
            segs: [data, cs, data, data, data, data],
            tr,
            ldtr,
            gdtr: DescriptorTable { base: 0, limit: 0xffff },
            idtr: DescriptorTable { base: 0, limit: 0xffff },
            cr0: cr::CR0_ET | cr::CR0_NW | cr::CR0_CD,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            apic_base: 0xfee0_0000 | (1 << 11),
            dr: [0; 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            xcr0: 1,
            msr: MsrState {
                pat: 0x0007_0406_0007_0406,
                misc_enable: 1,
                ..Default::default()
            },
            fpu: FpuState::default(),
            events: EventState::default(),
        }
    }

    /// A flat 64-bit long-mode state with paging set up by the caller:
    /// the state Linux's 64-bit boot protocol expects apart from CR3 and RIP.
    pub fn long_mode_flat(cr3: u64) -> Self {
        let mut s = Self::reset();
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        let data = Segment {
            selector: 0x18,
            type_: 0x3,
            l: false,
            db: true,
            ..code
        };
        s.segs = [data, code, data, data, data, data];
        s.cr0 = cr::CR0_PE | cr::CR0_PG | cr::CR0_ET | cr::CR0_NE | cr::CR0_WP;
        s.cr4 = cr::CR4_PAE;
        s.cr3 = cr3;
        s.efer = cr::EFER_LME | cr::EFER_LMA | cr::EFER_SCE | cr::EFER_NXE;
        s.tr = Segment {
            type_: 11,
            present: true,
            limit: 0x67,
            ..Default::default()
        };
        s
    }

    pub fn seg(&self, s: Seg) -> &Segment {
        &self.segs[s as usize]
    }

    pub fn seg_mut(&mut self, s: Seg) -> &mut Segment {
        &mut self.segs[s as usize]
    }

    /// Long mode active (EFER.LMA).
    pub fn long_mode(&self) -> bool {
        self.efer & cr::EFER_LMA != 0
    }

    /// Executing 64-bit code (long mode with CS.L).
    pub fn in_64bit(&self) -> bool {
        self.long_mode() && self.segs[Seg::Cs as usize].l
    }

    pub fn protected_mode(&self) -> bool {
        self.cr0 & cr::CR0_PE != 0
    }

    pub fn paging(&self) -> bool {
        self.cr0 & cr::CR0_PG != 0
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        if !self.protected_mode() {
            0
        } else if self.rflags & flags::VM != 0 {
            3
        } else {
            self.segs[Seg::Cs as usize].dpl
        }
    }

    /// Code bitness: 16, 32 or 64.
    pub fn code_bits(&self) -> u32 {
        let cs = &self.segs[Seg::Cs as usize];
        if self.long_mode() && cs.l {
            64
        } else if self.protected_mode() && self.rflags & flags::VM == 0 && cs.db {
            32
        } else {
            16
        }
    }

    /// Stack address size in bits (SS.B in legacy modes).
    pub fn stack_bits(&self) -> u32 {
        if self.in_64bit() {
            64
        } else if self.segs[Seg::Ss as usize].db && self.protected_mode() {
            32
        } else {
            16
        }
    }

    /// FPU TOP field.
    pub fn fpu_top(&self) -> usize {
        ((self.fpu.fsw >> 11) & 7) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_decoding() {
        // Linux's __KERNEL_CS in 64-bit mode: 0x00af9b000000ffff.
        let s = Segment::from_descriptor(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert!(s.l && s.g && s.present && s.s && !s.db);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.dpl, 0);
        // A flat 32-bit user data segment: 0x00cff3000000ffff.
        let d = Segment::from_descriptor(0x2b, 0x00cf_f300_0000_ffff);
        assert_eq!(d.dpl, 3);
        assert!(d.db && !d.is_code());
    }

    #[test]
    fn reset_state_is_real_mode() {
        let s = CpuState::reset();
        assert_eq!(s.code_bits(), 16);
        assert_eq!(s.seg(Seg::Cs).base + s.rip, 0xffff_fff0);
        assert_eq!(s.cpl(), 0);
    }

    #[test]
    fn fxsave_image_round_trip() {
        let mut f = FpuState {
            fsw: 5 << 11, // TOP = 5
            ..Default::default()
        };
        f.regs[5] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f]; // 1.0 in ST0
        f.regs[6] = [0; 10]; // +0.0 in ST1
        f.ftw = 0xc3ff | (1 << 12); // R5 valid, R6 zero, the rest empty
        f.xmm[3] = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        let img = f.to_fxsave();
        assert_eq!(img[4], 0b0110_0000);
        assert_eq!(&img[32..42], &f.regs[5]);
        let back = FpuState::from_fxsave(&img).unwrap();
        assert_eq!(back, f);
        let mut bad = img;
        bad[27] = 1;
        assert!(FpuState::from_fxsave(&bad).is_none());
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut s = CpuState::long_mode_flat(0x1000);
        s.gpr[3] = 0xdead_beef;
        s.fpu.xmm[7] = u128::MAX - 5;
        s.msr.other.push((0x277, 42));
        s.events.pending_interrupt = Some(0x30);
        let text = serde_json::to_string(&s).unwrap();
        let back: CpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }
}
