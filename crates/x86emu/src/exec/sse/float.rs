//! SSE/SSE2/SSE3 floating point: arithmetic, compares, conversions, with
//! MXCSR rounding, DAZ/FTZ and exception flags as the hardware sets them.
//! Arithmetic goes through `rustc_apfloat`, which rounds in every mode
//! and reports IEEE status; NaN selection, denormal handling and x86's
//! underflow rule (tininess after rounding with unbounded exponent) are
//! done here.

use iced_x86::{Instruction, Mnemonic as M, OpKind};
use rustc_apfloat::ieee::{Double, IeeeFloat, Quad, Semantics, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

use super::{check_mmx, check_sse, load, mmx_transition, mx, simd_fault, store, xmm_of, G, LO};
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::ExecResult;
use crate::exec::Registry;
use crate::state::flags;

pub fn register(r: &mut Registry) {
    macro_rules! reg {
        ($($m:ident => $f:ident),* $(,)?) => { $( r.add(M::$m, G, $f); )* };
    }
    reg!(
        Addps => addps, Addpd => addpd, Addss => addss, Addsd => addsd,
        Subps => subps, Subpd => subpd, Subss => subss, Subsd => subsd,
        Mulps => mulps, Mulpd => mulpd, Mulss => mulss, Mulsd => mulsd,
        Divps => divps, Divpd => divpd, Divss => divss, Divsd => divsd,
        Minps => minps, Minpd => minpd, Minss => minss, Minsd => minsd,
        Maxps => maxps, Maxpd => maxpd, Maxss => maxss, Maxsd => maxsd,
        Sqrtps => sqrtps, Sqrtpd => sqrtpd, Sqrtss => sqrtss, Sqrtsd => sqrtsd,
        Cmpps => cmpps, Cmppd => cmppd, Cmpss => cmpss, Cmpsd => cmpsd,
        Comiss => comiss, Comisd => comisd, Ucomiss => ucomiss, Ucomisd => ucomisd,
        Addsubps => addsubps, Addsubpd => addsubpd,
        Haddps => haddps, Haddpd => haddpd, Hsubps => hsubps, Hsubpd => hsubpd,
        Rcpps => rcpps, Rcpss => rcpss, Rsqrtps => rsqrtps, Rsqrtss => rsqrtss,
        Cvtsi2ss => cvtsi2ss, Cvtsi2sd => cvtsi2sd,
        Cvtss2si => cvtss2si, Cvttss2si => cvttss2si, Cvtsd2si => cvtsd2si, Cvttsd2si => cvttsd2si,
        Cvtss2sd => cvtss2sd, Cvtsd2ss => cvtsd2ss, Cvtps2pd => cvtps2pd, Cvtpd2ps => cvtpd2ps,
        Cvtdq2ps => cvtdq2ps, Cvtps2dq => cvtps2dq, Cvttps2dq => cvttps2dq,
        Cvtdq2pd => cvtdq2pd, Cvtpd2dq => cvtpd2dq, Cvttpd2dq => cvttpd2dq,
        Cvtpi2ps => cvtpi2ps, Cvtps2pi => cvtps2pi, Cvttps2pi => cvttps2pi,
        Cvtpi2pd => cvtpi2pd, Cvtpd2pi => cvtpd2pi, Cvttpd2pi => cvttpd2pi,
    );
}

/// Single precision with the exponent range unbounded (for the tininess test).
struct WideSingleS;
impl Semantics for WideSingleS {
    const BITS: usize = 24 + 16;
    const EXP_BITS: usize = 16;
}
/// Double precision with the exponent range unbounded.
struct WideDoubleS;
impl Semantics for WideDoubleS {
    const BITS: usize = 53 + 16;
    const EXP_BITS: usize = 16;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// One IEEE format (single or double) in raw bits.
trait Fmt {
    const BITS: u32;
    const FRAC: u32;
    /// Unbiased exponent of the smallest normal.
    const MIN_EXP: i32;
    const MAX_FINITE: u64 = Self::EXP_MASK - (1 << Self::FRAC) + Self::FRAC_MASK;
    fn calc(op: Op, a: u64, b: u64, rm: Round) -> StatusAnd<u64>;
    /// The exact result rounded to the format's precision with an
    /// unbounded exponent: (below the smallest normal, above the largest).
    fn wide(op: Op, a: u64, b: u64, rm: Round) -> (bool, bool);
    fn to_int(a: u64, width: usize, rm: Round) -> StatusAnd<i128>;
    fn from_int(i: i64, rm: Round) -> StatusAnd<u64>;
    /// Correctly rounded square root of a positive finite value; returns
    /// the result and whether it is inexact.
    fn sqrt(a: u64, rm: Round) -> (u64, bool);

    const SIGN: u64 = 1 << (Self::BITS - 1);
    const EXP_MASK: u64 = ((1u64 << (Self::BITS - 1 - Self::FRAC)) - 1) << Self::FRAC;
    const FRAC_MASK: u64 = (1u64 << Self::FRAC) - 1;
    const QUIET: u64 = 1 << (Self::FRAC - 1);
    const DEFAULT_NAN: u64 = Self::SIGN | Self::EXP_MASK | Self::QUIET;
    const MIN_NORMAL: u64 = 1 << Self::FRAC;

    fn is_nan(a: u64) -> bool {
        a & Self::EXP_MASK == Self::EXP_MASK && a & Self::FRAC_MASK != 0
    }
    fn is_snan(a: u64) -> bool {
        Self::is_nan(a) && a & Self::QUIET == 0
    }
    fn is_denormal(a: u64) -> bool {
        a & Self::EXP_MASK == 0 && a & Self::FRAC_MASK != 0
    }
    fn is_zero(a: u64) -> bool {
        a & !Self::SIGN == 0
    }
}

/// Tiny / overflowed classification of a result in a wide-exponent format.
fn wide_class<T: Float>(r: T, min_exp: i32) -> (bool, bool) {
    let finite = r.is_finite_non_zero();
    (finite && r.ilogb() < min_exp, finite && r.ilogb() > 1 - min_exp)
}

fn apply<T: Float>(op: Op, x: T, y: T, rm: Round) -> StatusAnd<T> {
    match op {
        Op::Add => x.add_r(y, rm),
        Op::Sub => x.sub_r(y, rm),
        Op::Mul => x.mul_r(y, rm),
        Op::Div => x.div_r(y, rm),
    }
}

macro_rules! fmt_impl {
    ($name:ident, $ap:ty, $wide:ty, $bits:expr, $frac:expr, $min_exp:expr) => {
        struct $name;
        impl Fmt for $name {
            const BITS: u32 = $bits;
            const FRAC: u32 = $frac;
            const MIN_EXP: i32 = $min_exp;
            fn calc(op: Op, a: u64, b: u64, rm: Round) -> StatusAnd<u64> {
                let r = apply(op, <$ap>::from_bits(a as u128), <$ap>::from_bits(b as u128), rm);
                r.status.and(r.value.to_bits() as u64)
            }
            fn wide(op: Op, a: u64, b: u64, rm: Round) -> (bool, bool) {
                let widen = |v: u64| -> IeeeFloat<$wide> {
                    let r: StatusAnd<IeeeFloat<$wide>> = <$ap>::from_bits(v as u128).convert(&mut false);
                    r.value
                };
                wide_class(apply(op, widen(a), widen(b), rm).value, Self::MIN_EXP)
            }
            fn to_int(a: u64, width: usize, rm: Round) -> StatusAnd<i128> {
                <$ap>::from_bits(a as u128).to_i128_r(width, rm, &mut false)
            }
            fn from_int(i: i64, rm: Round) -> StatusAnd<u64> {
                let r = <$ap>::from_i128_r(i as i128, rm);
                r.status.and(r.value.to_bits() as u64)
            }
            fn sqrt(a: u64, rm: Round) -> (u64, bool) {
                // Integer square root of the significand, scaled so the
                // root has 62+ bits; an inexact root gets a sticky half
                // bit, and apfloat rounds that to the format.
                let exp_field = ((a & Self::EXP_MASK) >> Self::FRAC) as i32;
                let frac = a & Self::FRAC_MASK;
                let (mut m, mut e) = if exp_field == 0 {
                    (frac as u128, Self::MIN_EXP - Self::FRAC as i32)
                } else {
                    (
                        (frac | 1 << Self::FRAC) as u128,
                        exp_field + Self::MIN_EXP - 1 - Self::FRAC as i32,
                    )
                };
                if e & 1 != 0 {
                    m <<= 1;
                    e -= 1;
                }
                let sh = (m.leading_zeros() - 2) & !1;
                let big = m << sh;
                let q = big.isqrt();
                let sticky = u128::from(q * q != big);
                let exp = (e - sh as i32) / 2 - 1;
                let wide = Quad::from_u128((q << 1) | sticky).value.scalbn(exp);
                let r: StatusAnd<$ap> = wide.convert_r(rm, &mut false);
                (r.value.to_bits() as u64, r.status.contains(Status::INEXACT))
            }
        }
    };
}

fmt_impl!(F32, Single, WideSingleS, 32, 23, -126);
fmt_impl!(F64, Double, WideDoubleS, 64, 52, -1022);

/// A key that orders non-NaN values numerically (both zeros equal).
fn order_key<F: Fmt>(a: u64) -> i64 {
    let mag = (a & !F::SIGN) as i64;
    if a & F::SIGN != 0 {
        -mag
    } else {
        mag
    }
}

/// MXCSR controls for one instruction, and the flags it raises.
struct Env {
    mxcsr: u32,
    flags: u32,
}

impl Env {
    fn new(cpu: &Cpu) -> Self {
        Env {
            mxcsr: cpu.state.fpu.mxcsr,
            flags: 0,
        }
    }
    fn round(&self) -> Round {
        match (self.mxcsr >> mx::RC_SHIFT) & 3 {
            0 => Round::NearestTiesToEven,
            1 => Round::TowardNegative,
            2 => Round::TowardPositive,
            _ => Round::TowardZero,
        }
    }
    /// Denormals-are-zero on an input.
    fn daz<F: Fmt>(&self, a: u64) -> u64 {
        if self.mxcsr & mx::DAZ != 0 && F::is_denormal(a) {
            a & F::SIGN
        } else {
            a
        }
    }
    /// NaN operands: IE for a signalling one; the first NaN, quieted.
    fn nan_result<F: Fmt>(&mut self, a: u64, b: u64) -> Option<u64> {
        if !F::is_nan(a) && !F::is_nan(b) {
            return None;
        }
        if F::is_snan(a) || F::is_snan(b) {
            self.flags |= mx::IE;
        }
        Some(if F::is_nan(a) { a | F::QUIET } else { b | F::QUIET })
    }
    fn denormal_check<F: Fmt>(&mut self, a: u64, b: u64) {
        if F::is_denormal(a) || F::is_denormal(b) {
            self.flags |= mx::DE;
        }
    }
    /// Turn a rounded result and its IEEE status into the x86 result
    /// and flags: default NaN on invalid, tininess and flush-to-zero.
    /// `wide` classifies the result with an unbounded exponent; it is only
    /// consulted at the edges of the range, where apfloat's bounded
    /// rounding hides x86's tininess and overflow.
    fn finish<F: Fmt>(&mut self, r: StatusAnd<u64>, wide: impl FnOnce() -> (bool, bool)) -> u64 {
        let (st, mut v) = (r.status, r.value);
        if st.contains(Status::INVALID_OP) {
            self.flags |= mx::IE;
            return F::DEFAULT_NAN;
        }
        if st.contains(Status::DIV_BY_ZERO) {
            self.flags |= mx::ZE;
        }
        let inexact = st.contains(Status::INEXACT);
        let mag = v & !F::SIGN;
        let edge = inexact && (mag == F::MIN_NORMAL || mag == F::MAX_FINITE);
        let (wide_tiny, wide_over) = if edge { wide() } else { (false, false) };
        if st.contains(Status::OVERFLOW) || wide_over {
            self.flags |= mx::OE;
        }
        let tiny = F::is_denormal(v) || (mag == 0 && inexact) || wide_tiny;
        let um_masked = self.mxcsr & (mx::UE << mx::MASK_SHIFT) != 0;
        if tiny {
            if !um_masked {
                self.flags |= mx::UE;
            } else if self.mxcsr & mx::FTZ != 0 {
                v &= F::SIGN;
                self.flags |= mx::UE | mx::PE;
            } else if inexact {
                self.flags |= mx::UE;
            }
        }
        if inexact {
            self.flags |= mx::PE;
        }
        v
    }

    fn arith<F: Fmt>(&mut self, op: Op, a: u64, b: u64) -> u64 {
        let (a, b) = (self.daz::<F>(a), self.daz::<F>(b));
        if let Some(n) = self.nan_result::<F>(a, b) {
            return n;
        }
        let rm = self.round();
        let r = F::calc(op, a, b, rm);
        // Division by zero outranks the denormal-operand exception.
        if !r.status.intersects(Status::DIV_BY_ZERO | Status::INVALID_OP) {
            self.denormal_check::<F>(a, b);
        }
        self.finish::<F>(r, || F::wide(op, a, b, rm))
    }

    fn sqrt<F: Fmt>(&mut self, a: u64) -> u64 {
        let a = self.daz::<F>(a);
        if let Some(n) = self.nan_result::<F>(a, a) {
            return n;
        }
        if F::is_zero(a) {
            return a;
        }
        if a & F::SIGN != 0 {
            self.flags |= mx::IE;
            return F::DEFAULT_NAN;
        }
        if a == F::EXP_MASK {
            return a;
        }
        self.denormal_check::<F>(a, a);
        let (r, inexact) = F::sqrt(a, self.round());
        if inexact {
            self.flags |= mx::PE;
        }
        r
    }

    /// MIN/MAX: the second operand when either is a NaN or both are zero.
    fn minmax<F: Fmt>(&mut self, a: u64, b: u64, max: bool) -> u64 {
        let (a, b) = (self.daz::<F>(a), self.daz::<F>(b));
        if F::is_nan(a) || F::is_nan(b) {
            self.flags |= mx::IE;
            return b;
        }
        self.denormal_check::<F>(a, b);
        let (x, y) = (order_key::<F>(a), order_key::<F>(b));
        let first = if max { x > y } else { x < y };
        if first {
            a
        } else {
            b
        }
    }

    /// Ordered comparison: None when unordered. `signal_qnan` raises IE
    /// for quiet NaNs too.
    fn compare<F: Fmt>(&mut self, a: u64, b: u64, signal_qnan: bool) -> Option<std::cmp::Ordering> {
        let (a, b) = (self.daz::<F>(a), self.daz::<F>(b));
        if F::is_nan(a) || F::is_nan(b) {
            if signal_qnan || F::is_snan(a) || F::is_snan(b) {
                self.flags |= mx::IE;
            }
            return None;
        }
        self.denormal_check::<F>(a, b);
        Some(order_key::<F>(a).cmp(&order_key::<F>(b)))
    }

    /// CMPPS predicate (imm8 bits 0-2) as an all-ones mask.
    fn cmp_pred<F: Fmt>(&mut self, a: u64, b: u64, pred: u8) -> u64 {
        use std::cmp::Ordering::*;
        let signal = matches!(pred & 3, 1 | 2);
        let o = self.compare::<F>(a, b, signal);
        let t = match pred & 7 {
            0 => o == Some(Equal),
            1 => o == Some(Less),
            2 => matches!(o, Some(Less | Equal)),
            3 => o.is_none(),
            4 => o != Some(Equal),
            5 => o != Some(Less),
            6 => !matches!(o, Some(Less | Equal)),
            _ => o.is_some(),
        };
        if t {
            u64::MAX >> (64 - F::BITS)
        } else {
            0
        }
    }

    /// Float to signed integer of `width` bits; the integer indefinite
    /// value on NaN or overflow.
    fn convert_to_int<F: Fmt>(&mut self, a: u64, width: usize, truncate: bool) -> u64 {
        let a = self.daz::<F>(a);
        let indefinite = 1u64 << (width - 1);
        if F::is_nan(a) {
            self.flags |= mx::IE;
            return indefinite;
        }
        let rm = if truncate { Round::TowardZero } else { self.round() };
        let r = F::to_int(a, width, rm);
        if r.status.contains(Status::INVALID_OP) {
            self.flags |= mx::IE;
            return indefinite;
        }
        if r.status.contains(Status::INEXACT) {
            self.flags |= mx::PE;
        }
        r.value as u64 & (u64::MAX >> (64 - width))
    }

    fn convert_from_int<F: Fmt>(&mut self, i: i64) -> u64 {
        let r = F::from_int(i, self.round());
        if r.status.contains(Status::INEXACT) {
            self.flags |= mx::PE;
        }
        r.value
    }

    fn single_to_double(&mut self, a: u64) -> u64 {
        let a = self.daz::<F32>(a);
        if F32::is_nan(a) {
            if F32::is_snan(a) {
                self.flags |= mx::IE;
            }
            let sign = (a & F32::SIGN) << 32;
            return sign | F64::EXP_MASK | F64::QUIET | ((a & F32::FRAC_MASK) << 29);
        }
        self.denormal_check::<F32>(a, a);
        let r: StatusAnd<Double> = Single::from_bits(a as u128).convert(&mut false);
        r.value.to_bits() as u64
    }

    fn double_to_single(&mut self, a: u64) -> u64 {
        let a = self.daz::<F64>(a);
        if F64::is_nan(a) {
            if F64::is_snan(a) {
                self.flags |= mx::IE;
            }
            let sign = (a >> 32) & F32::SIGN;
            return sign | F32::EXP_MASK | F32::QUIET | ((a & F64::FRAC_MASK) >> 29);
        }
        self.denormal_check::<F64>(a, a);
        let rm = self.round();
        let d = Double::from_bits(a as u128);
        let r: StatusAnd<Single> = d.convert_r(rm, &mut false);
        let r = r.status.and(r.value.to_bits() as u64);
        self.finish::<F32>(r, || {
            let w: StatusAnd<IeeeFloat<WideSingleS>> = d.convert_r(rm, &mut false);
            wide_class(w.value, F32::MIN_EXP)
        })
    }

    /// Approximate reciprocal (square root): computed exactly and cut to
    /// 12 bits of precision; NaN, zero and infinity behave as on hardware.
    /// Denormal inputs count as zero.
    fn approx(&mut self, a: u64, rsqrt: bool) -> u64 {
        let a = a & 0xffff_ffff;
        let a = if F32::is_denormal(a) { a & F32::SIGN } else { a };
        if F32::is_nan(a) {
            return a | F32::QUIET;
        }
        let sign = a & F32::SIGN;
        if F32::is_zero(a) {
            return sign | F32::EXP_MASK;
        }
        if rsqrt && sign != 0 {
            return F32::DEFAULT_NAN;
        }
        if a & !F32::SIGN == F32::EXP_MASK {
            return sign;
        }
        let x = if rsqrt {
            F32::sqrt(a, Round::NearestTiesToEven).0
        } else {
            a
        };
        let r = Single::from_bits(0x3f80_0000).div_r(Single::from_bits(x as u128), Round::NearestTiesToEven);
        (r.value.to_bits() as u64) & 0xffff_f000
    }
}

/// Which elements an instruction works on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Ps,
    Pd,
    Ss,
    Sd,
}

/// Write the result and merge the flags, or raise #XM/#UD for unmasked
/// exceptions without writing anything.
fn commit(cpu: &mut Cpu, env: &Env) -> ExecResult {
    let unmasked = env.flags & !(env.mxcsr >> mx::MASK_SHIFT) & mx::FLAGS;
    cpu.state.fpu.mxcsr |= env.flags;
    if unmasked != 0 {
        return Err(simd_fault(cpu));
    }
    Ok(())
}

/// Apply `f` to the elements of `a` and `b` selected by `shape`; scalar
/// forms keep the rest of `a`.
#[inline(always)]
fn elementwise(shape: Shape, a: u128, b: u128, mut f: impl FnMut(u64, u64, usize) -> u64) -> u128 {
    match shape {
        Shape::Ps => {
            let mut r = 0u128;
            for i in 0..4 {
                let s = 32 * i;
                let v = f((a >> s) as u32 as u64, (b >> s) as u32 as u64, i) as u32;
                r |= (v as u128) << s;
            }
            r
        }
        Shape::Pd => (f(a as u64, b as u64, 0) as u128) | (f((a >> 64) as u64, (b >> 64) as u64, 1) as u128) << 64,
        Shape::Ss => (a & !0xffff_ffff) | f(a as u32 as u64, b as u32 as u64, 0) as u32 as u128,
        Shape::Sd => (a & !LO) | f(a as u64, b as u64, 0) as u128,
    }
}

/// The common handler: XMM destination = f(destination, source).
#[inline(always)]
fn fp_op(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    ins: &Instruction,
    shape: Shape,
    f: impl FnMut(&mut Env, u64, u64, usize) -> u64,
) -> ExecResult {
    check_sse(cpu)?;
    let a = load(cpu, bus, ins, 0)?;
    let b = load(cpu, bus, ins, 1)?;
    let mut env = Env::new(cpu);
    let mut f = f;
    let r = elementwise(shape, a, b, |x, y, i| f(&mut env, x, y, i));
    commit(cpu, &env)?;
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = r;
    Ok(())
}

/// Run the operation on the host's SSE unit, which is exact when
/// `host_is_exact` (see `host.rs`); the software path handles the rest.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn on_host(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, f: super::host::HostOp) -> ExecResult {
    check_sse(cpu)?;
    let a = load(cpu, bus, ins, 0)?;
    let b = load(cpu, bus, ins, 1)?;
    let (r, raised) = f(a, b, cpu.state.fpu.mxcsr);
    cpu.state.fpu.mxcsr |= raised;
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = r;
    Ok(())
}

/// Whether `on_host` gives the exact result: every exception masked.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn host_is_exact(cpu: &Cpu) -> bool {
    cpu.state.fpu.mxcsr & super::host::ALL_MASKED == super::host::ALL_MASKED
}

macro_rules! arith {
    ($($name:ident: $shape:ident $fmt:ident $op:ident),* $(,)?) => {$(
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            #[cfg(target_arch = "x86_64")]
            if host_is_exact(cpu) {
                return on_host(cpu, bus, ins, super::host::$name);
            }
            fp_op(cpu, bus, ins, Shape::$shape, |e, a, b, _| e.arith::<$fmt>(Op::$op, a, b))
        }
    )*};
}
arith!(
    addps: Ps F32 Add, addpd: Pd F64 Add, addss: Ss F32 Add, addsd: Sd F64 Add,
    subps: Ps F32 Sub, subpd: Pd F64 Sub, subss: Ss F32 Sub, subsd: Sd F64 Sub,
    mulps: Ps F32 Mul, mulpd: Pd F64 Mul, mulss: Ss F32 Mul, mulsd: Sd F64 Mul,
    divps: Ps F32 Div, divpd: Pd F64 Div, divss: Ss F32 Div, divsd: Sd F64 Div,
);

macro_rules! minmax {
    ($($name:ident: $shape:ident $fmt:ident $max:expr),* $(,)?) => {$(
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            fp_op(cpu, bus, ins, Shape::$shape, |e, a, b, _| e.minmax::<$fmt>(a, b, $max))
        }
    )*};
}
minmax!(
    minps: Ps F32 false, minpd: Pd F64 false, minss: Ss F32 false, minsd: Sd F64 false,
    maxps: Ps F32 true, maxpd: Pd F64 true, maxss: Ss F32 true, maxsd: Sd F64 true,
);

macro_rules! sqrt {
    ($($name:ident: $shape:ident $fmt:ident),* $(,)?) => {$(
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            #[cfg(target_arch = "x86_64")]
            if host_is_exact(cpu) {
                return on_host(cpu, bus, ins, super::host::$name);
            }
            fp_op(cpu, bus, ins, Shape::$shape, |e, _a, b, _| e.sqrt::<$fmt>(b))
        }
    )*};
}
sqrt!(sqrtps: Ps F32, sqrtpd: Pd F64, sqrtss: Ss F32, sqrtsd: Sd F64);

macro_rules! cmp {
    ($($name:ident: $shape:ident $fmt:ident),* $(,)?) => {$(
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            let pred = ins.immediate8();
            fp_op(cpu, bus, ins, Shape::$shape, |e, a, b, _| e.cmp_pred::<$fmt>(a, b, pred))
        }
    )*};
}
cmp!(cmpps: Ps F32, cmppd: Pd F64, cmpss: Ss F32);

/// CMPSD: the SSE2 scalar compare; the string compare shares the mnemonic.
pub fn cmpsd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if !super::is_sse_form(ins) {
        // The string CMPSD belongs to the string instructions' file.
        return Err(cpu.unimplemented(ins.mnemonic()));
    }
    let pred = ins.immediate8();
    fp_op(cpu, bus, ins, Shape::Sd, |e, a, b, _| e.cmp_pred::<F64>(a, b, pred))
}

/// COMIS*/UCOMIS*: ZF, PF, CF from the comparison; OF, SF, AF cleared.
fn comi<F: Fmt>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, signal_qnan: bool) -> ExecResult {
    check_sse(cpu)?;
    let a = load(cpu, bus, ins, 0)? as u64;
    let b = load(cpu, bus, ins, 1)? as u64;
    let mask = u64::MAX >> (64 - F::BITS);
    let mut env = Env::new(cpu);
    let o = env.compare::<F>(a & mask, b & mask, signal_qnan);
    commit(cpu, &env)?;
    use std::cmp::Ordering::*;
    let f = match o {
        None => flags::ZF | flags::PF | flags::CF,
        Some(Greater) => 0,
        Some(Less) => flags::CF,
        Some(Equal) => flags::ZF,
    };
    cpu.state.rflags = (cpu.state.rflags & !flags::STATUS) | f;
    Ok(())
}

fn comiss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    comi::<F32>(cpu, bus, ins, true)
}
fn comisd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    comi::<F64>(cpu, bus, ins, true)
}
fn ucomiss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    comi::<F32>(cpu, bus, ins, false)
}
fn ucomisd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    comi::<F64>(cpu, bus, ins, false)
}

// SSE3 horizontal and alternating operations.

fn addsubps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Ps, |e, a, b, i| {
        e.arith::<F32>(if i % 2 == 0 { Op::Sub } else { Op::Add }, a, b)
    })
}
fn addsubpd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Pd, |e, a, b, i| {
        e.arith::<F64>(if i == 0 { Op::Sub } else { Op::Add }, a, b)
    })
}

fn horizontal_ps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, op: Op) -> ExecResult {
    check_sse(cpu)?;
    let a = load(cpu, bus, ins, 0)?;
    let b = load(cpu, bus, ins, 1)?;
    let mut env = Env::new(cpu);
    let e = |v: u128, i: u32| (v >> (32 * i)) as u32 as u64;
    let r = [
        env.arith::<F32>(op, e(a, 0), e(a, 1)),
        env.arith::<F32>(op, e(a, 2), e(a, 3)),
        env.arith::<F32>(op, e(b, 0), e(b, 1)),
        env.arith::<F32>(op, e(b, 2), e(b, 3)),
    ];
    commit(cpu, &env)?;
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = r
        .iter()
        .enumerate()
        .fold(0, |acc, (i, &v)| acc | (v as u128) << (32 * i));
    Ok(())
}

fn horizontal_pd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, op: Op) -> ExecResult {
    check_sse(cpu)?;
    let a = load(cpu, bus, ins, 0)?;
    let b = load(cpu, bus, ins, 1)?;
    let mut env = Env::new(cpu);
    let lo = env.arith::<F64>(op, a as u64, (a >> 64) as u64);
    let hi = env.arith::<F64>(op, b as u64, (b >> 64) as u64);
    commit(cpu, &env)?;
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = lo as u128 | (hi as u128) << 64;
    Ok(())
}

fn haddps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    horizontal_ps(cpu, bus, ins, Op::Add)
}
fn hsubps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    horizontal_ps(cpu, bus, ins, Op::Sub)
}
fn haddpd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    horizontal_pd(cpu, bus, ins, Op::Add)
}
fn hsubpd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    horizontal_pd(cpu, bus, ins, Op::Sub)
}

fn rcpps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Ps, |e, _a, b, _| e.approx(b, false))
}
fn rcpss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Ss, |e, _a, b, _| e.approx(b, false))
}
fn rsqrtps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Ps, |e, _a, b, _| e.approx(b, true))
}
fn rsqrtss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Ss, |e, _a, b, _| e.approx(b, true))
}

// Conversions.

/// CVTSI2SS/SD: a 32- or 64-bit integer into the low element.
fn cvtsi2f<F: Fmt>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, shape: Shape) -> ExecResult {
    check_sse(cpu)?;
    let size = cpu.op_size(ins, 1);
    let v = load(cpu, bus, ins, 1)? as u64;
    let i = if size == 4 { v as u32 as i32 as i64 } else { v as i64 };
    let mut env = Env::new(cpu);
    let r = env.convert_from_int::<F>(i);
    commit(cpu, &env)?;
    let x = &mut cpu.state.fpu.xmm[xmm_of(ins, 0)];
    *x = elementwise(shape, *x, 0, |_, _, _| r);
    Ok(())
}
fn cvtsi2ss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cvtsi2f::<F32>(cpu, bus, ins, Shape::Ss)
}
fn cvtsi2sd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cvtsi2f::<F64>(cpu, bus, ins, Shape::Sd)
}

/// CVT(T)SS2SI/CVT(T)SD2SI into a 32- or 64-bit register.
fn cvtf2si<F: Fmt>(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, truncate: bool) -> ExecResult {
    check_sse(cpu)?;
    let width = cpu.op_size(ins, 0) as usize * 8;
    let v = load(cpu, bus, ins, 1)? as u64 & (u64::MAX >> (64 - F::BITS));
    let mut env = Env::new(cpu);
    let r = env.convert_to_int::<F>(v, width, truncate);
    commit(cpu, &env)?;
    cpu.set_reg(ins.op0_register(), r);
    Ok(())
}
fn cvtss2si(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cvtf2si::<F32>(cpu, bus, ins, false)
}
fn cvttss2si(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cvtf2si::<F32>(cpu, bus, ins, true)
}
fn cvtsd2si(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cvtf2si::<F64>(cpu, bus, ins, false)
}
fn cvttsd2si(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    cvtf2si::<F64>(cpu, bus, ins, true)
}

fn cvtss2sd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    fp_op(cpu, bus, ins, Shape::Sd, |e, _a, b, _| {
        e.single_to_double(b & 0xffff_ffff)
    })
}
fn cvtsd2ss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    let b = load(cpu, bus, ins, 1)? as u64;
    let mut env = Env::new(cpu);
    let r = env.double_to_single(b);
    commit(cpu, &env)?;
    let x = &mut cpu.state.fpu.xmm[xmm_of(ins, 0)];
    *x = (*x & !0xffff_ffff) | r as u128;
    Ok(())
}

/// A packed conversion producing `out` elements of `out_bits` from the
/// source (operand 1) elements of `in_bits`; the destination's other
/// bits are zeroed (`keep_upper` = false) or kept.
#[allow(clippy::too_many_arguments)]
fn convert_packed(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    ins: &Instruction,
    in_bits: u32,
    out_bits: u32,
    count: u32,
    keep_upper: bool,
    mut f: impl FnMut(&mut Env, u64) -> u64,
) -> ExecResult {
    let to_mm = ins.op_kind(0) == OpKind::Register && ins.op0_register().is_mm();
    let from_mm = ins.op_kind(1) == OpKind::Register && ins.op1_register().is_mm();
    if to_mm || from_mm {
        check_mmx(cpu)?;
    }
    check_sse(cpu)?;
    let src = load(cpu, bus, ins, 1)?;
    let dst = load(cpu, bus, ins, 0)?;
    let mut env = Env::new(cpu);
    let in_mask = u128::MAX >> (128 - in_bits);
    let out_mask = u128::MAX >> (128 - out_bits);
    let mut r = 0u128;
    for i in 0..count {
        let v = f(&mut env, ((src >> (in_bits * i)) & in_mask) as u64) as u128;
        r |= (v & out_mask) << (out_bits * i);
    }
    let written = u128::MAX >> (128 - out_bits * count);
    if keep_upper {
        r |= dst & !written;
    }
    commit(cpu, &env)?;
    store(cpu, bus, ins, 0, r)?;
    if to_mm || from_mm {
        mmx_transition(cpu);
    }
    Ok(())
}

macro_rules! cvt {
    ($($name:ident: $in:expr => $out:expr, $n:expr, $keep:expr, |$e:ident, $v:ident| $body:expr);* $(;)?) => {$(
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            convert_packed(cpu, bus, ins, $in, $out, $n, $keep, |$e, $v| $body)
        }
    )*};
}
cvt!(
    cvtps2pd: 32 => 64, 2, false, |e, v| e.single_to_double(v);
    cvtpd2ps: 64 => 32, 2, false, |e, v| e.double_to_single(v);
    cvtdq2ps: 32 => 32, 4, false, |e, v| e.convert_from_int::<F32>(v as u32 as i32 as i64);
    cvtps2dq: 32 => 32, 4, false, |e, v| e.convert_to_int::<F32>(v, 32, false);
    cvttps2dq: 32 => 32, 4, false, |e, v| e.convert_to_int::<F32>(v, 32, true);
    cvtdq2pd: 32 => 64, 2, false, |e, v| e.convert_from_int::<F64>(v as u32 as i32 as i64);
    cvtpd2dq: 64 => 32, 2, false, |e, v| e.convert_to_int::<F64>(v, 32, false);
    cvttpd2dq: 64 => 32, 2, false, |e, v| e.convert_to_int::<F64>(v, 32, true);
    cvtpi2ps: 32 => 32, 2, true, |e, v| e.convert_from_int::<F32>(v as u32 as i32 as i64);
    cvtps2pi: 32 => 32, 2, false, |e, v| e.convert_to_int::<F32>(v, 32, false);
    cvttps2pi: 32 => 32, 2, false, |e, v| e.convert_to_int::<F32>(v, 32, true);
    cvtpi2pd: 32 => 64, 2, false, |e, v| e.convert_from_int::<F64>(v as u32 as i32 as i64);
    cvtpd2pi: 64 => 32, 2, false, |e, v| e.convert_to_int::<F64>(v, 32, false);
    cvttpd2pi: 64 => 32, 2, false, |e, v| e.convert_to_int::<F64>(v, 32, true);
);

/// The host fast path and the software path must agree bit for bit, in
/// result and flags, for every masked MXCSR: rounding modes, DAZ, FTZ,
/// over random values biased to the edges (denormals, the overflow and
/// underflow thresholds, zeros, infinities, quiet and signalling NaNs).
#[cfg(all(test, target_arch = "x86_64"))]
mod host_tests {
    use super::super::host;
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// A value of `F` from one of the interesting classes.
        fn value<F: Fmt>(&mut self) -> u64 {
            let r = self.next();
            let frac = r & F::FRAC_MASK;
            let sign = (r >> 63) * F::SIGN;
            let max_exp = F::EXP_MASK >> F::FRAC;
            let exp = match self.next() % 10 {
                0 => 0,                               // zero or denormal
                1 => 1 + self.next() % 3,             // just above the denormals
                2 => max_exp - 1 - self.next() % 3,   // near overflow
                3 => max_exp,                         // infinity or NaN
                4 => (max_exp / 2) + self.next() % 3, // around 1.0
                _ => self.next() % (max_exp + 1),     // anywhere
            };
            let frac = match self.next() % 8 {
                0 => 0,
                1 => F::FRAC_MASK,
                2 => frac & !F::QUIET, // signalling NaN when exp is max
                _ => frac,
            };
            sign | exp << F::FRAC | frac
        }
    }

    fn pack<F: Fmt>(rng: &mut Rng) -> u128 {
        let mut v = 0u128;
        for i in 0..(128 / F::BITS) {
            v |= (rng.value::<F>() as u128) << (i * F::BITS);
        }
        v
    }

    #[test]
    fn host_sse_arithmetic_matches_the_software_path() {
        type Soft = fn(&mut Env, u64, u64) -> u64;
        macro_rules! cases {
            ($($name:ident: $shape:ident $fmt:ident $f:expr),* $(,)?) => {
                [$((stringify!($name), Shape::$shape, <$fmt>::BITS, host::$name as host::HostOp, $f as Soft)),*]
            };
        }
        let cases = cases!(
            addss: Ss F32 |e: &mut Env, a, b| e.arith::<F32>(Op::Add, a, b),
            addsd: Sd F64 |e: &mut Env, a, b| e.arith::<F64>(Op::Add, a, b),
            addps: Ps F32 |e: &mut Env, a, b| e.arith::<F32>(Op::Add, a, b),
            addpd: Pd F64 |e: &mut Env, a, b| e.arith::<F64>(Op::Add, a, b),
            subss: Ss F32 |e: &mut Env, a, b| e.arith::<F32>(Op::Sub, a, b),
            subsd: Sd F64 |e: &mut Env, a, b| e.arith::<F64>(Op::Sub, a, b),
            mulss: Ss F32 |e: &mut Env, a, b| e.arith::<F32>(Op::Mul, a, b),
            mulsd: Sd F64 |e: &mut Env, a, b| e.arith::<F64>(Op::Mul, a, b),
            mulpd: Pd F64 |e: &mut Env, a, b| e.arith::<F64>(Op::Mul, a, b),
            divss: Ss F32 |e: &mut Env, a, b| e.arith::<F32>(Op::Div, a, b),
            divsd: Sd F64 |e: &mut Env, a, b| e.arith::<F64>(Op::Div, a, b),
            divps: Ps F32 |e: &mut Env, a, b| e.arith::<F32>(Op::Div, a, b),
            sqrtss: Ss F32 |e: &mut Env, _a, b| e.sqrt::<F32>(b),
            sqrtsd: Sd F64 |e: &mut Env, _a, b| e.sqrt::<F64>(b),
            sqrtps: Ps F32 |e: &mut Env, _a, b| e.sqrt::<F32>(b),
            sqrtpd: Pd F64 |e: &mut Env, _a, b| e.sqrt::<F64>(b),
        );
        let mut rng = Rng(0x853c_49e6_748f_ea9b);
        let mut checked = 0;
        for (name, shape, bits, host_op, soft) in cases {
            for case in 0..4000 {
                let (a, b) = if bits == 32 {
                    (pack::<F32>(&mut rng), pack::<F32>(&mut rng))
                } else {
                    (pack::<F64>(&mut rng), pack::<F64>(&mut rng))
                };
                // Masked exceptions; any rounding mode, DAZ, FTZ; stale flags.
                let mxcsr = host::ALL_MASKED
                    | (rng.next() as u32 & 3) << mx::RC_SHIFT
                    | (rng.next() as u32 & (mx::DAZ | mx::FTZ | mx::FLAGS));
                let mut env = Env { mxcsr, flags: 0 };
                let want = elementwise(shape, a, b, |x, y, _| soft(&mut env, x, y));
                let got = host_op(a, b, mxcsr);
                assert_eq!(
                    got,
                    (want, env.flags),
                    "{name} case {case}: a={a:#034x} b={b:#034x} mxcsr={mxcsr:#06x} (host vs software)"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 16 * 4000);
    }
}
