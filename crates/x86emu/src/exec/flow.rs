//! Near control flow: JMP, Jcc, CALL, RET, LOOP*, JrCXZ.
//! (Far transfers live in `system`, they load segments.)

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::memory::is_canonical;
use crate::state::{reg, Seg};

pub fn register(r: &mut Registry) {
    const G: &str = "flow";
    r.add(M::Jmp, G, jmp);
    r.add_all(
        &[
            M::Jo,
            M::Jno,
            M::Jb,
            M::Jae,
            M::Je,
            M::Jne,
            M::Jbe,
            M::Ja,
            M::Js,
            M::Jns,
            M::Jp,
            M::Jnp,
            M::Jl,
            M::Jge,
            M::Jle,
            M::Jg,
        ],
        G,
        jcc,
    );
    r.add(M::Call, G, call);
    r.add(M::Ret, G, ret);
    r.add_all(&[M::Loop, M::Loope, M::Loopne], G, loop_);
    r.add_all(&[M::Jcxz, M::Jecxz, M::Jrcxz], G, jrcxz);
}

/// Operand size in bytes of a near branch (for target truncation).
fn branch_bits(cpu: &Cpu, ins: &Instruction) -> u32 {
    match ins.op_kind(0) {
        OpKind::NearBranch16 => 16,
        OpKind::NearBranch32 => 32,
        OpKind::NearBranch64 => 64,
        _ => match cpu.op_size(ins, 0) {
            2 => 16,
            4 => 32,
            _ => 64,
        },
    }
}

/// Set RIP to a branch target, checking canonical form / CS limit.
pub fn branch_to(cpu: &mut Cpu, target: u64, bits: u32) -> ExecResult {
    cpu.state.rip = checked_target(cpu, target, bits)?;
    Ok(())
}

/// A branch target truncated to the operand size and checked (canonical in
/// 64-bit mode, inside CS otherwise).
fn checked_target(cpu: &Cpu, target: u64, bits: u32) -> ExecResult<u64> {
    let t = match bits {
        16 => target & 0xffff,
        32 => target & 0xffff_ffff,
        _ => target,
    };
    if cpu.state.in_64bit() {
        if !is_canonical(t) {
            return Err(Fault::gp0());
        }
    } else if t > cpu.state.seg(Seg::Cs).limit as u64 {
        return Err(Fault::gp0());
    }
    Ok(t)
}

fn target(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult<u64> {
    match ins.op_kind(0) {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => Ok(ins.near_branch_target()),
        _ => cpu.read_op(bus, ins, 0),
    }
}

fn jmp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if matches!(ins.op_kind(0), OpKind::FarBranch16 | OpKind::FarBranch32) || ins.is_jmp_far_indirect() {
        return super::system::far_jmp(cpu, bus, ins);
    }
    let t = target(cpu, bus, ins)?;
    branch_to(cpu, t, branch_bits(cpu, ins))
}

fn jcc(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if super::flags::condition(ins.condition_code(), cpu.state.rflags) {
        branch_to(cpu, ins.near_branch_target(), branch_bits(cpu, ins))?;
    }
    Ok(())
}

fn call(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if matches!(ins.op_kind(0), OpKind::FarBranch16 | OpKind::FarBranch32) || ins.is_call_far_indirect() {
        return super::system::far_call(cpu, bus, ins);
    }
    let t = target(cpu, bus, ins)?;
    let size = cpu.stack_op_size(ins);
    // Check the target before pushing so a bad target leaves RSP alone.
    let t = checked_target(cpu, t, size * 8)?;
    cpu.push(bus, cpu.state.rip, size)?;
    cpu.state.rip = t;
    Ok(())
}

fn ret(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = cpu.stack_op_size(ins);
    let sp = cpu.sp();
    let t = cpu.read_sized(bus, Seg::Ss, sp, size)?;
    let imm = if ins.op_count() > 0 {
        ins.immediate16() as u64
    } else {
        0
    };
    branch_to(cpu, t, size * 8)?;
    cpu.set_sp(sp.wrapping_add(size as u64).wrapping_add(imm));
    Ok(())
}

/// Count register per address size.
fn counter(cpu: &Cpu, ins: &Instruction) -> (u64, u32) {
    let bits = match ins.op0_kind() {
        _ if ins.mnemonic() == M::Jcxz => 16,
        _ if ins.mnemonic() == M::Jecxz => 32,
        _ if ins.mnemonic() == M::Jrcxz => 64,
        _ => match ins.op_register(1) {
            iced_x86::Register::CX => 16,
            iced_x86::Register::ECX => 32,
            iced_x86::Register::RCX => 64,
            _ => cpu.state.code_bits(),
        },
    };
    let c = cpu.state.gpr[reg::RCX];
    let v = match bits {
        16 => c & 0xffff,
        32 => c & 0xffff_ffff,
        _ => c,
    };
    (v, bits)
}

fn loop_(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let (c, bits) = counter(cpu, ins);
    let c = c.wrapping_sub(1);
    let zf = cpu.state.rflags & crate::state::flags::ZF != 0;
    let take = match ins.mnemonic() {
        M::Loope => c != 0 && zf,
        M::Loopne => c != 0 && !zf,
        _ => c != 0,
    };
    if take {
        branch_to(cpu, ins.near_branch_target(), branch_bits(cpu, ins))?;
    }
    let r = &mut cpu.state.gpr[reg::RCX];
    *r = match bits {
        16 => (*r & !0xffff) | (c & 0xffff),
        32 => c & 0xffff_ffff,
        _ => c,
    };
    Ok(())
}

fn jrcxz(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if counter(cpu, ins).0 == 0 {
        branch_to(cpu, ins.near_branch_target(), branch_bits(cpu, ins))?;
    }
    Ok(())
}
