//! A hostile guest against the local APICs: MMIO, x2APIC and TSC-deadline MSRs, APIC base.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::lapic(data));
