//! Differential tests for exec/x87: every form runs with a random x87 stack
//! (edge values, some empty registers, random TOP) under a random precision
//! and rounding control, all exceptions masked (an unmasked one would raise
//! #MF natively). The harness compares FCW, FSW, the tags, ST0-7 and memory.
//! Instructions are given as raw bytes; memory operands use [rbx].

use x86emu::FpuState;

use crate::harness::*;

/// Edge and random 80-bit values.
fn f80(rng: &mut Rng) -> [u8; 10] {
    let sign = (rng.below(2) as u16) << 15;
    let (sig, exp): (u64, u16) = match rng.below(16) {
        0 => (0, 0),
        1 => (1 << 63, 0x3fff),
        2 => (1 << 63, 0x7fff),                                                     // infinity
        3 => (0xc000_0000_0000_0000 | rng.next_u64() >> 2, 0x7fff),                 // QNaN
        4 => ((1 << 63) | (rng.next_u64() >> 2) | 1, 0x7fff),                       // SNaN
        5 => (u64::MAX, 0x7ffe),                                                    // max
        6 => (1 << 63, 1),                                                          // min normal
        7 => (rng.next_u64() >> (1 + rng.below(63)), 0),                            // denormal
        8 => (rng.next_u64() >> 1, 1 + rng.below(0x7ffe) as u16),                   // unnormal
        9 => ((1 << 63) | rng.below(4) << 62 >> 62, 0x3fff + rng.below(64) as u16), // near integers
        10 => ((1 << 63) | rng.next_u64(), rng.below(0x7fff) as u16),               // any exponent
        _ => ((1 << 63) | rng.next_u64(), 0x3fff - 40 + rng.below(80) as u16),
    };
    let sig = if exp == 0 && rng.below(8) == 0 {
        sig | 1 << 63
    } else {
        sig
    };
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&sig.to_le_bytes());
    b[8..].copy_from_slice(&(exp | sign).to_le_bytes());
    b
}

/// A "nice" value (normal, moderate exponent) for functions with narrow domains.
fn nice(rng: &mut Rng, max_exp: u16) -> [u8; 10] {
    let sign = (rng.below(2) as u16) << 15;
    let sig = (1u64 << 63) | rng.next_u64();
    let exp = 0x3fff - 20 + rng.below(20 + max_exp as u64) as u16;
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&sig.to_le_bytes());
    b[8..].copy_from_slice(&(exp | sign).to_le_bytes());
    b
}

/// A random FPU state: random TOP, values, a few empty registers, random
/// PC/RC with all exceptions masked, random condition codes.
fn fpu(rng: &mut Rng, empties: u64) -> FpuState {
    let mut f = FpuState::default();
    let pc = [0u16, 2, 3][rng.below(3) as usize];
    f.fcw = 0x7f | pc << 8 | (rng.below(4) as u16) << 10;
    let top = rng.below(8) as u16;
    let cc = rng.next_u64() as u16 & 0x4700;
    f.fsw = top << 11 | cc;
    let mut tags = 0u8;
    for p in 0..8 {
        f.regs[p] = f80(rng);
        if rng.below(empties) != 0 {
            tags |= 1 << p;
        }
    }
    f.set_abridged_tags(tags);
    f
}

fn scratch_bytes(rng: &mut Rng, c: &mut Case) {
    for b in c.mem.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    // Operand at [rbx] = scratch + 0x100: an edge float of every width.
    let v = f80(rng);
    let o = 0x100;
    match rng.below(4) {
        0 => c.mem[o..o + 10].copy_from_slice(&v),
        1 => {
            let f32v: u32 = [
                0,
                0x8000_0000,
                0x7f80_0000,
                0x7fc0_1234,
                0x7f80_0001,
                1,
                0x7f7f_ffff,
                0x3f80_0000,
            ][rng.below(8) as usize]
                | (rng.below(2) as u32) << 31;
            let f32v = if rng.below(2) == 0 { rng.next_u64() as u32 } else { f32v };
            c.mem[o..o + 4].copy_from_slice(&f32v.to_le_bytes());
        }
        2 => {
            let f64v: u64 = [
                0,
                0x7ff0_0000_0000_0000,
                0x7ff8_0000_0000_0001,
                0x7ff0_0000_0000_0001,
                1,
                0x3ff0_0000_0000_0000,
            ][rng.below(6) as usize]
                | rng.below(2) << 63;
            let f64v = if rng.below(2) == 0 { rng.next_u64() } else { f64v };
            c.mem[o..o + 8].copy_from_slice(&f64v.to_le_bytes());
        }
        _ => {
            let i = rng.edgy();
            c.mem[o..o + 8].copy_from_slice(&i.to_le_bytes());
        }
    }
}

fn case(rng: &mut Rng, code: &[u8], empties: u64) -> Case {
    let mut c = Case::new(code.to_vec());
    c.fpu = fpu(rng, empties);
    c.gpr[RBX] = scratch_addr() + 0x100;
    c.rflags = rng.next_u64() & 0x8d5;
    scratch_bytes(rng, &mut c);
    c
}

/// ModRM for [rbx] with a /digit.
fn m(op: u8, digit: u8) -> Vec<u8> {
    vec![op, digit << 3 | 3]
}

fn run_forms(forms: &[(&str, Vec<u8>)], seed: u64, empties: u64) {
    for (i, (name, code)) in forms.iter().enumerate() {
        run_cases(name, cases_per_form(), seed + i as u64, |rng| case(rng, code, empties));
    }
}

#[test]
fn x87_arith() {
    let mut forms: Vec<(&str, Vec<u8>)> = Vec::new();
    let names = ["add", "mul", "com", "comp", "sub", "subr", "div", "divr"];
    for (d, name) in names.iter().enumerate() {
        let d = d as u8;
        if d == 2 || d == 3 {
            continue;
        }
        forms.push((
            Box::leak(format!("f{name} st0,st3").into_boxed_str()),
            vec![0xd8, 0xc3 | d << 3],
        ));
        forms.push((Box::leak(format!("f{name} m32").into_boxed_str()), m(0xd8, d)));
        forms.push((Box::leak(format!("f{name} m64").into_boxed_str()), m(0xdc, d)));
        forms.push((
            Box::leak(format!("f{name} st2,st0").into_boxed_str()),
            vec![0xdc, 0xc2 | d << 3],
        ));
        forms.push((
            Box::leak(format!("f{name}p st1").into_boxed_str()),
            vec![0xde, 0xc1 | d << 3],
        ));
        forms.push((Box::leak(format!("fi{name} m32").into_boxed_str()), m(0xda, d)));
        forms.push((Box::leak(format!("fi{name} m16").into_boxed_str()), m(0xde, d)));
    }
    run_forms(&forms, 0x8700, 10);
}

#[test]
fn x87_load_store() {
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("fld m32", m(0xd9, 0)),
        ("fld m64", m(0xdd, 0)),
        ("fld m80", m(0xdb, 5)),
        ("fld st5", vec![0xd9, 0xc5]),
        ("fst m32", m(0xd9, 2)),
        ("fstp m32", m(0xd9, 3)),
        ("fst m64", m(0xdd, 2)),
        ("fstp m64", m(0xdd, 3)),
        ("fstp m80", m(0xdb, 7)),
        ("fst st3", vec![0xdd, 0xd3]),
        ("fstp st3", vec![0xdd, 0xdb]),
        ("fild m16", m(0xdf, 0)),
        ("fild m32", m(0xdb, 0)),
        ("fild m64", m(0xdf, 5)),
        ("fist m16", m(0xdf, 2)),
        ("fist m32", m(0xdb, 2)),
        ("fistp m32", m(0xdb, 3)),
        ("fistp m64", m(0xdf, 7)),
        ("fisttp m16", m(0xdf, 1)),
        ("fisttp m32", m(0xdb, 1)),
        ("fisttp m64", m(0xdd, 1)),
        ("fbstp", m(0xdf, 6)),
        ("fld1", vec![0xd9, 0xe8]),
        ("fldl2t", vec![0xd9, 0xe9]),
        ("fldl2e", vec![0xd9, 0xea]),
        ("fldpi", vec![0xd9, 0xeb]),
        ("fldlg2", vec![0xd9, 0xec]),
        ("fldln2", vec![0xd9, 0xed]),
        ("fldz", vec![0xd9, 0xee]),
        ("fxch st4", vec![0xd9, 0xcc]),
    ];
    run_forms(&forms, 0x8800, 6);
}

#[test]
fn x87_compare_and_unary() {
    let mut forms: Vec<(&str, Vec<u8>)> = vec![
        ("fcom st2", vec![0xd8, 0xd2]),
        ("fcomp st1", vec![0xd8, 0xd9]),
        ("fcom m32", m(0xd8, 2)),
        ("fcomp m64", m(0xdc, 3)),
        ("fcompp", vec![0xde, 0xd9]),
        ("fucom st3", vec![0xdd, 0xe3]),
        ("fucomp st1", vec![0xdd, 0xe9]),
        ("fucompp", vec![0xda, 0xe9]),
        ("ficom m32", m(0xda, 2)),
        ("ficomp m16", m(0xde, 3)),
        ("fcomi st2", vec![0xdb, 0xf2]),
        ("fcomip st1", vec![0xdf, 0xf1]),
        ("fucomi st4", vec![0xdb, 0xec]),
        ("fucomip st1", vec![0xdf, 0xe9]),
        ("ftst", vec![0xd9, 0xe4]),
        ("fxam", vec![0xd9, 0xe5]),
        ("fnstsw ax after fcom", vec![0xd8, 0xd1, 0xdf, 0xe0]),
        ("fchs", vec![0xd9, 0xe0]),
        ("fabs", vec![0xd9, 0xe1]),
        ("fsqrt", vec![0xd9, 0xfa]),
        ("frndint", vec![0xd9, 0xfc]),
        ("fscale", vec![0xd9, 0xfd]),
        ("fxtract", vec![0xd9, 0xf4]),
        ("fprem", vec![0xd9, 0xf8]),
        ("fprem1", vec![0xd9, 0xf5]),
    ];
    for (i, op) in [0xc1u8, 0xc9, 0xd1, 0xd9].iter().enumerate() {
        let name = ["fcmovb", "fcmove", "fcmovbe", "fcmovu"][i];
        forms.push((name, vec![0xda, *op]));
        let name = ["fcmovnb", "fcmovne", "fcmovnbe", "fcmovnu"][i];
        forms.push((name, vec![0xdb, *op]));
    }
    run_forms(&forms, 0x8900, 10);
}

#[test]
fn x87_control() {
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("fninit", vec![0xdb, 0xe3]),
        ("fnclex", vec![0xdb, 0xe2]),
        ("fnstcw", m(0xd9, 7)),
        ("fnstsw m16", m(0xdd, 7)),
        ("fnstsw ax", vec![0xdf, 0xe0]),
        ("ffree st2", vec![0xdd, 0xc2]),
        ("fincstp", vec![0xd9, 0xf7]),
        ("fdecstp", vec![0xd9, 0xf6]),
        ("fnop wait", vec![0xd9, 0xd0, 0x9b]),
        ("emms", vec![0x0f, 0x77]),
        // FLDCW with a random control word (masks kept set: no #MF).
        ("fldcw fnstcw", {
            let mut v = vec![0xc6, 0x03, 0x7f]; // mov byte [rbx], 0x7f (all masked)
            v.extend(m(0xd9, 5));
            v.extend([0xd9, 0x7b, 0x08]); // fnstcw [rbx+8]
            v
        }),
        // Environment and state images; FIP/FDP/FOP (bytes 12..24) differ
        // in meaning between the runs and are cleared after the store.
        ("fnstenv fldenv", {
            let mut v = m(0xd9, 6);
            v.extend([0x48, 0xc7, 0x43, 0x0c, 0, 0, 0, 0]); // mov qword [rbx+12], 0
            v.extend([0xc7, 0x43, 0x14, 0, 0, 0, 0]); // mov dword [rbx+20], 0
            v.extend(m(0xd9, 4));
            v
        }),
        ("fnsave frstor", {
            let mut v = m(0xdd, 6);
            v.extend([0x48, 0xc7, 0x43, 0x0c, 0, 0, 0, 0]);
            v.extend([0xc7, 0x43, 0x14, 0, 0, 0, 0]);
            v.extend(m(0xdd, 4));
            v
        }),
        ("fxsave fxrstor", {
            let mut code = vec![0x0f, 0xae, 0x03]; // fxsave [rbx]
            code.extend([0x48, 0xc7, 0x43, 0x08, 0, 0, 0, 0]); // FIP/FDP
            code.extend([0x48, 0xc7, 0x43, 0x10, 0, 0, 0, 0]);
            code.extend([0xc7, 0x43, 0x1c, 0, 0, 0, 0]); // MXCSR_MASK is host-specific
            code.extend([0xd9, 0xe8]); // fld1 (changes the state)
            code.extend([0x0f, 0xae, 0x0b]); // fxrstor [rbx]
            code
        }),
        ("fxsave64 fxrstor64", {
            let mut code = vec![0x48, 0x0f, 0xae, 0x03];
            code.extend([0x48, 0xc7, 0x43, 0x08, 0, 0, 0, 0]);
            code.extend([0x48, 0xc7, 0x43, 0x10, 0, 0, 0, 0]);
            code.extend([0xc7, 0x43, 0x1c, 0, 0, 0, 0]); // MXCSR_MASK is host-specific
            code.extend([0xdb, 0xe3]); // fninit
            code.extend([0x48, 0x0f, 0xae, 0x0b]);
            code
        }),
    ];
    run_forms(&forms, 0x8a00, 6);
}

/// Compare 80-bit values approximately (transcendentals go through f64 in
/// x86emu, while the hardware is accurate to about 1 ulp of 64 bits).
fn close(a: &[u8], b: &[u8]) -> bool {
    let val = |x: &[u8]| -> f64 {
        let sig = u64::from_le_bytes(x[..8].try_into().unwrap());
        let se = u16::from_le_bytes([x[8], x[9]]);
        let exp = (se & 0x7fff) as i32;
        if exp == 0x7fff {
            return if sig << 1 == 0 { f64::INFINITY } else { f64::NAN };
        }
        let v = sig as f64 * 2f64.powi((exp.max(1) - 16383 - 63).max(-1074));
        if se & 0x8000 != 0 {
            -v
        } else {
            v
        }
    };
    let (x, y) = (val(a), val(b));
    a == b || (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1e-300)
}

/// Transcendentals: C1 (rounding direction) is masked, since it depends on
/// the last bit; ST values are compared with a relative tolerance.
#[test]
fn x87_transcendental() {
    let forms: Vec<(&str, Vec<u8>, u16)> = vec![
        ("fsin", vec![0xd9, 0xfe], 6),
        ("fcos", vec![0xd9, 0xff], 6),
        ("fsincos", vec![0xd9, 0xfb], 6),
        ("fptan", vec![0xd9, 0xf2], 6),
        ("fpatan", vec![0xd9, 0xf3], 30),
        ("f2xm1", vec![0xd9, 0xf0], 0),
        ("fyl2x", vec![0xd9, 0xf1], 30),
        ("fyl2xp1", vec![0xd9, 0xf9], 0),
    ];
    for (i, (name, code, max_exp)) in forms.iter().enumerate() {
        let mut rng = Rng(0x8b00 + i as u64);
        let n = cases_per_form();
        for k in 0..n {
            let mut c = case(&mut rng, code, 1000);
            c.fpu.fcw = 0x37f; // round to nearest, 64 bits
            let top = c.fpu.fsw as usize >> 11 & 7;
            let mut v = nice(&mut rng, *max_exp);
            if *name == "fyl2x" {
                v[9] &= 0x7f;
            }
            if *name == "fyl2xp1" || *name == "f2xm1" {
                let se = (0x3ffd - rng.below(10) as u16) | ((v[9] as u16 & 0x80) << 8);
                v[8..].copy_from_slice(&se.to_le_bytes());
            }
            c.fpu.regs[top] = v;
            c.fpu.regs[(top + 1) & 7] = nice(&mut rng, 10);
            if *name == "fsincos" || *name == "fptan" {
                c.fpu.ftw |= 3 << (2 * ((top + 7) & 7));
            }
            let tags = c.fpu.abridged_tags();
            c.fpu.set_abridged_tags(tags);
            let emu = run_emulated(&c).unwrap_or_else(|e| panic!("{name}: {e}"));
            let nat = run_native(&c);
            let fsw = |o: &Outcome| u16::from_le_bytes([o.fx[2], o.fx[3]]) & !0x0200;
            assert_eq!(fsw(&nat), fsw(&emu), "{name} case {k}: fsw");
            assert_eq!(nat.fx[4], emu.fx[4], "{name} case {k}: tags");
            let top = (fsw(&nat) >> 11 & 7) as usize;
            for r in 0..8 {
                let o = 32 + r * 16;
                if nat.fx[4] & (1 << ((top + r) % 8)) != 0 {
                    assert!(
                        close(&nat.fx[o..o + 10], &emu.fx[o..o + 10]),
                        "{name} case {k}: st{r} native {:02x?} emu {:02x?}",
                        &nat.fx[o..o + 10],
                        &emu.fx[o..o + 10]
                    );
                }
            }
        }
        println!("diff-cases {name}: {n}");
    }
}
