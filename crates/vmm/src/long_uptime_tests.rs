//! Issue 14, hole 2: guest time must keep running for days, months and
//! years of uptime. Every clock the guest can see under `emu` (the TSC,
//! the LAPIC timer in all three modes, the PIT and the RTC) is driven here
//! by an injected machine clock far from zero, the way the vCPU threads
//! drive them with `Shared::now_ns`.

use crate::devices::irq::InterruptRouter;
use crate::devices::lapic::LAPIC_BASE;
use crate::devices::pit::{Pit, PIT_HZ};
use crate::devices::rtc::Rtc;
use crate::machine::{guest_tsc, TSC_KHZ};

const SEC: u64 = 1_000_000_000;
const HOUR: u64 = 3600 * SEC;
const DAY: u64 = 24 * HOUR;
const YEAR: u64 = 365 * DAY;
/// The uptimes tested: where the old code stopped, a day, a month, a year
/// and ten years.
const UPTIMES: [u64; 5] = [9_300 * SEC, DAY, 31 * DAY, YEAR, 10 * YEAR];

fn lapic_write(r: &mut InterruptRouter, reg: u64, v: u32, now: u64) {
    assert!(r.mmio_write(0, LAPIC_BASE + reg, &v.to_le_bytes(), now));
}

#[test]
fn the_tsc_keeps_counting() {
    let hz = u128::from(TSC_KHZ) * 1000;
    for t in UPTIMES {
        let expect = u128::from(t) * hz / u128::from(SEC);
        assert_eq!(u128::from(guest_tsc(t)), expect, "at {t} ns");
        // One microsecond later the TSC has moved by 2000 (2 GHz).
        assert_eq!(guest_tsc(t + 1000) - guest_tsc(t), 2000, "at {t} ns");
    }
    // 9,223 s was where `now_ns * TSC_KHZ` saturated in 64 bits.
    assert!(guest_tsc(9_300 * SEC) > guest_tsc(9_200 * SEC));
}

#[test]
fn tsc_deadline_timer_fires_after_a_year() {
    for t in UPTIMES {
        let mut r = InterruptRouter::new(1, u64::from(TSC_KHZ) * 1000);
        lapic_write(&mut r, 0xf0, 0x1ff, t);
        lapic_write(&mut r, 0x320, (2 << 17) | 0xec, t); // TSC-deadline mode
                                                         // Linux arms "1 ms from now" in guest TSC units.
        let deadline = guest_tsc(t) + u64::from(TSC_KHZ);
        assert!(r.wrmsr(0, 0x6e0, deadline, t, guest_tsc(t)));
        let due = r.next_deadline_ns(0).expect("armed");
        assert!((t + 999_000..=t + 1_000_000).contains(&due), "at {t}: due {due}");
        r.tick(0, due);
        assert_eq!(r.acknowledge(0), Some(0xec), "at {t}");
    }
}

#[test]
fn lapic_periodic_and_oneshot_timers_run_after_a_year() {
    for t in UPTIMES {
        let mut r = InterruptRouter::new(1, u64::from(TSC_KHZ) * 1000);
        lapic_write(&mut r, 0xf0, 0x1ff, t);
        lapic_write(&mut r, 0x3e0, 0xb, t); // divide by 1
        lapic_write(&mut r, 0x320, (1 << 17) | 0xef, t); // periodic
        lapic_write(&mut r, 0x380, 1_000_000, t); // 1 ms at 1 GHz
        let mut now = t;
        for i in 0..3 {
            let due = r.next_deadline_ns(0).expect("armed");
            assert_eq!(due, now + 1_000_000, "at {t}, period {i}");
            let mut b = [0u8; 4];
            assert!(r.mmio_read(0, LAPIC_BASE + 0x390, &mut b, due - 500_000));
            assert_eq!(u32::from_le_bytes(b), 500_000, "current count at {t}");
            r.tick(0, due);
            assert_eq!(r.acknowledge(0), Some(0xef));
            lapic_write(&mut r, 0xb0, 0, due); // EOI
            now = due;
        }
        lapic_write(&mut r, 0x320, 0xee, now); // one-shot
        lapic_write(&mut r, 0x380, 2_000, now);
        assert_eq!(r.next_deadline_ns(0), Some(now + 2_000));
    }
}

#[test]
fn pit_ticks_at_its_rate_after_a_year() {
    for t in UPTIMES {
        let mut p = Pit::new();
        // Linux: channel 0, lo/hi, mode 2, LATCH for HZ=1000.
        p.write(0x43, 0x34, t);
        p.write(0x40, (1193u16 & 0xff) as u8, t);
        p.write(0x40, (1193u16 >> 8) as u8, t);
        let mut prev = t;
        for _ in 0..5 {
            let due = p.next_irq_ns().expect("armed");
            let period = due - prev;
            assert!((999_000..=1_001_000).contains(&period), "at {t}: period {period}");
            assert!(p.tick(due));
            prev = due;
        }
        // The count reads back as it would just after loading.
        p.write(0x43, 0x00, prev + 1);
        let lo = p.read(0x40, prev + 1);
        let hi = p.read(0x40, prev + 1);
        let count = u16::from_le_bytes([lo, hi]);
        assert!((1190..=1193).contains(&count), "at {t}: count {count}");
        // A second of guest time is PIT_HZ input clocks, at any uptime.
        let mut p = Pit::new();
        p.write(0x43, 0x30, t); // mode 0, one shot
        p.write(0x40, 0xff, t);
        p.write(0x40, 0xff, t);
        let due = p.next_irq_ns().expect("armed") - t;
        assert_eq!(due, (65_535 * SEC).div_ceil(PIT_HZ), "at {t}");
    }
}

#[test]
fn rtc_runs_for_years() {
    const T0: i64 = 1_700_000_000; // 2023-11-14 22:13:20 UTC
    let mut rtc = Rtc::with_time(T0, 0);
    for t in UPTIMES {
        assert_eq!(rtc.unix_time(t), T0 + (t / SEC) as i64, "at {t}");
    }
    // Ten years on, the registers say 2033.
    rtc.write(0x70, 9, 10 * YEAR);
    let year = rtc.read(0x71, 10 * YEAR);
    assert_eq!(year, 0x33, "BCD year after ten years");
}
