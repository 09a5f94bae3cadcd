//! x87 instruction handlers.

use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind};
use rustc_apfloat::Round;

use super::float::{self, Cmp, Ctl, Op, F80, INDEFINITE, ONE, ZERO};
use super::float::{C0, C1, C2, C3, DE, IE, OE, PE, UE, ZE};
use super::{begin, has_mem, note, st_index, CC, OVERFLOW, UNDERFLOW};
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::exec::Registry;
use crate::state::{cr, flags, Seg};

pub fn register(r: &mut Registry) {
    const G: &str = "x87";
    r.add(M::Fld, G, fld);
    r.add_all(&[M::Fst, M::Fstp], G, fst);
    r.add(M::Fild, G, fild);
    r.add_all(&[M::Fist, M::Fistp, M::Fisttp], G, fist);
    r.add(M::Fbld, G, fbld);
    r.add(M::Fbstp, G, fbstp);
    r.add_all(
        &[M::Fld1, M::Fldz, M::Fldpi, M::Fldl2e, M::Fldl2t, M::Fldlg2, M::Fldln2],
        G,
        fld_const,
    );
    r.add(M::Fxch, G, fxch);
    r.add_all(
        &[
            M::Fadd,
            M::Faddp,
            M::Fiadd,
            M::Fsub,
            M::Fsubp,
            M::Fisub,
            M::Fsubr,
            M::Fsubrp,
            M::Fisubr,
            M::Fmul,
            M::Fmulp,
            M::Fimul,
            M::Fdiv,
            M::Fdivp,
            M::Fidiv,
            M::Fdivr,
            M::Fdivrp,
            M::Fidivr,
        ],
        G,
        arith,
    );
    r.add_all(&[M::Fchs, M::Fabs, M::Fsqrt, M::Frndint], G, unary);
    r.add(M::Fscale, G, fscale);
    r.add(M::Fxtract, G, fxtract);
    r.add_all(&[M::Fprem, M::Fprem1], G, fprem);
    r.add_all(
        &[
            M::Fcom,
            M::Fcomp,
            M::Fcompp,
            M::Fucom,
            M::Fucomp,
            M::Fucompp,
            M::Ficom,
            M::Ficomp,
            M::Ftst,
        ],
        G,
        fcom,
    );
    r.add_all(&[M::Fcomi, M::Fcomip, M::Fucomi, M::Fucomip], G, fcomi);
    r.add(M::Fxam, G, fxam);
    r.add_all(
        &[
            M::Fcmovb,
            M::Fcmove,
            M::Fcmovbe,
            M::Fcmovu,
            M::Fcmovnb,
            M::Fcmovne,
            M::Fcmovnbe,
            M::Fcmovnu,
        ],
        G,
        fcmov,
    );
    r.add(M::Fldcw, G, fldcw);
    r.add_all(&[M::Fnstcw, M::Fstcw], G, fnstcw);
    r.add_all(&[M::Fnstsw, M::Fstsw], G, fnstsw);
    r.add_all(&[M::Fnclex, M::Fclex], G, fnclex);
    r.add_all(&[M::Fninit, M::Finit], G, fninit);
    r.add_all(&[M::Ffree, M::Ffreep], G, ffree);
    r.add_all(&[M::Fincstp, M::Fdecstp], G, fincstp);
    r.add(M::Fnop, G, fnop);
    r.add_all(
        &[M::Fneni, M::Fndisi, M::Fnsetpm, M::Feni, M::Fdisi, M::Fsetpm],
        G,
        legacy_nop,
    );
    r.add(M::Wait, G, wait);
    r.add_all(&[M::Fnstenv, M::Fstenv], G, fnstenv);
    r.add(M::Fldenv, G, fldenv);
    r.add_all(&[M::Fnsave, M::Fsave], G, fnsave);
    r.add(M::Frstor, G, frstor);
    r.add_all(&[M::Fxsave, M::Fxsave64], G, fxsave);
    r.add_all(&[M::Fxrstor, M::Fxrstor64], G, fxrstor);
    r.add(M::Emms, G, emms);
    r.add_all(
        &[
            M::Fsin,
            M::Fcos,
            M::Fsincos,
            M::Fptan,
            M::Fpatan,
            M::F2xm1,
            M::Fyl2x,
            M::Fyl2xp1,
        ],
        G,
        transcendental,
    );
}

fn ctl(cpu: &Cpu) -> Ctl {
    Ctl::from_fcw(cpu.state.fpu.fcw)
}

fn rc(cpu: &Cpu) -> Round {
    float::rounding(cpu.state.fpu.fcw)
}

/// Read a memory operand as an 80-bit value (NaNs unquieted) plus the
/// flags of the conversion (DE for denormal sources, IE for SNaN).
fn load_mem(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult<(F80, u16)> {
    let (seg, ea) = cpu.fpu_ea(ins);
    Ok(match ins.memory_size() {
        MemorySize::Float32 => float::from_f32(cpu.read_u32(bus, seg, ea)?),
        MemorySize::Float64 => float::from_f64(cpu.read_u64(bus, seg, ea)?),
        MemorySize::Float80 => (F80::from_bytes(&cpu.read_bytes::<10>(bus, seg, ea)?), 0),
        MemorySize::Int16 => (float::from_int(cpu.read_u16(bus, seg, ea)? as i16 as i64), 0),
        MemorySize::Int32 => (float::from_int(cpu.read_u32(bus, seg, ea)? as i32 as i64), 0),
        MemorySize::Int64 => (float::from_int(cpu.read_u64(bus, seg, ea)? as i64), 0),
        MemorySize::Bcd => (float::from_bcd(&cpu.read_bytes::<10>(bus, seg, ea)?), 0),
        _ => return Err(Fault::ud()),
    })
}

/// Push `v` (with `bits` from computing it), handling stack overflow.
fn push_checked(cpu: &mut Cpu, v: F80, bits: u16) {
    let (v, bits) = if !cpu.st_empty(7) && bits & float::SF == 0 {
        (INDEFINITE, OVERFLOW)
    } else {
        (v, bits)
    };
    if cpu.fpu_report(bits) {
        cpu.fpu_push(v);
    }
}

fn fld(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let (v, bits) = if ins.op_kind(0) == OpKind::Memory {
        let (v, bits) = load_mem(cpu, bus, ins)?;
        // Loading an f32/f64 SNaN quiets it; m80 values load unchanged.
        if v.is_nan() && ins.memory_size() != MemorySize::Float80 {
            (v.quiet(), bits)
        } else {
            (v, bits)
        }
    } else {
        let i = st_index(ins.op0_register());
        if cpu.st_empty(i) {
            (INDEFINITE, UNDERFLOW)
        } else {
            (cpu.st(i), 0)
        }
    };
    note(cpu, bus, ins);
    push_checked(cpu, v, bits);
    Ok(())
}

fn fild(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let (v, bits) = load_mem(cpu, bus, ins)?;
    note(cpu, bus, ins);
    push_checked(cpu, v, bits);
    Ok(())
}

fn fbld(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fild(cpu, bus, ins)
}

/// Exceptions that keep a store to memory from happening when unmasked.
const STORE_BLOCKING: u16 = IE | DE | OE | UE;

fn fst(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let pop = ins.mnemonic() == M::Fstp;
    let empty = cpu.st_empty(0);
    let src = if empty { INDEFINITE } else { cpu.st(0) };
    if ins.op_kind(0) == OpKind::Register {
        note(cpu, bus, ins);
        let i = st_index(ins.op0_register());
        let bits = if empty { UNDERFLOW } else { 0 };
        if cpu.fpu_report(bits) {
            cpu.set_st(i, src);
            if pop {
                cpu.fpu_pop();
            }
        }
        return Ok(());
    }
    let (seg, ea) = cpu.fpu_ea(ins);
    let bits = match ins.memory_size() {
        MemorySize::Float32 | MemorySize::Float64 => {
            let double = ins.memory_size() == MemorySize::Float64;
            let (v, bits) = float::to_float(src, double, rc(cpu));
            let bits = if empty { UNDERFLOW } else { bits };
            if cpu.fpu_allows(bits, STORE_BLOCKING) {
                cpu.write_sized(bus, seg, ea, if double { 8 } else { 4 }, v)?;
            }
            bits
        }
        MemorySize::Float80 => {
            let bits = if empty { UNDERFLOW } else { 0 };
            if cpu.fpu_allows(bits, STORE_BLOCKING) {
                cpu.write_bytes(bus, seg, ea, &src.to_bytes())?;
            }
            bits
        }
        _ => return Err(Fault::ud()),
    };
    note(cpu, bus, ins);
    if cpu.fpu_allows(bits, STORE_BLOCKING) {
        cpu.fpu_report(bits);
        if pop {
            cpu.fpu_pop();
        }
    } else {
        cpu.fpu_report(bits);
    }
    Ok(())
}

fn fist(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let pop = ins.mnemonic() != M::Fist;
    let round = if ins.mnemonic() == M::Fisttp {
        Round::TowardZero
    } else {
        rc(cpu)
    };
    let width = match ins.memory_size() {
        MemorySize::Int16 => 16,
        MemorySize::Int32 => 32,
        _ => 64,
    };
    let (v, bits) = if cpu.st_empty(0) {
        (i64::MIN >> (64 - width), UNDERFLOW)
    } else {
        float::to_int(cpu.st(0), width, round)
    };
    let (seg, ea) = cpu.fpu_ea(ins);
    let ok = cpu.fpu_allows(bits, IE | DE);
    if ok {
        cpu.write_sized(bus, seg, ea, width / 8, v as u64)?;
    }
    note(cpu, bus, ins);
    cpu.fpu_report(bits);
    if ok && pop {
        cpu.fpu_pop();
    }
    Ok(())
}

fn fbstp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let (v, bits) = if cpu.st_empty(0) {
        (float::to_bcd(INDEFINITE, Round::TowardZero).0, UNDERFLOW)
    } else {
        float::to_bcd(cpu.st(0), rc(cpu))
    };
    let (seg, ea) = cpu.fpu_ea(ins);
    let ok = cpu.fpu_allows(bits, IE | DE);
    if ok {
        cpu.write_bytes(bus, seg, ea, &v)?;
    }
    note(cpu, bus, ins);
    cpu.fpu_report(bits);
    if ok {
        cpu.fpu_pop();
    }
    Ok(())
}

/// The 66-bit internal constants, rounded to 64 bits per RC: (sign+exp,
/// nearest, toward -inf/zero, toward +inf).
fn constant(m: M) -> (u16, u64, u64, u64) {
    match m {
        M::Fldpi => (
            0x4000,
            0xc90f_daa2_2168_c235,
            0xc90f_daa2_2168_c234,
            0xc90f_daa2_2168_c235,
        ),
        M::Fldl2e => (
            0x3fff,
            0xb8aa_3b29_5c17_f0bc,
            0xb8aa_3b29_5c17_f0bb,
            0xb8aa_3b29_5c17_f0bc,
        ),
        M::Fldl2t => (
            0x4000,
            0xd49a_784b_cd1b_8afe,
            0xd49a_784b_cd1b_8afe,
            0xd49a_784b_cd1b_8aff,
        ),
        M::Fldlg2 => (
            0x3ffd,
            0x9a20_9a84_fbcf_f799,
            0x9a20_9a84_fbcf_f798,
            0x9a20_9a84_fbcf_f799,
        ),
        M::Fldln2 => (
            0x3ffe,
            0xb172_17f7_d1cf_79ac,
            0xb172_17f7_d1cf_79ab,
            0xb172_17f7_d1cf_79ac,
        ),
        M::Fld1 => (0x3fff, 1 << 63, 1 << 63, 1 << 63),
        _ => (0, 0, 0, 0),
    }
}

fn fld_const(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let (se, nearest, down, up) = constant(ins.mnemonic());
    let sig = match rc(cpu) {
        Round::TowardPositive => up,
        Round::TowardNegative | Round::TowardZero => down,
        _ => nearest,
    };
    note(cpu, bus, ins);
    push_checked(cpu, F80 { sig, se }, 0);
    Ok(())
}

fn fxch(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let i = if ins.op_count() >= 2 {
        st_index(ins.op1_register())
    } else if ins.op_count() == 1 {
        st_index(ins.op0_register())
    } else {
        1
    };
    let (e0, ei) = (cpu.st_empty(0), cpu.st_empty(i));
    let bits = if e0 || ei { UNDERFLOW } else { 0 };
    if cpu.fpu_report(bits) {
        let a = if e0 { INDEFINITE } else { cpu.st(0) };
        let b = if ei { INDEFINITE } else { cpu.st(i) };
        cpu.set_st(0, b);
        cpu.set_st(i, a);
    }
    Ok(())
}

fn arith(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    use M::*;
    let (op, reverse, pop) = match ins.mnemonic() {
        Fadd | Fiadd => (Op::Add, false, false),
        Faddp => (Op::Add, false, true),
        Fsub | Fisub => (Op::Sub, false, false),
        Fsubp => (Op::Sub, false, true),
        Fsubr | Fisubr => (Op::Sub, true, false),
        Fsubrp => (Op::Sub, true, true),
        Fmul | Fimul => (Op::Mul, false, false),
        Fmulp => (Op::Mul, false, true),
        Fdiv | Fidiv => (Op::Div, false, false),
        Fdivp => (Op::Div, false, true),
        Fdivr | Fidivr => (Op::Div, true, false),
        _ => (Op::Div, true, true),
    };
    // Destination index, source value (or register), load flags.
    let (dst, src, load_bits) = if has_mem(ins) {
        let (v, bits) = load_mem(cpu, bus, ins)?;
        (0, Ok(v), bits & DE)
    } else if ins.op_count() >= 2 {
        (st_index(ins.op0_register()), Err(st_index(ins.op1_register())), 0)
    } else if ins.op_count() == 1 {
        (0, Err(st_index(ins.op0_register())), 0)
    } else {
        (1, Err(0), 0)
    };
    note(cpu, bus, ins);
    let src_empty = matches!(src, Err(i) if cpu.st_empty(i));
    let (v, bits) = if cpu.st_empty(dst) || src_empty {
        (INDEFINITE, UNDERFLOW)
    } else {
        let a = cpu.st(dst);
        let b = match src {
            Ok(v) => v,
            Err(i) => cpu.st(i),
        };
        let (x, y) = if reverse { (b, a) } else { (a, b) };
        let (v, bits) = float::arith(op, x, y, ctl(cpu));
        let nan = a.is_nan() || b.is_nan() || a.is_unsupported();
        let quiet = bits & (IE | ZE) != 0 || nan;
        (v, if quiet { bits } else { bits | load_bits })
    };
    if cpu.fpu_report(bits) {
        cpu.set_st(dst, v);
        if pop {
            cpu.fpu_pop();
        }
    }
    Ok(())
}

fn unary(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let (v, bits) = if cpu.st_empty(0) {
        (INDEFINITE, UNDERFLOW)
    } else {
        let a = cpu.st(0);
        match ins.mnemonic() {
            M::Fchs => (a.neg(), 0),
            M::Fabs => (a.abs(), 0),
            M::Fsqrt => float::sqrt(a, ctl(cpu)),
            _ => float::round_int(a, rc(cpu)),
        }
    };
    if cpu.fpu_report(bits) {
        cpu.set_st(0, v);
    }
    Ok(())
}

fn fscale(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let (v, bits) = if cpu.st_empty(0) || cpu.st_empty(1) {
        (INDEFINITE, UNDERFLOW)
    } else {
        // FSCALE ignores precision control.
        let c = Ctl { bits: 64, rc: rc(cpu) };
        float::scale(cpu.st(0), cpu.st(1), c)
    };
    if cpu.fpu_report(bits) {
        cpu.set_st(0, v);
    }
    Ok(())
}

fn fxtract(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    if cpu.st_empty(0) {
        if cpu.fpu_report(UNDERFLOW) {
            cpu.set_st(0, INDEFINITE);
            push_checked(cpu, INDEFINITE, UNDERFLOW);
        }
        return Ok(());
    }
    if !cpu.st_empty(7) {
        if cpu.fpu_report(OVERFLOW) {
            cpu.set_st(0, INDEFINITE);
            cpu.fpu_push(INDEFINITE);
        }
        return Ok(());
    }
    let (exp, sig, bits) = float::extract(cpu.st(0));
    if cpu.fpu_report(bits) {
        cpu.set_st(0, exp);
        cpu.fpu_push(sig);
    }
    Ok(())
}

fn fprem(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let (v, bits) = if cpu.st_empty(0) || cpu.st_empty(1) {
        (INDEFINITE, UNDERFLOW)
    } else {
        float::prem(cpu.st(0), cpu.st(1), ins.mnemonic() == M::Fprem1)
    };
    // NaN results (invalid or NaN operands) leave C0/C2/C3 alone.
    if !v.is_nan() {
        cpu.fpu_set_cc(C0 | C2 | C3, bits);
    } else {
        cpu.fpu_set_cc(C2, 0);
    }
    if cpu.fpu_report(bits) {
        cpu.set_st(0, v);
    }
    Ok(())
}

fn cmp_cc(c: Cmp) -> u16 {
    match c {
        Cmp::Greater => 0,
        Cmp::Less => C0,
        Cmp::Equal => C3,
        Cmp::Unordered => C0 | C2 | C3,
    }
}

fn fcom(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let m = ins.mnemonic();
    let quiet = matches!(m, M::Fucom | M::Fucomp | M::Fucompp);
    let pops = match m {
        M::Fcomp | M::Fucomp | M::Ficomp => 1,
        M::Fcompp | M::Fucompp => 2,
        _ => 0,
    };
    let (src, load_bits) = if m == M::Ftst {
        (Ok(ZERO), 0)
    } else if has_mem(ins) {
        let (v, bits) = load_mem(cpu, bus, ins)?;
        (Ok(v), bits & DE)
    } else if ins.op_count() >= 2 {
        (Err(st_index(ins.op1_register())), 0)
    } else if ins.op_count() == 1 {
        (Err(st_index(ins.op0_register())), 0)
    } else {
        (Err(1), 0)
    };
    note(cpu, bus, ins);
    let src_empty = matches!(src, Err(i) if cpu.st_empty(i));
    let (c, bits) = if cpu.st_empty(0) || src_empty {
        (Cmp::Unordered, UNDERFLOW)
    } else {
        let b = match src {
            Ok(v) => v,
            Err(i) => cpu.st(i),
        };
        let (c, bits) = float::compare(cpu.st(0), b, quiet);
        let nan = b.is_nan() || cpu.st(0).is_nan() || cpu.st(0).is_unsupported();
        (c, bits | if bits & IE == 0 && !nan { load_bits } else { 0 })
    };
    if cpu.fpu_report(bits) {
        cpu.fpu_set_cc(C0 | C2 | C3, cmp_cc(c));
        for _ in 0..pops {
            cpu.fpu_pop();
        }
    }
    Ok(())
}

fn fcomi(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    let m = ins.mnemonic();
    let quiet = matches!(m, M::Fucomi | M::Fucomip);
    let i = st_index(ins.op1_register());
    note(cpu, bus, ins);
    let (c, bits) = if cpu.st_empty(0) || cpu.st_empty(i) {
        (Cmp::Unordered, UNDERFLOW)
    } else {
        let (c, bits) = float::compare(cpu.st(0), cpu.st(i), quiet);
        (c, bits | (cpu.state.fpu.fsw & C1))
    };
    if cpu.fpu_report(bits) {
        let f = match c {
            Cmp::Greater => 0,
            Cmp::Less => flags::CF,
            Cmp::Equal => flags::ZF,
            Cmp::Unordered => flags::ZF | flags::PF | flags::CF,
        };
        crate::exec::flags::set_status(&mut cpu.state.rflags, f);
        if matches!(m, M::Fcomip | M::Fucomip) {
            cpu.fpu_pop();
        }
    }
    Ok(())
}

fn fxam(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let v = cpu.st(0);
    let class = if cpu.st_empty(0) {
        C3 | C0
    } else if v.is_unsupported() {
        0
    } else if v.is_nan() {
        C0
    } else if v.is_inf() {
        C2 | C0
    } else if v.is_zero() {
        C3
    } else if v.is_denormal() {
        C3 | C2
    } else {
        C2
    };
    let sign = if v.sign() { C1 } else { 0 };
    cpu.fpu_set_cc(CC, class | sign);
    Ok(())
}

fn fcmov(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let f = cpu.state.rflags;
    let (cf, zf, pf) = (f & flags::CF != 0, f & flags::ZF != 0, f & flags::PF != 0);
    let take = match ins.mnemonic() {
        M::Fcmovb => cf,
        M::Fcmove => zf,
        M::Fcmovbe => cf || zf,
        M::Fcmovu => pf,
        M::Fcmovnb => !cf,
        M::Fcmovne => !zf,
        M::Fcmovnbe => !cf && !zf,
        _ => !pf,
    };
    let i = st_index(ins.op1_register());
    if cpu.st_empty(0) || cpu.st_empty(i) {
        if cpu.fpu_report(UNDERFLOW) {
            cpu.set_st(0, INDEFINITE);
        }
        return Ok(());
    }
    // C1 is left unchanged when there is no stack fault.
    if take {
        let v = cpu.st(i);
        cpu.set_st(0, v);
    }
    Ok(())
}

fn fldcw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, false)?;
    let (seg, ea) = cpu.fpu_ea(ins);
    let v = cpu.read_u16(bus, seg, ea)?;
    // Bit 6 reads as 1; bits 13..15 are reserved.
    cpu.state.fpu.fcw = (v & 0x1f7f) | 0x40;
    cpu.fpu_update_es();
    Ok(())
}

fn fnstcw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, ins.mnemonic() == M::Fstcw)?;
    let (seg, ea) = cpu.fpu_ea(ins);
    cpu.write_u16(bus, seg, ea, cpu.state.fpu.fcw)
}

fn fnstsw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, ins.mnemonic() == M::Fstsw)?;
    let fsw = cpu.state.fpu.fsw;
    if ins.op_kind(0) == OpKind::Register {
        cpu.set_reg(iced_x86::Register::AX, fsw as u64);
        return Ok(());
    }
    let (seg, ea) = cpu.fpu_ea(ins);
    cpu.write_u16(bus, seg, ea, fsw)
}

fn fnclex(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, ins.mnemonic() == M::Fclex)?;
    cpu.state.fpu.fsw &= 0x7f00;
    Ok(())
}

fn fninit(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, ins.mnemonic() == M::Finit)?;
    cpu.fpu_init();
    Ok(())
}

fn ffree(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let i = st_index(ins.op0_register());
    cpu.set_empty(i);
    cpu.fpu_set_cc(C1, 0);
    if ins.mnemonic() == M::Ffreep {
        let t = (cpu.fpu_top() + 1) & 7;
        cpu.set_fpu_top(t);
    }
    Ok(())
}

fn fincstp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let t = if ins.mnemonic() == M::Fincstp {
        cpu.fpu_top() + 1
    } else {
        cpu.fpu_top().wrapping_sub(1)
    };
    cpu.set_fpu_top(t & 7);
    cpu.fpu_set_cc(C1, 0);
    Ok(())
}

fn fnop(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    Ok(())
}

/// FENI/FDISI/FSETPM: 8087/287 leftovers, no-ops since the 387.
fn legacy_nop(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, matches!(ins.mnemonic(), M::Feni | M::Fdisi | M::Fsetpm))
}

fn wait(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let cr0 = cpu.state.cr0;
    if cr0 & cr::CR0_MP != 0 && cr0 & cr::CR0_TS != 0 {
        return Err(Fault::nm());
    }
    if cpu.state.fpu.fsw & float::ES != 0 && cr0 & cr::CR0_NE != 0 {
        return Err(Fault::new(crate::exception::vector::MF));
    }
    Ok(())
}

/// Environment image: 28 bytes (32-bit operand size) or 14 (16-bit).
fn env_image(cpu: &Cpu, wide: bool) -> ([u8; 28], usize) {
    let f = &cpu.state.fpu;
    let tags = cpu.fpu_full_tags();
    let mut b = [0u8; 28];
    if wide {
        let words: [u32; 7] = [
            0xffff_0000 | f.fcw as u32,
            0xffff_0000 | f.fsw as u32,
            0xffff_0000 | tags as u32,
            f.last_ip as u32,
            ((f.last_opcode as u32 & 0x7ff) << 16),
            f.last_dp as u32,
            0xffff_0000,
        ];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        (b, 28)
    } else {
        let words: [u16; 7] = [f.fcw, f.fsw, tags, f.last_ip as u16, 0, f.last_dp as u16, 0];
        for (i, w) in words.iter().enumerate() {
            b[i * 2..i * 2 + 2].copy_from_slice(&w.to_le_bytes());
        }
        (b, 14)
    }
}

/// Load an environment image (control, status, tags, pointers).
fn load_env(cpu: &mut Cpu, b: &[u8], wide: bool) {
    let w = |i: usize| -> u32 {
        if wide {
            u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
        } else {
            u16::from_le_bytes([b[i * 2], b[i * 2 + 1]]) as u32
        }
    };
    let f = &mut cpu.state.fpu;
    f.fcw = (w(0) as u16 & 0x1f7f) | 0x40;
    f.fsw = w(1) as u16;
    f.last_ip = w(3) as u64;
    if wide {
        f.last_opcode = ((w(4) >> 16) & 0x7ff) as u16;
    }
    f.last_dp = w(5) as u64;
    let tags = w(2) as u16;
    cpu.fpu_load_tags(tags);
}

fn env_wide(ins: &Instruction) -> bool {
    matches!(ins.memory_size(), MemorySize::FpuEnv28 | MemorySize::FpuState108)
}

fn fnstenv(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, ins.mnemonic() == M::Fstenv)?;
    let (seg, ea) = cpu.fpu_ea(ins);
    let (img, len) = env_image(cpu, env_wide(ins));
    cpu.write_bytes(bus, seg, ea, &img[..len])?;
    // FNSTENV masks all exceptions after storing.
    cpu.state.fpu.fcw |= 0x3f;
    Ok(())
}

fn fldenv(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, false)?;
    let (seg, ea) = cpu.fpu_ea(ins);
    let wide = env_wide(ins);
    let mut img = [0u8; 28];
    if wide {
        img = cpu.read_bytes::<28>(bus, seg, ea)?;
    } else {
        img[..14].copy_from_slice(&cpu.read_bytes::<14>(bus, seg, ea)?);
    }
    load_env(cpu, &img, wide);
    Ok(())
}

fn fnsave(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, ins.mnemonic() == M::Fsave)?;
    let (seg, ea) = cpu.fpu_ea(ins);
    let (env, len) = env_image(cpu, env_wide(ins));
    let mut img = [0u8; 108];
    img[..len].copy_from_slice(&env[..len]);
    for i in 0..8 {
        let o = len + i * 10;
        img[o..o + 10].copy_from_slice(&cpu.st(i).to_bytes());
    }
    cpu.write_bytes(bus, seg, ea, &img[..len + 80])?;
    cpu.fpu_init();
    Ok(())
}

fn frstor(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, false)?;
    let (seg, ea) = cpu.fpu_ea(ins);
    let wide = env_wide(ins);
    let len = if wide { 28 } else { 14 };
    let mut img = [0u8; 108];
    if wide {
        img = cpu.read_bytes::<108>(bus, seg, ea)?;
    } else {
        img[..94].copy_from_slice(&cpu.read_bytes::<94>(bus, seg, ea)?);
    }
    // Registers first (in stack order of the new TOP), then the tags.
    let fsw = if wide {
        u16::from_le_bytes([img[4], img[5]])
    } else {
        u16::from_le_bytes([img[2], img[3]])
    };
    let top = ((fsw >> 11) & 7) as usize;
    for i in 0..8 {
        let o = len + i * 10;
        let mut r = [0u8; 10];
        r.copy_from_slice(&img[o..o + 10]);
        cpu.state.fpu.regs[(top + i) & 7] = r;
    }
    load_env(cpu, &img, wide);
    Ok(())
}

/// Linear address of a 512-byte FXSAVE area, #GP unless 16-byte aligned.
fn fx_area(cpu: &Cpu, ins: &Instruction, write: bool) -> ExecResult<(Seg, u64)> {
    let (seg, ea) = cpu.fpu_ea(ins);
    let lin = cpu.linear(seg, ea, 512, write)?;
    if lin & 15 != 0 {
        return Err(Fault::gp0());
    }
    Ok((seg, ea))
}

fn fxsave(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, false)?;
    let (seg, ea) = fx_area(cpu, ins, true)?;
    let mut img = cpu.state.fpu.to_fxsave();
    if ins.mnemonic() == M::Fxsave {
        // 32-bit format: FIP/FDP offsets, then FCS/FDS (stored as 0).
        let f = &cpu.state.fpu;
        img[8..12].copy_from_slice(&(f.last_ip as u32).to_le_bytes());
        img[12..16].fill(0);
        img[16..20].copy_from_slice(&(f.last_dp as u32).to_le_bytes());
        img[20..24].fill(0);
    }
    if !cpu.state.in_64bit() {
        // Outside 64-bit mode only XMM0-7 exist.
        img[288..416].fill(0);
    }
    // Bytes 416..511 are reserved or left to software: not written.
    cpu.write_bytes(bus, seg, ea, &img[..416])
}

fn fxrstor(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, false)?;
    let (seg, ea) = fx_area(cpu, ins, false)?;
    let mut img = cpu.read_bytes::<512>(bus, seg, ea)?;
    if ins.mnemonic() == M::Fxrstor {
        img[12..16].fill(0);
        img[20..24].fill(0);
    }
    let old_xmm = cpu.state.fpu.xmm;
    let Some(mut f) = crate::state::FpuState::from_fxsave(&img) else {
        return Err(Fault::gp0());
    };
    if !cpu.state.in_64bit() {
        f.xmm[8..].copy_from_slice(&old_xmm[8..]);
    }
    cpu.state.fpu = f;
    Ok(())
}

fn emms(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let cr0 = cpu.state.cr0;
    if cr0 & cr::CR0_EM != 0 {
        return Err(Fault::ud());
    }
    begin(cpu, true)?;
    cpu.state.fpu.ftw = 0xffff;
    cpu.set_fpu_top(0);
    Ok(())
}

/// FSIN/FCOS/FSINCOS/FPTAN/FPATAN/F2XM1/FYL2X/FYL2XP1, computed in f64
/// (about 53 correct bits, not the hardware's last bit).
fn transcendental(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    begin(cpu, true)?;
    note(cpu, bus, ins);
    let m = ins.mnemonic();
    let binary = matches!(m, M::Fpatan | M::Fyl2x | M::Fyl2xp1);
    let pushes = matches!(m, M::Fsincos | M::Fptan);
    let periodic = matches!(m, M::Fsin | M::Fcos | M::Fsincos | M::Fptan);
    if cpu.st_empty(0) || (binary && cpu.st_empty(1)) {
        // C2 (argument out of range) is clear: the hardware did not look
        // at an argument it did not have.
        if periodic {
            cpu.fpu_set_cc(C2, 0);
        }
        if cpu.fpu_report(UNDERFLOW) {
            if binary {
                cpu.set_st(1, INDEFINITE);
                cpu.fpu_pop();
            } else {
                cpu.set_st(0, INDEFINITE);
                if pushes {
                    cpu.fpu_push(INDEFINITE);
                }
            }
        }
        return Ok(());
    }
    if pushes && !cpu.st_empty(7) {
        if cpu.fpu_report(OVERFLOW) {
            cpu.set_st(0, INDEFINITE);
            cpu.fpu_push(INDEFINITE);
        }
        return Ok(());
    }
    let x = cpu.st(0);
    let y = cpu.st(1);
    // Operand checks: unsupported/NaN propagate, infinities are invalid
    // for the periodic functions, out-of-range arguments set C2.
    let nan = if binary {
        if x.is_unsupported() || y.is_unsupported() {
            Some((INDEFINITE, IE))
        } else if x.is_nan() || y.is_nan() {
            Some(float::propagate_nan(y, x))
        } else {
            None
        }
    } else if x.is_unsupported() {
        Some((INDEFINITE, IE))
    } else if x.is_nan() {
        Some(float::propagate_nan(x, x))
    } else {
        None
    };
    if let Some((v, bits)) = nan.or(if periodic && x.is_inf() {
        Some((INDEFINITE, IE))
    } else {
        None
    }) {
        if periodic {
            cpu.fpu_set_cc(C2, 0);
        }
        if cpu.fpu_report(bits) {
            if binary {
                cpu.set_st(1, v);
                cpu.fpu_pop();
            } else {
                cpu.set_st(0, v);
                if pushes {
                    cpu.fpu_push(v);
                }
            }
        }
        return Ok(());
    }
    if periodic && x.exp() >= 0x3fff + 63 {
        cpu.fpu_set_cc(C2, C2);
        return Ok(());
    }
    let de = if x.is_denormal() || (binary && y.is_denormal()) {
        DE
    } else {
        0
    };
    let xf = float::to_f64(x);
    let yf = float::to_f64(y);
    let out = |v: f64| float::from_host_f64(v);
    let inexact = |v: f64| if v == 0.0 && xf == 0.0 { 0 } else { PE };
    if periodic {
        cpu.fpu_set_cc(C2, 0);
    }
    match m {
        M::Fsin | M::Fcos | M::Fptan | M::F2xm1 => {
            let v = match m {
                M::Fsin => xf.sin(),
                M::Fcos => xf.cos(),
                M::Fptan => xf.tan(),
                _ => (xf * std::f64::consts::LN_2).exp_m1(),
            };
            // Keep the sign of zero arguments (sin, tan, 2^x-1 of -0 = -0).
            let r = if x.is_zero() && m != M::Fcos { x } else { out(v) };
            let bits = de | if x.is_zero() && m != M::Fcos { 0 } else { PE };
            if cpu.fpu_report(bits) {
                cpu.set_st(0, r);
                if m == M::Fptan {
                    cpu.fpu_push(ONE);
                }
            }
        }
        M::Fsincos => {
            let (s, c) = if x.is_zero() {
                (x, ONE)
            } else {
                (out(xf.sin()), out(xf.cos()))
            };
            if cpu.fpu_report(de | inexact(1.0)) {
                cpu.set_st(0, s);
                cpu.fpu_push(c);
            }
        }
        _ => {
            let (v, bits) = match m {
                M::Fpatan => (out(yf.atan2(xf)), de | PE),
                M::Fyl2x => {
                    if x.sign() && !x.is_zero() {
                        (INDEFINITE, IE)
                    } else if x.is_zero() {
                        if y.is_zero() {
                            (INDEFINITE, IE)
                        } else {
                            (out(f64::NEG_INFINITY * yf.signum()), ZE | de)
                        }
                    } else {
                        let v = yf * xf.log2();
                        (out(v), de | if v == 0.0 { 0 } else { PE })
                    }
                }
                _ => {
                    let v = yf * xf.ln_1p() / std::f64::consts::LN_2;
                    (out(v), de | if v == 0.0 { 0 } else { PE })
                }
            };
            let _ = OE;
            if cpu.fpu_report(bits) {
                cpu.set_st(1, v);
                cpu.fpu_pop();
            }
        }
    }
    Ok(())
}
