//! 16550 UART on COM1 through vm-superio, with its output on a writer
//! (the terminal) and its interrupt as a level the interrupt controller reads.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Interrupt line raised by the UART.
#[derive(Clone, Default)]
pub struct IrqLine(pub Arc<AtomicBool>);

impl Trigger for IrqLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

pub struct SerialPort<W: Write> {
    pub uart: Serial<IrqLine, vm_superio::serial::NoEvents, W>,
    pub irq: IrqLine,
}

impl<W: Write> SerialPort<W> {
    pub fn new(out: W) -> Self {
        let irq = IrqLine::default();
        SerialPort {
            uart: Serial::new(irq.clone(), out),
            irq,
        }
    }

    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    pub fn write(&mut self, port: u16, value: u8) {
        // Output errors (a closed terminal) must not stop the guest.
        let _ = self.uart.write((port - COM1_BASE) as u8, value);
    }

    /// Queue bytes typed by the user.
    pub fn input(&mut self, bytes: &[u8]) {
        let _ = self.uart.enqueue_raw_bytes(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_to_writer() {
        let mut s = SerialPort::new(Vec::new());
        for b in b"hi" {
            s.write(COM1_BASE, *b);
        }
        assert_eq!(s.uart.writer(), b"hi");
        // Line status: transmitter empty.
        assert!(s.read(COM1_BASE + 5) & 0x20 != 0);
    }
}
