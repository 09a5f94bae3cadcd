//! Failover streams as the standby reads them after the initial sync:
//! frames, each epoch checked whole, then applied to guest memory, and
//! each disk-writes frame parsed (and what passed encoded back the same);
//! never trusted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::migration::failover::fuzz_standby(data);
});
