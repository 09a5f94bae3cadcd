//! Issue 14, hole 4 (the machine's half): 16- and 32-bit port accesses
//! reach the byte-wide port devices as byte accesses to consecutive ports,
//! as on the ISA bus and in QEMU; they used to be cut to their low byte.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use x86emu::Bus;

use crate::devices::irq::{InterruptRouter, Interrupts};
use crate::machine::{Shared, VcpuBus, STOP_HALTED};

fn bus() -> VcpuBus {
    let irqs = Arc::new(Interrupts::new(InterruptRouter::new(1, 1_000_000_000)));
    let shared = Shared::for_tests(irqs, Box::new(std::io::sink()));
    VcpuBus { id: 0, shared }
}

#[test]
fn word_accesses_reach_both_cmos_ports() {
    let mut b = bus();
    // `out 0x70, ax`: AL selects CMOS byte 0x40, AH is written to it.
    b.io_out(0x70, 2, 0x5a40);
    b.io_out(0x70, 1, 0x40);
    assert_eq!(b.io_in(0x71, 1), 0x5a);
    // A word read: 0x70 is write-only (0xff), 0x71 the selected byte.
    assert_eq!(b.io_in(0x70, 2), 0x5aff);
    // A dword write from 0x6f: nothing at 0x6f, then index, data, and
    // the index port again.
    b.io_out(0x6f, 4, 0x41_33_41_00);
    b.io_out(0x70, 1, 0x41);
    assert_eq!(b.io_in(0x71, 1), 0x33);
    // Nothing answers 0x500: all ones, at every width.
    assert_eq!(b.io_in(0x500, 4), u32::MAX);
    assert_eq!(b.io_in(0x500, 2), 0xffff);
}

#[test]
fn a_word_write_with_s5_in_its_high_byte_powers_off() {
    let mut b = bus();
    // SLP_TYP=5, SLP_EN into the sleep control port 0x600, as the high
    // byte of a word written at 0x5ff; cut to its low byte it was lost.
    b.io_out(0x5ff, 2, 0x3400);
    assert_eq!(b.shared.stop.load(Ordering::Acquire), STOP_HALTED);
}
