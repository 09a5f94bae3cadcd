//! I/O APIC (Intel 82093AA datasheet), 24 pins, at `IOAPIC_BASE`.
//!
//! Register access is indirect: the guest writes a register index to
//! IOREGSEL (offset 0x00) and reads or writes it through IOWIN (0x10).
//! A pin's input is the *asserted* state of its line as the device sees it:
//! the polarity bit is stored and read back but not applied, since every
//! line we model is active-high (ISA, virtio-mmio), as under KVM.
//!
//! Deliveries are returned as [`InterruptMessage`]s for the router to send
//! to the local APICs. Level-triggered pins set Remote IRR on delivery; an
//! EOI for their vector (broadcast by a local APIC, or written to the EOI
//! register at 0x40) clears it and re-delivers if the line is still
//! asserted. Edges on masked pins are lost, as the datasheet says.

use serde::{Deserialize, Serialize};

use super::lapic::{DeliveryMode, Destination, InterruptMessage};

pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window we claim.
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const NUM_PINS: usize = 24;
/// Version 0x11, maximum redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI_REG: u64 = 0x40;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDIR_FIRST: u32 = 0x10;

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LOGICAL: u64 = 1 << 11;
/// Vector, delivery mode, destination mode, polarity, trigger, mask,
/// destination (bits 56-63).
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// Saved state of the IOAPIC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IoapicState {
    /// ID register (id in bits 27:24).
    pub id: u32,
    pub ioregsel: u32,
    pub redirtbl: [u64; NUM_PINS],
    /// Asserted input lines, one bit per pin.
    pub lines: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ioapic {
    s: IoapicState,
}

impl Ioapic {
    /// A reset IOAPIC with this APIC id (all pins masked). The ID register
    /// holds 8 bits (31:24, as Linux reads it and later IOAPICs have) rather
    /// than the 82093AA's 4, so the MP table's id N fits with N >= 16 CPUs.
    pub fn new(id: u8) -> Self {
        Ioapic {
            s: IoapicState {
                id: u32::from(id) << 24,
                ioregsel: 0,
                redirtbl: [RTE_MASKED; NUM_PINS],
                lines: 0,
            },
        }
    }

    pub fn state(&self) -> IoapicState {
        self.s.clone()
    }

    pub fn from_state(state: IoapicState) -> Self {
        Ioapic { s: state }
    }

    /// The redirection entry of `pin` (for tests and debugging).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.s.redirtbl.get(pin).copied()
    }

    fn message(entry: u64) -> InterruptMessage {
        let dest = (entry >> 56) as u32;
        InterruptMessage {
            dest: if entry & RTE_LOGICAL != 0 {
                Destination::Logical(dest)
            } else {
                Destination::Physical(dest)
            },
            mode: DeliveryMode::from_bits((entry >> 8) as u32),
            vector: entry as u8,
            level: entry & RTE_LEVEL != 0,
        }
    }

    /// Deliver `pin` if its line is active and the entry allows it.
    fn service(&mut self, pin: usize) -> Option<InterruptMessage> {
        let entry = *self.s.redirtbl.get(pin)?;
        if entry & RTE_MASKED != 0 || self.s.lines & (1 << pin) == 0 {
            return None;
        }
        if entry & RTE_LEVEL != 0 {
            if entry & RTE_REMOTE_IRR != 0 {
                return None;
            }
            self.s.redirtbl[pin] |= RTE_REMOTE_IRR;
        }
        Some(Self::message(entry))
    }

    /// Set the input line of `pin` (`true` = asserted). Returns the
    /// interrupt to deliver, if any: on a rising edge for edge-triggered
    /// pins, whenever asserted without Remote IRR for level-triggered ones.
    pub fn set_irq(&mut self, pin: usize, asserted: bool) -> Option<InterruptMessage> {
        if pin >= NUM_PINS {
            return None;
        }
        let bit = 1u32 << pin;
        let was = self.s.lines & bit != 0;
        if asserted {
            self.s.lines |= bit;
        } else {
            self.s.lines &= !bit;
            return None;
        }
        let entry = self.s.redirtbl[pin];
        if entry & RTE_LEVEL == 0 && was {
            return None; // no edge
        }
        self.service(pin)
    }

    /// A local APIC broadcast an EOI for `vector`: clear Remote IRR of the
    /// level-triggered pins with that vector, and re-deliver those whose
    /// line is still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<InterruptMessage> {
        let mut out = Vec::new();
        for pin in 0..NUM_PINS {
            let e = self.s.redirtbl[pin];
            if e & RTE_LEVEL != 0 && e & RTE_REMOTE_IRR != 0 && e as u8 == vector {
                self.s.redirtbl[pin] &= !RTE_REMOTE_IRR;
                out.extend(self.service(pin));
            }
        }
        out
    }

    fn read_reg(&self, index: u32) -> u32 {
        match index {
            REG_ID => self.s.id,
            REG_VERSION => IOAPIC_VERSION,
            REG_ARB => self.s.id, // arbitration id = APIC id after reset
            REG_REDIR_FIRST..=0x3f => {
                let pin = ((index - REG_REDIR_FIRST) / 2) as usize;
                let e = self.s.redirtbl[pin];
                if index & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, index: u32, value: u32) -> Option<InterruptMessage> {
        match index {
            REG_ID => self.s.id = value & 0xff00_0000,
            REG_REDIR_FIRST..=0x3f => {
                let pin = ((index - REG_REDIR_FIRST) / 2) as usize;
                let old = self.s.redirtbl[pin];
                let new = if index & 1 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut e = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                if e & RTE_LEVEL == 0 {
                    // Remote IRR means nothing for edge pins; Linux's EOI
                    // for old IOAPICs relies on a switch to edge clearing it.
                    e &= !RTE_REMOTE_IRR;
                }
                self.s.redirtbl[pin] = e;
                // An unmasked level-triggered pin whose line is asserted.
                if e & RTE_LEVEL != 0 {
                    return self.service(pin);
                }
            }
            _ => {}
        }
        None
    }

    /// MMIO read at `offset` within the IOAPIC window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            IOREGSEL => self.s.ioregsel,
            IOWIN => self.read_reg(self.s.ioregsel),
            _ => 0,
        };
        let bytes = u64::from(v).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset`. Returns an interrupt to deliver (unmasking
    /// an asserted level-triggered pin) and any re-deliveries from an EOI
    /// register write.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Vec<InterruptMessage> {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let value = u32::from_le_bytes(b);
        match offset {
            IOREGSEL => {
                self.s.ioregsel = value & 0xff;
                Vec::new()
            }
            IOWIN if data.len() >= 4 => self.write_reg(self.s.ioregsel, value).into_iter().collect(),
            EOI_REG => self.eoi(value as u8),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(io: &mut Ioapic, index: u32, value: u32) -> Vec<InterruptMessage> {
        io.mmio_write(IOREGSEL, &index.to_le_bytes());
        io.mmio_write(IOWIN, &value.to_le_bytes())
    }

    fn read(io: &mut Ioapic, index: u32) -> u32 {
        io.mmio_write(IOREGSEL, &[index as u8]);
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = Ioapic::new(4);
        assert_eq!(read(&mut io, 0), 4 << 24);
        assert_eq!(read(&mut io, 1), 0x170011);
        assert_eq!(read(&mut io, 2), 4 << 24);
        write(&mut io, 0, 0xffff_ffff);
        assert_eq!(read(&mut io, 0), 0xff00_0000);
        write(&mut io, 1, 0);
        assert_eq!(read(&mut io, 1), 0x170011);
        for i in 0..NUM_PINS as u32 {
            assert_eq!(read(&mut io, 0x10 + 2 * i), 0x10000);
            assert_eq!(read(&mut io, 0x11 + 2 * i), 0);
        }
        // Out-of-range indices and offsets: no panic, read zero.
        assert_eq!(read(&mut io, 0x40), 0);
        assert_eq!(read(&mut io, 0xff), 0);
        let mut b = [0u8; 8];
        io.mmio_read(0x20, &mut b);
        io.mmio_write(0x999, &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn edge_delivery() {
        let mut io = Ioapic::new(2);
        write(&mut io, 0x11 + 2 * 2, 1 << 24);
        write(&mut io, 0x10 + 2 * 2, 0x30);
        let m = io.set_irq(2, true).unwrap();
        assert_eq!(
            m,
            InterruptMessage {
                dest: Destination::Physical(1),
                mode: DeliveryMode::Fixed,
                vector: 0x30,
                level: false
            }
        );
        // No new edge while held high.
        assert_eq!(io.set_irq(2, true), None);
        assert_eq!(io.set_irq(2, false), None);
        assert!(io.set_irq(2, true).is_some());
        io.set_irq(2, false);
        // Masked: edge lost, not held.
        write(&mut io, 0x10 + 2 * 2, 0x10030);
        assert_eq!(io.set_irq(2, true), None);
        assert!(write(&mut io, 0x10 + 2 * 2, 0x30).is_empty());
        assert_eq!(io.set_irq(99, true), None);
    }

    #[test]
    fn level_remote_irr_and_eoi() {
        let mut io = Ioapic::new(2);
        write(&mut io, 0x10 + 2 * 5, 0xa000 | 0x41 | (1 << 11)); // level, active low, logical
        write(&mut io, 0x11 + 2 * 5, 0x03 << 24);
        let m = io.set_irq(5, true).unwrap();
        assert_eq!(m.dest, Destination::Logical(3));
        assert!(m.level);
        assert_ne!(io.entry(5).unwrap() & RTE_REMOTE_IRR, 0);
        // Held by Remote IRR.
        assert_eq!(io.set_irq(5, true), None);
        // Remote IRR is read-only.
        write(&mut io, 0x10 + 2 * 5, 0xa041 | (1 << 11));
        assert_ne!(io.entry(5).unwrap() & RTE_REMOTE_IRR, 0);
        // EOI for another vector does nothing.
        assert!(io.eoi(0x42).is_empty());
        // Still asserted: re-delivered.
        assert_eq!(io.eoi(0x41), vec![m]);
        io.set_irq(5, false);
        assert!(io.eoi(0x41).is_empty());
        assert_eq!(io.entry(5).unwrap() & RTE_REMOTE_IRR, 0);
        // EOI register at 0x40.
        io.set_irq(5, true);
        assert_eq!(io.mmio_write(EOI_REG, &[0x41, 0, 0, 0]).len(), 1);
    }

    #[test]
    fn unmask_asserted_level_delivers() {
        let mut io = Ioapic::new(0);
        write(&mut io, 0x10, 0x18050);
        assert_eq!(io.set_irq(0, true), None);
        let d = write(&mut io, 0x10, 0x8050);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].vector, 0x50);
        // Switching to edge clears Remote IRR (Linux's EOI for old IOAPICs).
        write(&mut io, 0x10, 0x10050);
        assert_eq!(io.entry(0).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn delivery_modes() {
        let mut io = Ioapic::new(0);
        write(&mut io, 0x10, 0x700);
        assert_eq!(io.set_irq(0, true).unwrap().mode, DeliveryMode::ExtInt);
        write(&mut io, 0x12, 0x400);
        assert_eq!(io.set_irq(1, true).unwrap().mode, DeliveryMode::Nmi);
        write(&mut io, 0x14, 0x131);
        assert_eq!(io.set_irq(2, true).unwrap().mode, DeliveryMode::LowestPriority);
    }

    #[test]
    fn state_round_trip() {
        let mut io = Ioapic::new(3);
        write(&mut io, 0x10 + 2 * 7, 0x8077);
        io.set_irq(7, true);
        let s = io.state();
        let io2 = Ioapic::from_state(s.clone());
        assert_eq!(io2, io);
        assert_eq!(io2.state(), s);
    }
}
