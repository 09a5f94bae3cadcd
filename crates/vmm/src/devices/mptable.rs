//! Intel MultiProcessor Specification 1.4 table: how Linux (without ACPI)
//! learns the CPUs, the IOAPIC and the ISA interrupt routing.
//!
//! The floating pointer goes at [`MPTABLE_START`] (the start of the last
//! KiB below 640 KiB, which Linux scans and the e820 map reserves), and the
//! configuration table right after it. It describes:
//! - one processor entry per CPU, APIC ids 0..N-1, the BSP flag on 0;
//! - one bus, "ISA   ", id 0;
//! - the IOAPIC, id N, at 0xfec00000;
//! - I/O interrupt entries for ISA IRQs 0-15 (IRQ0 on pin 2, as on a PC
//!   with the interrupt override; IRQ2 is the PIC cascade and has none;
//!   the others on the pin of the same number), and, as Firecracker does,
//!   for pins 16-23 as ISA IRQs 16-23 so virtio-mmio devices can use them;
//!   all with "conforms to bus" polarity and trigger, i.e. edge/high;
//! - local interrupt entries: ExtINT on LINT0 and NMI on LINT1 of all CPUs.
//!
//! The floating pointer says "virtual wire mode" (no IMCR).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ioapic::{IOAPIC_BASE, IOAPIC_VERSION, NUM_PINS};
use super::lapic::{APIC_VERSION, LAPIC_BASE};
use crate::{Error, Result};

/// Where the floating pointer structure goes.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The table must end below the BIOS area's end (reserved in e820).
const MPTABLE_LIMIT: u64 = 0x10_0000;
/// xAPIC ids are 8 bits, 0xff is broadcast, and the IOAPIC takes id N.
pub const MAX_CPUS: u8 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 (as CPUID reports), and its FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ISA_BUS_ID: u8 = 0;
const SPEC_REV: u8 = 4;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The IOAPIC pin an ISA IRQ is wired to (IRQ0 to pin 2), or `None` for
/// the cascade IRQ2.
pub fn isa_irq_to_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        _ => Some(irq),
    }
}

/// The table (floating pointer followed by the configuration table) as
/// it is written at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::Config(format!(
            "the MP table supports 1 to {MAX_CPUS} CPUs, not {num_cpus}"
        )));
    }
    let config_addr =
        u32::try_from(base + FLOATING_LEN as u64).map_err(|_| Error::Config("MP table above 4 GiB".into()))?;
    let ioapic_id = num_cpus;

    // Entries.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..num_cpus {
        let mut e = [0u8; PROCESSOR_LEN];
        e[0] = ENTRY_PROCESSOR;
        e[1] = id;
        e[2] = APIC_VERSION as u8;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let mut e = [0u8; ENTRY_LEN];
    e[0] = ENTRY_IOAPIC;
    e[1] = ioapic_id;
    e[2] = IOAPIC_VERSION as u8;
    e[3] = 1; // enabled
    e[4..8].copy_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    let routes = (0..16u8)
        .filter_map(|irq| isa_irq_to_pin(irq).map(|pin| (irq, pin)))
        .chain((16..NUM_PINS as u8).map(|pin| (pin, pin)));
    for (irq, pin) in routes {
        // Flags 0: polarity and trigger conform to the bus (ISA: edge, high).
        entries.extend_from_slice(&[ENTRY_IO_INT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, pin]);
        count += 1;
    }
    for (lint, kind) in [(0u8, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INT, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    // Configuration table header.
    let table_len = HEADER_LEN + entries.len();
    let table_len16 = u16::try_from(table_len).map_err(|_| Error::Config("MP table too large".into()))?;
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"PCMP");
    h[4..6].copy_from_slice(&table_len16.to_le_bytes());
    h[6] = SPEC_REV;
    h[8..16].copy_from_slice(b"VESSEL  ");
    h[16..28].copy_from_slice(b"VESSEL-VM   ");
    h[34..36].copy_from_slice(&count.to_le_bytes());
    h[36..40].copy_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    let mut table = h.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // Floating pointer.
    let mut f = [0u8; FLOATING_LEN];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&config_addr.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REV;
    // f[11] = 0: a configuration table is present; f[12] bit 7 = 0: virtual wire.
    f[10] = checksum(&f);

    let mut out = f.to_vec();
    out.extend_from_slice(&table);
    if base + out.len() as u64 > MPTABLE_LIMIT {
        return Err(Error::Config(format!("MP table for {num_cpus} CPUs does not fit")));
    }
    Ok(out)
}

/// Write the MP table for `num_cpus` CPUs into guest memory.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<()> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| Error::Memory(format!("cannot write the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Parse the table the way Linux's mpparse does and check every field.
    fn check(bytes: &[u8], base: u64, n: u8) {
        let f = &bytes[..16];
        assert_eq!(&f[0..4], b"_MP_");
        assert_eq!(sum(f), 0);
        assert_eq!(f[8], 1);
        assert_eq!(f[9], 4);
        assert_eq!(f[11], 0);
        assert_eq!(f[12] & 0x80, 0);
        let cfg = (u64::from(u32_at(f, 4)) - base) as usize;
        assert_eq!(cfg, 16);
        let len = usize::from(u16_at(bytes, cfg + 4));
        let t = &bytes[cfg..cfg + len];
        assert_eq!(cfg + len, bytes.len());
        assert_eq!(&t[0..4], b"PCMP");
        assert_eq!(sum(t), 0);
        assert_eq!(t[6], 4);
        assert_eq!(u32_at(t, 36), 0xfee0_0000);
        let count = u16_at(t, 34);
        let mut off = HEADER_LEN;
        let (mut cpus, mut buses, mut ioapics, mut lints) = (0u8, 0, 0, 0);
        let mut routes = Vec::new();
        for _ in 0..count {
            match t[off] {
                0 => {
                    assert_eq!(t[off + 1], cpus);
                    assert_eq!(t[off + 2], 0x14);
                    assert_eq!(t[off + 3], if cpus == 0 { 3 } else { 1 });
                    cpus += 1;
                    off += 20;
                }
                1 => {
                    assert_eq!(&t[off + 2..off + 8], b"ISA   ");
                    buses += 1;
                    off += 8;
                }
                2 => {
                    assert_eq!(t[off + 1], n);
                    assert_eq!(t[off + 2], 0x11);
                    assert_eq!(t[off + 3], 1);
                    assert_eq!(u32_at(t, off + 4), 0xfec0_0000);
                    ioapics += 1;
                    off += 8;
                }
                3 => {
                    assert_eq!(t[off + 1], 0);
                    assert_eq!(u16_at(t, off + 2), 0);
                    assert_eq!(t[off + 4], 0);
                    assert_eq!(t[off + 6], n);
                    routes.push((t[off + 5], t[off + 7]));
                    off += 8;
                }
                4 => {
                    let expect = if t[off + 7] == 0 { 3 } else { 1 };
                    assert_eq!(t[off + 1], expect);
                    assert_eq!(t[off + 6], 0xff);
                    lints += 1;
                    off += 8;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, len);
        assert_eq!((cpus, buses, ioapics, lints), (n, 1, 1, 2));
        assert!(routes.contains(&(0, 2)));
        assert!(!routes.iter().any(|r| r.0 == 2));
        for irq in [1u8, 3, 4, 8, 14, 15, 16, 23] {
            assert!(routes.contains(&(irq, irq)), "irq {irq}");
        }
        assert_eq!(routes.len(), 15 + 8);
    }

    #[test]
    fn layout_and_checksums() {
        for n in [1u8, 2, 4, 37, 64, MAX_CPUS] {
            let b = build(n, MPTABLE_START).unwrap();
            check(&b, MPTABLE_START, n);
        }
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(255, MPTABLE_START).is_err());
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let len = build(4, MPTABLE_START).unwrap().len();
        let mut back = vec![0u8; len];
        mem.read_slice(&mut back, GuestAddress(MPTABLE_START)).unwrap();
        check(&back, MPTABLE_START, 4);
        // Linux finds the floating pointer on a 16-byte boundary in the
        // last KiB below 640 KiB.
        assert_eq!(MPTABLE_START, 639 * 1024);
        // Too little memory: an error, not a panic.
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        assert!(setup_mptable(&small, 1).is_err());
    }

    #[test]
    fn irq_routing() {
        assert_eq!(isa_irq_to_pin(0), Some(2));
        assert_eq!(isa_irq_to_pin(2), None);
        assert_eq!(isa_irq_to_pin(4), Some(4));
    }
}
