//! Integer lane operations on MMX (64-bit) and XMM (128-bit) registers:
//! MMX, the SSE integer extensions, SSE2 and SSSE3, plus the bitwise and
//! shuffle instructions of the floating-point sets (no FP exceptions).

use iced_x86::{Instruction, Mnemonic as M};

use super::{enter, load, mmx_transition, store, G, LO};
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::ExecResult;
use crate::exec::Registry;

pub fn register(r: &mut Registry) {
    macro_rules! reg {
        ($($m:ident => $f:ident),* $(,)?) => { $( r.add(M::$m, G, $f); )* };
    }
    reg!(
        Paddb => paddb, Paddw => paddw, Paddd => paddd, Paddq => paddq,
        Psubb => psubb, Psubw => psubw, Psubd => psubd, Psubq => psubq,
        Paddsb => paddsb, Paddsw => paddsw, Paddusb => paddusb, Paddusw => paddusw,
        Psubsb => psubsb, Psubsw => psubsw, Psubusb => psubusb, Psubusw => psubusw,
        Pmullw => pmullw, Pmulhw => pmulhw, Pmulhuw => pmulhuw, Pmuludq => pmuludq,
        Pmaddwd => pmaddwd, Pavgb => pavgb, Pavgw => pavgw,
        Pminub => pminub, Pmaxub => pmaxub, Pminsw => pminsw, Pmaxsw => pmaxsw,
        Pcmpeqb => pcmpeqb, Pcmpeqw => pcmpeqw, Pcmpeqd => pcmpeqd,
        Pcmpgtb => pcmpgtb, Pcmpgtw => pcmpgtw, Pcmpgtd => pcmpgtd,
        Pand => pand, Pandn => pandn, Por => por, Pxor => pxor,
        Andps => pand, Andpd => pand, Andnps => pandn, Andnpd => pandn,
        Orps => por, Orpd => por, Xorps => pxor, Xorpd => pxor,
        Psadbw => psadbw,
        Pabsb => pabsb, Pabsw => pabsw, Pabsd => pabsd,
        Psignb => psignb, Psignw => psignw, Psignd => psignd,
        Pmulhrsw => pmulhrsw, Pmaddubsw => pmaddubsw,
        Phaddw => phaddw, Phaddd => phaddd, Phaddsw => phaddsw,
        Phsubw => phsubw, Phsubd => phsubd, Phsubsw => phsubsw,
        Pshufb => pshufb, Palignr => palignr,
        Psllw => psllw, Pslld => pslld, Psllq => psllq,
        Psrlw => psrlw, Psrld => psrld, Psrlq => psrlq,
        Psraw => psraw, Psrad => psrad,
        Pslldq => pslldq, Psrldq => psrldq,
        Punpcklbw => punpcklbw, Punpcklwd => punpcklwd, Punpckldq => punpckldq,
        Punpcklqdq => punpcklqdq,
        Punpckhbw => punpckhbw, Punpckhwd => punpckhwd, Punpckhdq => punpckhdq,
        Punpckhqdq => punpckhqdq,
        Unpcklps => punpckldq, Unpckhps => punpckhdq,
        Unpcklpd => punpcklqdq, Unpckhpd => punpckhqdq,
        Packsswb => packsswb, Packssdw => packssdw, Packuswb => packuswb,
        Pshufd => pshufd, Pshufhw => pshufhw, Pshuflw => pshuflw, Pshufw => pshufw,
        Shufps => shufps, Shufpd => shufpd,
        Pinsrw => pinsrw,
        Pextrw => pextrw, Pmovmskb => pmovmskb, Movmskps => movmskps, Movmskpd => movmskpd,
    );
}

// Lane views of a 128-bit value (little-endian lanes).

#[inline(always)]
fn bytes(v: u128) -> [u8; 16] {
    v.to_le_bytes()
}
#[inline(always)]
fn from_bytes(b: [u8; 16]) -> u128 {
    u128::from_le_bytes(b)
}
#[inline(always)]
fn words(v: u128) -> [u16; 8] {
    std::array::from_fn(|i| (v >> (16 * i)) as u16)
}
#[inline(always)]
fn from_words(w: [u16; 8]) -> u128 {
    w.iter()
        .enumerate()
        .fold(0, |acc, (i, &x)| acc | (x as u128) << (16 * i))
}
#[inline(always)]
fn dwords(v: u128) -> [u32; 4] {
    std::array::from_fn(|i| (v >> (32 * i)) as u32)
}
#[inline(always)]
fn from_dwords(d: [u32; 4]) -> u128 {
    d.iter()
        .enumerate()
        .fold(0, |acc, (i, &x)| acc | (x as u128) << (32 * i))
}

#[inline(always)]
fn map8(a: u128, b: u128, f: impl Fn(u8, u8) -> u8) -> u128 {
    let (a, b) = (bytes(a), bytes(b));
    from_bytes(std::array::from_fn(|i| f(a[i], b[i])))
}
#[inline(always)]
fn map16(a: u128, b: u128, f: impl Fn(u16, u16) -> u16) -> u128 {
    let (a, b) = (words(a), words(b));
    from_words(std::array::from_fn(|i| f(a[i], b[i])))
}
#[inline(always)]
fn map32(a: u128, b: u128, f: impl Fn(u32, u32) -> u32) -> u128 {
    let (a, b) = (dwords(a), dwords(b));
    from_dwords(std::array::from_fn(|i| f(a[i], b[i])))
}
#[inline(always)]
fn map64(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    f(a as u64, b as u64) as u128 | (f((a >> 64) as u64, (b >> 64) as u64) as u128) << 64
}

/// The common shape: destination register `op0 = f(op0, op1, width)`,
/// where width is 8 for MMX and 16 for XMM.
#[inline(always)]
fn binop(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, f: impl Fn(u128, u128, usize) -> u128) -> ExecResult {
    let mmx = enter(cpu, ins)?;
    let a = load(cpu, bus, ins, 0)?;
    let b = load(cpu, bus, ins, 1)?;
    if mmx {
        store(cpu, bus, ins, 0, f(a, b, 8) & LO)?;
        mmx_transition(cpu);
        Ok(())
    } else {
        store(cpu, bus, ins, 0, f(a, b, 16))
    }
}

macro_rules! op {
    ($name:ident, |$a:ident, $b:ident, $n:ident, $ins:ident| $body:expr) => {
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            binop(cpu, bus, ins, |$a, $b, $n| {
                let $ins = ins;
                $body
            })
        }
    };
    ($name:ident, $map:ident, |$x:ident, $y:ident| $body:expr) => {
        fn $name(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
            binop(cpu, bus, ins, |a, b, _| $map(a, b, |$x, $y| $body))
        }
    };
}

op!(paddb, map8, |x, y| x.wrapping_add(y));
op!(paddw, map16, |x, y| x.wrapping_add(y));
op!(paddd, map32, |x, y| x.wrapping_add(y));
op!(paddq, map64, |x, y| x.wrapping_add(y));
op!(psubb, map8, |x, y| x.wrapping_sub(y));
op!(psubw, map16, |x, y| x.wrapping_sub(y));
op!(psubd, map32, |x, y| x.wrapping_sub(y));
op!(psubq, map64, |x, y| x.wrapping_sub(y));
op!(paddsb, map8, |x, y| (x as i8).saturating_add(y as i8) as u8);
op!(paddsw, map16, |x, y| (x as i16).saturating_add(y as i16) as u16);
op!(paddusb, map8, |x, y| x.saturating_add(y));
op!(paddusw, map16, |x, y| x.saturating_add(y));
op!(psubsb, map8, |x, y| (x as i8).saturating_sub(y as i8) as u8);
op!(psubsw, map16, |x, y| (x as i16).saturating_sub(y as i16) as u16);
op!(psubusb, map8, |x, y| x.saturating_sub(y));
op!(psubusw, map16, |x, y| x.saturating_sub(y));
op!(pmullw, map16, |x, y| x.wrapping_mul(y));
op!(pmulhw, map16, |x, y| ((x as i16 as i32 * y as i16 as i32) >> 16) as u16);
op!(pmulhuw, map16, |x, y| ((x as u32 * y as u32) >> 16) as u16);
op!(pmuludq, map64, |x, y| (x as u32 as u64) * (y as u32 as u64));
op!(pmaddwd, map32, |x, y| {
    let p = |s: u32| (x >> s) as u16 as i16 as i32 * ((y >> s) as u16 as i16 as i32);
    p(0).wrapping_add(p(16)) as u32
});
op!(pavgb, map8, |x, y| ((x as u16 + y as u16 + 1) >> 1) as u8);
op!(pavgw, map16, |x, y| ((x as u32 + y as u32 + 1) >> 1) as u16);
op!(pmaxsw, map16, |x, y| (x as i16).max(y as i16) as u16);
op!(pminsw, map16, |x, y| (x as i16).min(y as i16) as u16);
op!(pcmpeqw, map16, |x, y| if x == y { !0 } else { 0 });
op!(pcmpeqd, map32, |x, y| if x == y { !0 } else { 0 });
op!(pcmpgtb, map8, |x, y| if x as i8 > y as i8 { !0 } else { 0 });
op!(pcmpgtw, map16, |x, y| if x as i16 > y as i16 { !0 } else { 0 });
op!(pcmpgtd, map32, |x, y| if x as i32 > y as i32 { !0 } else { 0 });
op!(psadbw, map64, |x, y| {
    let (x, y) = (x.to_le_bytes(), y.to_le_bytes());
    (0..8).map(|i| x[i].abs_diff(y[i]) as u64).sum()
});
op!(pabsb, map8, |_x, y| (y as i8).unsigned_abs());
op!(pabsw, map16, |_x, y| (y as i16).unsigned_abs());
op!(pabsd, map32, |_x, y| (y as i32).unsigned_abs());
op!(psignb, map8, |x, y| (x as i8).wrapping_mul((y as i8).signum()) as u8);
op!(psignw, map16, |x, y| (x as i16).wrapping_mul((y as i16).signum())
    as u16);
op!(psignd, map32, |x, y| (x as i32).wrapping_mul((y as i32).signum())
    as u32);
op!(pmulhrsw, map16, |x, y| {
    let p = x as i16 as i32 * y as i16 as i32;
    (((p >> 14) + 1) >> 1) as u16
});
op!(pmaddubsw, map16, |x, y| {
    let p = |s: u32| (x >> s) as u8 as i32 * ((y >> s) as u8 as i8 as i32);
    (p(0) + p(8)).clamp(i16::MIN as i32, i16::MAX as i32) as u16
});

// The operations glibc's string functions run in their inner loops get
// branch-free whole-register forms.

const LOW7: u128 = 0x7f7f_7f7f_7f7f_7f7f_7f7f_7f7f_7f7f_7f7f;
const HIGH1: u128 = !LOW7;

/// 0xff in every byte where `a == b`, else 0.
#[inline(always)]
fn eq_bytes(a: u128, b: u128) -> u128 {
    let x = a ^ b;
    // High bit of t is set iff the byte of x is non-zero (no carries
    // cross bytes: (x & 0x7f) + 0x7f <= 0xfe).
    let t = ((x & LOW7) + LOW7) | x;
    let zero_hi = !t & HIGH1;
    (zero_hi >> 7) * 0xff
}

op!(pcmpeqb, |a, b, _n, _i| eq_bytes(a, b));
op!(pminub, map8, |x, y| x.min(y));
op!(pmaxub, map8, |x, y| x.max(y));
op!(pand, |a, b, _n, _i| a & b);
op!(pandn, |a, b, _n, _i| !a & b);
op!(por, |a, b, _n, _i| a | b);
op!(pxor, |a, b, _n, _i| a ^ b);

/// Horizontal word/dword operation: pairs of `a` then pairs of `b`.
#[inline(always)]
fn horizontal16(a: u128, b: u128, n: usize, f: impl Fn(u16, u16) -> u16) -> u128 {
    let (a, b) = (words(a), words(b));
    let half = n / 4; // results per source
    let mut r = [0u16; 8];
    for i in 0..half {
        r[i] = f(a[2 * i], a[2 * i + 1]);
        r[half + i] = f(b[2 * i], b[2 * i + 1]);
    }
    from_words(r)
}
#[inline(always)]
fn horizontal32(a: u128, b: u128, n: usize, f: impl Fn(u32, u32) -> u32) -> u128 {
    let (a, b) = (dwords(a), dwords(b));
    let half = n / 8;
    let mut r = [0u32; 4];
    for i in 0..half {
        r[i] = f(a[2 * i], a[2 * i + 1]);
        r[half + i] = f(b[2 * i], b[2 * i + 1]);
    }
    from_dwords(r)
}

op!(phaddw, |a, b, n, _i| horizontal16(a, b, n, |x, y| x.wrapping_add(y)));
op!(phaddd, |a, b, n, _i| horizontal32(a, b, n, |x, y| x.wrapping_add(y)));
op!(phaddsw, |a, b, n, _i| horizontal16(
    a,
    b,
    n,
    |x, y| (x as i16).saturating_add(y as i16) as u16
));
op!(phsubw, |a, b, n, _i| horizontal16(a, b, n, |x, y| x.wrapping_sub(y)));
op!(phsubd, |a, b, n, _i| horizontal32(a, b, n, |x, y| x.wrapping_sub(y)));
op!(phsubsw, |a, b, n, _i| horizontal16(
    a,
    b,
    n,
    |x, y| (x as i16).saturating_sub(y as i16) as u16
));

op!(pshufb, |a, b, n, _i| {
    let (a, b) = (bytes(a), bytes(b));
    from_bytes(std::array::from_fn(|i| {
        if b[i] & 0x80 != 0 {
            0
        } else {
            a[b[i] as usize & (n - 1)]
        }
    }))
});

op!(palignr, |a, b, n, ins| {
    // Concatenate dest:src and shift right by imm8 bytes.
    let shift = ins.immediate8() as usize;
    let (a, b) = (bytes(a), bytes(b));
    from_bytes(std::array::from_fn(|i| {
        let k = i + shift;
        if i >= n {
            0
        } else if k < n {
            b[k]
        } else if k < 2 * n {
            a[k - n]
        } else {
            0
        }
    }))
});

/// The shift count of a vector shift: imm8, or the low quadword of the
/// register or memory source.
#[inline(always)]
fn count(b: u128) -> u64 {
    b as u64
}

op!(psllw, |a, b, _n, _i| {
    let c = count(b);
    map16(a, 0, |x, _| if c > 15 { 0 } else { x << c })
});
op!(pslld, |a, b, _n, _i| {
    let c = count(b);
    map32(a, 0, |x, _| if c > 31 { 0 } else { x << c })
});
op!(psllq, |a, b, _n, _i| {
    let c = count(b);
    map64(a, 0, |x, _| if c > 63 { 0 } else { x << c })
});
op!(psrlw, |a, b, _n, _i| {
    let c = count(b);
    map16(a, 0, |x, _| if c > 15 { 0 } else { x >> c })
});
op!(psrld, |a, b, _n, _i| {
    let c = count(b);
    map32(a, 0, |x, _| if c > 31 { 0 } else { x >> c })
});
op!(psrlq, |a, b, _n, _i| {
    let c = count(b);
    map64(a, 0, |x, _| if c > 63 { 0 } else { x >> c })
});
op!(psraw, |a, b, _n, _i| {
    let c = count(b).min(15);
    map16(a, 0, |x, _| ((x as i16) >> c) as u16)
});
op!(psrad, |a, b, _n, _i| {
    let c = count(b).min(31);
    map32(a, 0, |x, _| ((x as i32) >> c) as u32)
});
op!(pslldq, |a, b, _n, _i| {
    let c = count(b);
    if c > 15 {
        0
    } else {
        a << (8 * c)
    }
});
op!(psrldq, |a, b, _n, _i| {
    let c = count(b);
    if c > 15 {
        0
    } else {
        a >> (8 * c)
    }
});

/// Interleave elements of `size` bytes from the low (`high` = false) or
/// high halves of `a` and `b`.
#[inline(always)]
fn unpack(a: u128, b: u128, n: usize, size: usize, high: bool) -> u128 {
    let (a, b) = (bytes(a), bytes(b));
    let k = n / size / 2;
    let base = if high { k } else { 0 };
    let mut r = [0u8; 16];
    for i in 0..k {
        let src = (base + i) * size;
        r[2 * i * size..(2 * i + 1) * size].copy_from_slice(&a[src..src + size]);
        r[(2 * i + 1) * size..(2 * i + 2) * size].copy_from_slice(&b[src..src + size]);
    }
    from_bytes(r)
}

op!(punpcklbw, |a, b, n, _i| unpack(a, b, n, 1, false));
op!(punpcklwd, |a, b, n, _i| unpack(a, b, n, 2, false));
op!(punpckldq, |a, b, n, _i| unpack(a, b, n, 4, false));
op!(punpcklqdq, |a, b, n, _i| unpack(a, b, n, 8, false));
op!(punpckhbw, |a, b, n, _i| unpack(a, b, n, 1, true));
op!(punpckhwd, |a, b, n, _i| unpack(a, b, n, 2, true));
op!(punpckhdq, |a, b, n, _i| unpack(a, b, n, 4, true));
op!(punpckhqdq, |a, b, n, _i| unpack(a, b, n, 8, true));

/// PACKSSWB/PACKUSWB: signed words of `a` then `b`, saturated to bytes in
/// `lo..=hi`; `n` is the register width in bytes.
fn pack_words(a: u128, b: u128, n: usize, lo: i16, hi: i16) -> u128 {
    let (wa, wb) = (words(a), words(b));
    let k = n / 2;
    let sat = |w: u16| (w as i16).clamp(lo, hi) as u8;
    let mut r = [0u8; 16];
    for i in 0..k {
        r[i] = sat(wa[i]);
        r[k + i] = sat(wb[i]);
    }
    from_bytes(r)
}

op!(packsswb, |a, b, n, _i| pack_words(a, b, n, -128, 127));
op!(packuswb, |a, b, n, _i| pack_words(a, b, n, 0, 255));
op!(packssdw, |a, b, n, _i| {
    let (da, db) = (dwords(a), dwords(b));
    let k = n / 4;
    let sat = |d: u32| (d as i32).clamp(-32768, 32767) as u16;
    let mut r = [0u16; 8];
    for i in 0..k {
        r[i] = sat(da[i]);
        r[k + i] = sat(db[i]);
    }
    from_words(r)
});

op!(pshufd, |_a, b, _n, ins| {
    let imm = ins.immediate8() as usize;
    let d = dwords(b);
    from_dwords(std::array::from_fn(|i| d[(imm >> (2 * i)) & 3]))
});
op!(pshufw, |_a, b, _n, ins| {
    let imm = ins.immediate8() as usize;
    let w = words(b);
    from_words(std::array::from_fn(|i| if i < 4 { w[(imm >> (2 * i)) & 3] } else { 0 }))
});
op!(pshuflw, |_a, b, _n, ins| {
    let imm = ins.immediate8() as usize;
    let w = words(b);
    from_words(std::array::from_fn(
        |i| if i < 4 { w[(imm >> (2 * i)) & 3] } else { w[i] },
    ))
});
op!(pshufhw, |_a, b, _n, ins| {
    let imm = ins.immediate8() as usize;
    let w = words(b);
    from_words(std::array::from_fn(|i| {
        if i < 4 {
            w[i]
        } else {
            w[4 + ((imm >> (2 * (i - 4))) & 3)]
        }
    }))
});
op!(shufps, |a, b, _n, ins| {
    let imm = ins.immediate8() as usize;
    let (da, db) = (dwords(a), dwords(b));
    from_dwords([da[imm & 3], da[(imm >> 2) & 3], db[(imm >> 4) & 3], db[(imm >> 6) & 3]])
});
op!(shufpd, |a, b, _n, ins| {
    let imm = ins.immediate8();
    let lo = if imm & 1 != 0 { a >> 64 } else { a & LO };
    let hi = if imm & 2 != 0 { b >> 64 } else { b & LO };
    lo | (hi << 64)
});
op!(pinsrw, |a, b, n, ins| {
    let i = (ins.immediate8() as usize & (n / 2 - 1)) * 16;
    (a & !(0xffffu128 << i)) | ((b & 0xffff) << i)
});

/// PEXTRW r32, mm/xmm, imm8.
fn pextrw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mmx = enter(cpu, ins)?;
    let n = if mmx { 8 } else { 16 };
    let v = load(cpu, bus, ins, 1)?;
    let i = (ins.immediate8() as usize & (n / 2 - 1)) * 16;
    store(cpu, bus, ins, 0, (v >> i) & 0xffff)?;
    if mmx {
        mmx_transition(cpu);
    }
    Ok(())
}

/// Gather the top bit of each `size`-byte lane of operand 1 into a
/// general register.
#[inline(always)]
fn mask_bits(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, size: usize) -> ExecResult {
    let mmx = enter(cpu, ins)?;
    let n = if mmx { 8 } else { 16 };
    let v = load(cpu, bus, ins, 1)?;
    let mut m = 0u128;
    for i in 0..n / size {
        m |= ((v >> (8 * size * (i + 1) - 1)) & 1) << i;
    }
    store(cpu, bus, ins, 0, m)?;
    if mmx {
        mmx_transition(cpu);
    }
    Ok(())
}

fn pmovmskb(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    mask_bits(cpu, bus, ins, 1)
}
fn movmskps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    mask_bits(cpu, bus, ins, 4)
}
fn movmskpd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    mask_bits(cpu, bus, ins, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eq_bytes_matches_bytewise() {
        let a: u128 = 0x00ff_8012_7f80_0001_ff00_1234_5678_9abc;
        let b: u128 = 0x00fe_8012_7f00_0001_ff01_1234_0078_9abc;
        let expect = map8(a, b, |x, y| if x == y { 0xff } else { 0 });
        assert_eq!(eq_bytes(a, b), expect);
        assert_eq!(eq_bytes(a, a), u128::MAX);
    }
}
