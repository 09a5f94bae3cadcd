//! RDMSR and WRMSR: the MSRs the CPU holds in its state, and forwarding of
//! the others (local APIC, TSC deadline, paravirtual clocks) to the bus.
//!
//! The MSRs answered here are those Linux 6.1 touches on the CPU model we
//! offer (see shared/data/*.special.tsv). MSRs of features we do not
//! advertise (machine check banks, performance counters, AMD-specific
//! registers, SPEC_CTRL, XFD, ...) raise #GP unless the bus claims them:
//! Linux probes those with the `_safe` accessors.

use iced_x86::{Instruction, Register};

use super::control::write_efer;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::memory::is_canonical;
use crate::mmu::PHYS_ADDR_BITS;
use crate::state::reg;

pub const TSC: u32 = 0x10;
pub const PLATFORM_ID: u32 = 0x17;
pub const APIC_BASE: u32 = 0x1b;
pub const FEATURE_CONTROL: u32 = 0x3a;
pub const UCODE_REV: u32 = 0x8b;
pub const MTRRCAP: u32 = 0xfe;
pub const ARCH_CAPABILITIES: u32 = 0x10a;
pub const SYSENTER_CS: u32 = 0x174;
pub const SYSENTER_ESP: u32 = 0x175;
pub const SYSENTER_EIP: u32 = 0x176;
pub const MCG_CAP: u32 = 0x179;
pub const MCG_STATUS: u32 = 0x17a;
pub const MISC_ENABLE: u32 = 0x1a0;
pub const DEBUGCTL: u32 = 0x1d9;
pub const PAT: u32 = 0x277;
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;

/// MTRRcap: 8 variable ranges, fixed ranges, write-combining.
const MTRRCAP_VALUE: u64 = 0x508;

/// MSRs that only hold a value (kept in `msr.other`, reading 0 until written).
fn is_storage(index: u32) -> bool {
    matches!(
        index,
        FEATURE_CONTROL
            | UCODE_REV
            | MCG_STATUS
            | DEBUGCTL
            | MTRR_DEF_TYPE
            | 0x200..=0x20f // variable-range MTRR base/mask pairs
            | 0x250 // MTRRfix64K_00000
            | 0x258 | 0x259 // MTRRfix16K
            | 0x268..=0x26f // MTRRfix4K
    )
}

fn other(cpu: &Cpu, index: u32) -> u64 {
    cpu.state.msr.other.iter().find(|m| m.0 == index).map_or(0, |m| m.1)
}

fn set_other(cpu: &mut Cpu, index: u32, v: u64) {
    match cpu.state.msr.other.iter_mut().find(|m| m.0 == index) {
        Some(m) => m.1 = v,
        None => cpu.state.msr.other.push((index, v)),
    }
}

/// The guest's TSC now.
pub(crate) fn read_tsc(cpu: &mut Cpu, bus: &mut dyn Bus) -> u64 {
    bus.tsc(cpu.instret).wrapping_add(cpu.state.msr.tsc_offset as u64)
}

/// Read an MSR (`None` means #GP).
pub fn read_msr(cpu: &mut Cpu, bus: &mut dyn Bus, index: u32) -> Option<u64> {
    let m = &cpu.state.msr;
    Some(match index {
        TSC => read_tsc(cpu, bus),
        PLATFORM_ID => 0,
        APIC_BASE => cpu.state.apic_base,
        MTRRCAP => MTRRCAP_VALUE,
        ARCH_CAPABILITIES => crate::config::ARCH_CAPABILITIES,
        SYSENTER_CS => m.sysenter_cs,
        SYSENTER_ESP => m.sysenter_esp,
        SYSENTER_EIP => m.sysenter_eip,
        MCG_CAP => 0,
        MISC_ENABLE => m.misc_enable,
        PAT => m.pat,
        EFER => cpu.state.efer,
        STAR => m.star,
        LSTAR => m.lstar,
        CSTAR => m.cstar,
        SFMASK => m.sfmask,
        FS_BASE => cpu.state.segs[crate::state::Seg::Fs as usize].base,
        GS_BASE => cpu.state.segs[crate::state::Seg::Gs as usize].base,
        KERNEL_GS_BASE => m.kernel_gs_base,
        TSC_AUX if cpu.config.features.rdtscp => m.tsc_aux,
        i if is_storage(i) => other(cpu, i),
        i => return bus.rdmsr(i),
    })
}

/// Whether every byte of a PAT value is a valid memory type.
fn valid_pat(v: u64) -> bool {
    v.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}

/// Write an MSR; `Err` is the fault to raise.
pub fn write_msr(cpu: &mut Cpu, bus: &mut dyn Bus, index: u32, v: u64) -> ExecResult {
    let canonical = |v: u64| if is_canonical(v) { Ok(v) } else { Err(Fault::gp0()) };
    match index {
        TSC => {
            let base = bus.tsc(cpu.instret);
            cpu.state.msr.tsc_offset = v.wrapping_sub(base) as i64;
        }
        APIC_BASE => {
            // Bits 0-7 and 9 are reserved, 10 (x2APIC) only if offered.
            let mut reserved = 0x2ff | !((1u64 << PHYS_ADDR_BITS) - 1);
            if !cpu.config.features.x2apic {
                reserved |= 1 << 10;
            }
            if v & reserved != 0 {
                return Err(Fault::gp0());
            }
            // The BSP flag is read-only.
            cpu.state.apic_base = (v & !(1 << 8)) | (cpu.state.apic_base & (1 << 8));
        }
        SYSENTER_CS => cpu.state.msr.sysenter_cs = v & 0xffff_ffff,
        SYSENTER_ESP => cpu.state.msr.sysenter_esp = canonical(v)?,
        SYSENTER_EIP => cpu.state.msr.sysenter_eip = canonical(v)?,
        MISC_ENABLE => cpu.state.msr.misc_enable = v,
        PAT => {
            if !valid_pat(v) {
                return Err(Fault::gp0());
            }
            cpu.state.msr.pat = v;
        }
        EFER => write_efer(cpu, v)?,
        STAR => cpu.state.msr.star = v,
        LSTAR => cpu.state.msr.lstar = canonical(v)?,
        CSTAR => cpu.state.msr.cstar = canonical(v)?,
        SFMASK => cpu.state.msr.sfmask = v & 0xffff_ffff,
        FS_BASE => cpu.state.segs[crate::state::Seg::Fs as usize].base = canonical(v)?,
        GS_BASE => cpu.state.segs[crate::state::Seg::Gs as usize].base = canonical(v)?,
        KERNEL_GS_BASE => cpu.state.msr.kernel_gs_base = canonical(v)?,
        TSC_AUX if cpu.config.features.rdtscp => {
            if v >> 32 != 0 {
                return Err(Fault::gp0());
            }
            cpu.state.msr.tsc_aux = v;
        }
        // Read-only, as on hardware.
        ARCH_CAPABILITIES => return Err(Fault::gp0()),
        i if is_storage(i) => set_other(cpu, i, v),
        i => {
            if !bus.wrmsr(i, v) {
                return Err(Fault::gp0());
            }
        }
    }
    Ok(())
}

/// RDMSR: EDX:EAX = MSR[ECX].
pub(super) fn rdmsr(cpu: &mut Cpu, bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    if cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    let index = cpu.state.gpr[reg::RCX] as u32;
    let v = read_msr(cpu, bus, index).ok_or_else(Fault::gp0)?;
    cpu.set_reg(Register::EAX, v & 0xffff_ffff);
    cpu.set_reg(Register::EDX, v >> 32);
    Ok(())
}

/// WRMSR: MSR[ECX] = EDX:EAX.
pub(super) fn wrmsr(cpu: &mut Cpu, bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    if cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    let index = cpu.state.gpr[reg::RCX] as u32;
    let v = (cpu.state.gpr[reg::RAX] & 0xffff_ffff) | (cpu.state.gpr[reg::RDX] << 32);
    write_msr(cpu, bus, index, v)?;
    // Writes may change how code runs (EFER, GS base, the APIC's state).
    cpu.end_block = true;
    Ok(())
}
