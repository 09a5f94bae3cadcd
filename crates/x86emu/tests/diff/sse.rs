//! Differential tests for MMX/SSE/SSE2/SSE3/SSSE3 (exec/sse/).
//! Integer forms run on random and edge lane values; floating-point forms
//! on IEEE edge values (signed zeros, denormals, infinities, QNaN/SNaN
//! with payloads, extreme normals, tiny values whose products underflow)
//! under every MXCSR rounding mode and FTZ/DAZ setting, all exceptions
//! masked (an unmasked one would fault natively). MXCSR is compared
//! exactly. COMIS/UCOMIS define every status flag, so none are masked.

use iced_x86::code_asm::*;

use crate::harness::*;

type Asm = CodeAssembler;
type R = Result<(), iced_x86::IcedError>;

fn f32_edge(rng: &mut Rng) -> u32 {
    let sign = (rng.below(2) as u32) << 31;
    let frac = rng.next_u64() as u32 & 0x7f_ffff;
    let mag = match rng.below(16) {
        0 => 0,
        1 => 1,
        2 => 0x7f_ffff,
        3 => frac.max(1),                                         // denormal
        4 => 0x0080_0000,                                         // min normal
        5 => 0x7f7f_ffff,                                         // max normal
        6 => 0x7f80_0000,                                         // infinity
        7 => 0x7fc0_0000 | (frac >> 1),                           // QNaN with payload
        8 => 0x7f80_0000 | (frac >> 1).max(1),                    // SNaN
        9 => 0x3f80_0000,                                         // 1.0
        10 => ((1 + rng.below(24) as u32) << 23) | frac,          // tiny normal
        11 => ((0xe0 + rng.below(30) as u32) << 23) | frac,       // huge normal
        12 => 0x3f00_0000 + (rng.next_u64() as u32 & 0x1ff_ffff), // near 1
        13 => 0x4b00_0000 | frac,                                 // near 2^23: integral boundaries
        _ => rng.next_u64() as u32 & 0x7fff_ffff,
    };
    sign | mag
}

fn f64_edge(rng: &mut Rng) -> u64 {
    let sign = rng.below(2) << 63;
    let frac = rng.next_u64() & 0xf_ffff_ffff_ffff;
    let mag = match rng.below(17) {
        0 => 0,
        1 => 1,
        2 => 0xf_ffff_ffff_ffff,
        3 => frac.max(1),
        4 => 0x0010_0000_0000_0000,
        5 => 0x7fef_ffff_ffff_ffff,
        6 => 0x7ff0_0000_0000_0000,
        7 => 0x7ff8_0000_0000_0000 | (frac >> 1),
        8 => 0x7ff0_0000_0000_0000 | (frac >> 1).max(1),
        9 => 0x3ff0_0000_0000_0000,
        10 => ((1 + rng.below(60)) << 52) | frac,
        11 => ((0x7c0 + rng.below(60)) << 52) | frac,
        12 => 0x3fe0_0000_0000_0000 + (rng.next_u64() & 0x3f_ffff_ffff_ffff),
        13 => 0x4330_0000_0000_0000 | frac,
        14 => ((0x3ff + 20 + rng.below(50)) << 52) | frac, // int conversion range edges
        15 => 0x1_0000_0000 + rng.below(1000),             // small denormals, few bits
        _ => rng.next_u64() & 0x7fff_ffff_ffff_ffff,
    };
    sign | mag
}

fn vec_ps(rng: &mut Rng) -> u128 {
    (0..4).fold(0, |acc, i| acc | (f32_edge(rng) as u128) << (32 * i))
}
fn vec_pd(rng: &mut Rng) -> u128 {
    f64_edge(rng) as u128 | (f64_edge(rng) as u128) << 64
}

/// Random bytes with a bias toward equal and special lanes (the string
/// functions compare bytes against zero and each other).
fn vec_int(rng: &mut Rng) -> u128 {
    match rng.below(4) {
        0 => rng.next_u64() as u128 | (rng.next_u64() as u128) << 64,
        1 => {
            let b: [u8; 16] = std::array::from_fn(|_| [0, 0x80, 0x7f, 0xff, 1, b'a'][rng.below(6) as usize]);
            u128::from_le_bytes(b)
        }
        2 => {
            let w: [u8; 16] = std::array::from_fn(|i| {
                if i % 2 == 0 {
                    rng.next_u64() as u8
                } else {
                    [0, 0xff, 0x80, 0x7f][rng.below(4) as usize]
                }
            });
            u128::from_le_bytes(w)
        }
        _ => rng.edgy() as u128 | (rng.edgy() as u128) << 64,
    }
}

#[derive(Clone, Copy)]
enum Data {
    Int,
    Ps,
    Pd,
}

fn value(rng: &mut Rng, d: Data) -> u128 {
    match d {
        Data::Int => vec_int(rng),
        Data::Ps => vec_ps(rng),
        Data::Pd => vec_pd(rng),
    }
}

/// A random MXCSR with all exceptions masked: rounding mode, FTZ, DAZ
/// and some sticky flags already set.
fn random_mxcsr(rng: &mut Rng) -> u32 {
    let rc = (rng.below(4) as u32) << 13;
    let ftz = if rng.below(3) == 0 { 1 << 15 } else { 0 };
    let daz = if rng.below(3) == 0 { 1 << 6 } else { 0 };
    let sticky = if rng.below(4) == 0 { rng.below(64) as u32 } else { 0 };
    0x1f80 | rc | ftz | daz | sticky
}

/// A case with random XMM, MMX and general registers, memory at RBX
/// (16-byte aligned) filled the same way.
fn make_case(rng: &mut Rng, code: &[u8], d: Data) -> Case {
    let mut c = Case::new(code.to_vec());
    for x in c.fpu.xmm.iter_mut() {
        *x = value(rng, d);
    }
    for r in c.fpu.regs.iter_mut() {
        r[..8].copy_from_slice(&(value(rng, d) as u64).to_le_bytes());
        r[8] = rng.next_u64() as u8;
        r[9] = rng.next_u64() as u8;
    }
    c.fpu.fsw = (rng.below(8) as u16) << 11;
    c.fpu.ftw = if rng.below(2) == 0 { 0xffff } else { 0 };
    c.fpu.mxcsr = match d {
        Data::Int => 0x1f80 | rng.below(64) as u32,
        _ => random_mxcsr(rng),
    };
    for (i, v) in c.gpr.iter_mut().enumerate() {
        *v = if i == RSP { 0 } else { rng.edgy() };
    }
    c.gpr[RBX] = scratch_addr() + 0x100;
    for chunk in c.mem.chunks_mut(16) {
        chunk.copy_from_slice(&value(rng, d).to_le_bytes());
    }
    c
}

/// Run cases; with `SSE_DIFF_DEBUG` set, first print the inputs (MXCSR,
/// XMM1/3/10, memory) of failing cases.
fn run_dbg(name: &str, n: usize, seed: u64, mut make: impl FnMut(&mut Rng) -> Case) {
    if std::env::var_os("SSE_DIFF_DEBUG").is_none() {
        run_cases(name, n, seed, make);
        return;
    }
    let mut rng = Rng(seed | 1);
    let mut probe = Vec::new();
    for _ in 0..n {
        let c = make(&mut rng);
        if let Err(e) = check(&c) {
            probe.push(format!(
                "{name}: mxcsr {:#x} xmm1 {:#034x} xmm10 {:#034x} xmm3 {:#034x} mem20 {:02x?}: {e}",
                c.fpu.mxcsr,
                c.fpu.xmm[1],
                c.fpu.xmm[10],
                c.fpu.xmm[3],
                &c.mem[0x20..0x30]
            ));
            if probe.len() > 3 {
                break;
            }
        }
    }
    if !probe.is_empty() {
        eprintln!("{}", probe.join("\n"));
    }
    run_cases(name, n, seed, &mut make);
}

fn run_forms(forms: Vec<(String, Vec<u8>)>, d: Data, seed: u64, per_form: usize) {
    for (i, (name, code)) in forms.into_iter().enumerate() {
        run_cases(&name, per_form, seed + i as u64, |rng| make_case(rng, &code, d));
    }
}

macro_rules! xmm_forms {
    ($v:ident; $($m:ident),* $(,)?) => {$(
        $v.push((format!("{} xmm,xmm", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(xmm1, xmm10) })));
        $v.push((format!("{} xmm,m", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(xmm9, xmmword_ptr(rbx + 0x20)) })));
    )*};
}
macro_rules! mmx_forms {
    ($v:ident; $($m:ident),* $(,)?) => {$(
        $v.push((format!("{} mm,mm", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(mm1, mm6) })));
        $v.push((format!("{} mm,m", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(mm3, qword_ptr(rbx + 0x18)) })));
    )*};
}

fn per_form() -> usize {
    cases_per_form() / 2
}

#[test]
fn integer_ops() {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    xmm_forms!(v; paddb, paddw, paddd, paddq, psubb, psubw, psubd, psubq,
        paddsb, paddsw, paddusb, paddusw, psubsb, psubsw, psubusb, psubusw,
        pmullw, pmulhw, pmulhuw, pmuludq, pmaddwd, pavgb, pavgw,
        pminub, pmaxub, pminsw, pmaxsw, pcmpeqb, pcmpeqw, pcmpeqd, pcmpgtb, pcmpgtw, pcmpgtd,
        pand, pandn, por, pxor, andps, andpd, andnps, andnpd, orps, orpd, xorps, xorpd,
        psadbw, pabsb, pabsw, pabsd, psignb, psignw, psignd, pmulhrsw, pmaddubsw,
        phaddw, phaddd, phaddsw, phsubw, phsubd, phsubsw, pshufb,
        psllw, pslld, psllq, psrlw, psrld, psrlq, psraw, psrad,
        punpcklbw, punpcklwd, punpckldq, punpcklqdq, punpckhbw, punpckhwd, punpckhdq, punpckhqdq,
        unpcklps, unpckhps, unpcklpd, unpckhpd, packsswb, packssdw, packuswb);
    run_forms(v, Data::Int, 0x5500, per_form());
}

#[test]
fn mmx_ops() {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    mmx_forms!(v; paddb, paddw, paddd, paddq, psubb, psubw, psubd, psubq,
        paddsb, paddsw, paddusb, paddusw, psubsb, psubsw, psubusb, psubusw,
        pmullw, pmulhw, pmulhuw, pmuludq, pmaddwd, pavgb, pavgw,
        pminub, pmaxub, pminsw, pmaxsw, pcmpeqb, pcmpeqw, pcmpeqd, pcmpgtb, pcmpgtw, pcmpgtd,
        pand, pandn, por, pxor, psadbw, pabsb, pabsw, pabsd, psignb, psignw, psignd, pmulhrsw, pmaddubsw,
        phaddw, phaddd, phaddsw, phsubw, phsubd, phsubsw, pshufb,
        psllw, pslld, psllq, psrlw, psrld, psrlq, psraw, psrad,
        punpcklbw, punpcklwd, punpckldq, punpckhbw, punpckhwd, punpckhdq,
        packsswb, packssdw, packuswb);
    run_forms(v, Data::Int, 0x5600, per_form() / 2);
}

#[test]
fn immediate_forms() {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    for imm in [0u32, 1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 200] {
        macro_rules! sh {
            ($($m:ident),*) => {$(
                v.push((format!("{} xmm,{imm}", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(xmm3, imm) })));
                v.push((format!("{} mm,{imm}", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(mm5, imm) })));
            )*};
        }
        sh!(psllw, pslld, psllq, psrlw, psrld, psrlq, psraw, psrad);
        v.push((
            format!("pslldq {imm}"),
            asm(|a: &mut Asm| -> R { a.pslldq(xmm12, imm) }),
        ));
        v.push((
            format!("psrldq {imm}"),
            asm(|a: &mut Asm| -> R { a.psrldq(xmm12, imm) }),
        ));
        v.push((
            format!("palignr xmm {imm}"),
            asm(|a: &mut Asm| -> R { a.palignr(xmm2, xmm7, imm) }),
        ));
        v.push((
            format!("palignr xmm,m {imm}"),
            asm(|a: &mut Asm| -> R { a.palignr(xmm2, xmmword_ptr(rbx), imm) }),
        ));
        v.push((
            format!("palignr mm {imm}"),
            asm(|a: &mut Asm| -> R { a.palignr(mm2, mm7, imm) }),
        ));
    }
    for imm in [0u32, 0x1b, 0x4e, 0xe4, 0xff, 0x39, 0x93] {
        v.push((
            format!("pshufd {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pshufd(xmm1, xmm2, imm) }),
        ));
        v.push((
            format!("pshufd m {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pshufd(xmm1, xmmword_ptr(rbx + 0x30), imm) }),
        ));
        v.push((
            format!("pshufhw {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pshufhw(xmm1, xmm2, imm) }),
        ));
        v.push((
            format!("pshuflw {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pshuflw(xmm1, xmm2, imm) }),
        ));
        v.push((
            format!("pshufw {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pshufw(mm1, mm2, imm) }),
        ));
        v.push((
            format!("shufps {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.shufps(xmm1, xmm2, imm) }),
        ));
        v.push((
            format!("shufpd {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.shufpd(xmm1, xmm2, imm & 3) }),
        ));
        v.push((
            format!("pinsrw xmm {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pinsrw(xmm1, ecx, imm) }),
        ));
        v.push((
            format!("pinsrw xmm,m {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pinsrw(xmm1, word_ptr(rbx + 6), imm) }),
        ));
        v.push((
            format!("pinsrw mm {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pinsrw(mm1, ecx, imm) }),
        ));
        v.push((
            format!("pextrw xmm {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pextrw(edx, xmm1, imm) }),
        ));
        v.push((
            format!("pextrw mm {imm:#x}"),
            asm(|a: &mut Asm| -> R { a.pextrw(edx, mm1, imm) }),
        ));
    }
    run_forms(v, Data::Int, 0x5700, cases_per_form() / 8);
}

#[test]
fn moves() {
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("movdqa x,x", asm(|a| a.movdqa(xmm1, xmm11))),
        ("movdqa x,m", asm(|a| a.movdqa(xmm1, xmmword_ptr(rbx + 0x10)))),
        ("movdqa m,x", asm(|a| a.movdqa(xmmword_ptr(rbx + 0x40), xmm5))),
        ("movdqu x,m", asm(|a| a.movdqu(xmm1, xmmword_ptr(rbx + 0x13)))),
        ("movdqu m,x", asm(|a| a.movdqu(xmmword_ptr(rbx + 0x7), xmm13))),
        ("movdqu x,x", asm(|a| a.movdqu(xmm1, xmm13))),
        ("movaps x,x", asm(|a| a.movaps(xmm1, xmm2))),
        ("movaps x,m", asm(|a| a.movaps(xmm1, xmmword_ptr(rbx)))),
        ("movaps m,x", asm(|a| a.movaps(xmmword_ptr(rbx + 0x50), xmm2))),
        ("movapd x,x", asm(|a| a.movapd(xmm1, xmm2))),
        ("movups x,m", asm(|a| a.movups(xmm1, xmmword_ptr(rbx + 3)))),
        ("movups m,x", asm(|a| a.movups(xmmword_ptr(rbx + 9), xmm2))),
        ("movupd x,m", asm(|a| a.movupd(xmm1, xmmword_ptr(rbx + 3)))),
        ("lddqu", asm(|a| a.lddqu(xmm1, xmmword_ptr(rbx + 5)))),
        ("movntdq", asm(|a| a.movntdq(xmmword_ptr(rbx + 0x20), xmm4))),
        ("movntps", asm(|a| a.movntps(xmmword_ptr(rbx + 0x20), xmm4))),
        ("movntpd", asm(|a| a.movntpd(xmmword_ptr(rbx + 0x20), xmm4))),
        ("movnti", asm(|a| a.movnti(qword_ptr(rbx + 0x28), rcx))),
        ("movntq", asm(|a| a.movntq(qword_ptr(rbx + 0x28), mm4))),
        ("movd x,r32", asm(|a| a.movd(xmm1, ecx))),
        ("movd x,m32", asm(|a| a.movd(xmm1, dword_ptr(rbx + 4)))),
        ("movd r32,x", asm(|a| a.movd(ecx, xmm14))),
        ("movd m32,x", asm(|a| a.movd(dword_ptr(rbx + 4), xmm14))),
        ("movq x,r64", asm(|a| a.movq(xmm1, rcx))),
        ("movq r64,x", asm(|a| a.movq(rcx, xmm8))),
        ("movq x,x", asm(|a| a.movq(xmm1, xmm8))),
        ("movq x,m64", asm(|a| a.movq(xmm1, qword_ptr(rbx + 8)))),
        ("movq m64,x", asm(|a| a.movq(qword_ptr(rbx + 8), xmm3))),
        ("movd mm,r32", asm(|a| a.movd(mm1, ecx))),
        ("movd r32,mm", asm(|a| a.movd(ecx, mm2))),
        ("movq mm,r64", asm(|a| a.movq(mm1, rcx))),
        ("movq r64,mm", asm(|a| a.movq(rcx, mm7))),
        ("movq mm,mm", asm(|a| a.movq(mm1, mm7))),
        ("movq mm,m", asm(|a| a.movq(mm1, qword_ptr(rbx + 8)))),
        ("movq m,mm", asm(|a| a.movq(qword_ptr(rbx + 8), mm0))),
        ("movq2dq", asm(|a| a.movq2dq(xmm3, mm5))),
        ("movdq2q", asm(|a| a.movdq2q(mm3, xmm5))),
        ("movss x,x", asm(|a| a.movss(xmm1, xmm2))),
        ("movss x,m", asm(|a| a.movss(xmm1, dword_ptr(rbx + 4)))),
        ("movss m,x", asm(|a| a.movss(dword_ptr(rbx + 4), xmm1))),
        ("movsd x,x", asm(|a| a.movsd_2(xmm1, xmm2))),
        ("movsd x,m", asm(|a| a.movsd_2(xmm1, qword_ptr(rbx + 8)))),
        ("movsd m,x", asm(|a| a.movsd_2(qword_ptr(rbx + 8), xmm1))),
        ("movlps x,m", asm(|a| a.movlps(xmm1, qword_ptr(rbx + 8)))),
        ("movlps m,x", asm(|a| a.movlps(qword_ptr(rbx + 8), xmm1))),
        ("movhps x,m", asm(|a| a.movhps(xmm1, qword_ptr(rbx + 8)))),
        ("movhps m,x", asm(|a| a.movhps(qword_ptr(rbx + 8), xmm1))),
        ("movlpd x,m", asm(|a| a.movlpd(xmm1, qword_ptr(rbx + 8)))),
        ("movhpd x,m", asm(|a| a.movhpd(xmm1, qword_ptr(rbx + 8)))),
        ("movhpd m,x", asm(|a| a.movhpd(qword_ptr(rbx + 8), xmm1))),
        ("movhlps", asm(|a| a.movhlps(xmm1, xmm12))),
        ("movlhps", asm(|a| a.movlhps(xmm1, xmm12))),
        ("movddup x,x", asm(|a| a.movddup(xmm1, xmm12))),
        ("movddup x,m", asm(|a| a.movddup(xmm1, qword_ptr(rbx + 8)))),
        ("movsldup", asm(|a| a.movsldup(xmm1, xmm12))),
        ("movshdup", asm(|a| a.movshdup(xmm1, xmmword_ptr(rbx + 0x10)))),
        ("pmovmskb r32,x", asm(|a| a.pmovmskb(eax, xmm12))),
        ("pmovmskb r32,mm", asm(|a| a.pmovmskb(eax, mm2))),
        ("movmskps", asm(|a| a.movmskps(eax, xmm12))),
        ("movmskpd", asm(|a| a.movmskpd(r9d, xmm2))),
        (
            "maskmovdqu",
            asm(|a| {
                a.mov(rdi, rbx)?;
                a.maskmovdqu(xmm1, xmm2)
            }),
        ),
        (
            "maskmovq",
            asm(|a| {
                a.lea(rdi, qword_ptr(rbx + 3))?;
                a.maskmovq(mm1, mm2)
            }),
        ),
        // The case puts a valid MXCSR value at [rbx+0x60].
        (
            "stmxcsr ldmxcsr",
            asm(|a| {
                a.stmxcsr(dword_ptr(rbx + 0x64))?;
                a.ldmxcsr(dword_ptr(rbx + 0x60))?;
                a.stmxcsr(dword_ptr(rbx + 0x68))
            }),
        ),
        // The body of glibc's SSE2 strlen/strchr/memchr loops.
        (
            "string scan",
            asm(|a| {
                a.pxor(xmm0, xmm0)?;
                a.movdqa(xmm1, xmmword_ptr(rbx))?;
                a.movdqu(xmm2, xmmword_ptr(rbx + 0x13))?;
                a.pminub(xmm2, xmm1)?;
                a.pcmpeqb(xmm2, xmm0)?;
                a.pmovmskb(eax, xmm2)?;
                a.movd(xmm3, ecx)?;
                a.punpcklbw(xmm3, xmm3)?;
                a.punpcklwd(xmm3, xmm3)?;
                a.pshufd(xmm3, xmm3, 0)?;
                a.pcmpeqb(xmm3, xmm1)?;
                a.por(xmm3, xmm2)?;
                a.pmovmskb(edx, xmm3)
            }),
        ),
    ];
    for (i, (name, code)) in forms.into_iter().enumerate() {
        run_cases(name, per_form(), 0x5800 + i as u64, |rng| {
            let mut c = make_case(rng, &code, Data::Int);
            c.gpr[RCX] &= 0x3f;
            let mxcsr = random_mxcsr(rng) | rng.below(64) as u32;
            c.mem[0x160..0x164].copy_from_slice(&mxcsr.to_le_bytes());
            c
        });
    }
}

macro_rules! fp_forms {
    ($v:ident, $d:expr; $($m:ident $mem:ident),* $(,)?) => {$(
        $v.push((format!("{} xmm,xmm", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(xmm1, xmm10) }), $d));
        $v.push((format!("{} xmm,m", stringify!($m)), asm(|a: &mut Asm| -> R { a.$m(xmm9, $mem(rbx + 0x20)) }), $d));
    )*};
}

#[test]
fn float_arith() {
    let mut v: Vec<(String, Vec<u8>, Data)> = Vec::new();
    fp_forms!(v, Data::Ps; addps xmmword_ptr, subps xmmword_ptr, mulps xmmword_ptr, divps xmmword_ptr,
        minps xmmword_ptr, maxps xmmword_ptr, sqrtps xmmword_ptr,
        addss dword_ptr, subss dword_ptr, mulss dword_ptr, divss dword_ptr, minss dword_ptr, maxss dword_ptr,
        sqrtss dword_ptr, addsubps xmmword_ptr, haddps xmmword_ptr, hsubps xmmword_ptr);
    fp_forms!(v, Data::Pd; addpd xmmword_ptr, subpd xmmword_ptr, mulpd xmmword_ptr, divpd xmmword_ptr,
        minpd xmmword_ptr, maxpd xmmword_ptr, sqrtpd xmmword_ptr,
        addsd qword_ptr, subsd qword_ptr, mulsd qword_ptr, divsd qword_ptr, minsd qword_ptr, maxsd qword_ptr,
        sqrtsd qword_ptr, addsubpd xmmword_ptr, haddpd xmmword_ptr, hsubpd xmmword_ptr);
    for (i, (name, code, d)) in v.into_iter().enumerate() {
        run_dbg(&name, cases_per_form(), 0x5900 + i as u64, |rng| {
            make_case(rng, &code, d)
        });
    }
}

#[test]
fn float_compare() {
    let mut v: Vec<(String, Vec<u8>, Data)> = Vec::new();
    fp_forms!(v, Data::Ps; comiss dword_ptr, ucomiss dword_ptr);
    fp_forms!(v, Data::Pd; comisd qword_ptr, ucomisd qword_ptr);
    for p in 0..8u32 {
        v.push((
            format!("cmpps {p}"),
            asm(|a: &mut Asm| -> R { a.cmpps(xmm1, xmm10, p) }),
            Data::Ps,
        ));
        v.push((
            format!("cmppd {p}"),
            asm(|a: &mut Asm| -> R { a.cmppd(xmm1, xmmword_ptr(rbx), p) }),
            Data::Pd,
        ));
        v.push((
            format!("cmpss {p}"),
            asm(|a: &mut Asm| -> R { a.cmpss(xmm1, xmm10, p) }),
            Data::Ps,
        ));
        v.push((
            format!("cmpsd {p}"),
            asm(|a: &mut Asm| -> R { a.cmpsd_3(xmm1, qword_ptr(rbx + 8), p) }),
            Data::Pd,
        ));
    }
    for (i, (name, code, d)) in v.into_iter().enumerate() {
        run_dbg(&name, cases_per_form() / 2, 0x5a00 + i as u64, |rng| {
            let mut c = make_case(rng, &code, d);
            c.rflags = rng.next_u64() & 0x8d5;
            c
        });
    }
}

#[test]
fn float_convert() {
    let mut v: Vec<(String, Vec<u8>, Data)> = Vec::new();
    let ps = Data::Ps;
    let pd = Data::Pd;
    let int = Data::Int;
    macro_rules! f {
        ($name:expr, $d:expr, |$a:ident| $body:expr) => {
            v.push(($name.to_string(), asm(|$a: &mut Asm| -> R { $body }), $d));
        };
    }
    f!("cvtsi2ss r32", int, |a| a.cvtsi2ss(xmm1, ecx));
    f!("cvtsi2ss r64", int, |a| a.cvtsi2ss(xmm1, rcx));
    f!("cvtsi2ss m64", int, |a| a.cvtsi2ss(xmm1, qword_ptr(rbx)));
    f!("cvtsi2sd r32", int, |a| a.cvtsi2sd(xmm1, ecx));
    f!("cvtsi2sd r64", int, |a| a.cvtsi2sd(xmm1, rcx));
    f!("cvtsi2sd m32", int, |a| a.cvtsi2sd(xmm1, dword_ptr(rbx)));
    f!("cvtss2si r32", ps, |a| a.cvtss2si(eax, xmm3));
    f!("cvtss2si r64", ps, |a| a.cvtss2si(rax, xmm3));
    f!("cvttss2si r32", ps, |a| a.cvttss2si(eax, xmm3));
    f!("cvttss2si r64 m", ps, |a| a.cvttss2si(rax, dword_ptr(rbx + 4)));
    f!("cvtsd2si r32", pd, |a| a.cvtsd2si(eax, xmm3));
    f!("cvtsd2si r64", pd, |a| a.cvtsd2si(rax, xmm3));
    f!("cvttsd2si r32", pd, |a| a.cvttsd2si(eax, xmm3));
    f!("cvttsd2si r64", pd, |a| a.cvttsd2si(rax, xmm3));
    f!("cvttsd2si r64 m", pd, |a| a.cvttsd2si(r11, qword_ptr(rbx + 8)));
    f!("cvtss2sd", ps, |a| a.cvtss2sd(xmm1, xmm3));
    f!("cvtss2sd m", ps, |a| a.cvtss2sd(xmm1, dword_ptr(rbx + 8)));
    f!("cvtsd2ss", pd, |a| a.cvtsd2ss(xmm1, xmm3));
    f!("cvtsd2ss m", pd, |a| a.cvtsd2ss(xmm1, qword_ptr(rbx + 8)));
    f!("cvtps2pd", ps, |a| a.cvtps2pd(xmm1, xmm3));
    f!("cvtpd2ps", pd, |a| a.cvtpd2ps(xmm1, xmm3));
    f!("cvtpd2ps m", pd, |a| a.cvtpd2ps(xmm1, xmmword_ptr(rbx)));
    f!("cvtdq2ps", int, |a| a.cvtdq2ps(xmm1, xmm3));
    f!("cvtps2dq", ps, |a| a.cvtps2dq(xmm1, xmm3));
    f!("cvttps2dq", ps, |a| a.cvttps2dq(xmm1, xmm3));
    f!("cvtdq2pd", int, |a| a.cvtdq2pd(xmm1, xmm3));
    f!("cvtpd2dq", pd, |a| a.cvtpd2dq(xmm1, xmm3));
    f!("cvttpd2dq", pd, |a| a.cvttpd2dq(xmm1, xmmword_ptr(rbx + 0x10)));
    f!("cvtpi2ps", int, |a| a.cvtpi2ps(xmm1, mm3));
    f!("cvtpi2ps m", int, |a| a.cvtpi2ps(xmm1, qword_ptr(rbx)));
    f!("cvtps2pi", ps, |a| a.cvtps2pi(mm1, xmm3));
    f!("cvttps2pi", ps, |a| a.cvttps2pi(mm1, xmm3));
    f!("cvtpi2pd", int, |a| a.cvtpi2pd(xmm1, mm3));
    f!("cvtpd2pi", pd, |a| a.cvtpd2pi(mm1, xmm3));
    f!("cvttpd2pi", pd, |a| a.cvttpd2pi(mm1, xmm3));
    for (i, (name, code, d)) in v.into_iter().enumerate() {
        run_dbg(&name, cases_per_form(), 0x5b00 + i as u64, |rng| {
            let mut c = make_case(rng, &code, d);
            if matches!(d, Data::Int) {
                c.fpu.mxcsr = random_mxcsr(rng);
            }
            c
        });
    }
}

/// RCP/RSQRT are approximations whose exact bits are model-specific;
/// only the inputs with exact answers (zeros, infinities, NaNs) are
/// compared.
#[test]
fn float_approx_specials() {
    let forms = vec![
        ("rcpps", asm(|a| a.rcpps(xmm1, xmm3))),
        ("rcpss", asm(|a| a.rcpss(xmm1, xmm3))),
        ("rsqrtps", asm(|a| a.rsqrtps(xmm1, xmm3))),
        ("rsqrtss", asm(|a| a.rsqrtss(xmm1, xmm3))),
    ];
    for (i, (name, code)) in forms.into_iter().enumerate() {
        run_cases(name, cases_per_form() / 4, 0x5c00 + i as u64, |rng| {
            let mut c = make_case(rng, &code, Data::Ps);
            let special = [
                0u32,
                0x8000_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_1234,
                0xffc0_0001,
                0x7f80_0001,
            ];
            let lanes: [u32; 4] = std::array::from_fn(|_| special[rng.below(special.len() as u64) as usize]);
            c.fpu.xmm[3] = lanes
                .iter()
                .enumerate()
                .fold(0, |acc, (i, &l)| acc | (l as u128) << (32 * i));
            c
        });
    }
}
