//! The body of the image-opening fuzz target (crates/disk/fuzz), shared
//! with its deterministic stand-in in the tests.

use std::path::Path;

use crate::{BlockBackend, OpenOptions};

/// Write `data` as `dir/fuzz.qcow2`; open it read-only, read from it and
/// check it; then open it writable, write, flush, read, and check it with
/// leak repair. Any error is fine; a panic, a hang or an
/// absurd allocation is a bug.
pub fn open_and_read(dir: &Path, data: &[u8]) {
    let path = dir.join("fuzz.qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    if let Ok(disk) = crate::open(&path, &opts) {
        read_some(&*disk);
    }
    let _ = crate::check::check(&path, false);
    // Then as a VM's writable disk: L2 preallocation, copy-on-write
    // and allocation all run on the hostile metadata.
    if let Ok(disk) = crate::open(&path, &OpenOptions::default()) {
        let size = disk.size();
        for off in [0, size / 3, size.saturating_sub(4096)] {
            let len = size.saturating_sub(off).min(4096) as usize;
            let _ = disk.write_at(&[0xa5; 4096][..len], off);
        }
        let _ = disk.flush();
        read_some(&*disk);
    }
    let _ = crate::check::check(&path, true);
    let _ = std::fs::remove_file(&path);
}

fn read_some(disk: &dyn BlockBackend) {
    let size = disk.size();
    let mut buf = vec![0u8; 64 * 1024];
    // The start, a cluster boundary and the end, plus a spread of points.
    let mut offsets = vec![0, 65536 - 512, size.saturating_sub(4096)];
    offsets.extend((1..16).map(|i| size / 16 * i));
    for off in offsets {
        let len = (size.saturating_sub(off)).min(buf.len() as u64) as usize;
        let _ = disk.read_at(&mut buf[..len], off);
    }
}
