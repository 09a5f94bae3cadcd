//! The differential suite (tests/diff) again, with x86emu's JIT tier
//! translating every block on its first run: each generated case runs as
//! one translated block against the host CPU. The harness sees the crate
//! name `diff_jit` and switches the emulator over (`harness::JIT`).

#![cfg(target_arch = "x86_64")]

#[path = "../diff/harness.rs"]
mod harness;

#[path = "../diff/alu.rs"]
mod alu;
#[path = "../diff/bits.rs"]
mod bits;
#[path = "../diff/data.rs"]
mod data;
#[path = "../diff/sse.rs"]
mod sse;
#[path = "../diff/string.rs"]
mod string;
#[path = "../diff/x87.rs"]
mod x87;
