//! Fast system calls: SYSCALL/SYSRET, SYSENTER/SYSEXIT, and SWAPGS.

use iced_x86::{Instruction, Mnemonic};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::memory::is_canonical;
use crate::state::{cr, flags, reg, Seg, Segment};

/// A flat 4 GiB code segment with the given selector and privilege.
fn flat_code(selector: u16, dpl: u8, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: true,
        dpl,
        db: !long,
        s: true,
        l: long,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// A flat 4 GiB writable data (stack) segment.
fn flat_stack(selector: u16, dpl: u8) -> Segment {
    Segment {
        type_: 0x3,
        db: true,
        l: false,
        ..flat_code(selector, dpl, false)
    }
}

/// SYSCALL: to CPL 0 at LSTAR (64-bit), CSTAR (compatibility mode) or
/// STAR[31:0] (legacy mode), with RFLAGS masked by SFMASK.
pub(super) fn syscall(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let s = &cpu.state;
    if s.efer & cr::EFER_SCE == 0 || !s.protected_mode() {
        return Err(Fault::ud());
    }
    let sel = ((s.msr.star >> 32) & 0xfffc) as u16;
    let long = s.long_mode();
    let next = s.rip;
    let rflags = s.rflags;
    if long {
        cpu.state.gpr[reg::RCX] = next;
        cpu.state.gpr[11] = rflags & !flags::RF;
        cpu.state.rip = if cpu.state.in_64bit() {
            cpu.state.msr.lstar
        } else {
            cpu.state.msr.cstar
        };
        cpu.state.rflags = (rflags & !cpu.state.msr.sfmask & !flags::RF) | flags::FIXED1;
    } else {
        cpu.state.gpr[reg::RCX] = next & 0xffff_ffff;
        cpu.state.rip = cpu.state.msr.star & 0xffff_ffff;
        cpu.state.rflags = rflags & !(flags::VM | flags::IF | flags::RF);
    }
    *cpu.state.seg_mut(Seg::Cs) = flat_code(sel, 0, long);
    *cpu.state.seg_mut(Seg::Ss) = flat_stack(sel.wrapping_add(8), 0);
    cpu.end_block = true;
    Ok(())
}

/// SYSRET (to compatibility mode) and SYSRETQ (to 64-bit mode), CPL 3.
pub(super) fn sysret(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let s = &cpu.state;
    if s.efer & cr::EFER_SCE == 0 || !s.in_64bit() {
        return Err(Fault::ud());
    }
    if s.cpl() != 0 {
        return Err(Fault::gp0());
    }
    let base = ((s.msr.star >> 48) & 0xffff) as u16;
    let rcx = s.gpr[reg::RCX];
    let to64 = ins.mnemonic() == Mnemonic::Sysretq;
    if to64 && !is_canonical(rcx) {
        return Err(Fault::gp0());
    }
    let (cs, rip) = if to64 {
        (flat_code(base.wrapping_add(16) | 3, 3, true), rcx)
    } else {
        (flat_code(base | 3, 3, false), rcx & 0xffff_ffff)
    };
    let r11 = cpu.state.gpr[11];
    cpu.state.rflags = (r11 & 0x3c_7fd7) | flags::FIXED1;
    *cpu.state.seg_mut(Seg::Cs) = cs;
    *cpu.state.seg_mut(Seg::Ss) = flat_stack(base.wrapping_add(8) | 3, 3);
    cpu.state.rip = rip;
    cpu.end_block = true;
    Ok(())
}

/// SYSENTER: to CPL 0 at SYSENTER_EIP with SYSENTER_ESP.
pub(super) fn sysenter(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let s = &cpu.state;
    let cs_sel = (s.msr.sysenter_cs & 0xfffc) as u16;
    if !s.protected_mode() || cs_sel == 0 {
        return Err(Fault::gp0());
    }
    let long = s.long_mode();
    let (eip, esp) = if long {
        (s.msr.sysenter_eip, s.msr.sysenter_esp)
    } else {
        (s.msr.sysenter_eip & 0xffff_ffff, s.msr.sysenter_esp & 0xffff_ffff)
    };
    cpu.state.rflags &= !(flags::VM | flags::IF | flags::RF);
    *cpu.state.seg_mut(Seg::Cs) = flat_code(cs_sel, 0, long);
    *cpu.state.seg_mut(Seg::Ss) = flat_stack(cs_sel.wrapping_add(8), 0);
    cpu.state.rip = eip;
    cpu.state.gpr[reg::RSP] = esp;
    cpu.end_block = true;
    Ok(())
}

/// SYSEXIT (to 32-bit code) and SYSEXITQ (to 64-bit code), CPL 3.
pub(super) fn sysexit(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let s = &cpu.state;
    let base = (s.msr.sysenter_cs & 0xfffc) as u16;
    if !s.protected_mode() || base == 0 || s.cpl() != 0 {
        return Err(Fault::gp0());
    }
    let to64 = ins.mnemonic() == Mnemonic::Sysexitq;
    let (rdx, rcx) = (s.gpr[reg::RDX], s.gpr[reg::RCX]);
    let (cs, ss, rip, rsp) = if to64 {
        if !is_canonical(rdx) || !is_canonical(rcx) {
            return Err(Fault::gp0());
        }
        (base.wrapping_add(32), base.wrapping_add(40), rdx, rcx)
    } else {
        (
            base.wrapping_add(16),
            base.wrapping_add(24),
            rdx & 0xffff_ffff,
            rcx & 0xffff_ffff,
        )
    };
    *cpu.state.seg_mut(Seg::Cs) = flat_code(cs | 3, 3, to64);
    *cpu.state.seg_mut(Seg::Ss) = flat_stack(ss | 3, 3);
    cpu.state.rip = rip;
    cpu.state.gpr[reg::RSP] = rsp;
    cpu.end_block = true;
    Ok(())
}

/// SWAPGS: exchange GS.base with KERNEL_GS_BASE (64-bit mode, CPL 0).
pub(super) fn swapgs(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    if !cpu.state.in_64bit() {
        return Err(Fault::ud());
    }
    if cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    let s = &mut cpu.state;
    std::mem::swap(&mut s.segs[Seg::Gs as usize].base, &mut s.msr.kernel_gs_base);
    Ok(())
}
