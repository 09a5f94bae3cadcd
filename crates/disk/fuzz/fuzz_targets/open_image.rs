//! Open an arbitrary file as a disk image, read from it and check it.
//! Run: cd crates/disk/fuzz && cargo +nightly fuzz run open_image
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vessel-disk-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    disk::fuzzing::open_and_read(dir(), data);
});
