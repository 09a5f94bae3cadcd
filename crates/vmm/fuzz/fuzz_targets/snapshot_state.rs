//! Snapshot state files: parsed and checked, never trusted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmm::persist::MachineState::decode(data);
});
