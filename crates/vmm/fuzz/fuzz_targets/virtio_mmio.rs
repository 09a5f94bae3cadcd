//! The virtio-mmio transport under arbitrary register reads and writes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::virtio::fuzzing::mmio_registers(data));
