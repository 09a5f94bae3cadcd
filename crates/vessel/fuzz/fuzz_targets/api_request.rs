//! API requests (method, path, body) parsed and dispatched to a controller.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vessel::api::fuzzing::requests(data));
