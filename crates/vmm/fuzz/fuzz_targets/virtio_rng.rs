//! A hostile guest driver against virtio-rng's queue.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::virtio::fuzzing::rng_queue(data));
