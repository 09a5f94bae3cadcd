//! Fast paths: specialized handlers for the hottest instruction forms,
//! chosen once at decode time by iced's `Code` (mnemonic plus operand
//! form). They skip the generic operand machinery; everything else goes
//! through the per-mnemonic handlers. Each must behave exactly like the
//! generic handler for its form (the differential tests cover both).

use iced_x86::{Code, Instruction, OpKind, Register};

use super::Handler;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::memory::is_canonical;

/// A specialized handler for `ins`, if its form has one.
pub fn specialize(ins: &Instruction) -> Option<Handler> {
    let regs = ins.op_count() == 2 && ins.op0_kind() == OpKind::Register && ins.op1_kind() == OpKind::Register;
    Some(match ins.code() {
        Code::Mov_rm64_r64 | Code::Mov_r64_rm64 if regs => mov_r64_r64,
        Code::Mov_rm32_r32 | Code::Mov_r32_rm32 if regs => mov_r32_r32,
        Code::Mov_r64_rm64 if is_simple_mem(ins, 1) => mov_r64_m64,
        Code::Mov_rm64_r64 if is_simple_mem(ins, 0) => mov_m64_r64,
        Code::Mov_r32_imm32 => mov_r32_imm,
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => jmp_rel64,
        _ if ins.is_jcc_short_or_near() && ins.op0_kind() == OpKind::NearBranch64 => jcc_rel64,
        _ => return super::alu::specialize(ins).or_else(|| super::bits::specialize(ins)),
    })
}

/// A 64-bit-mode memory operand on DS/SS with no segment override (so the
/// segment base is zero in 64-bit mode).
fn is_simple_mem(ins: &Instruction, n: u32) -> bool {
    ins.op_kind(n) == OpKind::Memory
        && ins.code_size() == iced_x86::CodeSize::Code64
        && matches!(ins.memory_segment(), Register::DS | Register::SS | Register::ES)
        && ins.segment_prefix() == Register::None
}

#[inline(always)]
fn gpr64(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::RAX as usize) & 15
}

#[inline(always)]
fn gpr32(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::EAX as usize) & 15
}

fn mov_r64_r64(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let v = cpu.state.gpr[gpr64(ins.op1_register())];
    cpu.state.gpr[gpr64(ins.op0_register())] = v;
    Ok(())
}

fn mov_r32_r32(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let v = cpu.state.gpr[gpr32(ins.op1_register())] & 0xffff_ffff;
    cpu.state.gpr[gpr32(ins.op0_register())] = v;
    Ok(())
}

fn mov_r32_imm(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cpu.state.gpr[gpr32(ins.op0_register())] = ins.immediate32() as u64;
    Ok(())
}

/// The effective address of a 64-bit memory operand (no segment base).
#[inline(always)]
fn ea64(cpu: &Cpu, ins: &Instruction) -> u64 {
    cpu.effective_address(ins)
}

fn mov_r64_m64(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let ea = ea64(cpu, ins);
    let v = cpu.read_u64(bus, cpu.mem_seg(ins), ea)?;
    cpu.state.gpr[gpr64(ins.op0_register())] = v;
    Ok(())
}

fn mov_m64_r64(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let ea = ea64(cpu, ins);
    let v = cpu.state.gpr[gpr64(ins.op1_register())];
    cpu.write_u64(bus, cpu.mem_seg(ins), ea, v)
}

fn jmp_rel64(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let t = ins.near_branch64();
    if !is_canonical(t) {
        return Err(Fault::gp0());
    }
    cpu.state.rip = t;
    Ok(())
}

/// Jcc in 64-bit code (operand size 64): as `flow::jcc`, whose target check
/// for a 64-bit branch is the canonical check.
fn jcc_rel64(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if super::flags::condition(ins.condition_code(), cpu.state.rflags) {
        let t = ins.near_branch64();
        if !is_canonical(t) {
            return Err(Fault::gp0());
        }
        cpu.state.rip = t;
    }
    Ok(())
}
