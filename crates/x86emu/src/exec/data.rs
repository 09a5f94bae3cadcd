//! Data movement: MOV and its extending forms, LEA, XCHG, PUSH/POP,
//! sign-extension of the accumulator, BSWAP, LEAVE, XLAT, NOP.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::ExecResult;
use crate::operand::{sign_extend, size_mask};
use crate::state::{reg, Seg};

pub fn register(r: &mut Registry) {
    const G: &str = "data";
    r.add(M::Mov, G, mov);
    r.add(M::Movzx, G, movzx);
    r.add_all(&[M::Movsx, M::Movsxd], G, movsx);
    r.add(M::Lea, G, lea);
    r.add(M::Xchg, G, xchg);
    r.add(M::Push, G, push);
    r.add(M::Pop, G, pop);
    // CET hints (ENDBR, RDSSP) execute as NOPs on a CPU without CET, as glibc expects.
    r.add_all(
        &[M::Nop, M::Reservednop, M::Endbr32, M::Endbr64, M::Rdsspd, M::Rdsspq],
        G,
        nop,
    );
    r.add_all(&[M::Cbw, M::Cwde, M::Cdqe], G, cbw);
    r.add_all(&[M::Cwd, M::Cdq, M::Cqo], G, cwd);
    r.add(M::Bswap, G, bswap);
    r.add(M::Leave, G, leave);
    r.add(M::Xlatb, G, xlat);
    r.add_all(&[M::Pusha, M::Pushad], G, pusha);
    r.add_all(&[M::Popa, M::Popad], G, popa);
}

/// PUSHA/PUSHAD: AX CX DX BX (original) SP BP SI DI. Not encodable in
/// 64-bit mode, so iced never hands us one there.
fn pusha(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = if ins.mnemonic() == M::Pushad { 4 } else { 2 };
    let saved = cpu.state.gpr;
    let sp = cpu.state.gpr[reg::RSP];
    for (i, v) in saved.iter().take(8).enumerate() {
        let v = if i == reg::RSP { sp } else { *v };
        if let Err(e) = cpu.push(bus, v, size) {
            cpu.state.gpr[reg::RSP] = sp;
            return Err(e);
        }
    }
    Ok(())
}

/// POPA/POPAD: the reverse, skipping the saved SP.
fn popa(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = if ins.mnemonic() == M::Popad { 4 } else { 2 };
    let sp = cpu.sp();
    let mut vals = [0u64; 8];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = cpu.read_sized(bus, Seg::Ss, sp.wrapping_add((i as u64) * size as u64), size)?;
    }
    let regs16 = [
        Register::DI,
        Register::SI,
        Register::BP,
        Register::SP,
        Register::BX,
        Register::DX,
        Register::CX,
        Register::AX,
    ];
    let regs32 = [
        Register::EDI,
        Register::ESI,
        Register::EBP,
        Register::ESP,
        Register::EBX,
        Register::EDX,
        Register::ECX,
        Register::EAX,
    ];
    for (i, v) in vals.iter().enumerate() {
        if i == 3 {
            continue;
        }
        cpu.set_reg(if size == 4 { regs32[i] } else { regs16[i] }, *v);
    }
    cpu.set_sp(sp.wrapping_add(8 * size as u64));
    Ok(())
}

fn is_special(r: Register) -> bool {
    r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr()
}

fn mov(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) == OpKind::Register && is_special(ins.op0_register()) {
        return super::system::mov_to_special(cpu, bus, ins);
    }
    if ins.op_kind(1) == OpKind::Register && is_special(ins.op1_register()) {
        return super::system::mov_from_special(cpu, bus, ins);
    }
    let v = cpu.read_op(bus, ins, 1)?;
    cpu.write_op(bus, ins, 0, v)
}

fn movzx(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let v = cpu.read_op(bus, ins, 1)?;
    cpu.write_op(bus, ins, 0, v)
}

fn movsx(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let src_size = cpu.op_size(ins, 1);
    let v = sign_extend(cpu.read_op(bus, ins, 1)?, src_size);
    let dst_size = cpu.op_size(ins, 0);
    cpu.write_op(bus, ins, 0, v & size_mask(dst_size))
}

fn lea(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let ea = cpu.effective_address(ins);
    cpu.set_reg(ins.op0_register(), ea);
    Ok(())
}

fn xchg(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) == OpKind::Memory || ins.op_kind(1) == OpKind::Memory {
        // XCHG with memory is always locked.
        let (mem, r) = if ins.op_kind(0) == OpKind::Memory {
            (0, 1)
        } else {
            (1, 0)
        };
        let regv = cpu.get_reg(ins.op_register(r));
        let size = cpu.op_size(ins, mem);
        let ea = cpu.effective_address(ins);
        let seg = cpu.mem_seg(ins);
        let old = cpu.rmw(bus, seg, ea, size, true, &mut |_| regv)?;
        cpu.set_reg(ins.op_register(r), old);
        return Ok(());
    }
    let a = cpu.get_reg(ins.op0_register());
    let b = cpu.get_reg(ins.op1_register());
    cpu.set_reg(ins.op0_register(), b);
    cpu.set_reg(ins.op1_register(), a);
    Ok(())
}

fn push(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = cpu.stack_op_size(ins);
    let v = if ins.op_kind(0) == OpKind::Register && ins.op0_register().is_segment_register() {
        cpu.get_reg(ins.op0_register())
    } else {
        cpu.read_op(bus, ins, 0)?
    };
    cpu.push(bus, v, size)
}

fn pop(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) == OpKind::Register && ins.op0_register().is_segment_register() {
        return super::system::pop_segment(cpu, bus, ins);
    }
    let size = cpu.stack_op_size(ins);
    let sp = cpu.sp();
    let v = cpu.read_sized(bus, Seg::Ss, sp, size)?;
    // POP computes a memory destination's address with the incremented RSP.
    cpu.set_sp(sp.wrapping_add(size as u64));
    if let Err(e) = cpu.write_op(bus, ins, 0, v) {
        cpu.set_sp(sp);
        return Err(e);
    }
    Ok(())
}

fn nop(_cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    Ok(())
}

fn cbw(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let a = cpu.state.gpr[reg::RAX];
    match ins.mnemonic() {
        M::Cbw => cpu.set_reg(Register::AX, sign_extend(a, 1)),
        M::Cwde => cpu.set_reg(Register::EAX, sign_extend(a, 2)),
        _ => cpu.set_reg(Register::RAX, sign_extend(a, 4)),
    }
    Ok(())
}

fn cwd(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let a = cpu.state.gpr[reg::RAX];
    let (size, dst) = match ins.mnemonic() {
        M::Cwd => (2, Register::DX),
        M::Cdq => (4, Register::EDX),
        _ => (8, Register::RDX),
    };
    let neg = sign_extend(a, size) as i64 >> 63;
    cpu.set_reg(dst, neg as u64);
    Ok(())
}

fn bswap(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let r = ins.op0_register();
    let v = cpu.get_reg(r);
    let out = match r.size() {
        8 => v.swap_bytes(),
        4 => (v as u32).swap_bytes() as u64,
        // BSWAP of a 16-bit register is undefined; hardware zeroes it.
        _ => 0,
    };
    cpu.set_reg(r, out);
    Ok(())
}

fn leave(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = match ins.code() {
        iced_x86::Code::Leavew => 2,
        iced_x86::Code::Leaved => 4,
        _ => 8,
    };
    let bp = cpu.state.gpr[reg::RBP];
    let bits = cpu.state.stack_bits();
    let off = match bits {
        64 => bp,
        32 => bp & 0xffff_ffff,
        _ => bp & 0xffff,
    };
    let v = cpu.read_sized(bus, Seg::Ss, off, size)?;
    cpu.set_sp(off.wrapping_add(size as u64));
    let r = match size {
        2 => Register::BP,
        4 => Register::EBP,
        _ => Register::RBP,
    };
    cpu.set_reg(r, v);
    Ok(())
}

fn xlat(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let bx = cpu.get_reg(ins.memory_base());
    let al = cpu.state.gpr[reg::RAX] & 0xff;
    let mask = size_mask(ins.memory_base().size() as u32);
    let v = cpu.read_u8(bus, cpu.mem_seg(ins), bx.wrapping_add(al) & mask)?;
    cpu.set_reg(Register::AL, v as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::state::{cr, CpuState, Segment};
    use crate::testbus::TestBus;
    use crate::Cpu;

    /// 32-bit flat protected mode, no paging.
    fn cpu32() -> Cpu {
        let mut cpu = Cpu::standalone(1 << 20);
        let mut s = CpuState::reset();
        s.cr0 |= cr::CR0_PE;
        let cs = Segment::from_descriptor(0x08, 0x00cf_9b00_0000_ffff);
        let ds = Segment::from_descriptor(0x10, 0x00cf_9300_0000_ffff);
        s.segs = [ds, cs, ds, ds, ds, ds];
        cpu.set_state(s);
        cpu
    }

    #[test]
    fn pushad_popad_round_trip() {
        let mut bus = TestBus::new(1 << 20);
        bus.load(0x1000, &[0x60, 0x31, 0xc0, 0x61]); // pushad; xor eax,eax (or #UD); popad
        let mut cpu = cpu32();
        cpu.state.rip = 0x1000;
        for i in 0..8 {
            cpu.state.gpr[i] = 0x1111_1111 * (i as u64 + 1);
        }
        cpu.state.gpr[4] = 0x8000;
        cpu.step(&mut bus);
        assert_eq!(cpu.state.gpr[4], 0x8000 - 32);
        // EAX at the highest address, EDI at the lowest, original ESP in between.
        assert_eq!(bus.read_u32(0x8000 - 4), 0x1111_1111);
        assert_eq!(bus.read_u32(0x8000 - 20), 0x8000);
        assert_eq!(bus.read_u32(0x8000 - 32), 0x8888_8888);
        cpu.state.gpr[0] = 0;
        cpu.state.gpr[5] = 0;
        cpu.state.rip = 0x1003;
        cpu.step(&mut bus);
        assert_eq!(cpu.state.gpr[0], 0x1111_1111);
        assert_eq!(cpu.state.gpr[5], 0x6666_6666);
        assert_eq!(cpu.state.gpr[4], 0x8000);
    }
}
