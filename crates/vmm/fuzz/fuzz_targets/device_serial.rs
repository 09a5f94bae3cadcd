//! A hostile guest against the 16550 UART at COM1, with host input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::serial(data));
