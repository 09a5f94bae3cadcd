//! Control and debug registers: MOV to/from CRn and DRn, CLTS, LMSW, SMSW,
//! INVLPG, and the EFER rules shared with WRMSR.

use iced_x86::{Instruction, OpKind, Register};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::mmu::PHYS_ADDR_BITS;
use crate::state::{cr, Seg};

fn require_cpl0(cpu: &Cpu) -> ExecResult {
    if cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    Ok(())
}

/// CR0 bits that exist (the others in the low half are ignored on write).
const CR0_VALID: u64 = cr::CR0_PE
    | cr::CR0_MP
    | cr::CR0_EM
    | cr::CR0_TS
    | cr::CR0_ET
    | cr::CR0_NE
    | cr::CR0_WP
    | cr::CR0_AM
    | cr::CR0_NW
    | cr::CR0_CD
    | cr::CR0_PG;

/// Write CR0 with the architectural checks; activates or deactivates long
/// mode when paging is switched with EFER.LME set.
pub(crate) fn write_cr0(cpu: &mut Cpu, v: u64) -> ExecResult {
    if v >> 32 != 0 {
        return Err(Fault::gp0());
    }
    let v = (v & CR0_VALID) | cr::CR0_ET;
    if v & cr::CR0_PG != 0 && v & cr::CR0_PE == 0 {
        return Err(Fault::gp0());
    }
    if v & cr::CR0_NW != 0 && v & cr::CR0_CD == 0 {
        return Err(Fault::gp0());
    }
    let old = cpu.state.cr0;
    let mut efer = cpu.state.efer;
    let pg_on = v & cr::CR0_PG != 0 && old & cr::CR0_PG == 0;
    let pg_off = v & cr::CR0_PG == 0 && old & cr::CR0_PG != 0;
    if pg_on && efer & cr::EFER_LME != 0 {
        if cpu.state.cr4 & cr::CR4_PAE == 0 || cpu.state.seg(Seg::Cs).l {
            return Err(Fault::gp0());
        }
        efer |= cr::EFER_LMA;
    }
    if pg_off && efer & cr::EFER_LMA != 0 {
        // Long mode can only be left from compatibility mode.
        if cpu.state.in_64bit() {
            return Err(Fault::gp0());
        }
        efer &= !cr::EFER_LMA;
    }
    cpu.state.cr0 = v;
    cpu.state.efer = efer;
    if (v ^ old) & (cr::CR0_PG | cr::CR0_WP | cr::CR0_PE) != 0 {
        cpu.tlb.flush_all();
    }
    cpu.end_block = true;
    Ok(())
}

/// CR4 bits the guest may set: what CPUID offers (plus DE, MCE, PCE and
/// TSD, which every x86-64 processor has and which need no emulation).
fn cr4_allowed(cpu: &Cpu) -> u64 {
    let f = &cpu.config.features;
    let mut m = cr::CR4_TSD
        | cr::CR4_DE
        | cr::CR4_PSE
        | cr::CR4_PAE
        | cr::CR4_MCE
        | cr::CR4_PGE
        | cr::CR4_PCE
        | cr::CR4_OSFXSR
        | cr::CR4_OSXMMEXCPT;
    if f.smep {
        m |= cr::CR4_SMEP;
    }
    if f.smap {
        m |= cr::CR4_SMAP;
    }
    m
}

pub(crate) fn write_cr4(cpu: &mut Cpu, v: u64) -> ExecResult {
    if v & !cr4_allowed(cpu) != 0 {
        return Err(Fault::gp0());
    }
    if cpu.state.long_mode() && v & cr::CR4_PAE == 0 {
        return Err(Fault::gp0());
    }
    let old = cpu.state.cr4;
    cpu.state.cr4 = v;
    let paging_bits = cr::CR4_PGE | cr::CR4_PAE | cr::CR4_PSE | cr::CR4_PCIDE | cr::CR4_SMEP | cr::CR4_SMAP;
    if (v ^ old) & paging_bits != 0 {
        cpu.tlb.flush_all();
    }
    cpu.end_block = true;
    Ok(())
}

pub(crate) fn write_cr3(cpu: &mut Cpu, v: u64) -> ExecResult {
    let v = if cpu.state.long_mode() {
        if v >> PHYS_ADDR_BITS != 0 {
            return Err(Fault::gp0());
        }
        v
    } else {
        v & 0xffff_ffff
    };
    cpu.state.cr3 = v;
    cpu.tlb.flush_non_global();
    cpu.end_block = true;
    Ok(())
}

/// Write EFER (WRMSR 0xC0000080): LMA is read-only, LME cannot change
/// while paging is on, NXE only if offered.
pub(crate) fn write_efer(cpu: &mut Cpu, v: u64) -> ExecResult {
    let mut allowed = cr::EFER_SCE | cr::EFER_LME | cr::EFER_LMA;
    if cpu.config.features.nx {
        allowed |= cr::EFER_NXE;
    }
    if v & !allowed != 0 {
        return Err(Fault::gp0());
    }
    let old = cpu.state.efer;
    if cpu.state.paging() && (v ^ old) & cr::EFER_LME != 0 {
        return Err(Fault::gp0());
    }
    let new = (v & !cr::EFER_LMA) | (old & cr::EFER_LMA);
    if (new ^ old) & cr::EFER_NXE != 0 {
        cpu.tlb.flush_all();
    }
    cpu.state.efer = new;
    cpu.end_block = true;
    Ok(())
}

/// MOV CRn, reg.
pub(super) fn mov_to_cr(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let n = ins.op0_register() as usize - Register::CR0 as usize;
    if !matches!(n, 0 | 2 | 3 | 4 | 8) {
        return Err(Fault::ud());
    }
    require_cpl0(cpu)?;
    let v = cpu.get_reg(ins.op1_register());
    match n {
        0 => write_cr0(cpu, v),
        2 => {
            cpu.state.cr2 = v;
            Ok(())
        }
        3 => write_cr3(cpu, v),
        4 => write_cr4(cpu, v),
        _ => {
            if v & !0xf != 0 {
                return Err(Fault::gp0());
            }
            cpu.state.cr8 = v;
            bus.set_task_priority(v as u8);
            cpu.end_block = true;
            Ok(())
        }
    }
}

/// MOV reg, CRn.
pub(super) fn mov_from_cr(cpu: &mut Cpu, ins: &Instruction) -> ExecResult {
    let n = ins.op1_register() as usize - Register::CR0 as usize;
    let v = match n {
        0 => cpu.state.cr0,
        2 => cpu.state.cr2,
        3 => cpu.state.cr3,
        4 => cpu.state.cr4,
        8 => cpu.state.cr8,
        _ => return Err(Fault::ud()),
    };
    require_cpl0(cpu)?;
    cpu.set_reg(ins.op0_register(), v);
    Ok(())
}

/// DR4/DR5 alias DR6/DR7 unless CR4.DE is set, where they raise #UD.
fn debug_index(cpu: &Cpu, r: Register) -> ExecResult<usize> {
    let n = r as usize - Register::DR0 as usize;
    match n {
        0..=3 | 6 | 7 => Ok(n),
        4 | 5 if cpu.state.cr4 & cr::CR4_DE == 0 => Ok(n + 2),
        _ => Err(Fault::ud()),
    }
}

/// MOV DRn, reg. Breakpoints are stored but not armed.
pub(super) fn mov_to_dr(cpu: &mut Cpu, ins: &Instruction) -> ExecResult {
    let n = debug_index(cpu, ins.op0_register())?;
    require_cpl0(cpu)?;
    let v = cpu.get_reg(ins.op1_register());
    match n {
        0..=3 => cpu.state.dr[n] = v,
        6 | 7 if v >> 32 != 0 => return Err(Fault::gp0()),
        6 => cpu.state.dr6 = (v | 0xffff_0ff0) & !(1 << 12),
        _ => cpu.state.dr7 = (v | 0x400) & !((1 << 11) | (1 << 12) | (1 << 14) | (1 << 15)),
    }
    Ok(())
}

/// MOV reg, DRn.
pub(super) fn mov_from_dr(cpu: &mut Cpu, ins: &Instruction) -> ExecResult {
    let n = debug_index(cpu, ins.op1_register())?;
    require_cpl0(cpu)?;
    let v = match n {
        0..=3 => cpu.state.dr[n],
        6 => cpu.state.dr6,
        _ => cpu.state.dr7,
    };
    cpu.set_reg(ins.op0_register(), v);
    Ok(())
}

/// CLTS.
pub(super) fn clts(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    require_cpl0(cpu)?;
    cpu.state.cr0 &= !cr::CR0_TS;
    Ok(())
}

/// LMSW r/m16: PE, MP, EM, TS; PE cannot be cleared.
pub(super) fn lmsw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_cpl0(cpu)?;
    let v = cpu.read_op(bus, ins, 0)? & 0xf;
    let old = cpu.state.cr0;
    let new = (old & !0xe) | v | (old & cr::CR0_PE);
    write_cr0(cpu, new)
}

/// SMSW r/m16 (or a full register).
pub(super) fn smsw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let v = cpu.state.cr0;
    cpu.write_op(bus, ins, 0, v)
}

/// INVLPG m.
pub(super) fn invlpg(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_cpl0(cpu)?;
    if ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let ea = cpu.effective_address(ins);
    let seg = cpu.mem_seg(ins);
    // INVLPG never faults on its address: flush everything when the
    // address is not usable (a superset of what hardware flushes).
    match cpu.linear(seg, ea, 1, false) {
        Ok(lin) => cpu.tlb.flush_page(lin),
        Err(_) => cpu.tlb.flush_all(),
    }
    cpu.end_block = true;
    Ok(())
}
