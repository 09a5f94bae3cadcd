//! A hostile guest against the 8259 PICs and ELCR through their ports.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::pic(data));
