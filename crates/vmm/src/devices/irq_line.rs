//! The one interface a device uses to interrupt the guest.
//!
//! Under `emu` a line pulses a pin of our IOAPIC; under `kvm` it writes an
//! eventfd registered as an irqfd. Devices never know which.

use std::sync::Arc;

use crate::devices::irq::Interrupts;

/// An edge-triggered interrupt line: each `trigger` is one interrupt.
pub trait InterruptLine: Send + Sync {
    fn trigger(&self);
}

/// A pin of the emulated IOAPIC (and, below 16, the PIC).
pub struct EmuLine {
    pub irqs: Arc<Interrupts>,
    pub pin: u32,
}

impl InterruptLine for EmuLine {
    fn trigger(&self) {
        self.irqs.pulse_irq(self.pin);
    }
}
