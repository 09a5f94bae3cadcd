//! Shifts and rotates (SHL/SAL, SHR, SAR, ROL, ROR, RCL, RCR, SHLD, SHRD),
//! bit tests (BT, BTS, BTR, BTC), bit scans (BSF, BSR, and TZCNT/LZCNT,
//! which run as BSF/BSR because CPUID offers neither BMI1 nor ABM),
//! POPCNT, SETcc and CMOVcc.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::flags::{condition, set_status, sign_bit, szp};
use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::operand::{sign_extend, size_mask};
use crate::state::flags::*;

const SETCC: [M; 16] = [
    M::Seto,
    M::Setno,
    M::Setb,
    M::Setae,
    M::Sete,
    M::Setne,
    M::Setbe,
    M::Seta,
    M::Sets,
    M::Setns,
    M::Setp,
    M::Setnp,
    M::Setl,
    M::Setge,
    M::Setle,
    M::Setg,
];

const CMOVCC: [M; 16] = [
    M::Cmovo,
    M::Cmovno,
    M::Cmovb,
    M::Cmovae,
    M::Cmove,
    M::Cmovne,
    M::Cmovbe,
    M::Cmova,
    M::Cmovs,
    M::Cmovns,
    M::Cmovp,
    M::Cmovnp,
    M::Cmovl,
    M::Cmovge,
    M::Cmovle,
    M::Cmovg,
];

pub fn register(r: &mut Registry) {
    const G: &str = "bits";
    r.add_all(
        &[M::Shl, M::Sal, M::Shr, M::Sar, M::Rol, M::Ror, M::Rcl, M::Rcr],
        G,
        shift_rotate,
    );
    r.add_all(&[M::Shld, M::Shrd], G, double_shift);
    r.add(M::Bt, G, bt);
    r.add_all(&[M::Bts, M::Btr, M::Btc], G, bt_modify);
    // Without BMI1/ABM in CPUID, F3 0F BC/BD are BSF/BSR with an ignored
    // REP prefix, as on processors that predate those extensions.
    r.add_all(&[M::Bsf, M::Tzcnt], G, bsf);
    r.add_all(&[M::Bsr, M::Lzcnt], G, bsr);
    r.add(M::Popcnt, G, popcnt);
    r.add_all(&SETCC, G, setcc);
    r.add_all(&CMOVCC, G, cmovcc);
}

/// Shift and rotate counts are masked to 5 bits, or 6 for 64-bit operands.
#[inline(always)]
fn count_mask(size: u32) -> u64 {
    if size == 8 {
        0x3f
    } else {
        0x1f
    }
}

/// Bit `n` of `v` as 0 or 1 (0 for n >= 64).
#[inline(always)]
fn bit(v: u64, n: u32) -> u64 {
    if n >= 64 {
        0
    } else {
        (v >> n) & 1
    }
}

/// One shift or rotate of a `size`-byte value by an already masked `count`.
/// Returns the result and the new RFLAGS. A count of zero changes nothing.
/// Undefined flags get a fixed choice: AF is cleared, and OF follows the
/// count-1 formula for every count.
pub fn shift_rotate_value(m: M, v: u64, count: u32, size: u32, rflags: u64) -> (u64, u64) {
    let mask = size_mask(size);
    let v = v & mask;
    if count == 0 {
        return (v, rflags);
    }
    let bits = size * 8;
    let msb = |x: u64| u64::from(x & sign_bit(size) != 0);
    let of_if = |on: bool| if on { OF } else { 0 };
    match m {
        M::Shl | M::Sal | M::Shr | M::Sar => {
            let (res, cf, of) = match m {
                M::Shr => {
                    let res = if count >= 64 { 0 } else { v >> count };
                    (res, bit(v, count - 1), msb(v))
                }
                M::Sar => {
                    let sv = sign_extend(v, size) as i64;
                    let res = (sv >> count.min(63)) as u64 & mask;
                    let cf = ((sv >> (count - 1).min(63)) & 1) as u64;
                    (res, cf, 0)
                }
                _ => {
                    let wide = (v as u128) << count;
                    let res = wide as u64 & mask;
                    let cf = ((wide >> bits) & 1) as u64;
                    (res, cf, msb(res) ^ cf)
                }
            };
            let mut f = szp(res, size);
            f |= if cf != 0 { CF } else { 0 };
            f |= of_if(of != 0);
            let mut out = rflags;
            set_status(&mut out, f);
            (res, out)
        }
        M::Rol | M::Ror => {
            let r = count % bits;
            let res = if r == 0 {
                v
            } else if m == M::Rol {
                ((v << r) | (v >> (bits - r))) & mask
            } else {
                ((v >> r) | (v << (bits - r))) & mask
            };
            let (cf, of) = if m == M::Rol {
                let cf = res & 1;
                (cf, msb(res) ^ cf)
            } else {
                (msb(res), msb(res) ^ bit(res, bits - 2))
            };
            (res, with_cf_of(rflags, cf != 0, of != 0))
        }
        _ => {
            // RCL/RCR rotate the (size*8+1)-bit value CF:dest; 8- and 16-bit
            // counts are taken modulo 9 and 17.
            let width = bits + 1;
            let r = count % width;
            let wide_mask = (1u128 << width) - 1;
            let w = ((u128::from(rflags & CF != 0)) << bits) | v as u128;
            let rotated = if r == 0 {
                w
            } else if m == M::Rcl {
                ((w << r) | (w >> (width - r))) & wide_mask
            } else {
                ((w >> r) | (w << (width - r))) & wide_mask
            };
            let res = rotated as u64 & mask;
            let cf = ((rotated >> bits) & 1) as u64;
            let of = if m == M::Rcl {
                msb(res) ^ cf
            } else {
                msb(res) ^ bit(res, bits - 2)
            };
            (res, with_cf_of(rflags, cf != 0, of != 0))
        }
    }
}

fn with_cf_of(rflags: u64, cf: bool, of: bool) -> u64 {
    let mut out = rflags & !(CF | OF);
    if cf {
        out |= CF;
    }
    if of {
        out |= OF;
    }
    out
}

/// Decode-time fast path for SHL/SHR/SAR/ROL/ROR of a 32- or 64-bit
/// register by an immediate count: the register file is read and written
/// directly, with the same `shift_rotate_value` as `shift_rotate`.
pub(super) fn specialize(ins: &Instruction) -> Option<super::Handler> {
    if ins.has_lock_prefix()
        || !matches!(ins.mnemonic(), M::Shl | M::Shr | M::Sar | M::Rol | M::Ror)
        || ins.op_count() != 2
        || ins.op0_kind() != OpKind::Register
        || ins.op1_kind() != OpKind::Immediate8
    {
        return None;
    }
    let r = ins.op0_register();
    if r.is_gpr64() {
        Some(shift_reg_imm::<8>)
    } else if r.is_gpr32() {
        Some(shift_reg_imm::<4>)
    } else {
        None
    }
}

fn shift_reg_imm<const SIZE: u32>(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let first = if SIZE == 8 {
        iced_x86::Register::RAX
    } else {
        iced_x86::Register::EAX
    };
    let d = (ins.op0_register() as usize).wrapping_sub(first as usize) & 15;
    let count = (ins.immediate8() as u64 & count_mask(SIZE)) as u32;
    // As in `shift_rotate`, a zero count still writes the (zero-extended) register.
    let (v, f) = shift_rotate_value(ins.mnemonic(), cpu.state.gpr[d], count, SIZE, cpu.state.rflags);
    cpu.state.gpr[d] = v & size_mask(SIZE);
    cpu.state.rflags = f;
    Ok(())
}

fn shift_rotate(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = cpu.op_size(ins, 0);
    let count = (cpu.read_op(bus, ins, 1)? & count_mask(size)) as u32;
    let m = ins.mnemonic();
    let rflags = cpu.state.rflags;
    // A zero count still accesses the destination (and may fault) but
    // changes neither it nor the flags.
    let old = cpu.rmw_op(bus, ins, &mut |v| shift_rotate_value(m, v, count, size, rflags).0)?;
    cpu.state.rflags = shift_rotate_value(m, old, count, size, rflags).1;
    Ok(())
}

/// SHLD/SHRD of `dest` with bits from `src` by a masked `count`. Returns the
/// result and new RFLAGS. Counts above the operand size (16-bit only) have
/// undefined results and flags; here they keep shifting through a 48-bit
/// dest:src:dest.
pub fn double_shift_value(left: bool, dest: u64, src: u64, count: u32, size: u32, rflags: u64) -> (u64, u64) {
    let mask = size_mask(size);
    let (dest, src) = (dest & mask, src & mask);
    if count == 0 {
        return (dest, rflags);
    }
    let bits = size * 8;
    let (res, cf) = if size == 2 {
        // The 48-bit dest:src:dest: equal to the plain definition for
        // counts up to 16.
        let w = (dest << 32) | (src << 16) | dest;
        if left {
            ((w << count >> 32) & mask, bit(w, 48 - count))
        } else {
            ((w >> count) & mask, bit(w, count - 1))
        }
    } else if left {
        let w = ((dest as u128) << bits) | src as u128;
        (((w << count) >> bits) as u64 & mask, bit(dest, bits - count))
    } else {
        let w = ((src as u128) << bits) | dest as u128;
        ((w >> count) as u64 & mask, bit(dest, count - 1))
    };
    let mut f = szp(res, size);
    if cf != 0 {
        f |= CF;
    }
    if (res ^ dest) & sign_bit(size) != 0 {
        f |= OF;
    }
    let mut out = rflags;
    set_status(&mut out, f);
    (res, out)
}

fn double_shift(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = cpu.op_size(ins, 0);
    let src = cpu.read_op(bus, ins, 1)?;
    let count = (cpu.read_op(bus, ins, 2)? & count_mask(size)) as u32;
    let left = ins.mnemonic() == M::Shld;
    let rflags = cpu.state.rflags;
    let old = cpu.rmw_op(bus, ins, &mut |d| {
        double_shift_value(left, d, src, count, size, rflags).0
    })?;
    cpu.state.rflags = double_shift_value(left, old, src, count, size, rflags).1;
    Ok(())
}

/// Where a BT-family instruction finds its bit.
enum BitTarget {
    Register,
    /// Segment offset of the operand-sized unit that holds the bit.
    Memory(u64),
}

/// The operand holding the bit and the bit's index within it. A register
/// bit offset with a memory operand is signed and may address any unit
/// relative to the effective address; otherwise it is taken modulo the
/// operand size.
fn bit_target(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, size: u32) -> ExecResult<(BitTarget, u32)> {
    let bits = size * 8;
    let offset = cpu.read_op(bus, ins, 1)?;
    let index = (offset & u64::from(bits - 1)) as u32;
    if ins.op_kind(0) != OpKind::Memory {
        return Ok((BitTarget::Register, index));
    }
    let ea = cpu.effective_address(ins);
    if ins.op_kind(1) != OpKind::Register {
        return Ok((BitTarget::Memory(ea), index));
    }
    let units = (sign_extend(offset, size) as i64) >> bits.trailing_zeros();
    let addr = ea.wrapping_add((units as u64).wrapping_mul(u64::from(size)));
    let addr = match cpu.address_bits(ins) {
        64 => addr,
        32 => addr & 0xffff_ffff,
        _ => addr & 0xffff,
    };
    Ok((BitTarget::Memory(addr), index))
}

/// CF takes the tested bit; ZF is kept; OF, SF, AF and PF are undefined
/// and kept as well.
fn set_bt_cf(cpu: &mut Cpu, old: u64, index: u32) {
    cpu.state.rflags = with_cf_of(cpu.state.rflags, bit(old, index) != 0, cpu.state.rflags & OF != 0);
}

fn bt(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = cpu.op_size(ins, 0);
    let (target, index) = bit_target(cpu, bus, ins, size)?;
    let v = match target {
        BitTarget::Register => cpu.get_reg(ins.op0_register()),
        BitTarget::Memory(addr) => {
            let seg = cpu.mem_seg(ins);
            cpu.read_sized(bus, seg, addr, size)?
        }
    };
    set_bt_cf(cpu, v, index);
    Ok(())
}

fn bt_modify(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = cpu.op_size(ins, 0);
    let (target, index) = bit_target(cpu, bus, ins, size)?;
    let m = ins.mnemonic();
    let b = 1u64 << index;
    let mut update = |v: u64| match m {
        M::Bts => v | b,
        M::Btr => v & !b,
        _ => v ^ b,
    };
    let old = match target {
        BitTarget::Register => {
            let r = ins.op0_register();
            let old = cpu.get_reg(r);
            cpu.set_reg(r, update(old));
            old
        }
        BitTarget::Memory(addr) => {
            let seg = cpu.mem_seg(ins);
            cpu.rmw(bus, seg, addr, size, ins.has_lock_prefix(), &mut update)?
        }
    };
    set_bt_cf(cpu, old, index);
    Ok(())
}

/// BSF/BSR: a zero source sets ZF and leaves the destination unwritten
/// (all 64 bits, as AMD documents); CF, OF, SF, AF and PF are undefined
/// and cleared here.
fn bit_scan(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, forward: bool) -> ExecResult {
    let size = cpu.op_size(ins, 0);
    let src = cpu.read_op(bus, ins, 1)? & size_mask(size);
    if src == 0 {
        set_status(&mut cpu.state.rflags, ZF);
        return Ok(());
    }
    let index = if forward {
        src.trailing_zeros()
    } else {
        63 - src.leading_zeros()
    };
    cpu.write_op(bus, ins, 0, u64::from(index))?;
    set_status(&mut cpu.state.rflags, 0);
    Ok(())
}

fn bsf(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    bit_scan(cpu, bus, ins, true)
}

fn bsr(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    bit_scan(cpu, bus, ins, false)
}

/// POPCNT exists only when the configuration offers it in CPUID.
fn popcnt(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if !cpu.config.features.popcnt {
        return Err(Fault::ud());
    }
    let size = cpu.op_size(ins, 0);
    let src = cpu.read_op(bus, ins, 1)? & size_mask(size);
    cpu.write_op(bus, ins, 0, u64::from(src.count_ones()))?;
    set_status(&mut cpu.state.rflags, if src == 0 { ZF } else { 0 });
    Ok(())
}

fn setcc(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let v = condition(ins.condition_code(), cpu.state.rflags);
    cpu.write_op(bus, ins, 0, u64::from(v))
}

/// CMOVcc reads its source whatever the condition (a memory source may
/// fault), and a 32-bit destination is zero-extended even when not moved.
fn cmovcc(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let src = cpu.read_op(bus, ins, 1)?;
    let dst = ins.op0_register();
    let v = if condition(ins.condition_code(), cpu.state.rflags) {
        src
    } else {
        cpu.get_reg(dst)
    };
    cpu.set_reg(dst, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    use super::*;
    use crate::state::CpuState;
    use crate::testbus::TestBus;

    /// Run one register-only instruction in 64-bit mode.
    fn exec(cpu: &mut Cpu, code: &[u8]) -> ExecResult {
        let ins = Decoder::new(64, code, DecoderOptions::NONE).decode();
        let mut bus = TestBus::new(4096);
        crate::exec::handler_for(ins.mnemonic())(cpu, &mut bus, &ins)
    }

    fn cpu() -> Cpu {
        let mut cpu = Cpu::standalone(1 << 20);
        cpu.set_state(CpuState::long_mode_flat(0));
        cpu
    }

    const RDX: usize = 2;
    const RSI: usize = 6;

    #[test]
    fn tzcnt_and_lzcnt_run_as_bsf_and_bsr() {
        // (F3 form, plain form): tzcnt/bsf and lzcnt/bsr rdx, rsi, in all sizes.
        let pairs: [(&[u8], &[u8]); 6] = [
            (&[0xf3, 0x48, 0x0f, 0xbc, 0xd6], &[0x48, 0x0f, 0xbc, 0xd6]),
            (&[0xf3, 0x0f, 0xbc, 0xd6], &[0x0f, 0xbc, 0xd6]),
            (&[0x66, 0xf3, 0x0f, 0xbc, 0xd6], &[0x66, 0x0f, 0xbc, 0xd6]),
            (&[0xf3, 0x48, 0x0f, 0xbd, 0xd6], &[0x48, 0x0f, 0xbd, 0xd6]),
            (&[0xf3, 0x0f, 0xbd, 0xd6], &[0x0f, 0xbd, 0xd6]),
            (&[0x66, 0xf3, 0x0f, 0xbd, 0xd6], &[0x66, 0x0f, 0xbd, 0xd6]),
        ];
        for (rep, plain) in pairs {
            for src in [0u64, 1, 0x8000, 0x10_0000, 0x8000_0000_0000_0000, u64::MAX, 0xffff_0000] {
                let mut a = cpu();
                a.state.gpr[RDX] = 0x1234_5678_9abc_def0;
                a.state.gpr[RSI] = src;
                let mut b = cpu();
                b.state = a.state.clone();
                exec(&mut a, rep).unwrap();
                exec(&mut b, plain).unwrap();
                assert_eq!(a.state.gpr, b.state.gpr, "{rep:02x?} src {src:#x}");
                assert_eq!(a.state.rflags & ZF, b.state.rflags & ZF);
            }
        }
        // A zero source: ZF set, destination untouched (not TZCNT's 64, CF).
        let mut c = cpu();
        c.state.gpr[RDX] = 0x1234_5678_9abc_def0;
        c.state.gpr[RSI] = 0;
        exec(&mut c, &[0xf3, 0x0f, 0xbc, 0xd6]).unwrap();
        assert_eq!(c.state.gpr[RDX], 0x1234_5678_9abc_def0);
        assert!(c.state.rflags & ZF != 0);
        // LZCNT of 1 would be 63; BSR gives the bit index 0.
        c.state.gpr[RSI] = 1;
        exec(&mut c, &[0xf3, 0x48, 0x0f, 0xbd, 0xd6]).unwrap();
        assert_eq!(c.state.gpr[RDX], 0);
        assert!(c.state.rflags & ZF == 0);
    }

    #[test]
    fn popcnt_needs_the_feature() {
        let code = [0xf3, 0x48, 0x0f, 0xb8, 0xd6]; // popcnt rdx, rsi
        let mut c = cpu();
        c.state.gpr[RSI] = 0xf0f0;
        c.state.gpr[RDX] = 7;
        assert_eq!(exec(&mut c, &code), Err(Fault::ud()));
        assert_eq!(c.state.gpr[RDX], 7);
        c.config.features.popcnt = true;
        c.state.rflags |= CF | OF | SF | AF | PF | ZF;
        exec(&mut c, &code).unwrap();
        assert_eq!(c.state.gpr[RDX], 8);
        assert_eq!(c.state.rflags & STATUS, 0);
        c.state.gpr[RSI] = 0;
        exec(&mut c, &code).unwrap();
        assert_eq!((c.state.gpr[RDX], c.state.rflags & STATUS), (0, ZF));
    }

    #[test]
    fn rotate_through_carry_counts_modulo_width_plus_one() {
        // RCL of a byte by 9 is the identity and keeps CF.
        assert_eq!(shift_rotate_value(M::Rcl, 0x81, 9, 1, CF), (0x81, CF));
        // RCL by 1: the old CF enters at bit 0, bit 7 leaves into CF.
        let (v, f) = shift_rotate_value(M::Rcl, 0x80, 1, 1, 0);
        assert_eq!((v, f & (CF | OF)), (0, CF | OF));
        // RCR of a word by 17 is the identity.
        assert_eq!(shift_rotate_value(M::Rcr, 0x1234, 17, 2, 0), (0x1234, 0));
        // RCR of a qword by 63 equals RCL by 2 on the 65-bit value.
        let v = 0x8000_0000_0000_0001;
        assert_eq!(
            shift_rotate_value(M::Rcr, v, 63, 8, CF).0,
            shift_rotate_value(M::Rcl, v, 2, 8, CF).0
        );
    }

    #[test]
    fn zero_counts_leave_flags() {
        let all = STATUS;
        assert_eq!(shift_rotate_value(M::Shl, 5, 0, 4, all), (5, all));
        assert_eq!(double_shift_value(true, 5, 9, 0, 2, all), (5, all));
    }

    #[test]
    fn double_shift_full_width_takes_the_source() {
        let (v, f) = double_shift_value(true, 0x8001, 0x1234, 16, 2, 0);
        assert_eq!(v, 0x1234);
        assert!(f & CF != 0, "last bit out is bit 0 of the destination");
        let (v, _) = double_shift_value(false, 0xdead_beef, 0x1, 4, 4, 0);
        assert_eq!(v, 0x1dea_dbee);
    }

    #[test]
    fn cmov_false_zero_extends_32_bit_destination() {
        let mut c = cpu();
        c.state.gpr[RDX] = 0xffff_ffff_0000_0001;
        c.state.rflags &= !ZF;
        exec(&mut c, &[0x0f, 0x44, 0xd6]).unwrap(); // cmove edx, esi
        assert_eq!(c.state.gpr[RDX], 1);
    }
}
