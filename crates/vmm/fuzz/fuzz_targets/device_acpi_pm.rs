//! A hostile guest against the ACPI power registers.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::acpi_pm(data));
