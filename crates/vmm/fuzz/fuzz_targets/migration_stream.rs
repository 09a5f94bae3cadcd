//! Migration streams as the destination reads them: header, messages,
//! pages written into guest memory, the machine state; never trusted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::migration::stream::fuzz_receive(data);
});
