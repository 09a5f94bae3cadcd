//! Integer arithmetic and logic: ADD ADC SUB SBB CMP AND OR XOR TEST, INC
//! DEC NEG NOT, MUL IMUL DIV IDIV, XADD CMPXCHG CMPXCHG8B CMPXCHG16B, LAHF
//! SAHF, and the BCD adjustments (legacy modes only).
//!
//! These are the hottest handlers in the emulator, so the common ones are
//! generic over the operand width (`BITS`): the size is matched once per
//! instruction and the flag arithmetic compiles to constant masks.
//!
//! Flags that the SDM leaves undefined are set the way QEMU sets them
//! (results of the low half for MUL/IMUL, AF=0 for logic ops) or left
//! unchanged (DIV/IDIV, OF after DAA/DAS, SF ZF PF OF after AAA/AAS).

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::flags::set_status;
use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::mmu::{self, Access};
use crate::state::flags::{AF, CF, OF, PF, SF, STATUS, ZF};

pub fn register(r: &mut Registry) {
    const G: &str = "alu";
    r.add(M::Add, G, binop::<ADD>);
    r.add(M::Adc, G, binop::<ADC>);
    r.add(M::Sub, G, binop::<SUB>);
    r.add(M::Sbb, G, binop::<SBB>);
    r.add(M::And, G, binop::<AND>);
    r.add(M::Or, G, binop::<OR>);
    r.add(M::Xor, G, binop::<XOR>);
    r.add(M::Cmp, G, compare::<SUB>);
    r.add(M::Test, G, compare::<AND>);
    r.add(M::Inc, G, inc_dec::<true>);
    r.add(M::Dec, G, inc_dec::<false>);
    r.add(M::Neg, G, neg);
    r.add(M::Not, G, not);
    r.add(M::Mul, G, mul);
    r.add(M::Imul, G, imul);
    r.add(M::Div, G, div);
    r.add(M::Idiv, G, idiv);
    r.add(M::Xadd, G, xadd);
    r.add(M::Cmpxchg, G, cmpxchg);
    r.add(M::Cmpxchg8b, G, cmpxchg8b);
    r.add(M::Cmpxchg16b, G, cmpxchg16b);
    r.add(M::Lahf, G, lahf);
    r.add(M::Sahf, G, sahf);
    r.add(M::Daa, G, daa);
    r.add(M::Das, G, das);
    r.add(M::Aaa, G, aaa);
    r.add(M::Aas, G, aas);
    r.add(M::Aam, G, aam);
    r.add(M::Aad, G, aad);
}

// Operations of `arith`.
const ADD: u8 = 0;
const ADC: u8 = 1;
const SUB: u8 = 2;
const SBB: u8 = 3;
const AND: u8 = 4;
const OR: u8 = 5;
const XOR: u8 = 6;

/// PF for every low byte (bit 2 set when the byte has even parity).
static PARITY: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        if (i as u8).count_ones() & 1 == 0 {
            t[i] = PF as u8;
        }
        i += 1;
    }
    t
};

#[inline(always)]
fn mask_of<const BITS: u32>() -> u64 {
    if BITS >= 64 {
        u64::MAX
    } else {
        (1u64 << BITS) - 1
    }
}

/// SF, ZF and PF of a masked `BITS`-bit result.
#[inline(always)]
fn szp<const BITS: u32>(r: u64) -> u64 {
    PARITY[r as u8 as usize] as u64 | (((r == 0) as u64) << 6) | ((r >> (BITS - 8)) & SF)
}

/// Result and status flags of `a OP b` on `BITS`-bit values. `a` and `b`
/// must already be masked; `cf_in` is RFLAGS (only CF is used).
#[inline(always)]
fn arith<const OP: u8, const BITS: u32>(a: u64, b: u64, cf_in: u64) -> (u64, u64) {
    let mask = mask_of::<BITS>();
    let c = if OP == ADC || OP == SBB { cf_in & CF } else { 0 };
    let (r, cf, of) = match OP {
        ADD | ADC => {
            let (r, cf) = if BITS == 64 {
                let (s1, c1) = a.overflowing_add(b);
                let (s2, c2) = s1.overflowing_add(c);
                (s2, (c1 | c2) as u64)
            } else {
                let full = a + b + c;
                (full & mask, full >> BITS)
            };
            (r, cf, ((a ^ r) & (b ^ r)) >> (BITS - 1))
        }
        SUB | SBB => {
            let (r, cf) = if BITS == 64 {
                let (d1, b1) = a.overflowing_sub(b);
                let (d2, b2) = d1.overflowing_sub(c);
                (d2, (b1 | b2) as u64)
            } else {
                // A borrow sets every bit above BITS of the 64-bit difference.
                let full = a.wrapping_sub(b).wrapping_sub(c);
                (full & mask, (full >> BITS) & 1)
            };
            (r, cf, ((a ^ b) & (a ^ r)) >> (BITS - 1))
        }
        AND => return (a & b, szp::<BITS>(a & b)),
        OR => return (a | b, szp::<BITS>(a | b)),
        _ => return (a ^ b, szp::<BITS>(a ^ b)),
    };
    let f = cf | ((a ^ b ^ r) & AF) | szp::<BITS>(r) | ((of & 1) << 11);
    (r, f)
}

/// Call `$f::<.., BITS>` for the operand size (in bytes) `$size`.
macro_rules! by_size {
    ($size:expr, $f:ident [$($g:tt),*] ($($arg:expr),*)) => {
        match $size {
            1 => $f::<$($g,)* 8>($($arg),*),
            2 => $f::<$($g,)* 16>($($arg),*),
            4 => $f::<$($g,)* 32>($($arg),*),
            _ => $f::<$($g,)* 64>($($arg),*),
        }
    };
}

/// Decode-time fast paths for the hottest integer forms: `OP r, r` and
/// `OP r, imm` on 32- and 64-bit registers (no LOCK, which makes them #UD
/// and is left to the generic handler), and two-operand `IMUL r, r`. They
/// read the register file directly instead of going through `read_op`,
/// `op_size` and `get_reg`, and compute the same values and flags with the
/// same `arith` as `binop`/`compare`/`imul` (the differential tests run
/// every register and immediate form through them).
pub(super) fn specialize(ins: &Instruction) -> Option<super::Handler> {
    if ins.has_lock_prefix() || ins.op0_kind() != OpKind::Register {
        return None;
    }
    if ins.op_count() == 1 {
        let r = ins.op0_register();
        return match (ins.mnemonic(), r.is_gpr64(), r.is_gpr32()) {
            (M::Inc, true, _) => Some(inc_dec_reg::<true, 64>),
            (M::Inc, _, true) => Some(inc_dec_reg::<true, 32>),
            (M::Dec, true, _) => Some(inc_dec_reg::<false, 64>),
            (M::Dec, _, true) => Some(inc_dec_reg::<false, 32>),
            _ => None,
        };
    }
    if ins.op_count() != 2 {
        return None;
    }
    let r0 = ins.op0_register();
    let wide = if r0.is_gpr64() {
        true
    } else if r0.is_gpr32() {
        false
    } else {
        return None;
    };
    let rr = ins.op1_kind() == OpKind::Register;
    if rr && r0.size() != ins.op1_register().size() {
        return None;
    }
    let imm = matches!(
        ins.op1_kind(),
        OpKind::Immediate8to32 | OpKind::Immediate8to64 | OpKind::Immediate32 | OpKind::Immediate32to64
    );
    if !rr && !imm {
        return None;
    }
    let imm8 = matches!(ins.op1_kind(), OpKind::Immediate8to32 | OpKind::Immediate8to64);
    macro_rules! pick {
        ($op:ident, $write:expr) => {
            match (wide, rr, imm8) {
                (true, true, _) => alu_rr::<$op, 64, $write>,
                (false, true, _) => alu_rr::<$op, 32, $write>,
                (true, false, true) => alu_ri::<$op, 64, $write, true>,
                (true, false, false) => alu_ri::<$op, 64, $write, false>,
                (false, false, true) => alu_ri::<$op, 32, $write, true>,
                (false, false, false) => alu_ri::<$op, 32, $write, false>,
            }
        };
    }
    Some(match ins.mnemonic() {
        M::Add => pick!(ADD, true),
        M::Adc => pick!(ADC, true),
        M::Sub => pick!(SUB, true),
        M::Sbb => pick!(SBB, true),
        M::And => pick!(AND, true),
        M::Or => pick!(OR, true),
        M::Xor => pick!(XOR, true),
        M::Cmp => pick!(SUB, false),
        M::Test => pick!(AND, false),
        M::Imul if rr && wide => imul_rr::<64>,
        M::Imul if rr => imul_rr::<32>,
        _ => return None,
    })
}

/// Index into the register file of a 64-bit (`BITS` = 64) or 32-bit GPR.
#[inline(always)]
fn gpr_index<const BITS: u32>(r: Register) -> usize {
    let first = if BITS == 64 { Register::RAX } else { Register::EAX };
    (r as usize).wrapping_sub(first as usize) & 15
}

fn alu_rr<const OP: u8, const BITS: u32, const WRITE: bool>(
    cpu: &mut Cpu,
    _bus: &mut dyn Bus,
    ins: &Instruction,
) -> ExecResult {
    let mask = mask_of::<BITS>();
    let d = gpr_index::<BITS>(ins.op0_register());
    let b = cpu.state.gpr[gpr_index::<BITS>(ins.op1_register())] & mask;
    let (r, f) = arith::<OP, BITS>(cpu.state.gpr[d] & mask, b, cpu.state.rflags);
    if WRITE {
        // A 32-bit result zero-extends into the 64-bit register, as `set_reg` does.
        cpu.state.gpr[d] = r;
    }
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

/// `IMM8`: the immediate is an imm8 sign-extended to the operand size;
/// otherwise an imm32 (sign-extended to 64 bits for 64-bit operands).
fn alu_ri<const OP: u8, const BITS: u32, const WRITE: bool, const IMM8: bool>(
    cpu: &mut Cpu,
    _bus: &mut dyn Bus,
    ins: &Instruction,
) -> ExecResult {
    let mask = mask_of::<BITS>();
    let d = gpr_index::<BITS>(ins.op0_register());
    // Sign-extended as encoded, then cut to the operand size (as `read_op` & mask).
    let b = if IMM8 {
        ins.immediate8to64() as u64
    } else {
        ins.immediate32to64() as u64
    } & mask;
    let (r, f) = arith::<OP, BITS>(cpu.state.gpr[d] & mask, b, cpu.state.rflags);
    if WRITE {
        cpu.state.gpr[d] = r;
    }
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

/// INC/DEC of a 32/64-bit register: the flags of `inc_dec_sized` (CF kept).
fn inc_dec_reg<const INC: bool, const BITS: u32>(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mask = mask_of::<BITS>();
    let d = gpr_index::<BITS>(ins.op0_register());
    let a = cpu.state.gpr[d] & mask;
    let r = if INC { a.wrapping_add(1) } else { a.wrapping_sub(1) } & mask;
    cpu.state.gpr[d] = r;
    let sign = 1u64 << (BITS - 1);
    let of = if INC { r == sign } else { a == sign };
    let f = (cpu.state.rflags & CF) | ((a ^ 1 ^ r) & AF) | szp::<BITS>(r) | ((of as u64) << 11);
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

fn imul_rr<const BITS: u32>(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = BITS / 8;
    let d = gpr_index::<BITS>(ins.op0_register());
    let a = cpu.state.gpr[d] & mask_of::<BITS>();
    let b = cpu.state.gpr[gpr_index::<BITS>(ins.op1_register())] & mask_of::<BITS>();
    let (low, overflow, _) = signed_product(a, b, size);
    cpu.state.gpr[d] = low;
    set_status(&mut cpu.state.rflags, mul_flags(low, size, overflow));
    Ok(())
}

/// LOCK is allowed only on read-modify-write instructions with a memory
/// destination.
#[inline(always)]
fn check_lock(ins: &Instruction) -> ExecResult {
    if ins.has_lock_prefix() && ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    Ok(())
}

/// LOCK on an instruction that never allows it.
#[inline(always)]
fn no_lock(ins: &Instruction) -> ExecResult {
    if ins.has_lock_prefix() {
        return Err(Fault::ud());
    }
    Ok(())
}

fn binop<const OP: u8>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    by_size!(cpu.op_size(ins, 0), binop_sized[OP](cpu, bus, ins))
}

#[inline(always)]
fn binop_sized<const OP: u8, const BITS: u32>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mask = mask_of::<BITS>();
    let b = cpu.read_op(bus, ins, 1)? & mask;
    let rflags = cpu.state.rflags;
    let f = if ins.op_kind(0) == OpKind::Register {
        no_lock(ins)?;
        let reg = ins.op0_register();
        let (r, f) = arith::<OP, BITS>(cpu.get_reg(reg), b, rflags);
        cpu.set_reg(reg, r);
        f
    } else {
        // A locked update may retry: flags come from the final old value.
        let old = cpu.rmw_op(bus, ins, &mut |a| arith::<OP, BITS>(a & mask, b, rflags).0)?;
        arith::<OP, BITS>(old & mask, b, rflags).1
    };
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

/// CMP (OP = SUB) and TEST (OP = AND): flags only.
fn compare<const OP: u8>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    by_size!(cpu.op_size(ins, 0), compare_sized[OP](cpu, bus, ins))
}

#[inline(always)]
fn compare_sized<const OP: u8, const BITS: u32>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    no_lock(ins)?;
    let mask = mask_of::<BITS>();
    let a = cpu.read_op(bus, ins, 0)? & mask;
    let b = cpu.read_op(bus, ins, 1)? & mask;
    let (_, f) = arith::<OP, BITS>(a, b, 0);
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

/// Apply `f` to operand 0 (register, or memory honouring LOCK) and return
/// its old value.
#[inline(always)]
fn update_op0(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, f: impl Fn(u64) -> u64) -> ExecResult<u64> {
    if ins.op_kind(0) == OpKind::Register {
        no_lock(ins)?;
        let reg = ins.op0_register();
        let old = cpu.get_reg(reg);
        cpu.set_reg(reg, f(old));
        Ok(old)
    } else {
        cpu.rmw_op(bus, ins, &mut |a| f(a))
    }
}

fn inc_dec<const INC: bool>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    by_size!(cpu.op_size(ins, 0), inc_dec_sized[INC](cpu, bus, ins))
}

#[inline(always)]
fn inc_dec_sized<const INC: bool, const BITS: u32>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mask = mask_of::<BITS>();
    let sign = 1u64 << (BITS - 1);
    let step = |a: u64| {
        if INC {
            a.wrapping_add(1) & mask
        } else {
            a.wrapping_sub(1) & mask
        }
    };
    let a = update_op0(cpu, bus, ins, step)? & mask;
    let r = step(a);
    // CF is preserved.
    let of = if INC { r == sign } else { a == sign };
    let f = (cpu.state.rflags & CF) | ((a ^ 1 ^ r) & AF) | szp::<BITS>(r) | ((of as u64) << 11);
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

fn neg(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    by_size!(cpu.op_size(ins, 0), neg_sized [] (cpu, bus, ins))
}

#[inline(always)]
fn neg_sized<const BITS: u32>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mask = mask_of::<BITS>();
    let a = update_op0(cpu, bus, ins, |a| a.wrapping_neg() & mask)? & mask;
    let (_, f) = arith::<SUB, BITS>(0, a, 0);
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

fn not(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mask = crate::operand::size_mask(cpu.op_size(ins, 0));
    update_op0(cpu, bus, ins, |a| !a & mask)?;
    Ok(())
}

/// Accumulator registers for an operand size in bytes: (low, high) halves
/// of the double-width product or dividend (AL/AH, AX/DX, EAX/EDX, RAX/RDX).
fn acc_pair(size: u32) -> (Register, Register) {
    match size {
        1 => (Register::AL, Register::AH),
        2 => (Register::AX, Register::DX),
        4 => (Register::EAX, Register::EDX),
        _ => (Register::RAX, Register::RDX),
    }
}

/// Flags after a multiply: CF=OF=overflow; SF ZF PF from the low half and
/// AF=0 (undefined per SDM; this matches QEMU).
#[inline(always)]
fn mul_flags(low: u64, size: u32, overflow: bool) -> u64 {
    let szp = match size {
        1 => szp::<8>(low),
        2 => szp::<16>(low),
        4 => szp::<32>(low),
        _ => szp::<64>(low),
    };
    szp | if overflow { CF | OF } else { 0 }
}

/// MUL: unsigned double-width product of the accumulator and operand 0.
fn mul(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    no_lock(ins)?;
    let size = cpu.op_size(ins, 0);
    let src = cpu.read_op(bus, ins, 0)?;
    let bits = size * 8;
    let mask = crate::operand::size_mask(size);
    let (lo_reg, hi_reg) = acc_pair(size);
    let product = (cpu.state.gpr[0] & mask) as u128 * (src & mask) as u128;
    let low = product as u64 & mask;
    let high = (product >> bits) as u64 & mask;
    if size == 1 {
        cpu.set_reg(Register::AX, product as u64);
    } else {
        cpu.set_reg(lo_reg, low);
        cpu.set_reg(hi_reg, high);
    }
    set_status(&mut cpu.state.rflags, mul_flags(low, size, high != 0));
    Ok(())
}

/// Signed product of two `size`-byte values: (low `size` bytes, whether the
/// full product does not fit in them, the high `size` bytes).
#[inline(always)]
fn signed_product(a: u64, b: u64, size: u32) -> (u64, bool, u64) {
    use crate::operand::{sign_extend, size_mask};
    let mask = size_mask(size);
    let p = sign_extend(a, size) as i64 as i128 * sign_extend(b, size) as i64 as i128;
    let low = p as u64 & mask;
    let high = (p >> (size * 8)) as u64 & mask;
    let overflow = sign_extend(low, size) as i64 as i128 != p;
    (low, overflow, high)
}

/// IMUL: one operand (double-width into the accumulator pair), two
/// operands (dst *= src) or three (dst = src * imm).
fn imul(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    no_lock(ins)?;
    let size = cpu.op_size(ins, 0);
    match ins.op_count() {
        1 => {
            let src = cpu.read_op(bus, ins, 0)?;
            let (low, overflow, high) = signed_product(cpu.state.gpr[0], src, size);
            let (lo_reg, hi_reg) = acc_pair(size);
            if size == 1 {
                cpu.set_reg(Register::AX, (high << 8) | low);
            } else {
                cpu.set_reg(lo_reg, low);
                cpu.set_reg(hi_reg, high);
            }
            set_status(&mut cpu.state.rflags, mul_flags(low, size, overflow));
        }
        n => {
            let (a, b) = if n == 2 {
                (cpu.read_op(bus, ins, 0)?, cpu.read_op(bus, ins, 1)?)
            } else {
                (cpu.read_op(bus, ins, 1)?, cpu.read_op(bus, ins, 2)?)
            };
            let (low, overflow, _) = signed_product(a, b, size);
            cpu.set_reg(ins.op0_register(), low);
            set_status(&mut cpu.state.rflags, mul_flags(low, size, overflow));
        }
    }
    Ok(())
}

/// DIV: unsigned divide of the accumulator pair by operand 0. #DE on a zero
/// divisor or a quotient too wide, before anything changes. Flags are
/// undefined and left unchanged.
fn div(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    no_lock(ins)?;
    let size = cpu.op_size(ins, 0);
    let mask = crate::operand::size_mask(size);
    let divisor = cpu.read_op(bus, ins, 0)? & mask;
    if divisor == 0 {
        return Err(Fault::de());
    }
    let (lo_reg, hi_reg) = acc_pair(size);
    let (q, r) = if size == 8 {
        let dividend = ((cpu.state.gpr[2] as u128) << 64) | cpu.state.gpr[0] as u128;
        let q = dividend / divisor as u128;
        if q > u64::MAX as u128 {
            return Err(Fault::de());
        }
        (q as u64, (dividend % divisor as u128) as u64)
    } else {
        let bits = size * 8;
        let dividend = if size == 1 {
            cpu.state.gpr[0] & 0xffff
        } else {
            ((cpu.state.gpr[2] & mask) << bits) | (cpu.state.gpr[0] & mask)
        };
        let q = dividend / divisor;
        if q > mask {
            return Err(Fault::de());
        }
        (q, dividend % divisor)
    };
    store_quotient(cpu, size, lo_reg, hi_reg, q, r);
    Ok(())
}

/// Quotient and remainder go to AL/AH for bytes, else to the accumulator pair.
fn store_quotient(cpu: &mut Cpu, size: u32, lo_reg: Register, hi_reg: Register, q: u64, r: u64) {
    if size == 1 {
        cpu.set_reg(Register::AX, (r << 8) | q);
    } else {
        cpu.set_reg(lo_reg, q);
        cpu.set_reg(hi_reg, r);
    }
}

/// IDIV: signed divide, truncating toward zero. #DE on a zero divisor or a
/// quotient outside the signed range. Flags are undefined and left unchanged.
fn idiv(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    use crate::operand::{sign_extend, size_mask};
    no_lock(ins)?;
    let size = cpu.op_size(ins, 0);
    let mask = size_mask(size);
    let bits = size * 8;
    let divisor = sign_extend(cpu.read_op(bus, ins, 0)?, size) as i64 as i128;
    if divisor == 0 {
        return Err(Fault::de());
    }
    let (lo, hi) = (cpu.state.gpr[0], cpu.state.gpr[2]);
    let dividend: i128 = match size {
        1 => lo as u16 as i16 as i128,
        2 => ((((hi & 0xffff) << 16) | (lo & 0xffff)) as u32 as i32) as i128,
        4 => ((((hi & 0xffff_ffff) << 32) | (lo & 0xffff_ffff)) as i64) as i128,
        _ => (((hi as u128) << 64) | lo as u128) as i128,
    };
    // checked_div: i128::MIN / -1 overflows.
    let q = dividend.checked_div(divisor).ok_or(Fault::de())?;
    let limit = 1i128 << (bits - 1);
    if q < -limit || q >= limit {
        return Err(Fault::de());
    }
    let r = dividend.checked_rem(divisor).ok_or(Fault::de())?;
    let (q, r) = (q as u64 & mask, r as u64 & mask);
    let (lo_reg, hi_reg) = acc_pair(size);
    store_quotient(cpu, size, lo_reg, hi_reg, q, r);
    Ok(())
}

/// XADD: dst += src, src = old dst; flags as ADD.
fn xadd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    by_size!(cpu.op_size(ins, 0), xadd_sized [] (cpu, bus, ins))
}

#[inline(always)]
fn xadd_sized<const BITS: u32>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_lock(ins)?;
    let mask = mask_of::<BITS>();
    let src_reg = ins.op1_register();
    let src = cpu.get_reg(src_reg) & mask;
    let old = if ins.op_kind(0) == OpKind::Register {
        let dst_reg = ins.op0_register();
        let old = cpu.get_reg(dst_reg) & mask;
        // The source is written first, so with the same register the sum wins.
        cpu.set_reg(src_reg, old);
        cpu.set_reg(dst_reg, old.wrapping_add(src) & mask);
        old
    } else {
        let old = cpu.rmw_op(bus, ins, &mut |a| a.wrapping_add(src) & mask)? & mask;
        cpu.set_reg(src_reg, old);
        old
    };
    let (_, f) = arith::<ADD, BITS>(old, src, 0);
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

/// CMPXCHG: compare the accumulator with dst; equal: dst = src, else
/// accumulator = dst. Flags as CMP accumulator, dst.
fn cmpxchg(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    by_size!(cpu.op_size(ins, 0), cmpxchg_sized [] (cpu, bus, ins))
}

#[inline(always)]
fn cmpxchg_sized<const BITS: u32>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_lock(ins)?;
    let mask = mask_of::<BITS>();
    let (acc_reg, _) = acc_pair(BITS / 8);
    let acc = cpu.state.gpr[0] & mask;
    let src = cpu.get_reg(ins.op1_register()) & mask;
    let old = if ins.op_kind(0) == OpKind::Register {
        // A register destination is written only on success (no
        // zero-extension of a 32-bit register on failure).
        let dst_reg = ins.op0_register();
        let old = cpu.get_reg(dst_reg) & mask;
        if old == acc {
            cpu.set_reg(dst_reg, src);
        }
        old
    } else {
        // Memory always sees a write cycle, of its own value on failure.
        cpu.rmw_op(bus, ins, &mut |a| if a & mask == acc { src } else { a })? & mask
    };
    if old != acc {
        cpu.set_reg(acc_reg, old);
    }
    let (_, f) = arith::<SUB, BITS>(acc, old, 0);
    set_status(&mut cpu.state.rflags, f);
    Ok(())
}

/// CMPXCHG8B m64: compare EDX:EAX with m64; equal: m64 = ECX:EBX, ZF=1;
/// else EDX:EAX = m64, ZF=0. Other flags are unchanged.
fn cmpxchg8b(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let g = &cpu.state.gpr;
    let expected = ((g[2] & 0xffff_ffff) << 32) | (g[0] & 0xffff_ffff);
    let new = ((g[1] & 0xffff_ffff) << 32) | (g[3] & 0xffff_ffff);
    let ea = cpu.effective_address(ins);
    let seg = cpu.mem_seg(ins);
    let old = cpu.rmw(bus, seg, ea, 8, ins.has_lock_prefix(), &mut |m| {
        if m == expected {
            new
        } else {
            m
        }
    })?;
    let equal = old == expected;
    if !equal {
        cpu.set_reg(Register::EAX, old & 0xffff_ffff);
        cpu.set_reg(Register::EDX, old >> 32);
    }
    let rf = &mut cpu.state.rflags;
    *rf = (*rf & !ZF) | if equal { ZF } else { 0 };
    Ok(())
}

/// CMPXCHG16B m128: as CMPXCHG8B with RDX:RAX and RCX:RBX. The operand must
/// be 16-byte aligned (#GP(0)); the update is always atomic.
fn cmpxchg16b(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let g = &cpu.state.gpr;
    let expected = ((g[2] as u128) << 64) | g[0] as u128;
    let new = ((g[1] as u128) << 64) | g[3] as u128;
    let ea = cpu.effective_address(ins);
    let seg = cpu.mem_seg(ins);
    let lin = cpu.linear(seg, ea, 16, true)?;
    if lin & 15 != 0 {
        return Err(Fault::gp0());
    }
    let old = compare_exchange_128(cpu, bus, lin, expected, new)?;
    let equal = old == expected;
    if !equal {
        cpu.state.gpr[0] = old as u64;
        cpu.state.gpr[2] = (old >> 64) as u64;
    }
    let rf = &mut cpu.state.rflags;
    *rf = (*rf & !ZF) | if equal { ZF } else { 0 };
    Ok(())
}

/// Atomic 16-byte compare-exchange at a 16-byte aligned linear address;
/// returns the old value. RAM uses the host's CMPXCHG16B; MMIO (where
/// atomicity means nothing) is a read followed by a write.
fn compare_exchange_128(cpu: &mut Cpu, bus: &mut dyn Bus, lin: u64, expected: u128, new: u128) -> ExecResult<u128> {
    let user = cpu.state.cpl() == 3;
    let t = mmu::translate(&mut cpu.tlb, bus, &cpu.state, lin, Access::Write, user)?;
    if let Some(host) = t.host {
        cpu.note_code_write(t.phys);
        let offset = (lin & (crate::bus::PAGE_SIZE - 1)) as usize;
        // SAFETY: the bus vouches for PAGE_SIZE bytes at `host`; the caller
        // checked 16-byte alignment, so all 16 bytes lie inside the page.
        let p = unsafe { host.as_ptr().add(offset) } as *mut u128;
        return Ok(host_cmpxchg16b(p, expected, new));
    }
    let mut buf = [0u8; 16];
    cpu.read_linear(bus, lin, &mut buf, user)?;
    let old = u128::from_le_bytes(buf);
    let value = if old == expected { new } else { old };
    cpu.write_linear(bus, lin, &value.to_le_bytes(), user)?;
    Ok(old)
}

#[cfg(target_arch = "x86_64")]
fn host_cmpxchg16b(p: *mut u128, expected: u128, new: u128) -> u128 {
    if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
        return locked_fallback(p, expected, new);
    }
    let (mut lo, mut hi) = (expected as u64, (expected >> 64) as u64);
    // Inline assembly because the intrinsic becomes a libcall in builds
    // without the target feature. RBX is reserved by LLVM: swap the new low
    // half into it and restore it afterwards.
    // SAFETY: `p` is valid and 16-byte aligned (see compare_exchange_128),
    // the CPU has CMPXCHG16B, and RBX is restored before the block ends.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "mov rbx, {new_lo}",
            p = in(reg) p,
            new_lo = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    ((hi as u128) << 64) | lo as u128
}

#[cfg(not(target_arch = "x86_64"))]
fn host_cmpxchg16b(p: *mut u128, expected: u128, new: u128) -> u128 {
    locked_fallback(p, expected, new)
}

/// Compare-exchange under a global lock, for hosts without a 16-byte CAS.
#[allow(dead_code)]
fn locked_fallback(p: *mut u128, expected: u128, new: u128) -> u128 {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `p` is valid and aligned (see compare_exchange_128); the lock
    // serializes all fallback users.
    unsafe {
        let old = p.read_volatile();
        if old == expected {
            p.write_volatile(new);
        }
        old
    }
}

/// LAHF: AH = SF:ZF:0:AF:0:PF:1:CF.
fn lahf(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let f = cpu.state.rflags & (SF | ZF | AF | PF | CF);
    cpu.set_reg(Register::AH, f | 2);
    Ok(())
}

/// SAHF: SF ZF AF PF CF = AH; OF unchanged.
fn sahf(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let ah = (cpu.state.gpr[0] >> 8) & (SF | ZF | AF | PF | CF);
    let rf = &mut cpu.state.rflags;
    *rf = (*rf & !(SF | ZF | AF | PF | CF)) | ah;
    Ok(())
}

/// BCD adjustments do not exist in 64-bit mode.
#[inline(always)]
fn legacy_only(cpu: &Cpu) -> ExecResult {
    if cpu.state.in_64bit() {
        return Err(Fault::ud());
    }
    Ok(())
}

/// Replace the flags in `which` with `new`.
#[inline(always)]
fn set_flags(cpu: &mut Cpu, which: u64, new: u64) {
    let rf = &mut cpu.state.rflags;
    *rf = (*rf & !which) | (new & which);
}

/// DAA (SDM pseudo-code). OF is undefined and left unchanged.
fn daa(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    legacy_only(cpu)?;
    let old_al = cpu.state.gpr[0] & 0xff;
    let old_cf = cpu.state.rflags & CF != 0;
    let mut al = old_al;
    let mut af = false;
    if al & 0xf > 9 || cpu.state.rflags & AF != 0 {
        al = (al + 6) & 0xff;
        af = true;
    }
    // The SDM's carry out of AL + 6 is always overridden by this step.
    let cf = old_al > 0x99 || old_cf;
    if cf {
        al = (al + 0x60) & 0xff;
    }
    cpu.set_reg(Register::AL, al);
    let f = szp::<8>(al) | if cf { CF } else { 0 } | if af { AF } else { 0 };
    set_flags(cpu, STATUS & !OF, f);
    Ok(())
}

/// DAS (SDM pseudo-code). OF is undefined and left unchanged.
fn das(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    legacy_only(cpu)?;
    let old_al = cpu.state.gpr[0] & 0xff;
    let old_cf = cpu.state.rflags & CF != 0;
    let mut al = old_al;
    let mut cf = false;
    let mut af = false;
    if al & 0xf > 9 || cpu.state.rflags & AF != 0 {
        cf = old_cf || al < 6;
        al = al.wrapping_sub(6) & 0xff;
        af = true;
    }
    if old_al > 0x99 || old_cf {
        al = al.wrapping_sub(0x60) & 0xff;
        cf = true;
    }
    cpu.set_reg(Register::AL, al);
    let f = szp::<8>(al) | if cf { CF } else { 0 } | if af { AF } else { 0 };
    set_flags(cpu, STATUS & !OF, f);
    Ok(())
}

/// AAA: AX += 0x106 when the low nibble overflowed. Only AF and CF are
/// defined; the others are left unchanged.
fn aaa(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    legacy_only(cpu)?;
    let mut ax = cpu.state.gpr[0] & 0xffff;
    let adjust = ax & 0xf > 9 || cpu.state.rflags & AF != 0;
    if adjust {
        ax = (ax + 0x106) & 0xffff;
    }
    cpu.set_reg(Register::AX, ax & 0xff0f);
    set_flags(cpu, AF | CF, if adjust { AF | CF } else { 0 });
    Ok(())
}

/// AAS: AX -= 6 and AH -= 1 when the low nibble borrowed. Only AF and CF
/// are defined; the others are left unchanged.
fn aas(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    legacy_only(cpu)?;
    let mut ax = cpu.state.gpr[0] & 0xffff;
    let adjust = ax & 0xf > 9 || cpu.state.rflags & AF != 0;
    if adjust {
        ax = ax.wrapping_sub(6).wrapping_sub(0x100) & 0xffff;
    }
    cpu.set_reg(Register::AX, ax & 0xff0f);
    set_flags(cpu, AF | CF, if adjust { AF | CF } else { 0 });
    Ok(())
}

/// AAM imm8: AH = AL / imm8, AL = AL % imm8; #DE when imm8 is 0. SF ZF PF
/// from AL; OF AF CF are undefined and cleared.
fn aam(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    legacy_only(cpu)?;
    let base = ins.immediate8() as u64;
    if base == 0 {
        return Err(Fault::de());
    }
    let al = cpu.state.gpr[0] & 0xff;
    let (q, r) = (al / base, al % base);
    cpu.set_reg(Register::AX, (q << 8) | r);
    set_status(&mut cpu.state.rflags, szp::<8>(r));
    Ok(())
}

/// AAD imm8: AL = AL + AH * imm8, AH = 0. SF ZF PF from AL; OF AF CF are
/// undefined and cleared.
fn aad(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    legacy_only(cpu)?;
    let base = ins.immediate8() as u64;
    let ax = cpu.state.gpr[0];
    let al = ((ax & 0xff) + ((ax >> 8) & 0xff) * base) & 0xff;
    cpu.set_reg(Register::AX, al);
    set_status(&mut cpu.state.rflags, szp::<8>(al));
    Ok(())
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    use super::*;
    use crate::exception::vector;
    use crate::state::{CpuState, Segment};
    use crate::testbus::TestBus;

    const CODE: u64 = 0x7c00;

    /// Run one instruction in real mode with AX and the status flags given;
    /// returns (AX, RFLAGS, whether it raised an exception).
    fn run16(code: &[u8], ax: u64, rflags: u64) -> (u64, u64, bool) {
        let mut bus = TestBus::new(1 << 20);
        bus.load(CODE, code);
        let mut cpu = Cpu::standalone(1 << 20);
        cpu.state.segs[1] = Segment::real_mode(0, true);
        cpu.state.rip = CODE;
        cpu.state.gpr[0] = ax;
        cpu.state.rflags = 2 | rflags;
        cpu.step(&mut bus);
        (cpu.state.gpr[0] & 0xffff, cpu.state.rflags, cpu.stats.exceptions != 0)
    }

    /// Decode one 64-bit instruction (without iced's LOCK validity check)
    /// and run its handler on `cpu`.
    fn exec64(cpu: &mut Cpu, code: &[u8]) -> ExecResult {
        let mut dec = Decoder::with_ip(64, code, 0x1000, DecoderOptions::NO_INVALID_CHECK);
        let ins = dec.decode();
        assert!(!ins.is_invalid(), "{code:02x?} does not decode");
        let mut bus = TestBus::new(1 << 16);
        crate::exec::handler_for(ins.mnemonic())(cpu, &mut bus, &ins)
    }

    fn cpu64() -> Cpu {
        let mut cpu = Cpu::standalone(1 << 16);
        cpu.state = CpuState::long_mode_flat(0);
        cpu
    }

    fn bit(b: bool, f: u64) -> u64 {
        if b {
            f
        } else {
            0
        }
    }

    fn szp8(al: u64) -> u64 {
        bit(al == 0, ZF) | bit(al & 0x80 != 0, SF) | bit((al as u8).count_ones() & 1 == 0, PF)
    }

    /// SDM DAA pseudo-code, literally: (AL, flags).
    #[allow(unused_assignments)] // the SDM assigns CF and then overrides it
    fn ref_daa(al: u64, af_in: bool, cf_in: bool) -> (u64, u64) {
        let (old_al, old_cf) = (al, cf_in);
        let mut al = al;
        let mut cf = false;
        let af;
        if (al & 0x0f) > 9 || af_in {
            let sum = al + 6;
            al = sum & 0xff;
            cf = old_cf || sum > 0xff;
            af = true;
        } else {
            af = false;
        }
        if old_al > 0x99 || old_cf {
            al = (al + 0x60) & 0xff;
            cf = true;
        } else {
            cf = false;
        }
        (al, szp8(al) | bit(cf, CF) | bit(af, AF))
    }

    /// SDM DAS pseudo-code, literally.
    fn ref_das(al: u64, af_in: bool, cf_in: bool) -> (u64, u64) {
        let (old_al, old_cf) = (al, cf_in);
        let mut al = al;
        let mut cf = false;
        let af;
        if (al & 0x0f) > 9 || af_in {
            cf = old_cf || al < 6;
            al = al.wrapping_sub(6) & 0xff;
            af = true;
        } else {
            af = false;
        }
        if old_al > 0x99 || old_cf {
            al = al.wrapping_sub(0x60) & 0xff;
            cf = true;
        }
        (al, szp8(al) | bit(cf, CF) | bit(af, AF))
    }

    #[test]
    fn daa_das_match_the_sdm_for_every_input() {
        for al in 0..256u64 {
            for fl in 0..4u64 {
                let (af, cf) = (fl & 1 != 0, fl & 2 != 0);
                let rflags = bit(af, AF) | bit(cf, CF) | OF;
                for (code, reference) in [(0x27u8, ref_daa as fn(u64, bool, bool) -> (u64, u64)), (0x2f, ref_das)] {
                    let (ax, out, faulted) = run16(&[code], 0x5500 | al, rflags);
                    let (want_al, want_flags) = reference(al, af, cf);
                    assert!(!faulted);
                    assert_eq!(ax, 0x5500 | want_al, "{code:#x} al={al:#x} af={af} cf={cf}");
                    // OF is undefined (left unchanged here).
                    assert_eq!(out & STATUS, want_flags | OF, "{code:#x} al={al:#x} af={af} cf={cf}");
                }
            }
        }
        // SDM examples: 79h + 35h = AEh, DAA -> 14h CF=1; 35h - 47h = EEh, DAS -> 88h CF=1.
        assert_eq!(run16(&[0x27], 0xae, 0).0, 0x14);
        assert_eq!(run16(&[0x2f], 0xee, AF | CF).0, 0x88);
    }

    #[test]
    fn aaa_aas_match_the_sdm() {
        for ax in (0..0x10000u64).step_by(29) {
            for af in [false, true] {
                let adjust = ax & 0xf > 9 || af;
                let (aaa, aas) = if adjust {
                    (
                        (ax + 0x106) & 0xff0f,
                        ((ax.wrapping_sub(6) & 0xffff).wrapping_sub(0x100) & 0xff0f),
                    )
                } else {
                    (ax & 0xff0f, ax & 0xff0f)
                };
                for (code, want) in [(0x37u8, aaa), (0x3f, aas)] {
                    let (got, fl, faulted) = run16(&[code], ax, bit(af, AF));
                    assert!(!faulted);
                    assert_eq!(got, want, "{code:#x} ax={ax:#x} af={af}");
                    assert_eq!(fl & (AF | CF), bit(adjust, AF | CF));
                }
            }
        }
        // 6 + 9: AL=0Fh -> AAA -> AX=0105h.
        assert_eq!(run16(&[0x37], 0x000f, 0).0, 0x0105);
        // 8 - 9: AL=FFh, AF=1 -> AAS -> AH-1, AL=9.
        assert_eq!(run16(&[0x3f], 0x00ff, AF).0, 0xff09);
    }

    #[test]
    fn aam_aad() {
        for base in [10u64, 16, 7, 1, 0xff] {
            for ax in (0..0x10000u64).step_by(59) {
                let al = ax & 0xff;
                let (got, fl, faulted) = run16(&[0xd4, base as u8], ax, STATUS);
                assert!(!faulted);
                let want = ((al / base) << 8) | (al % base);
                assert_eq!(got, want);
                assert_eq!(fl & STATUS, szp8(want & 0xff));
                let (got, fl, faulted) = run16(&[0xd5, base as u8], ax, STATUS);
                assert!(!faulted);
                let want = (al + (ax >> 8) * base) & 0xff;
                assert_eq!(got, want);
                assert_eq!(fl & STATUS, szp8(want));
            }
        }
        assert_eq!(run16(&[0xd4, 0x0a], 0x3f, 0).0, 0x0603);
        assert_eq!(run16(&[0xd5, 0x0a], 0x0603, 0).0, 0x3f);
        // AAM 0 raises #DE and leaves AX alone.
        let (ax, _, faulted) = run16(&[0xd4, 0x00], 0x1234, 0);
        assert!(faulted);
        assert_eq!(ax, 0x1234);
    }

    #[test]
    fn bcd_is_invalid_in_64bit_mode() {
        let mut cpu = cpu64();
        let ins = Instruction::with(iced_x86::Code::Daa);
        let mut bus = TestBus::new(1 << 16);
        assert_eq!(daa(&mut cpu, &mut bus, &ins), Err(Fault::ud()));
        assert_eq!(aam(&mut cpu, &mut bus, &ins), Err(Fault::ud()));
    }

    #[test]
    fn divide_faults_leave_state_alone() {
        // div rcx with rcx = 0; div ecx with edx >= ecx; idiv with MIN / -1.
        let cases: [(&[u8], [u64; 3]); 6] = [
            (&[0x48, 0xf7, 0xf1], [5, 0, 0]),
            (&[0xf7, 0xf1], [5, 7, 7]),
            (&[0xf6, 0xf1], [0x0200, 0, 2]),
            (&[0x48, 0xf7, 0xf9], [0, 1 << 63, u64::MAX]),
            (&[0x48, 0xf7, 0xf9], [0, 0, 0]),
            (&[0x66, 0xf7, 0xf9], [0x0000, 0x8000, 0xffff]),
        ];
        for (code, [rax, rdx, rcx]) in cases {
            let mut cpu = cpu64();
            cpu.state.gpr[0] = rax;
            cpu.state.gpr[2] = rdx;
            cpu.state.gpr[1] = rcx;
            let before = cpu.state.clone();
            assert_eq!(
                exec64(&mut cpu, code).map_err(|f| f.vector),
                Err(vector::DE),
                "{code:02x?}"
            );
            assert_eq!(cpu.state.gpr, before.gpr);
            assert_eq!(cpu.state.rflags, before.rflags);
        }
        // 64-bit IDIV at the edge that fits: -2^127 / 2^63... use -2^64 / 2 = -2^63.
        let mut cpu = cpu64();
        cpu.state.gpr[0] = 0;
        cpu.state.gpr[2] = u64::MAX;
        cpu.state.gpr[1] = 2;
        assert_eq!(exec64(&mut cpu, &[0x48, 0xf7, 0xf9]), Ok(()));
        assert_eq!(cpu.state.gpr[0], 1 << 63);
        assert_eq!(cpu.state.gpr[2], 0);
    }

    #[test]
    fn lock_needs_a_memory_destination_and_a_lockable_instruction() {
        for code in [
            &[0xf0, 0x48, 0x01, 0xc8][..],   // lock add rax, rcx
            &[0xf0, 0x48, 0xff, 0xc0],       // lock inc rax
            &[0xf0, 0x48, 0x0f, 0xc1, 0xc8], // lock xadd rax, rcx
            &[0xf0, 0x48, 0x0f, 0xb1, 0xc8], // lock cmpxchg rax, rcx
            &[0xf0, 0x48, 0x39, 0x08],       // lock cmp [rax], rcx
            &[0xf0, 0x48, 0x85, 0x08],       // lock test [rax], rcx
            &[0xf0, 0x48, 0xf7, 0x20],       // lock mul qword [rax]
        ] {
            let mut cpu = cpu64();
            cpu.state.gpr[0] = 0x100;
            let before = cpu.state.clone();
            assert_eq!(exec64(&mut cpu, code), Err(Fault::ud()), "{code:02x?}");
            assert_eq!(cpu.state.gpr, before.gpr);
        }
    }

    #[test]
    fn cmpxchg16b_needs_16_byte_alignment() {
        let mut cpu = cpu64();
        cpu.state.gpr[6] = 0x2008; // rsi
        let before = cpu.state.clone();
        // lock cmpxchg16b [rsi]
        assert_eq!(exec64(&mut cpu, &[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), Err(Fault::gp0()));
        assert_eq!(cpu.state.gpr, before.gpr);
        assert_eq!(cpu.state.rflags, before.rflags);
    }

    #[test]
    fn host_cmpxchg16b_swaps_only_when_equal() {
        #[repr(align(16))]
        struct Slot(u128);
        let mut slot = Slot(0x1111_2222_3333_4444_5555_6666_7777_8888);
        let p = &mut slot.0 as *mut u128;
        let old = host_cmpxchg16b(p, 1, 2);
        assert_eq!(old, slot.0);
        let want = slot.0;
        assert_eq!(host_cmpxchg16b(p, want, 42), want);
        assert_eq!(slot.0, 42);
    }

    #[test]
    fn adcx_adox_are_not_offered() {
        assert!(!crate::exec::is_implemented(M::Adcx));
        assert!(!crate::exec::is_implemented(M::Adox));
        assert_eq!(crate::config::CpuConfig::default().cpuid(7, 0)[1] & (1 << 19), 0);
    }
}
