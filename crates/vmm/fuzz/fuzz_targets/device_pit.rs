//! A hostile guest against the 8254 PIT and port 0x61.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::pit(data));
