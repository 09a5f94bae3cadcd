//! A hostile guest against the IOAPIC's MMIO window.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::ioapic(data));
