//! Differential tests for exec/string.rs: MOVS, STOS, LODS, CMPS, SCAS in
//! all four sizes, with and without REP/REPE/REPNE, DF=0 and DF=1, counts
//! 0..300, overlapping MOVS. Every range stays inside the scratch page
//! (below the test stack). Address-size (0x67) and segment-override forms
//! cannot run natively on the scratch page and are unit-tested in
//! exec/string.rs instead, as are INS/OUTS.
//!
//! No flag is masked: CMPS/SCAS define all six status flags, and the other
//! string instructions leave them alone.

use crate::harness::*;

/// Bytes of the scratch page the string ranges may use (the test stack
/// lives above).
const AREA: u64 = 0xe00;
/// Largest REP count tried.
const MAX_COUNT: u64 = 300;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

#[derive(Clone, Copy, PartialEq)]
enum Prefix {
    None,
    Rep,
    Repne,
}

const SIZES: [u64; 4] = [1, 2, 4, 8];

fn encode(kind: Kind, size: u64, prefix: Prefix) -> Vec<u8> {
    let mut code = Vec::new();
    match prefix {
        Prefix::None => {}
        Prefix::Rep => code.push(0xf3),
        Prefix::Repne => code.push(0xf2),
    }
    match size {
        2 => code.push(0x66),
        8 => code.push(0x48),
        _ => {}
    }
    let byte_op = match kind {
        Kind::Movs => 0xa4,
        Kind::Cmps => 0xa6,
        Kind::Stos => 0xaa,
        Kind::Lods => 0xac,
        Kind::Scas => 0xae,
    };
    code.push(if size == 1 { byte_op } else { byte_op + 1 });
    code
}

fn name(kind: Kind, size: u64, prefix: Prefix) -> String {
    let p = match (prefix, kind) {
        (Prefix::None, _) => "",
        (Prefix::Rep, Kind::Cmps | Kind::Scas) => "repe ",
        (Prefix::Rep, _) => "rep ",
        (Prefix::Repne, _) => "repne ",
    };
    let k = match kind {
        Kind::Movs => "movs",
        Kind::Stos => "stos",
        Kind::Lods => "lods",
        Kind::Cmps => "cmps",
        Kind::Scas => "scas",
    };
    let s = match size {
        1 => "b",
        2 => "w",
        4 => "d",
        _ => "q",
    };
    format!("{p}{k}{s}")
}

/// A count biased toward the edges: 0, 1, 2 and the largest.
fn count(rng: &mut Rng) -> u64 {
    match rng.below(6) {
        0 => rng.below(3),
        1 => MAX_COUNT - rng.below(2),
        _ => rng.below(MAX_COUNT + 1),
    }
}

/// Offset of the first element so that `n` elements of `size` bytes
/// fit in the area going up (DF=0) or down (DF=1).
fn start(rng: &mut Rng, n: u64, size: u64, down: bool) -> u64 {
    let span = n.max(1) * size;
    let free = AREA - span;
    let low = rng.below(free + 1);
    if down {
        low + span - size
    } else {
        low
    }
}

/// Fill the area with values from a small alphabet so that CMPS and SCAS
/// find equal elements often.
fn fill_small_alphabet(rng: &mut Rng, mem: &mut [u8], size: u64, values: &[u64; 2]) {
    let bias = rng.below(100);
    for el in mem[..AREA as usize].chunks_mut(size as usize) {
        let v = if rng.below(100) < bias { values[0] } else { values[1] };
        let bytes = v.to_le_bytes();
        el.copy_from_slice(&bytes[..el.len()]);
    }
}

fn make_case(rng: &mut Rng, kind: Kind, size: u64, prefix: Prefix, code: &[u8]) -> Case {
    let mut c = Case::new(code.to_vec());
    for v in c.gpr.iter_mut() {
        *v = rng.edgy();
    }
    let down = rng.below(2) == 1;
    c.rflags = rng.next_u64() & 0x8d5 | if down { 1 << 10 } else { 0 };
    let n = if prefix == Prefix::None { 1 } else { count(rng) };
    let scratch = scratch_addr();
    let si = start(rng, n, size, down);
    let di = start(rng, n, size, down);
    c.gpr[RSI] = scratch + si;
    c.gpr[RDI] = scratch + di;
    if prefix != Prefix::None {
        c.gpr[RCX] = n;
    }
    for b in c.mem.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    match kind {
        Kind::Scas => {
            let other = rng.edgy();
            fill_small_alphabet(rng, &mut c.mem, size, &[c.gpr[RAX], other]);
        }
        Kind::Cmps => {
            // The destination is a copy of the source with a few changes,
            // or random data with a few equal elements.
            let (si, di, len) = (si as usize, di as usize, (n * size) as usize);
            let (lo_s, lo_d) = if down {
                (si + size as usize - len, di + size as usize - len)
            } else {
                (si, di)
            };
            if rng.below(2) == 0 {
                let src = c.mem[lo_s..lo_s + len].to_vec();
                c.mem[lo_d..lo_d + len].copy_from_slice(&src);
            }
            for _ in 0..rng.below(4) {
                let i = rng.below(len.max(1) as u64) as usize;
                c.mem[lo_d + i.min(len.saturating_sub(1))] = rng.next_u64() as u8;
            }
            if rng.below(2) == 0 && len > 0 {
                // A run of equal elements somewhere.
                let el = rng.below(n) as usize * size as usize;
                let k = (rng.below(4) as usize * size as usize).min(len - el);
                let src = c.mem[lo_s + el..lo_s + el + k].to_vec();
                c.mem[lo_d + el..lo_d + el + k].copy_from_slice(&src);
            }
        }
        _ => {}
    }
    c
}

fn run_kind(kind: Kind, prefixes: &[Prefix], seed: u64) {
    for (si, &size) in SIZES.iter().enumerate() {
        for (pi, &prefix) in prefixes.iter().enumerate() {
            let code = encode(kind, size, prefix);
            let seed = seed + (si * 16 + pi) as u64;
            run_cases(&name(kind, size, prefix), cases_per_form(), seed, |rng| {
                make_case(rng, kind, size, prefix, &code)
            });
        }
    }
}

#[test]
fn movs() {
    run_kind(Kind::Movs, &[Prefix::None, Prefix::Rep, Prefix::Repne], 0x5100);
}

#[test]
fn stos() {
    run_kind(Kind::Stos, &[Prefix::None, Prefix::Rep], 0x5200);
}

#[test]
fn lods() {
    run_kind(Kind::Lods, &[Prefix::None, Prefix::Rep], 0x5300);
}

#[test]
fn cmps() {
    run_kind(Kind::Cmps, &[Prefix::None, Prefix::Rep, Prefix::Repne], 0x5400);
}

#[test]
fn scas() {
    run_kind(Kind::Scas, &[Prefix::None, Prefix::Rep, Prefix::Repne], 0x5500);
}

/// REP MOVS whose source and destination overlap closely, both ways and
/// in both directions: element-by-element semantics (a destination just
/// above the source replicates the data).
#[test]
fn movs_overlapping() {
    for (si, &size) in SIZES.iter().enumerate() {
        let code = encode(Kind::Movs, size, Prefix::Rep);
        let name = format!("rep movs{} overlapping", ["b", "w", "d", "q"][si]);
        run_cases(&name, cases_per_form(), 0x5600 + si as u64, |rng| {
            let mut c = Case::new(code.clone());
            for v in c.gpr.iter_mut() {
                *v = rng.edgy();
            }
            let down = rng.below(4) == 0;
            c.rflags = rng.next_u64() & 0x8d5 | if down { 1 << 10 } else { 0 };
            let n = count(rng);
            let far = rng.below(2) == 0;
            let limit = if far { n * size + 8 } else { 24 };
            // Keep both ranges inside the area.
            let distance = 1 + rng.below(limit.min(AREA - n.max(1) * size - 1));
            // Room for both ranges and the distance between them.
            let span = n.max(1) * size + distance;
            let low = rng.below(AREA - span + 1);
            let (a, b) = (low, low + distance);
            let (mut s, mut d) = if rng.below(2) == 0 { (a, b) } else { (b, a) };
            if down {
                s += n.max(1) * size - size;
                d += n.max(1) * size - size;
            }
            let scratch = scratch_addr();
            c.gpr[RSI] = scratch + s;
            c.gpr[RDI] = scratch + d;
            c.gpr[RCX] = n;
            for b in c.mem.iter_mut() {
                *b = rng.next_u64() as u8;
            }
            c
        });
    }
}
