//! Far control transfers: JMP/CALL far, RETF and IRET, in real mode,
//! protected mode and long mode (64-bit and compatibility).

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::segment::{code_segment_for_return, code_segment_for_transfer, invalidate_data_segments, stack_segment};
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::memory::is_canonical;
use crate::operand::size_mask;
use crate::state::{flags, Seg, Segment};

/// Whether segment loads use descriptors (protected mode outside VM86).
fn descriptor_mode(cpu: &Cpu) -> bool {
    cpu.state.protected_mode() && cpu.state.rflags & flags::VM == 0
}

/// Check `ip` against the code segment it will run in.
fn check_target(cpu: &Cpu, cs: &Segment, ip: u64) -> ExecResult {
    let ok = if cpu.state.long_mode() && cs.l {
        is_canonical(ip)
    } else {
        ip <= cs.limit as u64
    };
    if ok {
        Ok(())
    } else {
        Err(Fault::gp0())
    }
}

/// Target selector, offset and operand size (bytes) of a far JMP/CALL.
fn far_target(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult<(u16, u64, u32)> {
    match ins.op_kind(0) {
        OpKind::FarBranch16 => Ok((ins.far_branch_selector(), ins.far_branch16() as u64, 2)),
        OpKind::FarBranch32 => Ok((ins.far_branch_selector(), ins.far_branch32() as u64, 4)),
        OpKind::Memory => {
            let size = match ins.code() {
                Code::Jmp_m1616 | Code::Call_m1616 => 2,
                Code::Jmp_m1664 | Code::Call_m1664 => 8,
                _ => 4,
            };
            let ea = cpu.effective_address(ins);
            let seg = cpu.mem_seg(ins);
            let off = cpu.read_sized(bus, seg, ea, size)?;
            let sel_off = ea.wrapping_add(size as u64) & super::segment::addr_mask(cpu, ins);
            let sel = cpu.read_u16(bus, seg, sel_off)?;
            Ok((sel, off, size))
        }
        _ => Err(Fault::ud()),
    }
}

/// The code segment to load for a far JMP/CALL (real mode: base = sel << 4).
fn transfer_cs(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> ExecResult<Segment> {
    if descriptor_mode(cpu) {
        code_segment_for_transfer(cpu, bus, sel)
    } else {
        let cur = *cpu.state.seg(Seg::Cs);
        Ok(Segment {
            selector: sel,
            base: (sel as u64) << 4,
            ..cur
        })
    }
}

/// Commit a new CS and RIP; the block must end (the code size may change).
fn set_cs_ip(cpu: &mut Cpu, cs: Segment, ip: u64) {
    *cpu.state.seg_mut(Seg::Cs) = cs;
    cpu.state.rip = ip;
    cpu.end_block = true;
}

pub fn far_jmp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let (sel, off, _) = far_target(cpu, bus, ins)?;
    let cs = transfer_cs(cpu, bus, sel)?;
    check_target(cpu, &cs, off)?;
    set_cs_ip(cpu, cs, off);
    Ok(())
}

pub fn far_call(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let (sel, off, size) = far_target(cpu, bus, ins)?;
    let cs = transfer_cs(cpu, bus, sel)?;
    check_target(cpu, &cs, off)?;
    let old_cs = cpu.state.seg(Seg::Cs).selector as u64;
    let old_ip = cpu.state.rip;
    let old_sp = cpu.state.gpr[4];
    let pushed = cpu.push(bus, old_cs, size).and_then(|_| cpu.push(bus, old_ip, size));
    if let Err(e) = pushed {
        cpu.state.gpr[4] = old_sp;
        return Err(e);
    }
    set_cs_ip(cpu, cs, off);
    Ok(())
}

/// Offset `k` bytes above the stack pointer, wrapped to the stack size.
fn stack_off(cpu: &Cpu, sp: u64, k: u64) -> u64 {
    let v = sp.wrapping_add(k);
    match cpu.state.stack_bits() {
        64 => v,
        32 => v & 0xffff_ffff,
        _ => v & 0xffff,
    }
}

fn read_stack(cpu: &mut Cpu, bus: &mut dyn Bus, sp: u64, k: u64, size: u32) -> ExecResult<u64> {
    let off = stack_off(cpu, sp, k);
    cpu.read_sized(bus, Seg::Ss, off, size)
}

/// Set RSP after loading a new stack from a frame: operand-size wide.
fn set_new_sp(cpu: &mut Cpu, v: u64, size: u32) {
    let sp = &mut cpu.state.gpr[4];
    *sp = if size == 2 { (*sp & !0xffff) | (v & 0xffff) } else { v };
}

/// Operand size of RETF from its encoding.
fn retf_size(ins: &Instruction) -> u32 {
    match ins.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfq | Code::Retfq_imm16 => 8,
        _ => 4,
    }
}

/// RETF [imm16].
pub fn retf(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = retf_size(ins);
    let imm = if ins.op_count() > 0 {
        ins.immediate16() as u64
    } else {
        0
    };
    let sp = cpu.sp();
    let ip = read_stack(cpu, bus, sp, 0, size)? & size_mask(size);
    let sel = read_stack(cpu, bus, sp, size as u64, size)? as u16;
    let sz = size as u64;
    if !descriptor_mode(cpu) {
        let cs = transfer_cs(cpu, bus, sel)?;
        check_target(cpu, &cs, ip)?;
        set_cs_ip(cpu, cs, ip);
        cpu.set_sp(sp.wrapping_add(2 * sz + imm));
        return Ok(());
    }
    let cpl = cpu.state.cpl();
    let cs = code_segment_for_return(cpu, bus, sel)?;
    let new_cpl = cs.dpl;
    let target64 = cpu.state.long_mode() && cs.l;
    check_target(cpu, &cs, ip)?;
    if new_cpl > cpl {
        let new_sp = read_stack(cpu, bus, sp, 2 * sz + imm, size)?;
        let ss_sel = read_stack(cpu, bus, sp, 3 * sz + imm, size)? as u16;
        let ss = stack_segment(cpu, bus, ss_sel, new_cpl, target64)?;
        set_cs_ip(cpu, cs, ip);
        *cpu.state.seg_mut(Seg::Ss) = ss;
        set_new_sp(cpu, new_sp, size);
        let sp = cpu.sp();
        cpu.set_sp(sp.wrapping_add(imm));
        invalidate_data_segments(cpu);
    } else {
        set_cs_ip(cpu, cs, ip);
        cpu.set_sp(sp.wrapping_add(2 * sz + imm));
    }
    Ok(())
}

/// Flags IRET may change, by the privilege of the code executing it.
fn iret_flags(old: u64, popped: u64, size: u32, cpl: u8) -> u64 {
    let iopl = ((old & flags::IOPL) >> 12) as u8;
    let mut mask = flags::STATUS | flags::TF | flags::DF | flags::NT | flags::RF | flags::AC | flags::ID;
    if cpl <= iopl {
        mask |= flags::IF;
    }
    if cpl == 0 {
        mask |= flags::IOPL | flags::VIF | flags::VIP;
    }
    if size == 2 {
        mask &= 0xffff;
    }
    (old & !mask) | (popped & mask) | flags::FIXED1
}

/// IRET, IRETD, IRETQ.
pub fn iret(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = match ins.mnemonic() {
        Mnemonic::Iret => 2,
        Mnemonic::Iretq => 8,
        _ => 4,
    };
    let sz = size as u64;
    let sp = cpu.sp();
    if !cpu.state.protected_mode() {
        let ip = read_stack(cpu, bus, sp, 0, size)? & size_mask(size);
        let sel = read_stack(cpu, bus, sp, sz, size)? as u16;
        let fl = read_stack(cpu, bus, sp, 2 * sz, size)?;
        let cs = transfer_cs(cpu, bus, sel)?;
        check_target(cpu, &cs, ip)?;
        let mask = if size == 2 { 0x7fd5 } else { 0x257fd5 };
        cpu.state.rflags = (cpu.state.rflags & !mask) | (fl & mask) | flags::FIXED1;
        set_cs_ip(cpu, cs, ip);
        cpu.set_sp(sp.wrapping_add(3 * sz));
        cpu.state.events.nmi_masked = false;
        return Ok(());
    }
    if cpu.state.rflags & flags::VM != 0 {
        // Virtual-8086 mode is not supported.
        return Err(Fault::gp0());
    }
    if cpu.state.rflags & flags::NT != 0 {
        // Task return (not supported), and #GP in long mode.
        return Err(Fault::gp0());
    }
    let ip = read_stack(cpu, bus, sp, 0, size)? & size_mask(size);
    let sel = read_stack(cpu, bus, sp, sz, size)? as u16;
    let fl = read_stack(cpu, bus, sp, 2 * sz, size)?;
    let cpl = cpu.state.cpl();
    if !cpu.state.long_mode() && fl & flags::VM != 0 && cpl == 0 && size == 4 {
        // Return to virtual-8086 mode: not supported.
        return Err(Fault::gp0());
    }
    let cs = code_segment_for_return(cpu, bus, sel)?;
    let new_cpl = cs.dpl;
    let target64 = cpu.state.long_mode() && cs.l;
    // 64-bit mode always pops SS:RSP; other modes only on a privilege change.
    let pop_stack = cpu.state.in_64bit() || new_cpl > cpl;
    let new_stack = if pop_stack {
        let new_sp = read_stack(cpu, bus, sp, 3 * sz, size)?;
        let ss_sel = read_stack(cpu, bus, sp, 4 * sz, size)? as u16;
        let ss = stack_segment(cpu, bus, ss_sel, new_cpl, target64)?;
        Some((new_sp, ss))
    } else {
        None
    };
    check_target(cpu, &cs, ip)?;
    cpu.state.rflags = iret_flags(cpu.state.rflags, fl, size, cpl);
    set_cs_ip(cpu, cs, ip);
    match new_stack {
        Some((new_sp, ss)) => {
            *cpu.state.seg_mut(Seg::Ss) = ss;
            set_new_sp(cpu, new_sp, size);
        }
        None => cpu.set_sp(sp.wrapping_add(3 * sz)),
    }
    if new_cpl > cpl {
        invalidate_data_segments(cpu);
    }
    cpu.state.events.nmi_masked = false;
    Ok(())
}
