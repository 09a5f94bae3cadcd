//! A cascaded pair of Intel 8259A programmable interrupt controllers, as on
//! a PC: the master at ports 0x20/0x21 (IRQ 0-7), the slave at 0xa0/0xa1
//! (IRQ 8-15) on the master's IR2, and the ELCR edge/level registers at
//! 0x4d0/0x4d1.
//!
//! Implemented: the ICW1-ICW4 init sequence (single/cascade, ICW4 optional,
//! auto-EOI, special fully nested mode), OCW1 mask, OCW2 non-specific /
//! specific / rotating EOI and priority rotation, OCW3 read IRR/ISR, poll
//! and special mask mode. Inputs are edge-triggered unless the ELCR makes
//! them level-triggered. Not modelled: 8080/8085 call mode (ICW1 bit 2 and
//! ICW2's low bits), buffered mode, and ICW1's LTIM (Linux leaves it 0).
//!
//! The INTR output ([`Pic::output`]) reaches the CPU through LINT0 of the
//! boot CPU's local APIC in ExtINT mode, or an IOAPIC pin in ExtINT mode;
//! [`Pic::acknowledge`] is the INTA cycle and returns the vector.

use serde::{Deserialize, Serialize};

pub const MASTER_CMD: u16 = 0x20;
pub const MASTER_DATA: u16 = 0x21;
pub const SLAVE_CMD: u16 = 0xa0;
pub const SLAVE_DATA: u16 = 0xa1;
pub const ELCR_MASTER: u16 = 0x4d0;
pub const ELCR_SLAVE: u16 = 0x4d1;

/// IRQs that can never be level-triggered: 0, 1, 2 on the master, 8 and 13
/// on the slave.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// One 8259A.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PicChipState {
    pub irr: u8,
    pub isr: u8,
    pub imr: u8,
    /// Input line levels, for edge detection.
    pub lines: u8,
    /// ICW2: vector of IR0 (low three bits zero).
    pub vector_base: u8,
    /// Which register of the init sequence comes next on the data port:
    /// 0 = none (OCW1), 2 = ICW2, 3 = ICW3, 4 = ICW4.
    pub init_step: u8,
    pub needs_icw4: bool,
    pub single: bool,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested: bool,
    pub special_mask: bool,
    /// OCW3 RR/RIS: reads of the command port return ISR instead of IRR.
    pub read_isr: bool,
    /// OCW3 poll command: the next command port read is a poll.
    pub poll: bool,
    /// The IR with the highest priority (rotated by the rotate commands).
    pub priority_base: u8,
    /// Edge/level control register (1 = level).
    pub elcr: u8,
}

/// Both chips.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PicState {
    pub master: PicChipState,
    pub slave: PicChipState,
}

impl PicChipState {
    /// Priority rank (0 = highest) of the highest set bit in `mask`, or 8.
    fn priority(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_base) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IR this chip would signal now, if any.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let req = self.priority(self.irr & !self.imr);
        if req == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            // The slave may interrupt while one of its IRQs is in service.
            in_service &= !(1 << 2);
        }
        if req < self.priority(in_service) {
            Some((req + self.priority_base) & 7)
        } else {
            None
        }
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let m = 1u8 << (irq & 7);
        if self.elcr & m != 0 {
            if level {
                self.irr |= m;
            } else {
                self.irr &= !m;
            }
        } else if level && self.lines & m == 0 {
            self.irr |= m;
        }
        if level {
            self.lines |= m;
        } else {
            self.lines &= !m;
        }
    }

    /// INTA for `irq`.
    fn ack(&mut self, irq: u8) {
        let m = 1u8 << (irq & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_base = (irq + 1) & 7;
            }
        } else {
            self.isr |= m;
        }
        if self.elcr & m == 0 {
            self.irr &= !m;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: reset everything but the ELCR and the input lines.
            *self = PicChipState {
                elcr: self.elcr,
                lines: self.lines,
                irr: self.irr & self.elcr & self.lines,
                init_step: 2,
                needs_icw4: v & 1 != 0,
                single: v & 2 != 0,
                ..Default::default()
            };
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 1 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2.
            let irq = v & 7;
            match v >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                1 | 5 => {
                    let p = self.priority(self.isr);
                    if p != 8 {
                        let irq = (p + self.priority_base) & 7;
                        self.isr &= !(1 << irq);
                        if v >> 5 == 5 {
                            self.priority_base = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << irq),
                7 => {
                    self.isr &= !(1 << irq);
                    self.priority_base = (irq + 1) & 7;
                }
                6 => self.priority_base = (irq + 1) & 7,
                _ => {} // 2: no operation
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_step {
            2 => {
                self.vector_base = v & 0xf8;
                self.init_step = if !self.single {
                    3
                } else if self.needs_icw4 {
                    4
                } else {
                    0
                };
            }
            3 => self.init_step = if self.needs_icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.special_fully_nested = v & 0x10 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Pic {
    s: PicState,
}

impl Pic {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> PicState {
        self.s.clone()
    }

    pub fn from_state(state: PicState) -> Self {
        Pic { s: state }
    }

    /// Propagate the slave's INT output to the master's IR2.
    fn cascade(&mut self) {
        let slave_int = self.s.slave.pending(false).is_some();
        self.s.master.set_line(2, slave_int);
    }

    /// Set ISA line `irq` (0-15) to `level`. Other numbers are ignored.
    pub fn set_irq(&mut self, irq: u32, level: bool) {
        match irq {
            0..=7 => self.s.master.set_line(irq as u8, level),
            8..=15 => self.s.slave.set_line((irq - 8) as u8, level),
            _ => return,
        }
        self.cascade();
    }

    /// The INTR output to the CPU.
    pub fn output(&self) -> bool {
        self.s.master.pending(true).is_some()
    }

    /// INTA cycle: the vector of the highest-priority request, moving it
    /// to in-service. With nothing pending the answer is the spurious IRQ7
    /// (or IRQ15) vector, as on real hardware.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.s.master.pending(true) {
            Some(2) if !self.s.master.single => {
                self.s.master.ack(2);
                match self.s.slave.pending(false) {
                    Some(irq) => {
                        self.s.slave.ack(irq);
                        self.s.slave.vector_base | irq
                    }
                    None => self.s.slave.vector_base | 7,
                }
            }
            Some(irq) => {
                self.s.master.ack(irq);
                self.s.master.vector_base | irq
            }
            None => self.s.master.vector_base | 7,
        };
        self.cascade();
        vector
    }

    fn poll(&mut self, slave: bool) -> u8 {
        let chip = if slave { &mut self.s.slave } else { &mut self.s.master };
        chip.poll = false;
        let r = match chip.pending(!slave) {
            Some(irq) => {
                chip.ack(irq);
                0x80 | irq
            }
            None => 0,
        };
        self.cascade();
        r
    }

    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            MASTER_CMD | SLAVE_CMD => {
                let slave = port == SLAVE_CMD;
                let chip = if slave { &self.s.slave } else { &self.s.master };
                if chip.poll {
                    self.poll(slave)
                } else if chip.read_isr {
                    chip.isr
                } else {
                    chip.irr
                }
            }
            MASTER_DATA | SLAVE_DATA => {
                let chip = if port == SLAVE_DATA {
                    &self.s.slave
                } else {
                    &self.s.master
                };
                if chip.poll {
                    self.poll(port == SLAVE_DATA)
                } else {
                    chip.imr
                }
            }
            ELCR_MASTER => self.s.master.elcr,
            ELCR_SLAVE => self.s.slave.elcr,
            _ => 0xff,
        }
    }

    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => self.s.master.write_command(value),
            MASTER_DATA => self.s.master.write_data(value),
            SLAVE_CMD => self.s.slave.write_command(value),
            SLAVE_DATA => self.s.slave.write_data(value),
            ELCR_MASTER => self.s.master.elcr = value & ELCR_MASK[0],
            ELCR_SLAVE => self.s.slave.elcr = value & ELCR_MASK[1],
            _ => return,
        }
        self.cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A: vectors 0x30/0x38, cascade on IR2, normal EOI.
    fn linux_init() -> Pic {
        let mut p = Pic::new();
        p.write(MASTER_DATA, 0xff);
        p.write(SLAVE_DATA, 0xff);
        p.write(MASTER_CMD, 0x11);
        p.write(MASTER_DATA, 0x30);
        p.write(MASTER_DATA, 0x04);
        p.write(MASTER_DATA, 0x01);
        p.write(SLAVE_CMD, 0x11);
        p.write(SLAVE_DATA, 0x38);
        p.write(SLAVE_DATA, 0x02);
        p.write(SLAVE_DATA, 0x01);
        p.write(MASTER_DATA, 0xfb);
        p.write(SLAVE_DATA, 0xff);
        p
    }

    #[test]
    fn init_sequence_and_masks() {
        let mut p = linux_init();
        assert_eq!(p.read(MASTER_DATA), 0xfb);
        assert_eq!(p.read(SLAVE_DATA), 0xff);
        assert_eq!(p.s.master.vector_base, 0x30);
        assert_eq!(p.s.slave.vector_base, 0x38);
        assert_eq!(p.s.master.init_step, 0);
        p.set_irq(0, true);
        assert!(!p.output());
        p.set_irq(0, false);
        // Edge lost? No: IRR latched it; unmasking delivers it.
        p.write(MASTER_DATA, 0xfa);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x30);
        assert!(!p.output());
        assert_eq!(p.s.master.isr, 1);
    }

    #[test]
    fn edge_and_eoi() {
        let mut p = linux_init();
        p.write(MASTER_DATA, 0x00);
        p.set_irq(3, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x31);
        // IRQ3 is lower priority than IRQ1 in service.
        assert!(!p.output());
        // Holding the line high makes no new edge.
        p.set_irq(1, true);
        p.write(MASTER_CMD, 0x20); // non-specific EOI
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x33);
        p.write(MASTER_CMD, 0x63); // specific EOI IRQ3
        assert_eq!(p.s.master.isr, 0);
        assert!(!p.output());
        p.set_irq(1, false);
        p.set_irq(1, true);
        assert!(p.output());
    }

    #[test]
    fn cascade_through_ir2() {
        let mut p = linux_init();
        p.write(SLAVE_DATA, 0xfe); // unmask IRQ8
        p.set_irq(8, true);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x38);
        assert_eq!(p.s.slave.isr, 1);
        assert_eq!(p.s.master.isr, 4);
        p.write(SLAVE_CMD, 0x20);
        p.write(MASTER_CMD, 0x20);
        assert_eq!(p.s.master.isr, 0);
        assert!(!p.output());
        // A second slave IRQ after EOI arrives again.
        p.set_irq(8, false);
        p.set_irq(8, true);
        assert_eq!(p.acknowledge(), 0x38);
    }

    #[test]
    fn read_irr_isr_and_poll() {
        let mut p = linux_init();
        p.set_irq(5, true);
        assert_eq!(p.read(MASTER_CMD), 0x20); // IRR by default
        p.write(MASTER_CMD, 0x0b); // read ISR
        assert_eq!(p.read(MASTER_CMD), 0);
        p.write(MASTER_CMD, 0x0a); // read IRR
        assert_eq!(p.read(MASTER_CMD), 0x20);
        p.write(MASTER_DATA, 0xdb);
        p.write(MASTER_CMD, 0x0c); // poll
        assert_eq!(p.read(MASTER_CMD), 0x85);
        assert_eq!(p.s.master.isr, 0x20);
        p.write(MASTER_CMD, 0x0c);
        assert_eq!(p.read(MASTER_CMD), 0);
    }

    #[test]
    fn spurious_and_auto_eoi() {
        let mut p = Pic::new();
        p.write(MASTER_CMD, 0x13); // single, ICW4
        p.write(MASTER_DATA, 0x08);
        p.write(MASTER_DATA, 0x03); // AEOI
        p.write(MASTER_DATA, 0x00);
        assert_eq!(p.acknowledge(), 0x0f);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x0c);
        assert_eq!(p.s.master.isr, 0);
    }

    #[test]
    fn rotation() {
        let mut p = linux_init();
        p.write(MASTER_DATA, 0);
        p.write(MASTER_CMD, 0xc4); // set priority: IRQ5 highest
        p.set_irq(3, true);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), 0x36);
        p.write(MASTER_CMD, 0xa0); // rotate on non-specific EOI
        assert_eq!(p.s.master.priority_base, 7);
        assert_eq!(p.acknowledge(), 0x33);
    }

    #[test]
    fn elcr_level() {
        let mut p = linux_init();
        p.write(ELCR_MASTER, 0xff);
        assert_eq!(p.read(ELCR_MASTER), 0xf8);
        p.write(ELCR_SLAVE, 0xff);
        assert_eq!(p.read(ELCR_SLAVE), 0xde);
        p.write(MASTER_DATA, 0);
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x35);
        p.write(MASTER_CMD, 0x20);
        // Still asserted: requested again.
        assert!(p.output());
        p.set_irq(5, false);
        assert!(!p.output());
    }

    #[test]
    fn hostile_ports_and_irqs() {
        let mut p = Pic::new();
        for v in 0..=255u8 {
            for port in [
                MASTER_CMD,
                MASTER_DATA,
                SLAVE_CMD,
                SLAVE_DATA,
                ELCR_MASTER,
                ELCR_SLAVE,
                0x22,
            ] {
                p.write(port, v);
                p.read(port);
            }
            p.set_irq(u32::from(v), true);
            p.acknowledge();
        }
    }

    #[test]
    fn state_round_trip() {
        let mut p = linux_init();
        p.set_irq(1, true);
        let s = p.state();
        assert_eq!(Pic::from_state(s.clone()), p);
    }
}
