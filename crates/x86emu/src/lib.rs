//! x86emu: a software x86-64 CPU.
//!
//! A pure library: architectural state ([`CpuState`], plain serde data),
//! instruction decoding through iced-x86, execution, the MMU and TLB,
//! exceptions and interrupt delivery. It owns no threads, files or devices;
//! it reaches memory, port I/O, MMIO and the interrupt controller only
//! through the [`Bus`] trait, and [`Cpu::run`] returns to its caller when
//! the guest halts, the instruction budget runs out, or the bus asks.

pub mod bus;
pub mod codemap;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod exception;
pub mod exec;
pub mod fuzzing;
pub mod interrupt;
#[cfg(all(target_arch = "x86_64", unix))]
mod jit;
pub mod memory;
pub mod mmu;
pub mod operand;
pub mod state;
pub mod testbus;

pub use bus::Bus;
pub use codemap::CodeMap;
pub use config::{CpuConfig, Features};
pub use cpu::{Cpu, Exit, Stats};
pub use exception::Fault;
/// The environment variable that turns on the JIT's lockstep check and
/// names its report file (see the `jit::lockstep` module).
pub const JIT_LOCKSTEP_ENV: &str = "VESSEL_JIT_LOCKSTEP";
pub use state::{CpuState, FpuState};
