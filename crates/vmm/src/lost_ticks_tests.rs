//! Issue 14, hole 11: PIT ticks missed while vCPU 0's thread waited for a
//! host core are delivered, one per timer interrupt the guest takes, as
//! KVM reinjects them. They used to merge into one, and Linux's timer check
//! (at least five ticks in its wait) failed under overcommit: "IO-APIC +
//! timer doesn't work!".

use crate::devices::ioapic::IOAPIC_BASE;
use crate::devices::irq::InterruptRouter;
use crate::devices::lapic::LAPIC_BASE;

const MS: u64 = 1_000_000;

fn out(r: &mut InterruptRouter, port: u16, v: u8, now: u64) {
    assert!(r.io_write(port, v, now));
}

/// Linux's PIT set-up: channel 0, mode 2, HZ=1000.
fn pit_hz_1000(r: &mut InterruptRouter, now: u64) {
    out(r, 0x43, 0x34, now);
    out(r, 0x40, (1193u16 & 0xff) as u8, now);
    out(r, 0x40, (1193u16 >> 8) as u8, now);
}

/// Take every interrupt that is pending, EOI-ing each with `eoi`; how many.
fn drain(r: &mut InterruptRouter, want: u8, eoi: &dyn Fn(&mut InterruptRouter)) -> u64 {
    let mut n = 0;
    while r.interrupt_pending(0) {
        assert_eq!(r.acknowledge(0), Some(want));
        eoi(r);
        n += 1;
        assert!(n < 10_000, "interrupt storm");
    }
    n
}

#[test]
fn missed_ticks_reach_the_guest_through_the_8259() {
    let mut r = InterruptRouter::new(1, 1_000_000_000);
    r.setup_virtual_wire();
    // ICW1-4: vectors 0x30.., then unmask IRQ 0 only.
    for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xfe)] {
        out(&mut r, port, v, 0);
    }
    let eoi = |r: &mut InterruptRouter| out(r, 0x20, 0x20, 0);
    pit_hz_1000(&mut r, 0);
    // On time: one tick per millisecond.
    let first = r.next_deadline_ns(0).unwrap();
    r.tick(0, first);
    assert_eq!(drain(&mut r, 0x30, &eoi), 1);
    // vCPU 0 waited 20 ms for a core: 20 ticks were due; all arrive.
    r.tick(0, first + 20 * MS);
    assert_eq!(drain(&mut r, 0x30, &eoi), 20);
    assert_eq!(r.pit_backlog(), 0);
    // A stall of minutes is not replayed tick by tick.
    r.tick(0, first + 600_000 * MS);
    assert_eq!(drain(&mut r, 0x30, &eoi), 1001);
    // Reprogramming the PIT drops the backlog.
    r.tick(0, first + 700_000 * MS);
    pit_hz_1000(&mut r, first + 700_000 * MS);
    assert_eq!(r.pit_backlog(), 0);
}

#[test]
fn missed_ticks_reach_the_guest_through_the_ioapic() {
    let mut r = InterruptRouter::new(1, 1_000_000_000);
    r.setup_virtual_wire();
    // PIC fully masked; LAPIC on; IOAPIC pin 2 (ISA IRQ 0): vector 0x31.
    for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0xff)] {
        out(&mut r, port, v, 0);
    }
    assert!(r.mmio_write(0, LAPIC_BASE + 0xf0, &0x1ffu32.to_le_bytes(), 0));
    for (index, v) in [(0x10u32 + 2 * 2, 0x31u32), (0x11 + 2 * 2, 0)] {
        r.mmio_write(0, IOAPIC_BASE, &index.to_le_bytes(), 0);
        r.mmio_write(0, IOAPIC_BASE + 0x10, &v.to_le_bytes(), 0);
    }
    let eoi = |r: &mut InterruptRouter| {
        assert!(r.mmio_write(0, LAPIC_BASE + 0xb0, &0u32.to_le_bytes(), 0));
    };
    pit_hz_1000(&mut r, 0);
    let first = r.next_deadline_ns(0).unwrap();
    r.tick(0, first);
    assert_eq!(drain(&mut r, 0x31, &eoi), 1);
    // Linux's check waits ~20 ms of TSC time for 5 ticks; a 16 ms stall
    // used to leave it with one.
    r.tick(0, first + 16 * MS);
    assert_eq!(drain(&mut r, 0x31, &eoi), 16);
}
