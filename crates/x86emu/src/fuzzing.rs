//! Run arbitrary bytes as code from an arbitrary CPU state. Used by the
//! cargo-fuzz target (`fuzz/fuzz_targets/exec.rs`) and by a unit test that
//! drives it with pseudo-random inputs, so CI exercises it on stable Rust.
//!
//! The contract under test: whatever the bytes, `Cpu::run` returns (within
//! its budget) and never panics, under the interpreter and under the JIT
//! tier (translating every block at once). [`run_bytes_lockstep`] also
//! demands that both end in the same state.

use crate::cpu::{Cpu, Exit};
use crate::state::{cr, flags, CpuState, Segment};
use crate::testbus::TestBus;

/// Guest RAM size for fuzzing: small so that every run is quick.
pub const RAM: u64 = 1 << 20;
/// Instructions per run.
pub const BUDGET: u64 = 2_000;

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

/// Build a state and memory from `data`, run it under the interpreter and
/// under the JIT, and return how the interpreter's run ended.
pub fn run_bytes(data: &[u8]) -> Exit {
    let _ = run_with(data, Some(0));
    run_with(data, None).0
}

/// As [`run_bytes`], and panic unless both tiers ended in the same exit,
/// state, instruction count and memory.
pub fn run_bytes_lockstep(data: &[u8]) -> Exit {
    lockstep_at(data, &[0])
}

/// Run `data` under the interpreter and under the JIT at each threshold,
/// and panic unless every run ends as the interpreter's did.
fn lockstep_at(data: &[u8], thresholds: &[u32]) -> Exit {
    let (exit, cpu, bus) = run_with(data, None);
    for &t in thresholds {
        let (jit_exit, jit_cpu, jit_bus) = run_with(data, Some(t));
        assert_eq!(exit, jit_exit, "exit: interpreter vs JIT (threshold {t})");
        assert_eq!(cpu.state, jit_cpu.state, "state: interpreter vs JIT (threshold {t})");
        assert_eq!(
            cpu.instret, jit_cpu.instret,
            "instructions: interpreter vs JIT (threshold {t})"
        );
        assert!(bus.ram() == jit_bus.ram(), "memory: interpreter vs JIT (threshold {t})");
    }
    exit
}

/// Where [`self_modifying_program`] puts its code (64-bit mode, identity
/// mapped; the code page is also written by the program).
const SMC_CODE: u64 = 0x8000;
/// Bytes per instruction slot of a self-modifying program.
const SMC_SLOT: usize = 12;

/// A 64-bit loop whose body stores into its own code while it runs, built
/// from `data`: each pass may find different instructions, immediates or
/// branch offsets, patched by stores of every width (absolute, RIP- and
/// register-relative), in the same block, in a block already translated,
/// or in one not yet run. Returned as an input for [`run_bytes`]'s machine
/// (64-bit kernel mode, code at `SMC_CODE`).
pub fn self_modifying_program(data: &[u8]) -> Vec<u8> {
    let mut d = data;
    let d = &mut d;
    let [passes, slots] = take::<2>(d);
    let slots = 1 + slots as usize % 16;
    let body_len = slots * SMC_SLOT;
    // mov ecx, passes; body; dec ecx; jnz body; hlt.
    let mut code = vec![0xb9];
    code.extend_from_slice(&(1 + passes as u32 % 6).to_le_bytes());
    let body = code.len();
    // A target byte anywhere in the program (the mov ecx, the body, the
    // loop's tail), so stores hit opcodes, immediates and the backward jump.
    let program_len = body + body_len + 2 + 6 + 1;
    for _ in 0..slots {
        let [kind, a, b, c] = take::<4>(d);
        let at = code.len();
        let target = SMC_CODE + (u16::from_le_bytes([a, b]) as usize % program_len) as u64;
        let mut slot = match kind % 8 {
            // mov byte [target], imm8
            0 => [&[0xc6, 0x04, 0x25][..], &(target as u32).to_le_bytes(), &[c]].concat(),
            // mov dword [target], imm32 (four bytes of data)
            1 => [&[0xc7, 0x04, 0x25][..], &(target as u32).to_le_bytes(), &take::<4>(d)].concat(),
            // mov [rip + disp], eax: RIP-relative, from after this instruction.
            2 => {
                let disp = target as i64 - (SMC_CODE as i64 + at as i64 + 6);
                [&[0x89, 0x05][..], &(disp as i32).to_le_bytes()].concat()
            }
            // mov rbx, target; mov [rbx], ax: a register-relative 16-bit store.
            3 => [&[0xbb][..], &(target as u32).to_le_bytes(), &[0x66, 0x89, 0x03]].concat(),
            // add eax, imm32: an immediate that other slots patch.
            4 => [&[0x05][..], &u32::from_le_bytes([a, b, c, kind]).to_le_bytes()].concat(),
            // A register ALU operation (add/or/adc/sbb/and/sub/xor/cmp r32, r32 over eax..ebx).
            5 => vec![(a % 8) << 3 | 1, 0xc0 | (b & 0x1b)],
            // jz/jnz over the next slot.
            6 => vec![0x74 | (a & 1), SMC_SLOT as u8 - 2],
            // rep stosb of al into [target], 1-4 bytes.
            _ => [
                &[0xbf][..],
                &(target as u32).to_le_bytes(),
                &[0x51, 0xb9, 1 + (c & 3), 0, 0, 0, 0xf3, 0xaa, 0x59][..],
            ]
            .concat(),
        };
        slot.resize(slot.len().max(SMC_SLOT), 0x90);
        code.extend_from_slice(&slot);
    }
    let tail = code.len();
    code.extend_from_slice(&[0xff, 0xc9, 0x0f, 0x85]);
    code.extend_from_slice(&((body as i64 - (tail as i64 + 8)) as i32).to_le_bytes());
    code.push(0xf4);
    // The machine's header: mode 2 (64-bit, CPL 0), code at 0x8000, an
    // IDT, a TSS and registers from the input (RAX seeds the stored values).
    let mut input = vec![2, 0, 0, 0];
    input.extend_from_slice(&take::<2>(d));
    input.extend_from_slice(&[0; 256 + 104]);
    input.extend_from_slice(&u64::from_le_bytes(take::<8>(d)).to_le_bytes());
    input.extend_from_slice(&[0; 15 * 8 + 8]);
    input.extend_from_slice(&code);
    input
}

/// Run [`self_modifying_program`]'s program under the interpreter and under
/// the JIT (translating every block at once, and after two runs), and panic
/// unless all end alike.
pub fn run_self_modifying_lockstep(data: &[u8]) -> Exit {
    lockstep_at(&self_modifying_program(data), &[0, 2])
}

/// Build a state and memory from `data` and run it with the JIT tier set
/// to `jit`.
fn run_with(data: &[u8], jit: Option<u32>) -> (Exit, Cpu, TestBus) {
    let (mut cpu, mut bus) = machine(data, jit);
    let mut exit = Exit::Budget;
    // A few slices, as a VMM would run them, resuming after HLT with an interrupt.
    for _ in 0..4 {
        exit = cpu.run(&mut bus, BUDGET / 4);
        match exit {
            Exit::Halted => cpu.inject_interrupt(0x20),
            Exit::TripleFault | Exit::WaitForSipi => break,
            _ => {}
        }
    }
    (exit, cpu, bus)
}

/// The CPU (JIT tier set to `jit`) and memory that `data` describes.
fn machine(mut data: &[u8], jit: Option<u32>) -> (Cpu, TestBus) {
    let d = &mut data;
    let [mode, misc, cpl_bits, seed] = take::<4>(d);
    let mut bus = TestBus::new(RAM);
    let mut s = CpuState::reset();
    // Identity-map the first 1 GiB with 2 MiB pages (tables at 0x1000..0x4000),
    // so that paging modes have something to work with.
    bus.write_u64(0x1000, 0x2000 | 7);
    bus.write_u64(0x2000, 0x3000 | 7);
    for i in 0..512u64 {
        bus.write_u64(0x3000 + i * 8, (i << 21) | 0x87);
    }
    // A GDT with flat code/data descriptors for every mode and DPL.
    let gdt: [u64; 8] = [
        0,
        0x00cf_9b00_0000_ffff, // 0x08 32-bit code DPL0
        0x00af_9b00_0000_ffff, // 0x10 64-bit code DPL0
        0x00cf_9300_0000_ffff, // 0x18 data DPL0
        0x00cf_fb00_0000_ffff, // 0x20 32-bit code DPL3
        0x00cf_f300_0000_ffff, // 0x28 data DPL3
        0x00af_fb00_0000_ffff, // 0x30 64-bit code DPL3
        0x0000_8900_5000_0067, // 0x38 TSS at 0x5000
    ];
    for (i, e) in gdt.iter().enumerate() {
        bus.write_u64(0x4000 + i as u64 * 8, *e);
    }
    s.gdtr.base = 0x4000;
    s.gdtr.limit = 0x47;
    s.idtr.base = 0x6000;
    s.idtr.limit = u16::from_le_bytes(take::<2>(d));
    // IDT contents, TSS contents and registers come from the input.
    let idt = take::<256>(d);
    bus.load(0x6000, &idt);
    let tss = take::<104>(d);
    bus.load(0x5000, &tss);
    for r in s.gpr.iter_mut() {
        *r = u64::from_le_bytes(take::<8>(d)) % (RAM + 0x1000);
    }
    s.rflags = (u64::from_le_bytes(take::<8>(d)) & 0x3f_7fd5) | flags::FIXED1;
    let code_at = 0x8000u64 + (seed as u64) * 16;
    let code = *d;
    let len = code.len().min((RAM - code_at) as usize);
    bus.load(code_at, &code[..len]);
    let user = cpl_bits & 1 != 0;
    match mode % 4 {
        0 => {
            // Real mode.
            s.segs[1] = Segment::real_mode((code_at >> 4) as u16, true);
            s.rip = code_at & 0xf;
        }
        1 => {
            // 32-bit protected mode, optionally with PAE paging.
            let cs = Segment::from_descriptor(if user { 0x23 } else { 0x08 }, gdt[if user { 4 } else { 1 }]);
            let ds = Segment::from_descriptor(if user { 0x2b } else { 0x18 }, gdt[if user { 5 } else { 3 }]);
            s.segs = [ds, cs, ds, ds, ds, ds];
            s.cr0 |= cr::CR0_PE;
            if misc & 1 != 0 {
                s.cr4 |= cr::CR4_PAE;
                s.cr3 = 0x7000;
                bus.write_u64(0x7000, 0x3000 | 1);
                s.cr0 |= cr::CR0_PG;
            }
            s.rip = code_at;
        }
        _ => {
            // Long mode, 64-bit or compatibility code.
            s = CpuState {
                gpr: s.gpr,
                rflags: s.rflags,
                gdtr: s.gdtr,
                idtr: s.idtr,
                ..CpuState::long_mode_flat(0x1000)
            };
            let compat = mode % 4 == 3;
            let (csel, craw) = match (user, compat) {
                (false, false) => (0x10, gdt[2]),
                (false, true) => (0x08, gdt[1]),
                (true, false) => (0x33, gdt[6]),
                (true, true) => (0x23, gdt[4]),
            };
            let ds = Segment::from_descriptor(if user { 0x2b } else { 0x18 }, gdt[if user { 5 } else { 3 }]);
            s.segs = [ds, Segment::from_descriptor(csel, craw), ds, ds, ds, ds];
            s.tr = Segment::from_descriptor(0x38, gdt[7]);
            s.rip = code_at;
        }
    }
    if misc & 2 != 0 {
        s.cr4 |= cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT;
    }
    if misc & 4 != 0 {
        s.cr0 |= cr::CR0_TS;
    }
    s.msr.lstar = code_at;
    s.efer |= if misc & 8 != 0 { cr::EFER_SCE } else { 0 };
    let mut cpu = Cpu::standalone(RAM);
    cpu.set_jit(jit);
    cpu.set_state(s);
    if misc & 16 != 0 {
        cpu.inject_interrupt(misc);
    }
    if misc & 32 != 0 {
        cpu.inject_nmi();
    }
    (cpu, bus)
}

/// Cases per seeded test: `FUZZ_CASES`, 3000 by default.
#[cfg(test)]
fn seeded_cases() -> usize {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// The seeded tests' pseudo-random source (xorshift64).
#[cfg(test)]
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic stand-in for the fuzzer: many pseudo-random inputs,
    /// biased toward plausible instruction bytes.
    #[test]
    fn random_bytes_never_panic_or_hang() {
        let (n, mut next) = (seeded_cases(), xorshift(0x9e37_79b9_7f4a_7c15));
        for _ in 0..n {
            let len = 400 + (next() % 200) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Any exit is fine; returning at all (no panic, no hang) is the test.
            let _ = run_bytes(&data);
        }
    }
}

#[cfg(test)]
mod lockstep {
    use super::{seeded_cases, xorshift};

    /// The same seeded inputs as the test above, each run under both tiers
    /// and compared.
    #[test]
    fn jit_ends_as_the_interpreter_on_random_bytes() {
        let (n, mut next) = (seeded_cases(), xorshift(0x9e37_79b9_7f4a_7c15));
        for case in 0..n {
            let len = 400 + (next() % 200) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if std::panic::catch_unwind(|| super::run_bytes_lockstep(&data)).is_err() {
                panic!("seeded case {case} ends differently under the JIT");
            }
        }
    }

    /// Seeded self-modifying programs, each run under both tiers and compared.
    #[test]
    fn jit_ends_as_the_interpreter_on_self_modifying_code() {
        let (n, mut next) = (seeded_cases(), super::xorshift(0x2545_f491_4f6c_dd1d));
        let mut code_writes = 0;
        for case in 0..n {
            let data: Vec<u8> = (0..80).map(|_| next() as u8).collect();
            let program = super::self_modifying_program(&data);
            let (_, cpu, _) = super::run_with(&program, None);
            code_writes += cpu.stats.code_writes;
            if std::panic::catch_unwind(|| super::run_self_modifying_lockstep(&data)).is_err() {
                panic!("self-modifying case {case} ends differently under the JIT");
            }
        }
        // The generator must really write code that has run: otherwise this
        // test compares nothing of interest.
        assert!(
            code_writes > n as u64,
            "only {code_writes} stores into code in {n} programs"
        );
    }
}
