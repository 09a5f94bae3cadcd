//! A hostile guest driver against virtio-console's queues.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::virtio::fuzzing::console_queues(data));
