//! Random state and random code bytes: x86emu must neither panic nor hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = x86emu::fuzzing::run_bytes(data);
});
