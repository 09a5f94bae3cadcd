//! A hostile guest driver against virtio-net's queues, on a real TAP.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::virtio::fuzzing::net_queues(data));
