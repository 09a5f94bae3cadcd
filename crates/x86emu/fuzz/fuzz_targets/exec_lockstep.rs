//! Random state and random code bytes, run by the interpreter and by the
//! JIT translating every block: both must end in the same state, with the
//! same memory and instruction count (a divergence panics).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = x86emu::fuzzing::run_bytes_lockstep(data);
});
