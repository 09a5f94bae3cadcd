//! A hostile guest against the CMOS RTC as time passes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::devices::fuzzing::rtc(data));
