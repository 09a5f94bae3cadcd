//! A hostile guest against the i8042 keyboard controller.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::i8042(data));
