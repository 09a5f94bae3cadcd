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
    let (exit, cpu, bus) = run_with(data, None);
    let (jit_exit, jit_cpu, jit_bus) = run_with(data, Some(0));
    assert_eq!(exit, jit_exit, "exit: interpreter vs JIT");
    assert_eq!(cpu.state, jit_cpu.state, "state: interpreter vs JIT");
    assert_eq!(cpu.instret, jit_cpu.instret, "instructions: interpreter vs JIT");
    assert!(bus.ram() == jit_bus.ram(), "memory: interpreter vs JIT");
    exit
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic stand-in for the fuzzer: many pseudo-random inputs,
    /// biased toward plausible instruction bytes.
    #[test]
    fn random_bytes_never_panic_or_hang() {
        let n: usize = std::env::var("FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
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
    /// The same seeded inputs as the test above, each run under both tiers
    /// and compared.
    #[test]
    fn jit_ends_as_the_interpreter_on_random_bytes() {
        let n: usize = std::env::var("FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..n {
            let len = 400 + (next() % 200) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if std::panic::catch_unwind(|| super::run_bytes_lockstep(&data)).is_err() {
                panic!("seeded case {case} ends differently under the JIT");
            }
        }
    }
}
