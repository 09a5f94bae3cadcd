//! System instructions: control/debug/segment registers, descriptor
//! tables, far transfers, interrupts and returns, MSRs, CPUID, I/O, HLT.

use iced_x86::Instruction;

use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::ExecResult;

pub fn register(_r: &mut Registry) {}

/// MOV to a segment, control, debug or test register.
pub fn mov_to_special(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    Err(cpu.unimplemented(ins.mnemonic()))
}

/// MOV from a segment, control, debug or test register.
pub fn mov_from_special(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    Err(cpu.unimplemented(ins.mnemonic()))
}

/// POP into a segment register.
pub fn pop_segment(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    Err(cpu.unimplemented(ins.mnemonic()))
}

/// JMP far (direct ptr16:16/32 or indirect m16:16/32/64).
pub fn far_jmp(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    Err(cpu.unimplemented(ins.mnemonic()))
}

/// CALL far.
pub fn far_call(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    Err(cpu.unimplemented(ins.mnemonic()))
}
