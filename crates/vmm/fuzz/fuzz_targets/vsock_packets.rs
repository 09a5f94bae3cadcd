//! The virtio-vsock back end under arbitrary packets from the guest.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::virtio::fuzzing::vsock_packets(data));
