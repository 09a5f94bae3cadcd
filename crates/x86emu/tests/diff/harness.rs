//! Differential testing against the host processor.
//!
//! A test case is a short sequence of user-level machine code plus a start
//! state (general registers, status flags, x87/SSE state as an FXSAVE image,
//! and a 4 KiB scratch page). The harness runs the code natively inside this
//! process, from a generated trampoline in an RWX mapping, and in x86emu
//! (64-bit mode, the scratch and code pages mapped at the same virtual
//! addresses as natively), then compares every register, the flags not
//! masked as undefined, the FXSAVE image and every scratch byte.
//!
//! Native code runs at CPL 3 and x86emu at CPL 0; the instructions under
//! test behave the same at both. Code must not fault natively: generators
//! avoid faulting inputs (a native fault would kill the test process).

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use x86emu::state::{flags, CpuState};
use x86emu::testbus::TestBus;
use x86emu::{Cpu, FpuState};

pub use x86emu::state::reg::*;

/// Whether this build of the suite runs the emulator with the JIT at
/// threshold 0 (the `diff_jit` test target) instead of the interpreter.
pub const JIT: bool = matches!(env!("CARGO_CRATE_NAME").as_bytes(), b"diff_jit");

/// Size of the scratch page the code may read and write.
pub const SCRATCH: usize = 4096;

/// Bytes of the code area.
const CODE_PAGE: usize = 4096;
/// Room for the test's own code inside the trampoline.
pub const MAX_CODE: usize = 2048;

/// Offsets inside the state page.
const ST_IN_GPR: usize = 0; // 16 * 8
const ST_IN_FLAGS: usize = 128;
const ST_OUT_GPR: usize = 256;
const ST_OUT_FLAGS: usize = 384;
const ST_HOST_RSP: usize = 392;
const ST_IN_FX: usize = 512; // 16-byte aligned
const ST_OUT_FX: usize = 1024;
const ST_HOST_FX: usize = 1536;

/// One differential case.
#[derive(Clone)]
pub struct Case {
    pub code: Vec<u8>,
    /// Initial general registers (RSP is set by the harness).
    pub gpr: [u64; 16],
    /// Initial status flags and DF (other bits are ignored).
    pub rflags: u64,
    /// Initial x87/SSE state.
    pub fpu: FpuState,
    /// Initial scratch memory.
    pub mem: Vec<u8>,
    /// Flags that are undefined after the code and not compared.
    pub undefined_flags: u64,
    /// Compare the x87 part of the FXSAVE image (FCW..ST7).
    pub compare_x87: bool,
    /// FSW bits not compared (for example C1 after transcendental ops).
    pub fsw_mask: u16,
    /// Registers not compared (bit i = GPR i), for undefined results.
    pub skip_gpr: u16,
}

impl Case {
    pub fn new(code: Vec<u8>) -> Self {
        Case {
            code,
            gpr: [0; 16],
            rflags: 0,
            fpu: FpuState::default(),
            mem: vec![0; SCRATCH],
            undefined_flags: 0,
            compare_x87: true,
            fsw_mask: 0xffff,
            skip_gpr: 0,
        }
    }
}

/// The state after running a case.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub fx: Vec<u8>,
    pub mem: Vec<u8>,
}

/// The native side: one RWX mapping with code, state and scratch pages.
pub struct Native {
    base: *mut u8,
}

// SAFETY: the mapping is process-wide memory; access is serialized by the
// mutex that guards the only `Native` instance.
unsafe impl Send for Native {}

impl Native {
    fn code(&self) -> *mut u8 {
        self.base
    }
    fn state(&self) -> *mut u8 {
        // SAFETY: the mapping is three pages long.
        unsafe { self.base.add(CODE_PAGE) }
    }
    /// Address of the scratch page (the same in native and emulated runs).
    pub fn scratch(&self) -> *mut u8 {
        // SAFETY: the mapping is three pages long.
        unsafe { self.base.add(CODE_PAGE + 4096) }
    }
}

fn native() -> MutexGuard<'static, Native> {
    static NATIVE: OnceLock<Mutex<Native>> = OnceLock::new();
    NATIVE
        .get_or_init(|| {
            // SAFETY: anonymous private mapping, checked for failure.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    CODE_PAGE + 8192,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap RWX failed");
            Mutex::new(Native { base: p as *mut u8 })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Address of the scratch page, to put into registers for memory operands.
pub fn scratch_addr() -> u64 {
    native().scratch() as u64
}

/// A tiny emitter for the trampoline's RIP-relative moves.
struct Emit {
    buf: Vec<u8>,
    base: u64,
}

impl Emit {
    fn here(&self) -> u64 {
        self.base + self.buf.len() as u64
    }
    /// Emit `bytes` followed by a rel32 to `target`, plus `tail` bytes after it.
    fn riprel(&mut self, bytes: &[u8], target: u64, tail: &[u8]) {
        self.buf.extend_from_slice(bytes);
        let next = self.here() + 4 + tail.len() as u64;
        let rel = (target as i64 - next as i64) as i32;
        self.buf.extend_from_slice(&rel.to_le_bytes());
        self.buf.extend_from_slice(tail);
    }
    /// mov r64, [target] / mov [target], r64
    fn mov_load(&mut self, reg: usize, target: u64) {
        let rex = 0x48 | if reg >= 8 { 4 } else { 0 };
        self.riprel(&[rex, 0x8b, 0x05 | ((reg as u8 & 7) << 3)], target, &[]);
    }
    fn mov_store(&mut self, reg: usize, target: u64) {
        let rex = 0x48 | if reg >= 8 { 4 } else { 0 };
        self.riprel(&[rex, 0x89, 0x05 | ((reg as u8 & 7) << 3)], target, &[]);
    }
}

/// Run natively. Serialized by the global mutex.
pub fn run_native(case: &Case) -> Outcome {
    assert!(case.code.len() <= MAX_CODE);
    let n = native();
    let code = n.code() as u64;
    let st = n.state() as u64;
    let scratch = n.scratch() as u64;
    let mut e = Emit {
        buf: Vec::new(),
        base: code,
    };
    // Prologue: save callee-saved registers and the host stack.
    e.buf
        .extend_from_slice(&[0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57]);
    e.mov_store(RSP, st + ST_HOST_RSP as u64);
    // fxsave64 [rip+host_fx]
    e.riprel(&[0x48, 0x0f, 0xae, 0x05], st + ST_HOST_FX as u64, &[]);
    // The test's stack: the top of the scratch page.
    e.mov_load(RSP, st + (ST_IN_GPR + RSP * 8) as u64);
    // fxrstor64 [rip+in_fx]
    e.riprel(&[0x48, 0x0f, 0xae, 0x0d], st + ST_IN_FX as u64, &[]);
    // push qword [rip+in_flags]; popfq
    e.riprel(&[0xff, 0x35], st + ST_IN_FLAGS as u64, &[]);
    e.buf.push(0x9d);
    for r in 0..16 {
        if r != RSP {
            e.mov_load(r, st + (ST_IN_GPR + r * 8) as u64);
        }
    }
    e.buf.extend_from_slice(&case.code);
    for r in 0..16 {
        e.mov_store(r, st + (ST_OUT_GPR + r * 8) as u64);
    }
    // pushfq; pop qword [rip+out_flags]
    e.buf.push(0x9c);
    e.riprel(&[0x8f, 0x05], st + ST_OUT_FLAGS as u64, &[]);
    // fxsave64 [rip+out_fx]
    e.riprel(&[0x48, 0x0f, 0xae, 0x05], st + ST_OUT_FX as u64, &[]);
    // Give the Rust caller back its own x87/SSE state (MXCSR, tags, TOP).
    e.riprel(&[0x48, 0x0f, 0xae, 0x0d], st + ST_HOST_FX as u64, &[]);
    // cld: the Rust caller relies on DF=0 (the ABI), and cases may set it.
    e.buf.push(0xfc);
    e.mov_load(RSP, st + ST_HOST_RSP as u64);
    e.buf
        .extend_from_slice(&[0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5d, 0x5b, 0xc3]);
    assert!(e.buf.len() <= CODE_PAGE);

    // SAFETY: all three pages belong to our mapping and we hold its lock;
    // the trampoline restores every callee-saved register and the stack
    // before returning, and the generated code only touches our pages.
    unsafe {
        std::ptr::copy_nonoverlapping(e.buf.as_ptr(), n.code(), e.buf.len());
        let stp = n.state();
        let mut gpr = case.gpr;
        gpr[RSP] = scratch + SCRATCH as u64 - 256;
        for (i, v) in gpr.iter().enumerate() {
            (stp.add(ST_IN_GPR + i * 8) as *mut u64).write_unaligned(*v);
        }
        let fl = (case.rflags & (flags::STATUS | flags::DF)) | flags::FIXED1 | flags::IF;
        (stp.add(ST_IN_FLAGS) as *mut u64).write_unaligned(fl);
        let fx = case.fpu.to_fxsave();
        std::ptr::copy_nonoverlapping(fx.as_ptr(), stp.add(ST_IN_FX), 512);
        std::ptr::copy_nonoverlapping(case.mem.as_ptr(), n.scratch(), SCRATCH.min(case.mem.len()));
        let f: extern "C" fn() = std::mem::transmute(n.code());
        f();
        let mut out = Outcome {
            gpr: [0; 16],
            rflags: (stp.add(ST_OUT_FLAGS) as *const u64).read_unaligned(),
            fx: std::slice::from_raw_parts(stp.add(ST_OUT_FX), 512).to_vec(),
            mem: std::slice::from_raw_parts(n.scratch(), SCRATCH).to_vec(),
        };
        for (i, v) in out.gpr.iter_mut().enumerate() {
            *v = (stp.add(ST_OUT_GPR + i * 8) as *const u64).read_unaligned();
        }
        out
    }
}

/// Page-table builder for the emulated side.
struct Tables {
    next: u64,
}

impl Tables {
    fn alloc(&mut self, bus: &mut TestBus) -> u64 {
        let p = self.next;
        self.next += 4096;
        bus.load(p, &[0u8; 4096]);
        p
    }
    fn map(&mut self, bus: &mut TestBus, pml4: u64, lin: u64, phys: u64) {
        let mut table = pml4;
        for level in (1..4).rev() {
            let idx = (lin >> (12 + 9 * level)) & 0x1ff;
            let e = bus.read_u64(table + idx * 8);
            table = if e & 1 == 0 {
                let t = self.alloc(bus);
                bus.write_u64(table + idx * 8, t | 7);
                t
            } else {
                e & 0x000f_ffff_ffff_f000
            };
        }
        bus.write_u64(table + ((lin >> 12) & 0x1ff) * 8, phys | 7);
    }
}

/// Run in x86emu with the same virtual layout as natively.
pub fn run_emulated(case: &Case) -> Result<Outcome, String> {
    run_emulated_with(case, x86emu::CpuConfig::default())
}

/// `run_emulated` with a chosen CPU configuration (for features that are
/// off by default).
pub fn run_emulated_with(case: &Case, config: x86emu::CpuConfig) -> Result<Outcome, String> {
    let (code_lin, scratch) = {
        let n = native();
        (n.code() as u64 + 0x800, n.scratch() as u64)
    };
    let mut bus = TestBus::new(1 << 20);
    let mut t = Tables { next: 0x10000 };
    let pml4 = t.alloc(&mut bus);
    let code_phys = 0x80000;
    let scratch_phys = 0x90000;
    // Two code pages in case the test code crosses a page boundary.
    t.map(&mut bus, pml4, code_lin & !0xfff, code_phys);
    t.map(&mut bus, pml4, (code_lin & !0xfff) + 4096, code_phys + 4096);
    t.map(&mut bus, pml4, scratch, scratch_phys);
    let code_off = code_phys + (code_lin & 0xfff);
    bus.load(code_off, &case.code);
    let end = code_lin + case.code.len() as u64;
    bus.load(scratch_phys, &case.mem[..SCRATCH.min(case.mem.len())]);
    // The native trampoline loads RFLAGS through the test stack (push; popfq),
    // leaving that qword just below RSP: leave the same footprint here.
    let fl = (case.rflags & (flags::STATUS | flags::DF)) | flags::FIXED1 | flags::IF;
    bus.write_u64(scratch_phys + SCRATCH as u64 - 256 - 8, fl);

    let mut cpu = Cpu::standalone(1 << 20);
    cpu.config = config;
    if JIT {
        // Every block translated on its first run, and blocks as long as
        // the code (not one instruction per `step`): a HLT after the code
        // ends the run.
        cpu.set_jit(Some(0));
        if !cpu.jit_active() {
            return Err("the JIT is not available on this host (no executable memory)".into());
        }
        bus.load(code_off + case.code.len() as u64, &[0xf4]);
    }
    let mut s = CpuState::long_mode_flat(pml4);
    s.cr4 |= x86emu::state::cr::CR4_OSFXSR | x86emu::state::cr::CR4_OSXMMEXCPT;
    s.cr0 &= !x86emu::state::cr::CR0_EM;
    s.cr0 |= x86emu::state::cr::CR0_MP;
    s.gpr = case.gpr;
    s.gpr[RSP] = scratch + SCRATCH as u64 - 256;
    s.rflags = (case.rflags & (flags::STATUS | flags::DF)) | flags::FIXED1 | flags::IF;
    s.fpu = case.fpu.clone();
    s.rip = code_lin;
    cpu.set_state(s);
    let mut steps = 0;
    while cpu.state.rip != end {
        let before = cpu.stats.exceptions;
        if JIT {
            let exit = cpu.run(&mut bus, 1000);
            if exit == x86emu::Exit::Halted && cpu.state.rip == end + 1 {
                cpu.state.rip = end;
            }
        } else {
            cpu.step(&mut bus);
        }
        if cpu.stats.exceptions != before {
            return Err(format!(
                "exception in emulator at rip {:#x} (offset {}), unimplemented: {:?}",
                cpu.state.rip,
                cpu.state.rip.wrapping_sub(code_lin),
                cpu.stats.unimplemented
            ));
        }
        steps += 1;
        if steps > 1_000_000 {
            return Err("emulator did not reach the end of the code".into());
        }
    }
    if JIT && cpu.stats.jit_instructions == 0 {
        return Err("the JIT ran none of the code (nothing was translated)".into());
    }
    Ok(Outcome {
        gpr: cpu.state.gpr,
        rflags: cpu.state.rflags,
        fx: cpu.state.fpu.to_fxsave().to_vec(),
        mem: bus.ram()[scratch_phys as usize..scratch_phys as usize + SCRATCH].to_vec(),
    })
}

/// Run both and compare. Returns a description of every difference.
pub fn check(case: &Case) -> Result<(), String> {
    let emu = run_emulated(case)?;
    let nat = run_native(case);
    let mut diffs = Vec::new();
    for r in 0..16 {
        if case.skip_gpr & (1 << r) == 0 && nat.gpr[r] != emu.gpr[r] {
            diffs.push(format!("gpr{r}: native {:#x} emu {:#x}", nat.gpr[r], emu.gpr[r]));
        }
    }
    let fmask = (flags::STATUS | flags::DF) & !case.undefined_flags;
    if nat.rflags & fmask != emu.rflags & fmask {
        diffs.push(format!(
            "rflags: native {:#x} emu {:#x} (compared bits {:#x})",
            nat.rflags & fmask,
            emu.rflags & fmask,
            fmask
        ));
    }
    // FXSAVE image: FCW, FSW (masked), abridged FTW, FOP, MXCSR, ST0-7, XMM0-15.
    // FIP/FDP are not compared: x86emu keeps guest-linear values, which
    // differ in meaning from the host's in user mode.
    let u16_at = |v: &[u8], o: usize| u16::from_le_bytes([v[o], v[o + 1]]);
    if case.compare_x87 {
        if u16_at(&nat.fx, 0) != u16_at(&emu.fx, 0) {
            diffs.push(format!(
                "fcw: native {:#x} emu {:#x}",
                u16_at(&nat.fx, 0),
                u16_at(&emu.fx, 0)
            ));
        }
        let (nf, ef) = (u16_at(&nat.fx, 2) & case.fsw_mask, u16_at(&emu.fx, 2) & case.fsw_mask);
        if nf != ef {
            diffs.push(format!("fsw: native {nf:#x} emu {ef:#x}"));
        }
        if nat.fx[4] != emu.fx[4] {
            diffs.push(format!("ftw: native {:#x} emu {:#x}", nat.fx[4], emu.fx[4]));
        }
        for i in 0..8 {
            let o = 32 + i * 16;
            // Only valid registers have defined contents.
            let top = ((u16_at(&nat.fx, 2) >> 11) & 7) as usize;
            if nat.fx[4] & (1 << ((top + i) % 8)) != 0 && nat.fx[o..o + 10] != emu.fx[o..o + 10] {
                diffs.push(format!(
                    "st{i}: native {:02x?} emu {:02x?}",
                    &nat.fx[o..o + 10],
                    &emu.fx[o..o + 10]
                ));
            }
        }
    }
    if nat.fx[24..28] != emu.fx[24..28] {
        diffs.push(format!(
            "mxcsr: native {:02x?} emu {:02x?}",
            &nat.fx[24..28],
            &emu.fx[24..28]
        ));
    }
    for i in 0..16 {
        let o = 160 + i * 16;
        if nat.fx[o..o + 16] != emu.fx[o..o + 16] {
            diffs.push(format!(
                "xmm{i}: native {:02x?} emu {:02x?}",
                &nat.fx[o..o + 16],
                &emu.fx[o..o + 16]
            ));
        }
    }
    // The native epilogue's PUSHFQ writes just below the final RSP.
    let scratch = scratch_addr();
    let pushf_slot = nat.gpr[RSP].wrapping_sub(8).wrapping_sub(scratch);
    let clobbered = |i: usize| (i as u64).wrapping_sub(pushf_slot) < 8;
    if let Some(i) = (0..SCRATCH).find(|&i| nat.mem[i] != emu.mem[i] && !clobbered(i)) {
        diffs.push(format!(
            "memory at scratch+{i:#x}: native {:#x} emu {:#x}",
            nat.mem[i], emu.mem[i]
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

/// Small deterministic PRNG (xorshift64*), so failures reproduce from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// A value biased toward edge cases: 0, 1, -1, sign boundaries, small.
    pub fn edgy(&mut self) -> u64 {
        const EDGES: [u64; 12] = [
            0,
            1,
            2,
            u64::MAX,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0x7fff_ffff,
            0x8000_0000,
            0x8000_0000_0000_0000,
        ];
        match self.below(4) {
            0 => EDGES[self.below(EDGES.len() as u64) as usize],
            1 => EDGES[self.below(EDGES.len() as u64) as usize]
                .wrapping_add(self.below(3))
                .wrapping_sub(1),
            2 => self.below(256),
            _ => self.next_u64(),
        }
    }
}

/// How many random cases per instruction form: `DIFF_CASES` (default 200).
pub fn cases_per_form() -> usize {
    std::env::var("DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Run `n` cases built by `make`, failing with the first mismatches.
/// Returns the number of cases run (for the summary counts).
pub fn run_cases(name: &str, n: usize, seed: u64, mut make: impl FnMut(&mut Rng) -> Case) -> usize {
    let mut rng = Rng(seed | 1);
    let mut failures = Vec::new();
    for i in 0..n {
        let case = make(&mut rng);
        if let Err(e) = check(&case) {
            failures.push(format!(
                "{name} case {i} code {:02x?} gpr {:x?} flags {:#x}: {e}",
                case.code,
                &case.gpr[..8],
                case.rflags
            ));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    record(name, n);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    n
}

/// Print a per-class count line, collected by the test summary.
fn record(name: &str, n: usize) {
    println!("diff-cases {name}: {n}");
}

/// Encode one instruction with iced's assembler (64-bit).
pub fn asm(f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(64).expect("64-bit assembler");
    f(&mut a).expect("assemble");
    a.assemble(0).expect("assemble")
}
