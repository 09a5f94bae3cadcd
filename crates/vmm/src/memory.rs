//! Guest physical memory: RAM below the 32-bit MMIO hole, the rest above 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// Start of the MMIO hole below 4 GiB (IOAPIC, LAPIC, virtio-mmio).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// Smallest guest we accept: the kernel, initrd and page tables must fit.
pub const MIN_MEM: u64 = 32 << 20;

/// RAM ranges for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]
    }
}

/// Allocate guest memory.
pub fn create(size: u64) -> Result<GuestMemoryMmap> {
    if size < MIN_MEM {
        return Err(Error::Config(format!(
            "memory size {} MiB is below the minimum of {} MiB",
            size >> 20,
            MIN_MEM >> 20
        )));
    }
    if let Some(host) = host_memory() {
        if size > host {
            return Err(Error::Config(format!(
                "memory size {} MiB is more than the host's {} MiB",
                size >> 20,
                host >> 20
            )));
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(format!("cannot allocate {} MiB: {e}", size >> 20)))
}

/// The host's physical memory, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_split() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
        assert!(create(1 << 20).is_err());
    }
}
