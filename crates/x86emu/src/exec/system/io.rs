//! Port I/O: IN and OUT, and the I/O permission check (IOPL, then the TSS
//! I/O permission bitmap) that INS/OUTS share.

use iced_x86::{Instruction, OpKind};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::state::flags;

/// Whether the current code may access `size` bytes at `port`: always in
/// real mode, when CPL <= IOPL in protected mode, and otherwise when the
/// TSS I/O bitmap clears every bit of the access. #GP(0) if not.
pub fn check_io_permission(cpu: &mut Cpu, bus: &mut dyn Bus, port: u16, size: u32) -> ExecResult {
    let s = &cpu.state;
    if !s.protected_mode() {
        return Ok(());
    }
    let iopl = ((s.rflags & flags::IOPL) >> 12) as u8;
    if s.rflags & flags::VM == 0 && s.cpl() <= iopl {
        return Ok(());
    }
    let tr = s.tr;
    // Only a 32/64-bit TSS (available or busy) has a bitmap.
    if tr.unusable || tr.s || tr.type_ & 0xd != 9 || tr.limit < 0x67 {
        return Err(Fault::gp0());
    }
    let mut b = [0u8; 2];
    cpu.read_system(bus, tr.base.wrapping_add(0x66), &mut b)?;
    let off = u16::from_le_bytes(b) as u64 + port as u64 / 8;
    if off + 1 > tr.limit as u64 {
        return Err(Fault::gp0());
    }
    cpu.read_system(bus, tr.base.wrapping_add(off), &mut b)?;
    let bits = u16::from_le_bytes(b) >> (port & 7);
    if bits & ((1 << size) - 1) != 0 {
        return Err(Fault::gp0());
    }
    Ok(())
}

fn port_of(cpu: &Cpu, ins: &Instruction, n: u32) -> u16 {
    match ins.op_kind(n) {
        OpKind::Immediate8 => ins.immediate8() as u16,
        _ => cpu.get_reg(ins.op_register(n)) as u16,
    }
}

/// IN AL/AX/EAX, imm8/DX.
pub(super) fn in_(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let dst = ins.op0_register();
    let size = dst.size() as u32;
    let port = port_of(cpu, ins, 1);
    check_io_permission(cpu, bus, port, size)?;
    let v = bus.io_in(port, size as u8);
    cpu.set_reg(dst, v as u64);
    Ok(())
}

/// OUT imm8/DX, AL/AX/EAX.
pub(super) fn out(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let src = ins.op1_register();
    let size = src.size() as u32;
    let port = port_of(cpu, ins, 0);
    check_io_permission(cpu, bus, port, size)?;
    let v = cpu.get_reg(src) as u32;
    bus.io_out(port, size as u8, v);
    // A device may have raised an interrupt: let the run loop look.
    cpu.end_block = true;
    Ok(())
}
