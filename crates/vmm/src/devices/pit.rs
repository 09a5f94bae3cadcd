//! Intel 8254 programmable interval timer at ports 0x40-0x43, plus the bits
//! of the PC's system control port B (0x61) that belong to it.
//!
//! Counters run at [`PIT_HZ`]. Nothing ticks in the background: a counter
//! remembers when it was loaded, and its count and OUT pin are computed
//! from the time passed in (`now_ns`, the machine's monotonic clock). The
//! machine calls [`Pit::tick`] when [`Pit::next_irq_ns`] has passed; a
//! `true` answer is a rising edge of channel 0's OUT, i.e. an IRQ0 edge.
//!
//! Modes 0-5 are modelled (count and OUT). The gate input matters for
//! channel 2 only (channels 0 and 1 are wired high): a rising edge starts
//! modes 1 and 5 and restarts modes 2 and 3, and a low gate holds OUT high
//! in modes 2 and 3. Not modelled: a low gate pausing the count in modes
//! 0, 2, 3 and 4; a new count in modes 2/3 waiting for the end of the
//! current period (it restarts the counter at once); BCD counting (the BCD
//! bit is stored and reported, but counting is binary).
//!
//! Port 0x61: bit 0 gate of channel 2, bit 1 speaker data enable (stored),
//! bits 2-3 stored, bit 4 the DRAM refresh toggle (flips every 15.085 µs,
//! from the clock), bit 5 OUT of channel 2. Linux's TSC calibration polls
//! bit 5 and reads channel 2's count; both follow the clock.

use serde::{Deserialize, Serialize};

/// Input clock of the counters.
pub const PIT_HZ: u64 = 1_193_182;
pub const PIT_PORT_FIRST: u16 = 0x40;
pub const PIT_PORT_LAST: u16 = 0x43;
pub const PORT_B: u16 = 0x61;

const ACCESS_LATCH: u8 = 0;
const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;

/// Half period of the refresh toggle in port 0x61 bit 4.
const REFRESH_HALF_NS: u64 = 15_085;

/// One counter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PitChannelState {
    /// 0-5.
    pub mode: u8,
    /// 1 = LSB only, 2 = MSB only, 3 = LSB then MSB.
    pub access: u8,
    pub bcd: bool,
    /// The count in use (1..=0x10000; a written 0 means 0x10000).
    pub reload: u32,
    /// When counting started (count loaded, or gate trigger).
    pub load_ns: u64,
    /// A count has been written since the last control word.
    pub loaded: bool,
    /// Modes 1 and 5: a gate rising edge has started the count.
    pub triggered: bool,
    pub gate: bool,
    /// Read flip-flop for LSB-then-MSB: the MSB is next.
    pub read_msb: bool,
    /// Write flip-flop for LSB-then-MSB: the MSB is next.
    pub write_msb: bool,
    /// The LSB written while waiting for the MSB.
    pub write_lsb: u8,
    pub latched_count: Option<u16>,
    pub latched_status: Option<u8>,
    /// When OUT next rises (used for channel 0's IRQ).
    pub next_edge_ns: Option<u64>,
}

impl PitChannelState {
    fn new(gate: bool) -> Self {
        PitChannelState {
            mode: 0,
            access: ACCESS_LOHI,
            bcd: false,
            reload: 0x10000,
            load_ns: 0,
            loaded: false,
            triggered: false,
            gate,
            read_msb: false,
            write_msb: false,
            write_lsb: 0,
            latched_count: None,
            latched_status: None,
            next_edge_ns: None,
        }
    }

    fn running(&self) -> bool {
        self.loaded && (!matches!(self.mode, 1 | 5) || self.triggered)
    }

    /// Input clocks since counting started.
    fn ticks(&self, now_ns: u64) -> u64 {
        let d = u128::from(now_ns.saturating_sub(self.load_ns)) * u128::from(PIT_HZ) / 1_000_000_000;
        u64::try_from(d).unwrap_or(u64::MAX)
    }

    /// The time at which `ticks` input clocks have passed.
    fn tick_ns(&self, ticks: u64) -> u64 {
        let ns = (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PIT_HZ));
        self.load_ns.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn count(&self, now_ns: u64) -> u16 {
        if !self.running() {
            return self.reload as u16;
        }
        let d = self.ticks(now_ns);
        let r = u64::from(self.reload.max(1));
        let c = match self.mode {
            2 => r - d % r,
            3 => r - (d.wrapping_mul(2)) % r,
            _ => r.wrapping_sub(d),
        };
        c as u16
    }

    fn out(&self, now_ns: u64) -> bool {
        if matches!(self.mode, 2 | 3) && !self.gate {
            return true;
        }
        if !self.loaded {
            return self.mode != 0;
        }
        if !self.running() {
            return true; // modes 1 and 5 waiting for a trigger
        }
        let d = self.ticks(now_ns);
        let r = u64::from(self.reload.max(1));
        match self.mode {
            0 => d >= r,
            1 => d >= r,
            2 => d % r != r - 1 || r == 1,
            3 => d % r < r.div_ceil(2),
            _ => d != r, // 4, 5: one clock low at terminal count
        }
    }

    /// The time of OUT's next rising edge after `now_ns`.
    fn next_edge(&self, now_ns: u64) -> Option<u64> {
        if !self.running() {
            return None;
        }
        let d = self.ticks(now_ns);
        let r = u64::from(self.reload.max(1));
        let t = match self.mode {
            0 | 1 => (d < r).then_some(r)?,
            2 | 3 => (d / r).saturating_add(1).saturating_mul(r),
            _ => (d < r + 1).then_some(r + 1)?,
        };
        Some(self.tick_ns(t))
    }

    fn status(&self, now_ns: u64) -> u8 {
        (u8::from(self.out(now_ns)) << 7)
            | (u8::from(!self.loaded) << 6)
            | (self.access << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.count(now_ns));
        }
    }

    fn control(&mut self, access: u8, mode: u8, bcd: bool, now_ns: u64) {
        self.access = access;
        // Modes 6 and 7 are aliases of 2 and 3.
        self.mode = if mode > 5 { mode - 4 } else { mode };
        self.bcd = bcd;
        self.loaded = false;
        self.triggered = false;
        self.read_msb = false;
        self.write_msb = false;
        self.latched_count = None;
        self.latched_status = None;
        self.next_edge_ns = self.next_edge(now_ns);
    }

    fn load(&mut self, value: u16, now_ns: u64) {
        self.reload = if value == 0 { 0x10000 } else { u32::from(value) };
        self.load_ns = now_ns;
        self.loaded = true;
        self.next_edge_ns = self.next_edge(now_ns);
    }

    fn write(&mut self, v: u8, now_ns: u64) {
        match self.access {
            ACCESS_LO => self.load(u16::from(v), now_ns),
            ACCESS_HI => self.load(u16::from(v) << 8, now_ns),
            _ => {
                if self.write_msb {
                    self.write_msb = false;
                    self.load(u16::from(self.write_lsb) | (u16::from(v) << 8), now_ns);
                } else {
                    self.write_msb = true;
                    self.write_lsb = v;
                }
            }
        }
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        let (value, latched) = match self.latched_count {
            Some(c) => (c, true),
            None => (self.count(now_ns), false),
        };
        let (byte, done) = match self.access {
            ACCESS_LO => (value as u8, true),
            ACCESS_HI => ((value >> 8) as u8, true),
            _ => {
                self.read_msb = !self.read_msb;
                if self.read_msb {
                    (value as u8, false)
                } else {
                    ((value >> 8) as u8, true)
                }
            }
        };
        if latched && done {
            self.latched_count = None;
        }
        byte
    }

    /// Recompute when OUT next rises, at `now_ns`: for a state built from
    /// another PIT model's (KVM's, in a snapshot across engines).
    pub fn refresh_next_edge(&mut self, now_ns: u64) {
        self.next_edge_ns = self.next_edge(now_ns);
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        let rising = gate && !self.gate;
        self.gate = gate;
        if rising && self.loaded && matches!(self.mode, 1 | 2 | 3 | 5) {
            self.triggered = true;
            self.load_ns = now_ns;
        }
        self.next_edge_ns = self.next_edge(now_ns);
    }
}

/// Saved state of the PIT and port 0x61.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bits 0-3 as last written.
    pub port_b: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pit {
    s: PitState,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    pub fn new() -> Self {
        Pit {
            s: PitState {
                channels: [
                    PitChannelState::new(true),
                    PitChannelState::new(true),
                    PitChannelState::new(false),
                ],
                port_b: 0,
            },
        }
    }

    pub fn state(&self) -> PitState {
        self.s.clone()
    }

    pub fn from_state(state: PitState) -> Self {
        Pit { s: state }
    }

    /// Read one of 0x40-0x43 or 0x61.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            0x40..=0x42 => self.s.channels[usize::from(port - 0x40)].read(now_ns),
            PORT_B => {
                let ch2 = &self.s.channels[2];
                let refresh = (now_ns / REFRESH_HALF_NS) & 1 == 1;
                (self.s.port_b & 0x0f) | (u8::from(refresh) << 4) | (u8::from(ch2.out(now_ns)) << 5)
            }
            _ => 0xff, // 0x43 is write-only
        }
    }

    /// Write one of 0x40-0x43 or 0x61.
    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            0x40..=0x42 => self.s.channels[usize::from(port - 0x40)].write(value, now_ns),
            0x43 => self.control_word(value, now_ns),
            PORT_B => {
                self.s.port_b = value & 0x0f;
                self.s.channels[2].set_gate(value & 1 != 0, now_ns);
            }
            _ => {}
        }
    }

    fn control_word(&mut self, v: u8, now_ns: u64) {
        let sc = v >> 6;
        let access = (v >> 4) & 3;
        if sc == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear statuses.
            for (i, ch) in self.s.channels.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                if v & 0x10 == 0 && ch.latched_status.is_none() {
                    ch.latched_status = Some(ch.status(now_ns));
                }
                if v & 0x20 == 0 {
                    ch.latch_count(now_ns);
                }
            }
            return;
        }
        let ch = &mut self.s.channels[usize::from(sc)];
        if access == ACCESS_LATCH {
            ch.latch_count(now_ns);
        } else {
            ch.control(access, (v >> 1) & 7, v & 1 != 0, now_ns);
        }
    }

    /// When channel 0's OUT next rises (an IRQ0 edge), if it will.
    pub fn next_irq_ns(&self) -> Option<u64> {
        self.s.channels[0].next_edge_ns
    }

    /// Advance to `now_ns`: `true` if channel 0's OUT rose since the last
    /// call (one edge per call, however many periods were missed).
    pub fn tick(&mut self, now_ns: u64) -> bool {
        self.tick_count(now_ns) > 0
    }

    /// Advance to `now_ns`: how many times channel 0's OUT rose since the
    /// last call (more than one when the caller was late: a vCPU thread
    /// that waited for a host core).
    pub fn tick_count(&mut self, now_ns: u64) -> u64 {
        let ch = &mut self.s.channels[0];
        match ch.next_edge_ns {
            Some(t) if t <= now_ns => {
                let r = u64::from(ch.reload.max(1));
                let edges = match ch.mode {
                    // Periodic: one edge every `r` input clocks.
                    2 | 3 => (ch.ticks(now_ns) / r).saturating_sub(ch.ticks(t) / r) + 1,
                    _ => 1,
                };
                ch.next_edge_ns = ch.next_edge(now_ns);
                edges
            }
            _ => 0,
        }
    }

    /// Channel 2's OUT (port 0x61 bit 5).
    pub fn out2(&self, now_ns: u64) -> bool {
        self.s.channels[2].out(now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS_PER_TICK: f64 = 1e9 / PIT_HZ as f64;

    fn at(ticks: u64) -> u64 {
        (ticks as f64 * NS_PER_TICK).ceil() as u64
    }

    #[test]
    fn channel0_periodic_mode2_irqs() {
        let mut p = Pit::new();
        assert_eq!(p.next_irq_ns(), None);
        // Linux: 0x34 = channel 0, lo/hi, mode 2; LATCH for HZ=1000 is 1193.
        p.write(0x43, 0x34, 0);
        p.write(0x40, (1193u16 & 0xff) as u8, 0);
        assert_eq!(p.next_irq_ns(), None);
        p.write(0x40, (1193u16 >> 8) as u8, 0);
        let first = p.next_irq_ns().unwrap();
        assert!((999_000..=1_000_000).contains(&first), "{first}");
        assert!(!p.tick(first - 1));
        assert!(p.tick(first));
        let second = p.next_irq_ns().unwrap();
        assert!(second > first && second - first <= 1_000_000);
        // Missed periods collapse into one edge.
        assert!(p.tick(10_500_000));
        assert!(!p.tick(10_500_000));
        assert!(p.next_irq_ns().unwrap() > 10_500_000);
        assert!(p.next_irq_ns().unwrap() <= 11_000_000);
    }

    #[test]
    fn mode0_and_mode4_oneshot() {
        let mut p = Pit::new();
        p.write(0x43, 0x30, 100); // mode 0
        p.write(0x40, 100, 100);
        p.write(0x40, 0, 100);
        let t = p.next_irq_ns().unwrap();
        assert_eq!(t, 100 + at(100));
        assert!(p.tick(t));
        assert_eq!(p.next_irq_ns(), None);
        assert!(!p.tick(u64::MAX));
        p.write(0x43, 0x38, 0); // mode 4
        p.write(0x40, 10, 0);
        p.write(0x40, 0, 0);
        assert_eq!(p.next_irq_ns(), Some(at(11)));
    }

    #[test]
    fn counting_and_latch() {
        let mut p = Pit::new();
        p.write(0x43, 0x34, 0);
        p.write(0x40, 0x00, 0);
        p.write(0x40, 0x10, 0); // 0x1000
        let t = at(0x100);
        // Latch, then time passes: latched value is read.
        p.write(0x43, 0x00, t);
        let lo = p.read(0x40, t + 50_000);
        let hi = p.read(0x40, t + 50_000);
        assert_eq!(u16::from_le_bytes([lo, hi]), 0x0f00);
        // Live read: LSB then MSB of the current count.
        let t2 = at(0x200);
        p.read(0x40, t2);
        assert_eq!(p.read(0x40, t2), 0x0e);
        // A second latch while one is pending is ignored.
        p.write(0x43, 0x00, at(0x300));
        p.write(0x43, 0x00, at(0x400));
        p.read(0x40, 0);
        assert_eq!(p.read(0x40, 0), 0x0d);
    }

    #[test]
    fn access_modes() {
        let mut p = Pit::new();
        p.write(0x43, 0x50, 0); // channel 1, LSB only, mode 0
        p.write(0x41, 0x80, 0);
        assert_eq!(p.read(0x41, 0), 0x80);
        assert_eq!(p.read(0x41, at(0x10)), 0x70);
        p.write(0x43, 0x60, 0); // MSB only
        p.write(0x41, 0x02, 0);
        assert_eq!(p.read(0x41, at(0x10)), 0x01);
        assert_eq!(p.s.channels[1].reload, 0x200);
    }

    #[test]
    fn readback_status_and_count() {
        let mut p = Pit::new();
        p.write(0x43, 0xb0, 0); // channel 2, lo/hi, mode 0
                                // Status: OUT low, null count, access 3, mode 0.
        p.write(0x43, 0xe8, 0); // read-back status of channel 2
        assert_eq!(p.read(0x42, 0), 0x70);
        p.write(PORT_B, 1, 0);
        p.write(0x42, 0x10, 0);
        p.write(0x42, 0x00, 0);
        // Read-back both: status first, then the count.
        p.write(0x43, 0xc8, at(4));
        assert_eq!(p.read(0x42, at(8)), 0x30);
        assert_eq!(p.read(0x42, at(8)), 0x0c);
        assert_eq!(p.read(0x42, at(8)), 0x00);
        // After terminal count, OUT is high in the status.
        p.write(0x43, 0xe8, at(0x20));
        assert_eq!(p.read(0x42, at(0x20)), 0xb0);
    }

    /// What Linux's pit_calibrate_tsc and quick_pit_calibrate do.
    #[test]
    fn tsc_calibration_through_port_61() {
        let mut p = Pit::new();
        let v = p.read(PORT_B, 0);
        p.write(PORT_B, (v & !0x02) | 0x01, 0);
        p.write(0x43, 0xb0, 0);
        let latch = (PIT_HZ / 20) as u16; // 50 ms
        p.write(0x42, latch as u8, 0);
        p.write(0x42, (latch >> 8) as u8, 0);
        assert_eq!(p.read(PORT_B, 0) & 0x20, 0);
        assert_eq!(p.read(PORT_B, 49_000_000) & 0x20, 0);
        assert_eq!(p.read(PORT_B, 50_001_000) & 0x20, 0x20);
        // quick_pit_calibrate: start at 0xffff and watch the MSB fall.
        p.write(0x43, 0xb0, 0);
        p.write(0x42, 0xff, 0);
        p.write(0x42, 0xff, 0);
        for i in 0..200u64 {
            let t = at(256 * i + 128);
            p.read(0x42, t);
            assert_eq!(p.read(0x42, t), 0xff - i as u8);
        }
    }

    #[test]
    fn port_b_bits_and_gate() {
        let mut p = Pit::new();
        p.write(PORT_B, 0xff, 0);
        assert_eq!(p.read(PORT_B, 0) & 0x0f, 0x0f);
        assert_eq!(p.read(PORT_B, 0) & 0xc0, 0);
        let r1 = p.read(PORT_B, 0) & 0x10;
        let r2 = p.read(PORT_B, REFRESH_HALF_NS) & 0x10;
        assert_ne!(r1, r2);
        // Mode 2/3 with gate low: OUT high; a rising gate restarts.
        p.write(PORT_B, 0, 0);
        p.write(0x43, 0xb6, 0); // channel 2, lo/hi, mode 3
        p.write(0x42, 100, 0);
        p.write(0x42, 0, 0);
        assert!(p.out2(at(75)));
        p.write(PORT_B, 1, at(1000));
        assert!(p.out2(at(1000) + 1));
        assert!(!p.out2(at(1000) + at(60)));
        // Mode 1 waits for a trigger.
        p.write(PORT_B, 0, 0);
        p.write(0x43, 0xb2, 0);
        p.write(0x42, 10, 0);
        p.write(0x42, 0, 0);
        assert!(p.out2(at(100)));
        p.write(PORT_B, 1, at(100));
        assert!(!p.out2(at(105)));
        assert!(p.out2(at(111)));
    }

    #[test]
    fn mode3_square_wave() {
        let mut p = Pit::new();
        p.write(0x43, 0x36, 0);
        p.write(0x40, 10, 0);
        p.write(0x40, 0, 0);
        assert!(p.s.channels[0].out(at(4)));
        assert!(!p.s.channels[0].out(at(5)));
        assert!(p.s.channels[0].out(at(10)));
        assert_eq!(p.next_irq_ns(), Some(at(10)));
        // Count decrements by two.
        assert_eq!(p.s.channels[0].count(at(2)), 6);
    }

    #[test]
    fn hostile_writes() {
        let mut p = Pit::new();
        for v in 0..=255u8 {
            for port in 0x40..=0x43u16 {
                p.write(port, v, u64::from(v) * 1000);
                p.read(port, u64::MAX - u64::from(v));
            }
            p.write(PORT_B, v, 0);
            p.tick(u64::MAX);
        }
        // Mode aliases: 6 -> 2, 7 -> 3.
        p.write(0x43, 0x3c, 0);
        assert_eq!(p.s.channels[0].mode, 2);
        p.write(0x43, 0x3e, 0);
        assert_eq!(p.s.channels[0].mode, 3);
    }

    #[test]
    fn state_round_trip() {
        let mut p = Pit::new();
        p.write(0x43, 0x34, 0);
        p.write(0x40, 0x9c, 0);
        p.write(0x40, 0x2e, 0);
        let s = p.state();
        let mut q = Pit::from_state(s.clone());
        assert_eq!(q, p);
        assert_eq!(q.tick(20_000_000), p.tick(20_000_000));
    }
}
