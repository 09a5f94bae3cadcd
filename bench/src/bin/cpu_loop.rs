//! x86emu interpreter speed on simple loops, side by side with the same
//! machine code run natively on the host CPU.
//!
//! Usage: cargo run --release -p vessel-bench --bin cpu_loop [-- ITERATIONS]
//! Prints guest instructions per second for x86emu's interpreter, for its
//! JIT tier (threshold 16), for native, and native / JIT.

use std::time::Instant;

use x86emu::state::CpuState;
use x86emu::testbus::TestBus;
use x86emu::{Cpu, Exit};

/// A loop body and how many instructions one iteration executes.
struct Workload {
    name: &'static str,
    /// Code run with RCX = iterations; must end with `ret` (0xc3) for the
    /// native run. The emulated run stops at the `ret`.
    code: &'static [u8],
    per_iter: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        // l: add rax, rcx; dec rcx; jnz l; ret
        name: "add/dec/jnz",
        code: &[0x48, 0x01, 0xc8, 0x48, 0xff, 0xc9, 0x75, 0xf8, 0xc3],
        per_iter: 3,
    },
    Workload {
        // l: mov rdx,[rsi]; add rdx,rcx; mov [rsi],rdx; xor rdx,rax; dec rcx; jnz l; ret
        name: "load/add/store/xor/dec/jnz",
        code: &[
            0x48, 0x8b, 0x16, 0x48, 0x01, 0xca, 0x48, 0x89, 0x16, 0x48, 0x31, 0xc2, 0x48, 0xff, 0xc9, 0x75, 0xef, 0xc3,
        ],
        per_iter: 6,
    },
    Workload {
        // Multiply-accumulate in the style of the kernel's generic
        // multi-precision inner loop (mpihelp_submul_1, half of Debian's
        // boot; docs/EMU-PERF.md):
        // l: mov rax,[rsi]; mov rdx,rax; shr rdx,32; imul rax,rcx; imul rdx,r9;
        //    add rax,r8; cmp rax,r8; setb r10b; movzx r10d,r10b; add rdx,r10;
        //    sub r8,rax; adc r9,rdx; mov [rsi],rax; dec rcx; jnz l; ret
        name: "mul-add (mpihelp-like)",
        code: &[
            0x48, 0x8b, 0x06, 0x48, 0x89, 0xc2, 0x48, 0xc1, 0xea, 0x20, 0x48, 0x0f, 0xaf, 0xc1, 0x49, 0x0f, 0xaf, 0xd1,
            0x4c, 0x01, 0xc0, 0x4c, 0x39, 0xc0, 0x41, 0x0f, 0x92, 0xc2, 0x45, 0x0f, 0xb6, 0xd2, 0x4c, 0x01, 0xd2, 0x49,
            0x29, 0xc0, 0x49, 0x11, 0xd1, 0x48, 0x89, 0x06, 0x48, 0xff, 0xc9, 0x75, 0xcf, 0xc3,
        ],
        per_iter: 15,
    },
];

fn run_emulated(w: &Workload, iters: u64, jit: Option<u32>) -> (f64, u64) {
    let mut bus = TestBus::new(4 << 20);
    // Identity map 0..1 GiB with 2 MiB pages.
    bus.write_u64(0x1000, 0x2000 | 3);
    bus.write_u64(0x2000, 0x3000 | 3);
    for i in 0..512u64 {
        bus.write_u64(0x3000 + i * 8, (i << 21) | 0x83);
    }
    let code_at = 0x10_0000u64;
    bus.load(code_at, w.code);
    let mut cpu = Cpu::standalone(4 << 20);
    cpu.set_jit(jit);
    assert_eq!(
        cpu.jit_active(),
        jit.is_some(),
        "the host refused the JIT's code memory"
    );
    let mut s = CpuState::long_mode_flat(0x1000);
    s.rip = code_at;
    s.gpr[1] = iters;
    s.gpr[4] = 0x20_0000;
    s.gpr[6] = 0x30_0000;
    cpu.set_state(s);
    let ret_at = code_at + w.code.len() as u64 - 1;
    let start = Instant::now();
    let before = cpu.instret;
    // Stop exactly at the `ret`: a budget that runs past it would return
    // into nothing.
    let total = iters * w.per_iter;
    while cpu.state.rip != ret_at && cpu.instret - before < total {
        let left = total - (cpu.instret - before);
        match cpu.run(&mut bus, left.min(10_000_000)) {
            Exit::Budget => {}
            other => panic!("unexpected exit {other:?} at {:#x}", cpu.state.rip),
        }
        if cpu.stats.exceptions > 0 {
            panic!("guest exception at {:#x}: {:?}", cpu.state.rip, cpu.stats.unimplemented);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    (secs, cpu.instret - before)
}

fn run_native(w: &Workload, iters: u64) -> f64 {
    // SAFETY: an anonymous RWX mapping that we fill with the workload code,
    // which only uses caller-saved registers (RAX RCX RDX RSI R8-R10) and
    // memory at RSI.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(w.code.as_ptr(), p as *mut u8, w.code.len());
        let mut scratch = [0u64; 8];
        let f: extern "sysv64" fn() = std::mem::transmute(p);
        let start = Instant::now();
        std::arch::asm!(
            "call {f}",
            f = in(reg) f,
            inout("rcx") iters => _,
            inout("rsi") scratch.as_mut_ptr() => _,
            out("rax") _, out("rdx") _, out("r8") _, out("r9") _, out("r10") _,
        );
        let secs = start.elapsed().as_secs_f64();
        libc::munmap(p, 4096);
        secs
    }
}

fn main() {
    let iters: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000_000);
    println!(
        "{:<30} {:>12} {:>12} {:>8} {:>12} {:>12}",
        "workload", "interp MIPS", "JIT MIPS", "JIT/int", "native MIPS", "native/JIT"
    );
    for w in WORKLOADS {
        let (int_secs, int_executed) = run_emulated(w, iters, None);
        let (jit_secs, jit_executed) = run_emulated(w, iters, Some(16));
        let native_secs = run_native(w, iters);
        let instrs = (iters * w.per_iter) as f64;
        let int_mips = int_executed as f64 / int_secs / 1e6;
        let jit_mips = jit_executed as f64 / jit_secs / 1e6;
        let native_mips = instrs / native_secs / 1e6;
        println!(
            "{:<30} {:>12.1} {:>12.1} {:>7.2}x {:>12.1} {:>11.1}x",
            w.name,
            int_mips,
            jit_mips,
            jit_mips / int_mips,
            native_mips,
            native_mips / jit_mips
        );
    }
}
