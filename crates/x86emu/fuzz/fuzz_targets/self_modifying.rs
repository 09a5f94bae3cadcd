//! 64-bit loops that store into their own code while they run (opcodes,
//! immediates, branch offsets; every store width), run by the interpreter
//! and by the JIT: every run must end as the interpreter's does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = x86emu::fuzzing::run_self_modifying_lockstep(data);
});
