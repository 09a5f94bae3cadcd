//! Differential tests: x86emu against the host CPU. See `harness.rs`.
//! `DIFF_CASES=N` sets the random cases per instruction form (default 200);
//! each test prints `diff-cases <class>: <count>` lines (`--nocapture`).

#![cfg(target_arch = "x86_64")]

mod harness;

mod alu;
mod bits;
mod data;
mod sse;
mod string;
mod x87;
