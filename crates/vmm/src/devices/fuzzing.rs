//! Entry points for fuzzing the platform devices with a hostile guest: the
//! `cargo fuzz` targets in `crates/vmm/fuzz` and a deterministic unit test
//! call these.
//!
//! The input is a program of guest accesses (port reads and writes, MMIO,
//! MSRs) mixed with what the VMM itself does between them (time passing,
//! timer ticks, interrupt acknowledgement, a snapshot round trip). Each
//! device family has its own target, which draws only the accesses that
//! reach it; the devices are the real ones, wired as the machine wires
//! them.

use super::irq::InterruptRouter;
use super::lapic::{LAPIC_BASE, LAPIC_SIZE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST};
use super::{acpi_pm, i8042, ioapic, rtc, serial};

const CPUS: usize = 2;
const TSC_HZ: u64 = 2_000_000_000;

/// Reads the fuzzer's bytes as a stream of small values; past the end
/// everything reads as zero, so that any input is a whole program.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// An access width the CPU can make: 1, 2, 4 or 8 bytes.
    fn width(&mut self) -> usize {
        1 << (self.u8() % 4)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.u8()) % from.len()]
    }
}

/// Guest time: advances by what the input says, from nanoseconds to
/// decades, so that long uptimes are covered too.
struct Clock {
    now_ns: u64,
}

impl Clock {
    fn advance(&mut self, input: &mut Input) {
        let shift = input.u8() % 48;
        self.now_ns = self.now_ns.saturating_add(u64::from(input.u32()) << shift);
    }

    fn guest_tsc(&self) -> u64 {
        (u128::from(self.now_ns) * u128::from(TSC_HZ) / 1_000_000_000) as u64
    }
}

/// Which accesses a target draws.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Pic,
    Pit,
    Ioapic,
    Lapic,
}

const PIC_PORTS: &[u16] = &[0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1];
const PIT_PORTS: &[u16] = &[0x40, 0x41, 0x42, 0x43, 0x61];

/// Drive the interrupt router (PIC, PIT, IOAPIC, the local APICs) as two
/// vCPUs and the VMM would. A snapshot round trip must give back the same
/// state.
fn interrupt_router(data: &[u8], family: Family) {
    let mut input = Input { data };
    let mut router = InterruptRouter::new(CPUS, TSC_HZ);
    if input.u8() & 1 == 0 {
        router.setup_virtual_wire();
    }
    let mut clock = Clock { now_ns: 0 };
    while !input.done() {
        let cpu = usize::from(input.u8()) % CPUS;
        match input.u8() % 12 {
            // The guest's accesses, at the family's own ports or pages.
            0..=3 => match family {
                Family::Pic | Family::Pit => {
                    let port = input.pick(if family == Family::Pic { PIC_PORTS } else { PIT_PORTS });
                    if input.u8() & 1 == 0 {
                        let _ = router.io_read(port, clock.now_ns);
                    } else {
                        router.io_write(port, input.u8(), clock.now_ns);
                    }
                }
                Family::Ioapic | Family::Lapic => {
                    let (base, size) = if family == Family::Ioapic {
                        (ioapic::IOAPIC_BASE, ioapic::IOAPIC_SIZE)
                    } else {
                        (LAPIC_BASE, LAPIC_SIZE)
                    };
                    let gpa = base + u64::from(input.u16()) % size;
                    let mut buf = [0u8; 8];
                    let len = input.width();
                    if input.u8() & 1 == 0 {
                        router.mmio_read(cpu, gpa, &mut buf[..len], clock.now_ns);
                    } else {
                        buf = input.u64().to_le_bytes();
                        router.mmio_write(cpu, gpa, &buf[..len], clock.now_ns);
                    }
                }
            },
            4 if family == Family::Lapic => {
                let index = if input.u8() & 1 == 0 {
                    MSR_TSC_DEADLINE
                } else {
                    X2APIC_MSR_FIRST + u32::from(input.u8())
                };
                if input.u8() & 1 == 0 {
                    let _ = router.rdmsr(cpu, index, clock.now_ns);
                } else {
                    router.wrmsr(cpu, index, input.u64(), clock.now_ns, clock.guest_tsc());
                }
            }
            5 if family == Family::Lapic => router.set_apic_base(cpu, input.u64()),
            5 | 6 => router.set_task_priority(cpu, input.u64()),
            // Devices raise their lines.
            7 => {
                let line = u32::from(input.u8()) % super::irq::NUM_LINES;
                if input.u8() & 1 == 0 {
                    router.pulse_irq(line);
                } else {
                    router.set_irq(line, input.u8() & 1 != 0);
                }
            }
            // The vCPU takes what is pending, as its loop would.
            8 => {
                if router.interrupt_pending(cpu) {
                    let _ = router.acknowledge(cpu);
                }
                let _ = router.take_events(cpu);
            }
            // Time passes; due timers fire.
            9 => {
                clock.advance(&mut input);
                for c in 0..CPUS {
                    if router.next_deadline_ns(c).is_some_and(|d| d <= clock.now_ns) {
                        router.tick(c, clock.now_ns);
                    }
                }
                let _ = router.pit_backlog();
            }
            // A snapshot and restore in the middle of it all.
            10 => {
                let state = router.state();
                router = InterruptRouter::from_state(state.clone());
                assert_eq!(router.state(), state, "restore changed the interrupt state");
            }
            _ => {
                let _ = router.take_touched();
            }
        }
    }
}

/// The 8259 PICs (and the ELCR), reached through their ports.
pub fn pic(data: &[u8]) {
    interrupt_router(data, Family::Pic);
}

/// The 8254 PIT and port 0x61, reached through their ports.
pub fn pit(data: &[u8]) {
    interrupt_router(data, Family::Pit);
}

/// The IOAPIC's MMIO window.
pub fn ioapic(data: &[u8]) {
    interrupt_router(data, Family::Ioapic);
}

/// The local APICs: MMIO page, x2APIC and TSC-deadline MSRs, APIC base.
pub fn lapic(data: &[u8]) {
    interrupt_router(data, Family::Lapic);
}

/// The 16550 UART at COM1: register accesses mixed with host input.
pub fn serial(data: &[u8]) {
    let mut input = Input { data };
    let mut port = serial::SerialPort::new(std::io::sink());
    while !input.done() {
        let reg = serial::COM1_BASE + u16::from(input.u8() % 8);
        match input.u8() % 4 {
            0 => {
                let _ = port.read(reg);
            }
            1 => port.write(reg, input.u8()),
            2 => {
                let n = usize::from(input.u8());
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                port.queue_input(&bytes);
                port.refill();
            }
            _ => {
                let saved = port.save();
                match serial::SerialPort::restore(&saved, std::io::sink()) {
                    Ok(p) => port = p,
                    Err(e) => panic!("a saved UART did not restore: {e}"),
                }
            }
        }
    }
}

/// The i8042 keyboard controller's data and status ports.
pub fn i8042(data: &[u8]) {
    let mut input = Input { data };
    let mut kbd = i8042::I8042::default();
    while !input.done() {
        let port = input.pick(&[i8042::DATA_PORT, i8042::STATUS_PORT]);
        match input.u8() % 4 {
            0 => {
                let _ = kbd.read(port);
            }
            1 => kbd.write(port, input.u8()),
            2 => {
                let _ = kbd.take_irq();
            }
            _ => {
                let _ = kbd.trigger_ctrl_alt_del();
            }
        }
    }
}

/// The CMOS RTC: index and data ports, as time passes (into the far
/// future too).
pub fn rtc(data: &[u8]) {
    let mut input = Input { data };
    let mut clock = Clock { now_ns: 0 };
    let mut rtc = rtc::Rtc::with_time(i64::from(input.u32()), 0);
    while !input.done() {
        let port = input.pick(&[rtc::INDEX_PORT, rtc::DATA_PORT]);
        match input.u8() % 5 {
            0 => {
                let _ = rtc.read(port, clock.now_ns);
            }
            1 => rtc.write(port, input.u8(), clock.now_ns),
            2 => clock.advance(&mut input),
            3 => {
                let _ = rtc.unix_time(clock.now_ns);
            }
            _ => {
                let state = rtc.state();
                rtc = rtc::Rtc::from_state(state.clone());
                assert_eq!(rtc.state(), state, "restore changed the RTC");
            }
        }
    }
}

/// The ACPI power registers: a write decodes to at most one action, and
/// only the documented values power off or reset.
pub fn acpi_pm(data: &[u8]) {
    let mut input = Input { data };
    while !input.done() {
        let port = acpi_pm::SLEEP_CONTROL_PORT + u16::from(input.u8() % 4);
        let value = input.u8();
        assert_eq!(acpi_pm::read(port), 0);
        let action = acpi_pm::action(port, value);
        let expected = if port == acpi_pm::RESET_PORT && value == acpi_pm::RESET_VALUE {
            acpi_pm::PowerAction::Reset
        } else if port == acpi_pm::SLEEP_CONTROL_PORT && value & 0x3c == 0x20 | acpi_pm::S5_SLEEP_TYPE << 2 {
            acpi_pm::PowerAction::PowerOff
        } else {
            acpi_pm::PowerAction::None
        };
        assert_eq!(action, expected, "port {port:#x} value {value:#x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic stand-in for the fuzzers: pseudo-random programs for
    /// every device.
    #[test]
    fn hostile_programs_do_not_panic_or_hang() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let targets: [fn(&[u8]); 8] = [pic, pit, ioapic, lapic, serial, i8042, rtc, acpi_pm];
        for _ in 0..200 {
            let len = (next() % 4000) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for t in targets {
                t(&data);
            }
        }
    }
}
