//! virtio-blk queue handling on arbitrary guest memory (a hostile driver).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::virtio::fuzzing::blk_queue(data));
