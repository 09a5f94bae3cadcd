//! Differential tests for exec/bits.rs: shifts and rotates, SHLD/SHRD, the
//! BT family, BSF/BSR (and TZCNT/LZCNT run as them), POPCNT, SETcc, CMOVcc.
//!
//! Code is encoded by hand (legacy prefixes, REX, opcode, ModRM) so one
//! generator covers every operand size; each encoding is decoded with iced
//! and checked against the intended mnemonic before it runs.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use x86emu::state::flags::{AF, CF, OF, PF, SF, STATUS};

use crate::harness::*;

const RSI: usize = 6;
const R9: usize = 9;
const R10: usize = 10;

/// The r/m operand of an encoding.
#[derive(Clone, Copy)]
enum Rm {
    /// A register number (for byte operands 4..7 without REX are AH..BH).
    Reg(usize),
    /// `[rbx + disp8]`.
    Mem(i8),
}

/// One instruction: optional legacy prefixes, the operand-size prefix or
/// REX.W from `size`, `opcode`, ModRM with `reg` and `rm`, then `imm`.
fn enc(prefixes: &[u8], size: u32, opcode: &[u8], reg: usize, rm: Rm, imm: Option<u8>) -> Vec<u8> {
    let mut b = prefixes.to_vec();
    if size == 2 {
        b.push(0x66);
    }
    let mut rex = 0u8;
    if size == 8 {
        rex |= 8;
    }
    if reg >= 8 {
        rex |= 4;
    }
    if let Rm::Reg(r) = rm {
        if r >= 8 {
            rex |= 1;
        }
    }
    if rex != 0 {
        b.push(0x40 | rex);
    }
    b.extend_from_slice(opcode);
    let reg3 = (reg as u8 & 7) << 3;
    match rm {
        Rm::Reg(r) => b.push(0xc0 | reg3 | (r as u8 & 7)),
        Rm::Mem(d) => {
            b.push(0x40 | reg3 | 3);
            b.push(d as u8);
        }
    }
    if let Some(i) = imm {
        b.push(i);
    }
    b
}

/// Panic unless `code` is exactly one instruction with mnemonic `m`.
fn expect(code: &[u8], m: Mnemonic) {
    let mut d = Decoder::new(64, code, DecoderOptions::NONE);
    let ins = d.decode();
    assert_eq!(ins.mnemonic(), m, "encoding {code:02x?}");
    assert_eq!(ins.len(), code.len(), "encoding {code:02x?}");
}

fn size_name(size: u32) -> &'static str {
    match size {
        1 => "8",
        2 => "16",
        4 => "32",
        _ => "64",
    }
}

fn random_regs(rng: &mut Rng) -> [u64; 16] {
    let mut g = [0u64; 16];
    for v in g.iter_mut() {
        *v = rng.edgy();
    }
    g
}

/// A case with random registers, random status flags (and DF clear), RBX
/// pointing into the middle of a randomly filled scratch page.
fn base_case(rng: &mut Rng, code: Vec<u8>) -> Case {
    let mut c = Case::new(code);
    c.gpr = random_regs(rng);
    c.rflags = rng.next_u64() & STATUS;
    c.gpr[RBX] = scratch_addr() + 0x800;
    for b in c.mem.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    c
}

/// Counts worth testing for a `bits`-wide operand, or a random one.
fn edgy_count(rng: &mut Rng, bits: u32) -> u8 {
    let edges = [0, 1, bits - 1, bits, bits + 1, 31, 32, 63, 64, 255];
    if rng.below(2) == 0 {
        edges[rng.below(edges.len() as u64) as usize] as u8
    } else {
        rng.next_u64() as u8
    }
}

/// The destination r/m: a register (AH for bytes, to cover the high-byte
/// registers; RDX or R9 otherwise) or memory.
fn dest_rm(size: u32, mem: bool, rng: &mut Rng) -> Rm {
    if mem {
        Rm::Mem(-8 + rng.below(32) as i8)
    } else if size == 1 && rng.below(2) == 0 {
        Rm::Reg(4)
    } else if rng.below(2) == 0 {
        Rm::Reg(RDX)
    } else {
        Rm::Reg(R9)
    }
}

const SIZES: [u32; 4] = [1, 2, 4, 8];

#[derive(Clone, Copy, PartialEq)]
enum CountForm {
    One,
    Imm,
    Cl,
}

fn count_mask(size: u32) -> u8 {
    if size == 8 {
        0x3f
    } else {
        0x1f
    }
}

/// Shifts and rotates: every operation, size, count form and r/m form.
/// Undefined (SDM): AF after shifts by a nonzero count (rotates leave it
/// alone); OF after any shift or rotate whose masked count exceeds 1; CF
/// after SHL/SHR/SAL whose count is at least the operand width.
#[test]
fn shifts_and_rotates() {
    // (name, /digit, mnemonic)
    let ops = [
        ("rol", 0, Mnemonic::Rol),
        ("ror", 1, Mnemonic::Ror),
        ("rcl", 2, Mnemonic::Rcl),
        ("rcr", 3, Mnemonic::Rcr),
        ("shl", 4, Mnemonic::Shl),
        ("shr", 5, Mnemonic::Shr),
        ("sal", 6, Mnemonic::Sal),
        ("sar", 7, Mnemonic::Sar),
    ];
    let mut seed = 0x5100;
    for &(name, digit, m) in &ops {
        for size in SIZES {
            for form in [CountForm::One, CountForm::Imm, CountForm::Cl] {
                for mem in [false, true] {
                    seed += 1;
                    // The /6 alias is rare: only its register forms.
                    if m == Mnemonic::Sal && mem {
                        continue;
                    }
                    let label = format!(
                        "{name}{} {},{}",
                        size_name(size),
                        if mem { "m" } else { "r" },
                        match form {
                            CountForm::One => "1",
                            CountForm::Imm => "imm8",
                            CountForm::Cl => "cl",
                        }
                    );
                    let bits = size * 8;
                    run_cases(&label, cases_per_form(), seed, |rng| {
                        let count = match form {
                            CountForm::One => 1,
                            _ => edgy_count(rng, bits),
                        };
                        let byte = size == 1;
                        let rm = dest_rm(size, mem, rng);
                        let code = match form {
                            CountForm::One => enc(&[], size, &[if byte { 0xd0 } else { 0xd1 }], digit, rm, None),
                            CountForm::Imm => enc(&[], size, &[if byte { 0xc0 } else { 0xc1 }], digit, rm, Some(count)),
                            CountForm::Cl => enc(&[], size, &[if byte { 0xd2 } else { 0xd3 }], digit, rm, None),
                        };
                        expect(&code, m);
                        let mut c = base_case(rng, code);
                        if form == CountForm::Cl {
                            c.gpr[RCX] = (c.gpr[RCX] & !0xff) | u64::from(count);
                        }
                        let masked = u32::from(count & count_mask(size));
                        let rotate = digit < 4;
                        if masked != 0 && !rotate {
                            c.undefined_flags |= AF;
                        }
                        if masked > 1 {
                            c.undefined_flags |= OF;
                        }
                        if matches!(m, Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr) && masked >= bits {
                            c.undefined_flags |= CF;
                        }
                        c
                    });
                }
            }
        }
    }
}

/// SHLD/SHRD by imm8 and CL. Undefined (SDM): AF for nonzero counts, OF
/// for counts above 1, and for 16-bit counts above 16 the result and all
/// flags (register forms skip the destination; memory forms avoid them).
#[test]
fn double_shifts() {
    let ops = [("shld", 0xa4u8, Mnemonic::Shld), ("shrd", 0xac, Mnemonic::Shrd)];
    let mut seed = 0x5200;
    for &(name, opcode, m) in &ops {
        for size in [2u32, 4, 8] {
            for cl in [false, true] {
                for mem in [false, true] {
                    seed += 1;
                    let label = format!(
                        "{name}{} {},r,{}",
                        size_name(size),
                        if mem { "m" } else { "r" },
                        if cl { "cl" } else { "imm8" }
                    );
                    let bits = size * 8;
                    run_cases(&label, cases_per_form(), seed, |rng| {
                        let mut count = edgy_count(rng, bits);
                        let over = |c: u8| u32::from(c & count_mask(size)) > bits;
                        if mem && over(count) {
                            count &= 0xf;
                        }
                        let rm = dest_rm(size, mem, rng);
                        let src = if rng.below(2) == 0 { RSI } else { R10 };
                        let code = if cl {
                            enc(&[], size, &[0x0f, opcode + 1], src, rm, None)
                        } else {
                            enc(&[], size, &[0x0f, opcode], src, rm, Some(count))
                        };
                        expect(&code, m);
                        let mut c = base_case(rng, code);
                        if cl {
                            c.gpr[RCX] = (c.gpr[RCX] & !0xff) | u64::from(count);
                        }
                        let masked = u32::from(count & count_mask(size));
                        if masked != 0 {
                            c.undefined_flags |= AF;
                        }
                        if masked > 1 {
                            c.undefined_flags |= OF;
                        }
                        if over(count) {
                            c.undefined_flags |= STATUS;
                            if let Rm::Reg(r) = rm {
                                c.skip_gpr |= 1 << r;
                            }
                        }
                        c
                    });
                }
            }
        }
    }
}

/// BT, BTS, BTR, BTC: register and immediate bit offsets, register and
/// memory operands (a register offset with memory is signed and reaches
/// other words of the page), and the LOCK forms. Undefined (SDM): OF, SF,
/// AF, PF.
#[test]
fn bit_tests() {
    // (name, opcode of the r/m,reg form, /digit of 0F BA, mnemonic)
    let ops = [
        ("bt", 0xa3u8, 4usize, Mnemonic::Bt),
        ("bts", 0xab, 5, Mnemonic::Bts),
        ("btr", 0xb3, 6, Mnemonic::Btr),
        ("btc", 0xbb, 7, Mnemonic::Btc),
    ];
    let mut seed = 0x5300;
    for &(name, opcode, digit, m) in &ops {
        for size in [2u32, 4, 8] {
            let bits = size as i64 * 8;
            // (reg offset?, memory?, locked?)
            for (by_reg, mem, locked) in [
                (true, false, false),
                (false, false, false),
                (true, true, false),
                (false, true, false),
                (true, true, true),
                (false, true, true),
            ] {
                seed += 1;
                if locked && m == Mnemonic::Bt {
                    continue;
                }
                let label = format!(
                    "{}{name}{} {},{}",
                    if locked { "lock " } else { "" },
                    size_name(size),
                    if mem { "m" } else { "r" },
                    if by_reg { "r" } else { "imm8" }
                );
                run_cases(&label, cases_per_form(), seed, |rng| {
                    let prefixes: &[u8] = if locked { &[0xf0] } else { &[] };
                    let rm = if mem { Rm::Mem(0) } else { dest_rm(size, false, rng) };
                    let src = if rng.below(2) == 0 { RSI } else { R10 };
                    let imm = rng.edgy() as u8;
                    let code = if by_reg {
                        enc(prefixes, size, &[0x0f, opcode], src, rm, None)
                    } else {
                        enc(prefixes, size, &[0x0f, 0xba], digit, rm, Some(imm))
                    };
                    expect(&code, m);
                    let mut c = base_case(rng, code);
                    if by_reg && mem {
                        // RBX is 0x800 into the page: a signed offset within
                        // +-0x700 bytes stays inside it.
                        let max_units = 0x700 / i64::from(size);
                        let units = rng.below(2 * max_units as u64 + 1) as i64 - max_units;
                        let offset = units * bits + rng.below(bits as u64) as i64;
                        // Bits above the operand size are ignored: keep them random.
                        let keep = if size == 8 { 0 } else { u64::MAX << (size * 8) };
                        c.gpr[src] = (c.gpr[src] & keep) | (offset as u64 & !keep);
                    } else if by_reg && rng.below(2) == 0 {
                        c.gpr[src] = rng.below(256);
                    }
                    c.undefined_flags = OF | SF | AF | PF;
                    c
                });
            }
        }
    }
}

/// Sources for bit scans and counts: zero often, single bits, edge values.
fn scan_source(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => 0,
        1 => 1u64 << rng.below(64),
        _ => rng.edgy(),
    }
}

/// BSF/BSR, register and memory sources. Undefined (SDM): CF, OF, SF, AF,
/// PF. A zero source leaves the destination unwritten on AMD, while Intel
/// zeroes the upper half of a 32-bit destination: those cases start with
/// the upper half already zero.
fn scan_case(rng: &mut Rng, code: Vec<u8>, size: u32, mem: bool) -> Case {
    let mut c = base_case(rng, code);
    let src = scan_source(rng);
    if mem {
        c.mem[0x800..0x808].copy_from_slice(&src.to_le_bytes());
    } else {
        c.gpr[RSI] = src;
    }
    let masked = if size == 8 {
        src
    } else {
        src & ((1u64 << (size * 8)) - 1)
    };
    if size == 4 && masked == 0 {
        c.gpr[RDX] &= 0xffff_ffff;
    }
    c
}

fn scan_forms() -> Vec<(String, u32, bool, u8, Mnemonic)> {
    let mut v = Vec::new();
    for (name, op, m) in [("bsf", 0xbcu8, Mnemonic::Bsf), ("bsr", 0xbd, Mnemonic::Bsr)] {
        for size in [2u32, 4, 8] {
            for mem in [false, true] {
                let label = format!("{name}{} r,{}", size_name(size), if mem { "m" } else { "r" });
                v.push((label, size, mem, op, m));
            }
        }
    }
    v
}

fn scan_code(prefixes: &[u8], size: u32, mem: bool, op: u8) -> Vec<u8> {
    let rm = if mem { Rm::Mem(0) } else { Rm::Reg(RSI) };
    enc(prefixes, size, &[0x0f, op], RDX, rm, None)
}

#[test]
fn bit_scans() {
    for (i, (label, size, mem, op, m)) in scan_forms().into_iter().enumerate() {
        run_cases(&label, cases_per_form(), 0x5400 + i as u64, |rng| {
            let code = scan_code(&[], size, mem, op);
            expect(&code, m);
            let mut c = scan_case(rng, code, size, mem);
            c.undefined_flags = CF | OF | SF | AF | PF;
            c
        });
    }
}

/// Compare registers and defined flags of two outcomes.
fn compare(nat: &Outcome, emu: &Outcome, undefined_flags: u64) -> Result<(), String> {
    let mut diffs = Vec::new();
    for r in 0..16 {
        if nat.gpr[r] != emu.gpr[r] {
            diffs.push(format!("gpr{r}: native {:#x} emu {:#x}", nat.gpr[r], emu.gpr[r]));
        }
    }
    let mask = STATUS & !undefined_flags;
    if nat.rflags & mask != emu.rflags & mask {
        diffs.push(format!(
            "rflags: native {:#x} emu {:#x}",
            nat.rflags & mask,
            emu.rflags & mask
        ));
    }
    // The native epilogue's PUSHFQ writes the 8 bytes below the final RSP.
    let pushf_slot = nat.gpr[RSP].wrapping_sub(8).wrapping_sub(scratch_addr());
    let clobbered = |i: usize| (i as u64).wrapping_sub(pushf_slot) < 8;
    if let Some(i) = (0..SCRATCH).find(|&i| nat.mem[i] != emu.mem[i] && !clobbered(i)) {
        diffs.push(format!("memory at scratch+{i:#x} differs"));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

/// TZCNT/LZCNT encodings (F3 0F BC/BD). Our CPUID offers neither BMI1 nor
/// ABM, so they must run as BSF/BSR. A host that has the features runs
/// them as TZCNT/LZCNT, so there the emulated F3 form is compared with the
/// host running the plain BSF/BSR encoding.
#[test]
fn tzcnt_lzcnt_run_as_bit_scans() {
    let host_has = |op: u8| {
        if op == 0xbc {
            std::arch::is_x86_feature_detected!("bmi1")
        } else {
            std::arch::is_x86_feature_detected!("lzcnt")
        }
    };
    for (i, (label, size, mem, op, _)) in scan_forms().into_iter().enumerate() {
        let label = format!("rep {label}");
        let name = if op == 0xbc { Mnemonic::Tzcnt } else { Mnemonic::Lzcnt };
        let mut rng = Rng(0x5500 + i as u64);
        let n = cases_per_form();
        for k in 0..n {
            let code = scan_code(&[0xf3], size, mem, op);
            expect(&code, name);
            let mut c = scan_case(&mut rng, code, size, mem);
            c.undefined_flags = CF | OF | SF | AF | PF;
            if !host_has(op) {
                if let Err(e) = check(&c) {
                    panic!("{label} case {k}: {e}");
                }
                continue;
            }
            let emu = run_emulated(&c).unwrap_or_else(|e| panic!("{label} case {k}: {e}"));
            let mut plain = c.clone();
            plain.code = scan_code(&[], size, mem, op);
            let nat = run_native(&plain);
            if let Err(e) = compare(&nat, &emu, c.undefined_flags) {
                panic!("{label} case {k} code {:02x?} gpr {:x?}: {e}", c.code, &c.gpr[..11]);
            }
        }
        println!("diff-cases {label}: {n}");
    }
}

/// POPCNT: #UD unless the configuration offers it; when offered, compared
/// with the host (all flags defined: ZF from the source, the rest clear).
#[test]
fn popcnt() {
    if !std::arch::is_x86_feature_detected!("popcnt") {
        return;
    }
    let mut config = x86emu::CpuConfig::default();
    config.features.popcnt = true;
    for (i, size) in [2u32, 4, 8].into_iter().enumerate() {
        for mem in [false, true] {
            let label = format!("popcnt{} r,{}", size_name(size), if mem { "m" } else { "r" });
            let mut rng = Rng(0x5600 + 2 * i as u64 + u64::from(mem));
            let code = scan_code(&[0xf3], size, mem, 0xb8);
            expect(&code, Mnemonic::Popcnt);
            let n = cases_per_form();
            for k in 0..n {
                let c = scan_case(&mut rng, code.clone(), size, mem);
                if k == 0 {
                    assert!(run_emulated(&c).is_err(), "POPCNT must raise #UD when not offered");
                }
                let emu = run_emulated_with(&c, config.clone()).unwrap_or_else(|e| panic!("{label} case {k}: {e}"));
                let nat = run_native(&c);
                if let Err(e) = compare(&nat, &emu, 0) {
                    panic!("{label} case {k} gpr {:x?}: {e}", &c.gpr[..11]);
                }
            }
            println!("diff-cases {label}: {n}");
        }
    }
}

/// SETcc into a low byte, a high byte and memory, under random flags.
#[test]
fn setcc() {
    for cc in 0..16u8 {
        for (form, rm) in [("r8", Rm::Reg(R9)), ("ah", Rm::Reg(4)), ("m8", Rm::Mem(3))] {
            let code = enc(&[], 1, &[0x0f, 0x90 + cc], 0, rm, None);
            let mut d = Decoder::new(64, &code, DecoderOptions::NONE);
            let label = format!("{:?} {form}", d.decode().mnemonic()).to_lowercase();
            run_cases(&label, cases_per_form(), 0x5700 + u64::from(cc), |rng| {
                base_case(rng, code.clone())
            });
        }
    }
}

/// CMOVcc for every size from a register and from memory, under random
/// flags (a false 32-bit CMOV still zero-extends its destination).
#[test]
fn cmovcc() {
    for cc in 0..16u8 {
        for size in [2u32, 4, 8] {
            for mem in [false, true] {
                let rm = if mem { Rm::Mem(-4) } else { Rm::Reg(R10) };
                let code = enc(&[], size, &[0x0f, 0x40 + cc], RDX, rm, None);
                let mut d = Decoder::new(64, &code, DecoderOptions::NONE);
                let label = format!(
                    "{:?}{} r,{}",
                    d.decode().mnemonic(),
                    size_name(size),
                    if mem { "m" } else { "r" }
                )
                .to_lowercase();
                run_cases(
                    &label,
                    cases_per_form(),
                    0x5800 + u64::from(cc) * 8 + u64::from(size),
                    |rng| base_case(rng, code.clone()),
                );
            }
        }
    }
}
