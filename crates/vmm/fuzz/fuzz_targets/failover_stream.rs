//! Failover streams as the standby reads them after the initial sync:
//! frames, and each epoch checked whole, then applied to guest memory;
//! never trusted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::migration::failover::fuzz_standby(data);
});
