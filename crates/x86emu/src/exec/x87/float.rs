//! x87 extended-precision arithmetic on raw 80-bit values, with the FCW's
//! precision (PC) and rounding (RC) control, x87 NaN rules and the FSW
//! exception bits each operation raises.
//!
//! Correctly rounded operations come from `rustc_apfloat`. For PC = 64 the
//! operation runs directly in `X87DoubleExtended`. For PC = 24/53 it runs in
//! a 127-bit format with a wide exponent and is then rounded once more to a
//! 24/53-bit format that keeps the x87 exponent range. Double rounding is
//! harmless there: 127 >= 2p + 2 for p <= 53 (Figueroa), and directed modes
//! compose.

use rustc_apfloat::ieee::{Double, IeeeFloat, Semantics, Single, X87DoubleExtended as Ext};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

/// FSW exception bits and condition codes.
pub const IE: u16 = 1 << 0;
pub const DE: u16 = 1 << 1;
pub const ZE: u16 = 1 << 2;
pub const OE: u16 = 1 << 3;
pub const UE: u16 = 1 << 4;
pub const PE: u16 = 1 << 5;
pub const SF: u16 = 1 << 6;
pub const ES: u16 = 1 << 7;
pub const C0: u16 = 1 << 8;
pub const C1: u16 = 1 << 9;
pub const C2: u16 = 1 << 10;
pub const C3: u16 = 1 << 14;
pub const BUSY: u16 = 1 << 15;

/// Intermediate format for PC = 24/53: 127-bit significand, 20-bit exponent.
pub struct WideS;
impl Semantics for WideS {
    const BITS: usize = 147;
    const EXP_BITS: usize = 20;
}
type Wide = IeeeFloat<WideS>;

/// 24-bit significand with the x87 exponent range (PC = 24).
pub struct Pc24S;
impl Semantics for Pc24S {
    const BITS: usize = 39;
    const EXP_BITS: usize = 15;
}
type Pc24 = IeeeFloat<Pc24S>;

/// 53-bit significand with the x87 exponent range (PC = 53).
pub struct Pc53S;
impl Semantics for Pc53S {
    const BITS: usize = 68;
    const EXP_BITS: usize = 15;
}
type Pc53 = IeeeFloat<Pc53S>;

/// A raw 80-bit register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct F80 {
    pub sig: u64,
    /// Sign (bit 15) and biased exponent.
    pub se: u16,
}

/// The "real indefinite" QNaN that masked invalid operations produce.
pub const INDEFINITE: F80 = F80 {
    sig: 0xc000_0000_0000_0000,
    se: 0xffff,
};
pub const ONE: F80 = F80 {
    sig: 1 << 63,
    se: 0x3fff,
};
pub const ZERO: F80 = F80 { sig: 0, se: 0 };

impl F80 {
    pub fn from_bytes(b: &[u8; 10]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        F80 {
            sig: u64::from_le_bytes(s),
            se: u16::from_le_bytes([b[8], b[9]]),
        }
    }
    pub fn to_bytes(self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&self.sig.to_le_bytes());
        b[8..].copy_from_slice(&self.se.to_le_bytes());
        b
    }
    pub fn exp(self) -> u16 {
        self.se & 0x7fff
    }
    pub fn sign(self) -> bool {
        self.se & 0x8000 != 0
    }
    pub fn neg(self) -> Self {
        F80 {
            se: self.se ^ 0x8000,
            ..self
        }
    }
    pub fn abs(self) -> Self {
        F80 {
            se: self.se & 0x7fff,
            ..self
        }
    }
    pub fn with_sign(self, neg: bool) -> Self {
        F80 {
            se: (self.se & 0x7fff) | if neg { 0x8000 } else { 0 },
            ..self
        }
    }
    /// Encodings the 387 and later reject: unnormals, pseudo-NaN/infinity.
    pub fn is_unsupported(self) -> bool {
        self.exp() != 0 && self.sig >> 63 == 0
    }
    pub fn is_nan(self) -> bool {
        self.exp() == 0x7fff && self.sig >> 63 == 1 && self.sig << 1 != 0
    }
    pub fn is_snan(self) -> bool {
        self.is_nan() && self.sig & (1 << 62) == 0
    }
    pub fn is_inf(self) -> bool {
        self.exp() == 0x7fff && self.sig == 1 << 63
    }
    pub fn is_zero(self) -> bool {
        self.exp() == 0 && self.sig == 0
    }
    /// Denormals and pseudo-denormals.
    pub fn is_denormal(self) -> bool {
        self.exp() == 0 && self.sig != 0
    }
    pub fn quiet(self) -> Self {
        F80 {
            sig: self.sig | 1 << 62,
            ..self
        }
    }
    fn bits(self) -> u128 {
        (self.se as u128) << 64 | self.sig as u128
    }
    pub fn to_ext(self) -> Ext {
        Ext::from_bits(self.bits())
    }
    pub fn from_ext(x: Ext) -> Self {
        let b = x.to_bits();
        let mut v = F80 {
            sig: b as u64,
            se: (b >> 64) as u16,
        };
        // apfloat encodes the smallest normals as pseudo-denormals.
        if v.exp() == 0 && v.sig >> 63 == 1 {
            v.se |= 1;
        }
        v
    }
    /// Tag of a value: 0 valid, 1 zero, 2 special.
    pub fn tag(self) -> u16 {
        if self.exp() == 0 {
            if self.sig == 0 {
                1
            } else {
                2
            }
        } else if self.exp() == 0x7fff || self.sig >> 63 == 0 {
            2
        } else {
            0
        }
    }
    /// Normalized significand and unbiased exponent of a finite nonzero
    /// value: value = sig * 2^(exp - 63).
    pub fn unpack(self) -> (u64, i32) {
        let mut e = if self.exp() == 0 { 1 } else { self.exp() as i32 } - 16383;
        let mut s = self.sig;
        if s != 0 {
            let z = s.leading_zeros();
            s <<= z;
            e -= z as i32;
        }
        (s, e)
    }
}

/// Precision and rounding control from the FCW.
#[derive(Clone, Copy, Debug)]
pub struct Ctl {
    /// Significand bits: 24, 53 or 64.
    pub bits: u32,
    pub rc: Round,
}

impl Ctl {
    pub fn from_fcw(fcw: u16) -> Self {
        let bits = match (fcw >> 8) & 3 {
            0 => 24,
            2 => 53,
            _ => 64,
        };
        Ctl {
            bits,
            rc: rounding(fcw),
        }
    }
    fn toward_zero(self) -> Self {
        Ctl {
            rc: Round::TowardZero,
            ..self
        }
    }
}

pub fn rounding(fcw: u16) -> Round {
    match (fcw >> 10) & 3 {
        0 => Round::NearestTiesToEven,
        1 => Round::TowardNegative,
        2 => Round::TowardPositive,
        _ => Round::TowardZero,
    }
}

/// FSW exception bits for an apfloat status.
fn status_bits(s: Status) -> u16 {
    let mut f = 0;
    if s.contains(Status::INVALID_OP) {
        f |= IE;
    }
    if s.contains(Status::DIV_BY_ZERO) {
        f |= ZE;
    }
    if s.contains(Status::OVERFLOW) {
        f |= OE;
    }
    if s.contains(Status::UNDERFLOW) {
        f |= UE;
    }
    if s.contains(Status::INEXACT) {
        f |= PE;
    }
    f
}

/// Result of an operation: the value and the FSW bits it raises (exception
/// bits plus C1 = "rounded up").
pub type Res = (F80, u16);

/// x87 NaN propagation for two operands, at least one a NaN.
pub fn propagate_nan(a: F80, b: F80) -> Res {
    let flags = if a.is_snan() || b.is_snan() { IE } else { 0 };
    let pick = match (a.is_nan(), b.is_nan()) {
        (true, false) => a,
        (false, true) => b,
        _ => {
            if a.is_snan() != b.is_snan() {
                // A QNaN wins over an SNaN.
                if a.is_snan() {
                    b
                } else {
                    a
                }
            } else {
                let (qa, qb) = (a.quiet(), b.quiet());
                if qa.sig != qb.sig {
                    if qa.sig > qb.sig {
                        a
                    } else {
                        b
                    }
                } else if a.se <= b.se {
                    a
                } else {
                    b
                }
            }
        }
    };
    (pick.quiet(), flags)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

fn apply<F: Float>(op: Op, x: F, y: F, rc: Round) -> StatusAnd<F> {
    match op {
        Op::Add => x.add_r(y, rc),
        Op::Sub => x.sub_r(y, rc),
        Op::Mul => x.mul_r(y, rc),
        Op::Div => x.div_r(y, rc),
    }
}

/// Round a wide value to the precision of `ctl` (x87 exponent range).
fn round_wide(w: StatusAnd<Wide>, ctl: Ctl) -> StatusAnd<Ext> {
    let mut lost = false;
    let (v, s) = match ctl.bits {
        24 => {
            let r: StatusAnd<Pc24> = w.value.convert_r(ctl.rc, &mut lost);
            let back: StatusAnd<Ext> = r.value.convert(&mut lost);
            (back.value, r.status)
        }
        53 => {
            let r: StatusAnd<Pc53> = w.value.convert_r(ctl.rc, &mut lost);
            let back: StatusAnd<Ext> = r.value.convert(&mut lost);
            (back.value, r.status)
        }
        _ => {
            let r: StatusAnd<Ext> = w.value.convert_r(ctl.rc, &mut lost);
            (r.value, r.status)
        }
    };
    (s | w.status).and(v)
}

fn to_wide(x: F80) -> Wide {
    let mut lost = false;
    let r: StatusAnd<Wide> = x.to_ext().convert(&mut lost);
    r.value
}

fn compute(op: Op, a: F80, b: F80, ctl: Ctl) -> StatusAnd<Ext> {
    if ctl.bits == 64 {
        apply(op, a.to_ext(), b.to_ext(), ctl.rc)
    } else {
        round_wide(apply(op, to_wide(a), to_wide(b), ctl.rc), ctl)
    }
}

/// Finish a rounded result: exception bits, C1 if rounding increased the
/// magnitude (found by redoing the operation toward zero).
fn finish(r: StatusAnd<Ext>, again: impl Fn(Ctl) -> StatusAnd<Ext>, ctl: Ctl) -> Res {
    let mut flags = status_bits(r.status);
    if flags & IE != 0 {
        return (INDEFINITE, IE);
    }
    let mut v = F80::from_ext(r.value);
    // apfloat reports no overflow when a directed mode gives the largest
    // finite value (and ignores the sign there): decide overflow with
    // round-to-nearest and build the directed result here.
    if flags & PE != 0 && (v.is_inf() || v.abs() == largest(ctl.bits)) {
        // Toward zero the threshold is 2^16384 whatever the precision:
        // round-to-nearest at 64 bits approximates it to half an ulp.
        let bits = if v.is_inf() { ctl.bits } else { 64 };
        let nearest = again(Ctl {
            rc: Round::NearestTiesToEven,
            bits,
        });
        if nearest.status.contains(Status::OVERFLOW) {
            let neg = F80::from_ext(nearest.value).sign();
            let to_inf = match ctl.rc {
                Round::TowardZero => false,
                Round::TowardPositive => !neg,
                Round::TowardNegative => neg,
                _ => true,
            };
            let inf = F80 {
                sig: 1 << 63,
                se: 0x7fff,
            };
            v = if to_inf { inf } else { largest(ctl.bits) }.with_sign(neg);
            return (v, OE | PE | if to_inf { C1 } else { 0 });
        }
    }
    if flags & PE != 0 {
        let up = match ctl.rc {
            Round::TowardZero => false,
            Round::TowardPositive => !v.sign(),
            Round::TowardNegative => v.sign(),
            _ => F80::from_ext(again(ctl.toward_zero()).value).abs() != v.abs(),
        };
        if up {
            flags |= C1;
        }
    }
    (v, flags)
}

/// Largest finite value with `bits` significand bits.
fn largest(bits: u32) -> F80 {
    F80 {
        sig: !0u64 << (64 - bits),
        se: 0x7ffe,
    }
}

fn check_operands(a: F80, b: F80) -> Option<Res> {
    if a.is_unsupported() || b.is_unsupported() {
        return Some((INDEFINITE, IE));
    }
    if a.is_nan() || b.is_nan() {
        return Some(propagate_nan(a, b));
    }
    None
}

fn denormal_flag(a: F80, b: F80) -> u16 {
    if a.is_denormal() || b.is_denormal() {
        DE
    } else {
        0
    }
}

/// a op b under PC/RC.
pub fn arith(op: Op, a: F80, b: F80, ctl: Ctl) -> Res {
    if let Some(r) = check_operands(a, b) {
        return r;
    }
    let de = denormal_flag(a, b);
    let (v, f) = finish(compute(op, a, b, ctl), |c| compute(op, a, b, c), ctl);
    if f & (IE | ZE) != 0 {
        return (v, f);
    }
    (v, f | de)
}

/// Square root, correctly rounded under PC/RC.
pub fn sqrt(a: F80, ctl: Ctl) -> Res {
    if a.is_unsupported() {
        return (INDEFINITE, IE);
    }
    if a.is_nan() {
        return propagate_nan(a, a);
    }
    if a.is_zero() || (a.is_inf() && !a.sign()) {
        return (a, 0);
    }
    if a.sign() {
        return (INDEFINITE, IE);
    }
    let de = if a.is_denormal() { DE } else { 0 };
    let (m, e) = a.unpack();
    // value = m * 2^(e-63). Take a 66/67-bit root of m * 2^k (k making
    // the exponent even), with a sticky bit for a nonzero remainder.
    let k: i32 = if (e - 63 - 68) & 1 == 0 { 68 } else { 69 };
    let (root, rem) = sqrt_shifted(m, k as u32);
    let root = (root << 1) | (rem != 0) as u128;
    let exp = (e - 63 - k) / 2 - 1;
    let make = |c: Ctl| {
        let w = Wide::from_u128(root).value.scalbn(exp);
        round_wide(Status::OK.and(w), c)
    };
    let (v, f) = finish(make(ctl), make, ctl);
    (v, f | de)
}

/// Integer square root of m * 2^k (k <= 70) by the digit-by-digit method:
/// (root, remainder).
fn sqrt_shifted(m: u64, k: u32) -> (u128, u128) {
    let pairs = (64 + k).div_ceil(2);
    let bit = |i: u32| -> u128 {
        if i >= k && i - k < 64 {
            ((m >> (i - k)) & 1) as u128
        } else {
            0
        }
    };
    let (mut rem, mut root) = (0u128, 0u128);
    for p in (0..pairs).rev() {
        rem = (rem << 2) | (bit(2 * p + 1) << 1) | bit(2 * p);
        let trial = (root << 2) | 1;
        root <<= 1;
        if rem >= trial {
            rem -= trial;
            root |= 1;
        }
    }
    (root, rem)
}

/// Round to an integer value in the FCW's rounding mode (FRNDINT).
pub fn round_int(a: F80, rc: Round) -> Res {
    if a.is_unsupported() {
        return (INDEFINITE, IE);
    }
    if a.is_nan() {
        return propagate_nan(a, a);
    }
    let de = if a.is_denormal() { DE } else { 0 };
    let ctl = Ctl { bits: 64, rc };
    let r = a.to_ext().round_to_integral(rc);
    let (v, f) = finish(r, move |c| a.to_ext().round_to_integral(c.rc), ctl);
    (v, f | de)
}

/// ST0 * 2^trunc(ST1) (FSCALE).
pub fn scale(a: F80, b: F80, ctl: Ctl) -> Res {
    if let Some(r) = check_operands(a, b) {
        return r;
    }
    let de = denormal_flag(a, b);
    if b.is_inf() {
        return match (b.sign(), a.is_zero(), a.is_inf()) {
            (false, true, _) | (true, _, true) => (INDEFINITE, IE),
            (false, _, _) => (
                F80 {
                    sig: 1 << 63,
                    se: 0x7fff,
                }
                .with_sign(a.sign()),
                de,
            ),
            (true, _, _) => (ZERO.with_sign(a.sign()), de),
        };
    }
    if a.is_zero() || a.is_inf() {
        return (a, de);
    }
    let n = b.to_ext().round_to_integral(Round::TowardZero).value;
    let mut exact = false;
    let n = n
        .to_i128_r(32, Round::TowardZero, &mut exact)
        .value
        .clamp(-100_000, 100_000) as i32;
    let make = |c: Ctl| round_wide(Status::OK.and(to_wide(a).scalbn(n)), c);
    let (v, f) = finish(make(ctl), make, ctl);
    (v, f | de)
}

/// Split into exponent and significand (FXTRACT): (exponent, significand).
pub fn extract(a: F80) -> (F80, F80, u16) {
    if a.is_unsupported() {
        return (INDEFINITE, INDEFINITE, IE);
    }
    if a.is_nan() {
        let (q, f) = propagate_nan(a, a);
        return (q, q, f);
    }
    if a.is_zero() {
        let ninf = F80 {
            sig: 1 << 63,
            se: 0xffff,
        };
        return (ninf, a, ZE);
    }
    if a.is_inf() {
        return (
            F80 {
                sig: 1 << 63,
                se: 0x7fff,
            },
            a,
            0,
        );
    }
    let de = if a.is_denormal() { DE } else { 0 };
    let (m, e) = a.unpack();
    let exp = F80::from_ext(Ext::from_i128(e as i128).value);
    let sig = F80 {
        sig: m,
        se: 0x3fff | (a.se & 0x8000),
    };
    (exp, sig, de)
}

/// Pack sign * m * 2^e exactly (the value must be representable).
fn pack_exact(neg: bool, m: u128, e: i32) -> F80 {
    let mut lost = false;
    let w = Wide::from_u128(m).value.scalbn(e);
    let r: StatusAnd<Ext> = w.convert_r(Round::TowardZero, &mut lost);
    F80::from_ext(r.value).with_sign(neg)
}

/// Partial remainder (FPREM, or FPREM1 with `nearest`). Returns the new
/// ST0 and the FSW bits (C0/C1/C3 quotient bits, C2 incomplete, exceptions).
pub fn prem(a: F80, b: F80, nearest: bool) -> Res {
    if let Some(r) = check_operands(a, b) {
        return r;
    }
    if a.is_inf() || b.is_zero() {
        return (INDEFINITE, IE);
    }
    let de = denormal_flag(a, b);
    // An unchanged pseudo-denormal comes back normalized.
    let a_norm = if a.is_denormal() && a.sig >> 63 == 1 {
        F80 { se: a.se | 1, ..a }
    } else {
        a
    };
    if a.is_zero() || b.is_inf() {
        return (a_norm, de);
    }
    let (ma, ea) = a.unpack();
    let (mb, eb) = b.unpack();
    let d = ea - eb;
    if d < 0 {
        // |a| < |b|: quotient 0 (or 1 for FPREM1 when |a| > |b|/2).
        if nearest && d == -1 && ma > mb {
            // |a| > |b|/2: a - sign*b
            let r = arith(
                Op::Sub,
                a.abs(),
                b.abs(),
                Ctl {
                    bits: 64,
                    rc: Round::TowardZero,
                },
            )
            .0;
            let v = r.with_sign(!a.sign());
            return (v, de | C1);
        }
        return (a_norm, de);
    }
    if d >= 64 {
        // Partial reduction by a multiple of b * 2^(d - n).
        let n = (d & 31) | 32;
        let num = (ma as u128) << n;
        let r = num % mb as u128;
        let v = if r == 0 {
            ZERO.with_sign(a.sign())
        } else {
            pack_exact(a.sign(), r, eb + d - n - 63)
        };
        return (v, de | C2);
    }
    let num = (ma as u128) << d;
    let mbw = mb as u128;
    let mut q = num / mbw;
    let mut r = num % mbw;
    let mut neg = a.sign();
    if nearest && (2 * r > mbw || (2 * r == mbw && q & 1 == 1)) {
        q += 1;
        r = mbw - r;
        neg = !neg;
    }
    let v = if r == 0 {
        ZERO.with_sign(a.sign())
    } else {
        pack_exact(neg, r, eb - 63)
    };
    let mut f = de;
    if q & 4 != 0 {
        f |= C0;
    }
    if q & 2 != 0 {
        f |= C3;
    }
    if q & 1 != 0 {
        f |= C1;
    }
    (v, f)
}

/// Comparison result of two values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Less,
    Equal,
    Greater,
    Unordered,
}

/// Compare; `quiet` (FUCOM) raises IE only for SNaN/unsupported operands.
pub fn compare(a: F80, b: F80, quiet: bool) -> (Cmp, u16) {
    if a.is_unsupported() || b.is_unsupported() {
        return (Cmp::Unordered, IE);
    }
    if a.is_nan() || b.is_nan() {
        let ie = !quiet || a.is_snan() || b.is_snan();
        return (Cmp::Unordered, if ie { IE } else { 0 });
    }
    let de = denormal_flag(a, b);
    let c = match a.to_ext().partial_cmp(&b.to_ext()) {
        Some(std::cmp::Ordering::Less) => Cmp::Less,
        Some(std::cmp::Ordering::Greater) => Cmp::Greater,
        Some(std::cmp::Ordering::Equal) => Cmp::Equal,
        None => Cmp::Unordered,
    };
    (c, de)
}

/// Load conversions (exact except for NaN quieting).
pub fn from_f32(bits: u32) -> Res {
    let exp = (bits >> 23) & 0xff;
    let frac = bits & 0x7f_ffff;
    let neg = bits >> 31 != 0;
    if exp == 0xff && frac != 0 {
        let v = F80 {
            sig: 1 << 63 | (frac as u64) << 40,
            se: 0x7fff,
        }
        .with_sign(neg);
        let f = if frac & (1 << 22) == 0 { IE } else { 0 };
        return (v, f);
    }
    let de = if exp == 0 && frac != 0 { DE } else { 0 };
    let mut lost = false;
    let r: StatusAnd<Ext> = Single::from_bits(bits as u128).convert(&mut lost);
    (F80::from_ext(r.value), de)
}

pub fn from_f64(bits: u64) -> Res {
    let exp = (bits >> 52) & 0x7ff;
    let frac = bits & ((1 << 52) - 1);
    let neg = bits >> 63 != 0;
    if exp == 0x7ff && frac != 0 {
        let v = F80 {
            sig: 1 << 63 | frac << 11,
            se: 0x7fff,
        }
        .with_sign(neg);
        let f = if frac & (1 << 51) == 0 { IE } else { 0 };
        return (v, f);
    }
    let de = if exp == 0 && frac != 0 { DE } else { 0 };
    let mut lost = false;
    let r: StatusAnd<Ext> = Double::from_bits(bits as u128).convert(&mut lost);
    (F80::from_ext(r.value), de)
}

pub fn from_int(v: i64) -> F80 {
    F80::from_ext(Ext::from_i128(v as i128).value)
}

/// Store conversion to f32 (`double` false) or f64 bits, with flags.
pub fn to_float(a: F80, double: bool, rc: Round) -> (u64, u16) {
    let (indef, nan_shift, nan_base) = if double {
        (0xfff8_0000_0000_0000u64, 11, 0x7ff0_0000_0000_0000u64)
    } else {
        (0xffc0_0000, 40, 0x7f80_0000)
    };
    if a.is_unsupported() {
        return (indef, IE);
    }
    if a.is_nan() {
        let f = if a.is_snan() { IE } else { 0 };
        let q = a.quiet();
        let sign_bit = if double { 63 } else { 31 };
        let v = nan_base | (q.sig & !(1 << 63)) >> nan_shift | (a.sign() as u64) << sign_bit;
        return (v, f);
    }
    let mut lost = false;
    let x = a.to_ext();
    let (bits, status, tz_bits) = if double {
        let r: StatusAnd<Double> = x.convert_r(rc, &mut lost);
        let t: StatusAnd<Double> = x.convert_r(Round::TowardZero, &mut lost);
        (r.value.to_bits() as u64, r.status, t.value.to_bits() as u64)
    } else {
        let r: StatusAnd<Single> = x.convert_r(rc, &mut lost);
        let t: StatusAnd<Single> = x.convert_r(Round::TowardZero, &mut lost);
        (r.value.to_bits() as u64, r.status, t.value.to_bits() as u64)
    };
    let mut f = status_bits(status);
    let (inf, max) = if double {
        (0x7ff0_0000_0000_0000u64, 0x7fef_ffff_ffff_ffffu64)
    } else {
        (0x7f80_0000, 0x7f7f_ffff)
    };
    let sign_bit = if double { 1u64 << 63 } else { 1 << 31 };
    let magnitude = bits & !sign_bit;
    if f & PE != 0 && magnitude == max {
        // Directed rounding to the largest finite value: apfloat does not
        // report the overflow (see `finish`).
        let mut lost = false;
        let over = if double {
            let r: StatusAnd<Double> = x.convert_r(Round::NearestTiesToEven, &mut lost);
            r.status.contains(Status::OVERFLOW)
        } else {
            let r: StatusAnd<Single> = x.convert_r(Round::NearestTiesToEven, &mut lost);
            r.status.contains(Status::OVERFLOW)
        };
        if over {
            f |= OE;
        }
    }
    let bits = if f & OE != 0 {
        // Overflow direction by rounding mode and sign.
        let to_inf = match rc {
            Round::TowardZero => false,
            Round::TowardPositive => !a.sign(),
            Round::TowardNegative => a.sign(),
            _ => true,
        };
        (if to_inf { inf } else { max }) | if a.sign() { sign_bit } else { 0 }
    } else {
        bits
    };
    if f & PE != 0 && bits != tz_bits {
        f |= C1;
    }
    (bits, f)
}

/// Store conversion to a signed integer of `width` bits (FIST/FISTTP).
/// Out-of-range values and NaNs give the integer indefinite with IE.
pub fn to_int(a: F80, width: u32, rc: Round) -> (i64, u16) {
    let indefinite = i64::MIN >> (64 - width);
    if a.is_unsupported() || a.is_nan() || a.is_inf() {
        return (indefinite, IE);
    }
    let x = a.to_ext();
    let r = x.round_to_integral(rc);
    let mut exact = false;
    let v = r.value.to_i128_r(128, Round::TowardZero, &mut exact);
    let lo = -(1i128 << (width - 1));
    let hi = (1i128 << (width - 1)) - 1;
    if v.status.contains(Status::INVALID_OP) || v.value < lo || v.value > hi {
        return (indefinite, IE);
    }
    let mut f = 0;
    if r.status.contains(Status::INEXACT) {
        f |= PE;
        if r.value.abs() > x.abs() {
            f |= C1;
        }
    }
    (v.value as i64, f)
}

/// Approximate value as f64 (for the transcendental functions).
pub fn to_f64(a: F80) -> f64 {
    let mut lost = false;
    let r: StatusAnd<Double> = a.to_ext().convert_r(Round::NearestTiesToEven, &mut lost);
    f64::from_bits(r.value.to_bits() as u64)
}

pub fn from_host_f64(v: f64) -> F80 {
    from_f64(v.to_bits()).0
}

/// Load a packed BCD value (FBLD).
pub fn from_bcd(b: &[u8; 10]) -> F80 {
    let mut v: i64 = 0;
    for i in (0..9).rev() {
        let byte = b[i];
        // Invalid digits give undefined results; use them as is.
        v = v * 100 + ((byte >> 4) as i64) * 10 + (byte & 0xf) as i64;
    }
    let f = from_int(v);
    if b[9] & 0x80 != 0 {
        f.neg()
    } else {
        f
    }
}

/// Store as packed BCD (FBSTP): None when out of range (IE, BCD indefinite).
pub fn to_bcd(a: F80, rc: Round) -> ([u8; 10], u16) {
    let indefinite = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];
    if a.is_unsupported() || a.is_nan() || a.is_inf() {
        return (indefinite, IE);
    }
    let x = a.to_ext();
    let r = x.round_to_integral(rc);
    let mut exact = false;
    let v = r.value.to_i128_r(128, Round::TowardZero, &mut exact);
    let mag = v.value.unsigned_abs();
    if v.status.contains(Status::INVALID_OP) || mag >= 1_000_000_000_000_000_000 {
        return (indefinite, IE);
    }
    let mut out = [0u8; 10];
    let mut m = mag as u64;
    for byte in out.iter_mut().take(9) {
        let lo = (m % 10) as u8;
        m /= 10;
        let hi = (m % 10) as u8;
        m /= 10;
        *byte = hi << 4 | lo;
    }
    if a.sign() {
        out[9] = 0x80;
    }
    let mut f = 0;
    if r.status.contains(Status::INEXACT) {
        f |= PE;
        if r.value.abs() > x.abs() {
            f |= C1;
        }
    }
    (out, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: f64) -> F80 {
        from_host_f64(v)
    }

    #[test]
    fn basic_arith() {
        let c = Ctl::from_fcw(0x37f);
        assert_eq!(arith(Op::Add, f(1.5), f(2.25), c), (f(3.75), 0));
        assert_eq!(arith(Op::Div, f(1.0), f(0.0), c).1, ZE);
        assert_eq!(arith(Op::Sub, f(f64::INFINITY), f(f64::INFINITY), c), (INDEFINITE, IE));
        // 1/3 at PC=24 equals the f32 value.
        let c24 = Ctl::from_fcw(0x07f);
        let (v, fl) = arith(Op::Div, f(1.0), f(3.0), c24);
        assert_eq!(v, f((1.0f32 / 3.0) as f64));
        assert_eq!(fl & PE, PE);
    }

    #[test]
    fn sqrt_and_prem() {
        let c = Ctl::from_fcw(0x37f);
        assert_eq!(sqrt(f(16.0), c), (f(4.0), 0));
        let (v, fl) = sqrt(f(2.0), c);
        assert_eq!(v.sig, 0xb504_f333_f9de_6484);
        assert_eq!(fl & PE, PE);
        let (r, fl) = prem(f(7.0), f(2.0), false);
        assert_eq!(r, f(1.0));
        assert_eq!(fl & (C0 | C1 | C3), C3 | C1); // q = 3
    }

    #[test]
    fn integer_conversions() {
        let rn = Round::NearestTiesToEven;
        assert_eq!(to_int(f(2.5), 16, rn), (2, PE));
        assert_eq!(to_int(f(40000.0), 16, rn), (-32768, IE));
        assert_eq!(to_int(f(-3.5), 32, Round::TowardZero), (-3, PE));
        assert_eq!(from_int(-5), f(-5.0));
    }
}
