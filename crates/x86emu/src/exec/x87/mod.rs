//! The x87 FPU: loads and stores of every format, arithmetic with the FCW's
//! precision and rounding control, comparisons, the control instructions,
//! the environment/state images (FNSTENV/FLDENV/FNSAVE/FRSTOR), FXSAVE and
//! FXRSTOR, EMMS, and the transcendental functions (computed through f64).
//!
//! Not modelled: the biased results of unmasked overflow/underflow (the
//! masked result is written and ES is set), the real-mode layouts of the
//! environment image (the protected-mode layout is used), FCS/FDS (stored
//! as 0, as CPUs with the "FCS/FDS deprecated" feature do).

mod float;
mod ops;

use iced_x86::{Instruction, OpKind, Register};

use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{vector, ExecResult, Fault};
use crate::state::{cr, Seg};
use float::{BUSY, C0, C1, C2, C3, ES, F80, IE, SF};

pub fn register(r: &mut Registry) {
    ops::register(r);
}

/// Stack fault bits: underflow (C1 = 0) and overflow (C1 = 1).
const UNDERFLOW: u16 = IE | SF;
const OVERFLOW: u16 = IE | SF | C1;
/// Condition-code bits.
const CC: u16 = C0 | C1 | C2 | C3;

/// Raise #NM / #MF as the instruction's class requires, before any change.
/// `waiting` instructions report a pending unmasked exception first.
fn begin(cpu: &Cpu, waiting: bool) -> ExecResult {
    let cr0 = cpu.state.cr0;
    if cr0 & (cr::CR0_EM | cr::CR0_TS) != 0 {
        return Err(Fault::nm());
    }
    if waiting && cpu.state.fpu.fsw & ES != 0 && cr0 & cr::CR0_NE != 0 {
        return Err(Fault::new(vector::MF));
    }
    Ok(())
}

/// Record FIP, FDP and FOP for a non-control instruction.
fn note(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) {
    let ip = cpu.cur_ip;
    cpu.state.fpu.last_ip = ip;
    if has_mem(ins) {
        cpu.state.fpu.last_dp = cpu.effective_address(ins);
    }
    // FOP: the low 3 bits of the D8..DF byte and the ModRM byte. Read the
    // instruction's bytes again (they were just fetched, so this does not
    // fault in practice; if it does, FOP is left alone).
    let len = ins.len().min(15);
    let mut buf = [0u8; 15];
    let cs = cpu.state.seg(Seg::Cs).base;
    let lin = if cpu.state.in_64bit() {
        ip
    } else {
        cs.wrapping_add(ip) & 0xffff_ffff
    };
    let user = cpu.state.cpl() == 3;
    if cpu.read_linear(bus, lin, &mut buf[..len], user).is_ok() {
        if let Some(p) = buf[..len].iter().position(|b| (0xd8..=0xdf).contains(b)) {
            if let Some(&modrm) = buf.get(p + 1) {
                cpu.state.fpu.last_opcode = ((buf[p] as u16 & 7) << 8) | modrm as u16;
            }
        }
    }
}

fn has_mem(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|n| ins.op_kind(n) == OpKind::Memory)
}

/// Index i of an ST(i) register operand.
fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

impl Cpu {
    fn fpu_top(&self) -> usize {
        self.state.fpu_top()
    }
    fn set_fpu_top(&mut self, top: usize) {
        let f = &mut self.state.fpu;
        f.fsw = (f.fsw & !(7 << 11)) | (((top & 7) as u16) << 11);
    }
    fn st_phys(&self, i: usize) -> usize {
        (self.fpu_top() + i) & 7
    }
    fn st_empty(&self, i: usize) -> bool {
        (self.state.fpu.ftw >> (2 * self.st_phys(i))) & 3 == 3
    }
    fn st(&self, i: usize) -> F80 {
        F80::from_bytes(&self.state.fpu.regs[self.st_phys(i)])
    }
    fn set_st(&mut self, i: usize, v: F80) {
        let p = self.st_phys(i);
        self.state.fpu.regs[p] = v.to_bytes();
        let f = &mut self.state.fpu;
        f.ftw = (f.ftw & !(3 << (2 * p))) | (v.tag() << (2 * p));
    }
    fn set_empty(&mut self, i: usize) {
        let p = self.st_phys(i);
        self.state.fpu.ftw |= 3 << (2 * p);
    }
    fn fpu_push(&mut self, v: F80) {
        let t = self.fpu_top().wrapping_sub(1) & 7;
        self.set_fpu_top(t);
        self.set_st(0, v);
    }
    fn fpu_pop(&mut self) {
        self.set_empty(0);
        let t = (self.fpu_top() + 1) & 7;
        self.set_fpu_top(t);
    }

    /// Whether the exceptions in `bits` are all masked among `blocking`
    /// (unmasked ones in `blocking` suppress the result).
    fn fpu_allows(&self, bits: u16, blocking: u16) -> bool {
        bits & blocking & !self.state.fpu.fcw & 0x3f == 0
    }

    /// Merge an operation's exception bits (and C1) into the FSW; set
    /// ES/B for unmasked ones. Returns whether the result may be written
    /// (no unmasked invalid, denormal or zero-divide).
    fn fpu_report(&mut self, bits: u16) -> bool {
        let allowed = self.fpu_allows(bits, float::IE | float::DE | float::ZE);
        let f = &mut self.state.fpu;
        f.fsw = (f.fsw & !C1) | (bits & (C1 | 0x7f));
        if bits & 0x3f & !f.fcw != 0 {
            f.fsw |= ES | BUSY;
        }
        allowed
    }

    /// Replace the condition codes in `mask` with those in `bits`.
    fn fpu_set_cc(&mut self, mask: u16, bits: u16) {
        let f = &mut self.state.fpu;
        f.fsw = (f.fsw & !mask) | (bits & mask);
    }

    /// Recompute ES/B from the exception bits and the masks.
    fn fpu_update_es(&mut self) {
        let f = &mut self.state.fpu;
        if f.fsw & 0x3f & !f.fcw != 0 {
            f.fsw |= ES | BUSY;
        } else {
            f.fsw &= !(ES | BUSY);
        }
    }

    /// The tag word computed from register contents (FNSTENV/FNSAVE).
    fn fpu_full_tags(&self) -> u16 {
        let f = &self.state.fpu;
        (0..8).fold(0u16, |acc, p| {
            let t = if (f.ftw >> (2 * p)) & 3 == 3 {
                3
            } else {
                F80::from_bytes(&f.regs[p]).tag()
            };
            acc | (t << (2 * p))
        })
    }

    /// Load a tag word: only "empty" is taken from it, the rest is
    /// recomputed from the registers (as the hardware does).
    fn fpu_load_tags(&mut self, tags: u16) {
        let mut ftw = 0u16;
        for p in 0..8 {
            let t = if (tags >> (2 * p)) & 3 == 3 {
                3
            } else {
                F80::from_bytes(&self.state.fpu.regs[p]).tag()
            };
            ftw |= t << (2 * p);
        }
        self.state.fpu.ftw = ftw;
    }

    fn fpu_init(&mut self) {
        let f = &mut self.state.fpu;
        f.fcw = 0x037f;
        f.fsw = 0;
        f.ftw = 0xffff;
        f.last_opcode = 0;
        f.last_ip = 0;
        f.last_dp = 0;
    }

    fn fpu_ea(&self, ins: &Instruction) -> (Seg, u64) {
        (self.mem_seg(ins), self.effective_address(ins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbus::TestBus;

    #[test]
    fn stack_push_pop_and_tags() {
        let mut cpu = Cpu::standalone(1 << 20);
        cpu.fpu_push(float::ONE);
        assert_eq!(cpu.fpu_top(), 7);
        assert!(!cpu.st_empty(0));
        assert_eq!(cpu.state.fpu.ftw, 0x3fff);
        cpu.fpu_pop();
        assert_eq!(cpu.fpu_top(), 0);
        assert_eq!(cpu.state.fpu.ftw, 0xffff);
    }

    #[test]
    fn nm_when_task_switched() {
        let mut cpu = Cpu::standalone(1 << 20);
        cpu.state.cr0 |= cr::CR0_TS;
        assert_eq!(begin(&cpu, true), Err(Fault::nm()));
        let _ = TestBus::new(4096);
    }
}
