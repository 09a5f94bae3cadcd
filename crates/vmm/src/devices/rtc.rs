//! Motorola MC146818 real-time clock and CMOS RAM at ports 0x70 (index)
//! and 0x71 (data).
//!
//! The clock is UTC. It is kept as "guest wall time `base_unix_secs` at
//! machine time `base_ns`", so it runs with the machine's clock, survives
//! a snapshot, and is set by the guest through the SET bit like the chip.
//! Registers 0-9 (and the century byte at 0x32) are computed on read, in
//! BCD or binary and 12- or 24-hour format as register B says (default BCD,
//! 24-hour). Register A's UIP bit is high only during the last 244 µs of
//! each second, as on the chip, so Linux's UIP polling finishes at once.
//! Register C reads 0 and register D reports valid RAM and time.
//!
//! Not modelled: periodic, alarm and update-ended interrupts (IRQ8) and
//! their flags in register C, square wave output, daylight saving. The
//! alarm registers are plain RAM. The NMI-disable bit (bit 7 of port 0x70)
//! is ignored.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;
pub const CMOS_SIZE: usize = 128;

const REG_SECONDS: usize = 0;
const REG_MINUTES: usize = 2;
const REG_HOURS: usize = 4;
const REG_WEEKDAY: usize = 6;
const REG_DAY: usize = 7;
const REG_MONTH: usize = 8;
const REG_YEAR: usize = 9;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
/// Divider bits 6:4 = 010: 32.768 kHz time base, clock running.
const A_DIVIDER_RUNNING: u8 = 0x20;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;

/// How long UIP stays high before each update.
const UIP_NS: u64 = 244_000;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RtcState {
    /// Selected register (port 0x70, low seven bits).
    pub index: u8,
    /// The 128 bytes of CMOS. The time registers hold the clock only while
    /// the SET bit is on (otherwise they are computed on read).
    pub cmos: Vec<u8>,
    /// UTC seconds since the epoch at machine time `base_ns`.
    pub base_unix_secs: i64,
    pub base_ns: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rtc {
    s: RtcState,
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).wrapping_mul(10).wrapping_add(v & 0xf)
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month 1-12, day 1-31) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Rtc {
    /// An RTC set to the host's current UTC time at machine time `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Self::with_time(secs, now_ns)
    }

    /// An RTC reading `unix_secs` (UTC) at machine time `now_ns`.
    pub fn with_time(unix_secs: i64, now_ns: u64) -> Self {
        let mut cmos = vec![0u8; CMOS_SIZE];
        cmos[REG_A] = A_DIVIDER_RUNNING | 0x06; // 1.024 kHz rate select
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        Rtc {
            s: RtcState {
                index: 0,
                cmos,
                base_unix_secs: unix_secs,
                base_ns: now_ns,
            },
        }
    }

    pub fn state(&self) -> RtcState {
        self.s.clone()
    }

    pub fn from_state(state: RtcState) -> Self {
        let mut s = state;
        s.cmos.resize(CMOS_SIZE, 0);
        s.index &= 0x7f;
        Rtc { s }
    }

    fn running(&self) -> bool {
        self.s.cmos[REG_A] & 0x70 == A_DIVIDER_RUNNING && self.s.cmos[REG_B] & B_SET == 0
    }

    /// Wall time (UTC seconds) and nanoseconds into the second at `now_ns`.
    fn now(&self, now_ns: u64) -> (i64, u64) {
        let d = now_ns.saturating_sub(self.s.base_ns);
        let secs = i64::try_from(d / 1_000_000_000).unwrap_or(i64::MAX);
        (self.s.base_unix_secs.saturating_add(secs), d % 1_000_000_000)
    }

    fn encode(&self, v: u8) -> u8 {
        if self.s.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.s.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    /// Write the clock at `unix_secs` into the time registers of `cmos`.
    fn store_time(&mut self, unix_secs: i64) {
        let days = unix_secs.div_euclid(86_400);
        let sod = unix_secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let hour = (sod / 3600) as u8;
        let hours = if self.s.cmos[REG_B] & B_24H != 0 {
            self.encode(hour)
        } else {
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
        };
        let fields = [
            (REG_SECONDS, self.encode((sod % 60) as u8)),
            (REG_MINUTES, self.encode((sod / 60 % 60) as u8)),
            (REG_HOURS, hours),
            // 1 = Sunday; 1970-01-01 was a Thursday.
            (REG_WEEKDAY, self.encode(((days + 4).rem_euclid(7) + 1) as u8)),
            (REG_DAY, self.encode(day)),
            (REG_MONTH, self.encode(month)),
            (REG_YEAR, self.encode(year.rem_euclid(100) as u8)),
            (REG_CENTURY, self.encode(year.div_euclid(100).rem_euclid(100) as u8)),
        ];
        for (reg, v) in fields {
            self.s.cmos[reg] = v;
        }
    }

    /// The time the registers in `cmos` describe (invalid fields clamped).
    fn load_time(&self) -> i64 {
        let c = &self.s.cmos;
        let sec = i64::from(self.decode(c[REG_SECONDS]).min(59));
        let min = i64::from(self.decode(c[REG_MINUTES]).min(59));
        let raw_h = c[REG_HOURS];
        let hour = if c[REG_B] & B_24H != 0 {
            self.decode(raw_h).min(23)
        } else {
            let h = self.decode(raw_h & 0x7f).clamp(1, 12) % 12;
            h + if raw_h & 0x80 != 0 { 12 } else { 0 }
        };
        let day = self.decode(c[REG_DAY]).clamp(1, 31);
        let month = self.decode(c[REG_MONTH]).clamp(1, 12);
        let year = i64::from(self.decode(c[REG_YEAR]).min(99)) + 100 * i64::from(self.decode(c[REG_CENTURY]).min(99));
        days_from_civil(year, month, day) * 86_400 + i64::from(hour) * 3600 + min * 60 + sec
    }

    fn is_time_reg(reg: usize) -> bool {
        matches!(
            reg,
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY..=REG_YEAR | REG_CENTURY
        )
    }

    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        if port != DATA_PORT {
            return 0xff; // the index port is write-only
        }
        let reg = usize::from(self.s.index & 0x7f);
        match reg {
            REG_A => {
                let (_, sub) = self.now(now_ns);
                let uip = self.running() && sub >= 1_000_000_000 - UIP_NS;
                (self.s.cmos[REG_A] & 0x7f) | if uip { A_UIP } else { 0 }
            }
            REG_C => 0,
            REG_D => D_VRT,
            _ if Self::is_time_reg(reg) && self.s.cmos[REG_B] & B_SET == 0 => {
                let (secs, _) = self.now(now_ns);
                self.store_time(secs);
                self.s.cmos[reg]
            }
            _ => self.s.cmos.get(reg).copied().unwrap_or(0xff),
        }
    }

    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        if port == INDEX_PORT {
            self.s.index = value & 0x7f;
            return;
        }
        if port != DATA_PORT {
            return;
        }
        let reg = usize::from(self.s.index & 0x7f);
        match reg {
            REG_A => self.s.cmos[REG_A] = value & 0x7f,
            REG_B => {
                let old = self.s.cmos[REG_B];
                if value & B_SET != 0 && old & B_SET == 0 {
                    // Freeze the clock into the registers for the guest to edit.
                    let (secs, _) = self.now(now_ns);
                    self.store_time(secs);
                }
                // Format bits apply to what the registers hold from now on.
                let mut v = value;
                if v & B_SET != 0 {
                    v &= !B_UIE;
                }
                if old & B_SET != 0 && v & B_SET != 0 && (old ^ v) & (B_BINARY | B_24H) != 0 {
                    let t = self.load_time();
                    self.s.cmos[REG_B] = v;
                    self.store_time(t);
                }
                self.s.cmos[REG_B] = v;
                if old & B_SET != 0 && v & B_SET == 0 {
                    self.rebase(now_ns);
                }
            }
            REG_C | REG_D => {}
            _ if Self::is_time_reg(reg) => {
                if self.s.cmos[REG_B] & B_SET == 0 {
                    // Without SET, the chip updates a single field in place.
                    let (secs, _) = self.now(now_ns);
                    self.store_time(secs);
                    self.s.cmos[reg] = value;
                    self.rebase(now_ns);
                } else {
                    self.s.cmos[reg] = value;
                }
            }
            _ => {
                if let Some(b) = self.s.cmos.get_mut(reg) {
                    *b = value;
                }
            }
        }
    }

    fn rebase(&mut self, now_ns: u64) {
        self.s.base_unix_secs = self.load_time();
        self.s.base_ns = now_ns;
    }

    /// The guest's wall clock (UTC seconds) at `now_ns`.
    pub fn unix_time(&self, now_ns: u64) -> i64 {
        self.now(now_ns).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29 23:59:58 UTC, a Thursday.
    const T: i64 = 1_709_251_198;

    fn rd(r: &mut Rtc, reg: u8, now: u64) -> u8 {
        r.write(INDEX_PORT, reg, now);
        r.read(DATA_PORT, now)
    }

    fn wr(r: &mut Rtc, reg: u8, v: u8, now: u64) {
        r.write(INDEX_PORT, reg, now);
        r.write(DATA_PORT, v, now);
    }

    #[test]
    fn calendar_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(T / 86_400), (2024, 2, 29));
        for d in [-1000i64, 0, 10_956, 19_782, 47_482, 100_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn bcd_24h_default() {
        let mut r = Rtc::with_time(T, 0);
        assert_eq!(rd(&mut r, 0x0b, 0), 0x02);
        assert_eq!(rd(&mut r, 0, 0), 0x58);
        assert_eq!(rd(&mut r, 2, 0), 0x59);
        assert_eq!(rd(&mut r, 4, 0), 0x23);
        assert_eq!(rd(&mut r, 6, 0), 5); // Thursday
        assert_eq!(rd(&mut r, 7, 0), 0x29);
        assert_eq!(rd(&mut r, 8, 0), 0x02);
        assert_eq!(rd(&mut r, 9, 0), 0x24);
        assert_eq!(rd(&mut r, 0x32, 0), 0x20);
        // Time runs with the machine clock: 2 s later it is March 1st.
        let now = 2_000_000_000;
        assert_eq!(rd(&mut r, 0, now), 0x00);
        assert_eq!(rd(&mut r, 7, now), 0x01);
        assert_eq!(rd(&mut r, 8, now), 0x03);
        assert_eq!(rd(&mut r, 6, now), 6);
    }

    #[test]
    fn binary_and_12h() {
        let mut r = Rtc::with_time(T, 0);
        wr(&mut r, 0x0b, B_BINARY, 0); // binary, 12h
        assert_eq!(rd(&mut r, 0, 0), 58);
        assert_eq!(rd(&mut r, 4, 0), 0x80 | 11);
        assert_eq!(rd(&mut r, 9, 0), 24);
        let mut r = Rtc::with_time(T - 23 * 3600, 0); // 00:59:58
        wr(&mut r, 0x0b, 0, 0); // BCD, 12h
        assert_eq!(rd(&mut r, 4, 0), 0x12);
    }

    #[test]
    fn uip_only_at_end_of_second() {
        let mut r = Rtc::with_time(T, 0);
        assert_eq!(rd(&mut r, 0x0a, 0), 0x26);
        assert_eq!(rd(&mut r, 0x0a, 500_000_000) & A_UIP, 0);
        assert_eq!(rd(&mut r, 0x0a, 999_900_000) & A_UIP, A_UIP);
        assert_eq!(rd(&mut r, 0x0a, 1_000_000_000) & A_UIP, 0);
        // Read-only UIP; a stopped divider never updates.
        wr(&mut r, 0x0a, 0xff, 0);
        assert_eq!(rd(&mut r, 0x0a, 0), 0x7f);
        assert_eq!(rd(&mut r, 0x0a, 999_900_000) & A_UIP, 0);
    }

    #[test]
    fn c_d_and_ram() {
        let mut r = Rtc::with_time(T, 0);
        assert_eq!(rd(&mut r, 0x0c, 0), 0);
        assert_eq!(rd(&mut r, 0x0d, 0), 0x80);
        wr(&mut r, 0x0d, 0, 0);
        assert_eq!(rd(&mut r, 0x0d, 0), 0x80);
        wr(&mut r, 0x40, 0xab, 0);
        assert_eq!(rd(&mut r, 0x40, 0), 0xab);
        // NMI-disable bit ignored.
        r.write(INDEX_PORT, 0x80 | 0x40, 0);
        assert_eq!(r.read(DATA_PORT, 0), 0xab);
        assert_eq!(r.read(INDEX_PORT, 0), 0xff);
        assert_eq!(r.read(0x72, 0), 0xff);
    }

    #[test]
    fn guest_sets_the_clock() {
        let mut r = Rtc::with_time(T, 0);
        wr(&mut r, 0x0b, B_SET | B_24H, 0);
        // Frozen while SET.
        assert_eq!(rd(&mut r, 0, 5_000_000_000), 0x58);
        wr(&mut r, 9, 0x28, 0); // 2028 (a leap year)
        wr(&mut r, 4, 0x10, 0);
        wr(&mut r, 0x0b, B_24H, 7_000_000_000);
        assert_eq!(rd(&mut r, 9, 7_000_000_000), 0x28);
        assert_eq!(rd(&mut r, 4, 7_000_000_000), 0x10);
        assert_eq!(rd(&mut r, 7, 7_000_000_000), 0x29);
        assert_eq!(rd(&mut r, 0, 8_000_000_000), 0x59);
        // Writing one field without SET changes just that field.
        wr(&mut r, 2, 0x05, 8_000_000_000);
        assert_eq!(rd(&mut r, 2, 8_000_000_000), 0x05);
        assert_eq!(rd(&mut r, 4, 8_000_000_000), 0x10);
    }

    #[test]
    fn hostile_values_never_panic() {
        let mut r = Rtc::with_time(i64::MAX - 10, u64::MAX);
        for reg in 0..=255u8 {
            for v in [0u8, 0x7f, 0x80, 0x99, 0xff] {
                wr(&mut r, reg, v, u64::MAX);
                rd(&mut r, reg, 0);
                wr(&mut r, 0x0b, v, 0);
                rd(&mut r, reg, u64::MAX);
            }
        }
        let s = RtcState {
            index: 0xff,
            cmos: vec![],
            base_unix_secs: i64::MIN,
            base_ns: 0,
        };
        let mut r = Rtc::from_state(s);
        for reg in 0..=0x7fu8 {
            rd(&mut r, reg, u64::MAX);
        }
    }

    #[test]
    fn state_round_trip() {
        let mut r = Rtc::with_time(T, 100);
        wr(&mut r, 0x20, 7, 0);
        let s = r.state();
        let mut r2 = Rtc::from_state(s.clone());
        assert_eq!(r2.state(), s);
        assert_eq!(rd(&mut r2, 0, 100), 0x58);
        assert_eq!(r2.unix_time(3_000_000_100), T + 3);
    }
}
