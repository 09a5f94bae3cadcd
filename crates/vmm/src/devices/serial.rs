//! 16550 UART on COM1 through vm-superio, with its output on a writer
//! (the terminal) and its interrupt as a level the interrupt controller reads.
//!
//! Input from the host loses nothing: the UART's receive FIFO holds only 64
//! bytes, so what does not fit waits in a bounded host-side buffer
//! ([`INPUT_BUFFER`]) and moves into the FIFO as the guest reads it.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Host input that may wait for the guest, at most (1 MiB).
pub const INPUT_BUFFER: usize = 1 << 20;
/// The UART's receive FIFO.
const FIFO_SIZE: usize = 64;

// Register offsets and bits (DLAB clear).
const RBR: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;
const LSR: u8 = 5;
const IER_RDA: u8 = 0x01;
const IIR_NO_INT: u8 = 0x01;
/// "Received data available", with the FIFO-enabled bits of a 16550A.
const IIR_RDA_FIFO: u8 = 0xc4;
const LSR_DR: u8 = 0x01;

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

/// The UART's registers and receive FIFO: vm-superio's `SerialState` as a
/// serde value. Host input not yet in the FIFO is not part of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialData {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

pub struct SerialPort<W: Write> {
    pub uart: Serial<IrqLine, vm_superio::serial::NoEvents, W>,
    pub irq: IrqLine,
    /// Host input the FIFO had no room for yet, in order.
    pending: VecDeque<u8>,
}

impl<W: Write> SerialPort<W> {
    pub fn new(out: W) -> Self {
        let irq = IrqLine::default();
        SerialPort {
            uart: Serial::new(irq.clone(), out),
            irq,
            pending: VecDeque::new(),
        }
    }

    pub fn read(&mut self, port: u16) -> u8 {
        let offset = port.wrapping_sub(COM1_BASE) as u8;
        let mut v = self.uart.read(offset);
        // The guest drained the FIFO (half of it at least): top it up from
        // the host buffer, which raises the interrupt again.
        if offset == RBR && self.uart.fifo_capacity() >= FIFO_SIZE / 2 {
            self.refill();
        }
        // A 16550 keeps "received data available" asserted while data
        // waits (receive trigger level 1). vm-superio drops it at the first
        // byte read, so a driver that reads IIR after taking part of the
        // FIFO (Linux reads at most 256 bytes per pass, then asks IIR
        // whether to go on) would leave the rest until more input came.
        // Report it as the hardware does.
        if offset == IIR
            && v & IIR_NO_INT != 0
            && self.uart.read(LSR) & LSR_DR != 0
            && self.uart.read(IER) & IER_RDA != 0
        {
            v = IIR_RDA_FIFO;
        }
        v
    }

    pub fn write(&mut self, port: u16, value: u8) {
        // Output errors (a closed terminal) must not stop the guest.
        let _ = self.uart.write(port.wrapping_sub(COM1_BASE) as u8, value);
    }

    /// Take as much of `bytes` as the host buffer has room for (it holds
    /// [`INPUT_BUFFER`] bytes at most); returns how many. They reach the
    /// guest through [`SerialPort::refill`].
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(INPUT_BUFFER - self.pending.len());
        self.pending.extend(&bytes[..n]);
        n
    }

    /// Move host input into the FIFO while it has room, raising the
    /// receive interrupt (if the guest enabled it).
    pub fn refill(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            match self.uart.enqueue_raw_bytes(front) {
                Ok(n) if n > 0 => {
                    self.pending.drain(..n);
                }
                // Loopback mode takes nothing: keep the bytes.
                _ => break,
            }
        }
    }

    /// The UART's state.
    pub fn save(&self) -> SerialData {
        let s = self.uart.state();
        SerialData {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in state `d` writing to `out`; a FIFO longer than the
    /// UART's is refused.
    pub fn restore(d: &SerialData, out: W) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: d.baud_divisor_low,
            baud_divisor_high: d.baud_divisor_high,
            interrupt_enable: d.interrupt_enable,
            interrupt_identification: d.interrupt_identification,
            line_control: d.line_control,
            line_status: d.line_status,
            modem_control: d.modem_control,
            modem_status: d.modem_status,
            scratch: d.scratch,
            in_buffer: d.in_buffer.clone(),
        };
        let irq = IrqLine::default();
        let uart = Serial::from_state(&state, irq.clone(), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial port: {e:?}"))?;
        Ok(SerialPort {
            uart,
            irq,
            pending: VecDeque::new(),
        })
    }

    /// Host input still waiting for room in the FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let mut s = SerialPort::new(Vec::new());
        s.write(COM1_BASE + 3, 0x83); // DLAB, 8 bits
        s.write(COM1_BASE, 0x01);
        s.write(COM1_BASE + 3, 0x03);
        s.write(COM1_BASE + 1, 0x01); // receive interrupt on
        s.queue_input(b"abc");
        s.refill();
        let d = s.save();
        assert_eq!(d.in_buffer, b"abc");
        let r = SerialPort::restore(&d, Vec::new()).unwrap();
        assert_eq!(r.save(), d);
        let mut long = d.clone();
        long.in_buffer = vec![0; 65];
        assert!(SerialPort::restore(&long, Vec::new()).is_err());
    }

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

    /// Linux's 8250 interrupt handler: ask IIR whether the port needs
    /// service; if so read at most 256 bytes while LSR says data is ready;
    /// repeat until IIR says no interrupt.
    fn linux_irq_handler(s: &mut SerialPort<Vec<u8>>, got: &mut Vec<u8>) {
        for _pass in 0..512 {
            if s.read(COM1_BASE + IIR as u16) & IIR_NO_INT != 0 {
                return;
            }
            for _ in 0..256 {
                if s.read(COM1_BASE + LSR as u16) & LSR_DR == 0 {
                    break;
                }
                got.push(s.read(COM1_BASE));
            }
        }
    }

    /// 4 KiB sent at once, far more than the 64-byte FIFO: the guest gets
    /// every byte, in order, driven by interrupts alone (no byte waits for
    /// more input to arrive).
    #[test]
    fn input_beyond_the_fifo_arrives_whole() {
        let mut s = SerialPort::new(Vec::new());
        s.write(COM1_BASE + IER as u16, IER_RDA);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(s.queue_input(&data), data.len());
        s.refill();
        let mut got = Vec::new();
        let mut interrupts = 0;
        while s.irq.0.swap(false, Ordering::AcqRel) {
            interrupts += 1;
            linux_irq_handler(&mut s, &mut got);
            // A handler that stops early (256-byte passes) still leaves
            // either nothing or a pending interrupt behind.
        }
        assert_eq!(got.len(), data.len(), "after {interrupts} interrupts");
        assert!(got == data, "bytes reordered or changed");
        assert_eq!(s.pending_input(), 0);
    }

    /// Same, with a driver that takes a few bytes per interrupt and
    /// returns (as a busy guest might): IIR keeps reporting data, and the
    /// host buffer keeps the FIFO full.
    #[test]
    fn slow_reader_loses_nothing() {
        let mut s = SerialPort::new(Vec::new());
        s.write(COM1_BASE + IER as u16, IER_RDA);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        s.queue_input(&data);
        s.refill();
        let mut got = Vec::new();
        for _ in 0..10_000 {
            if s.read(COM1_BASE + IIR as u16) & IIR_NO_INT != 0 {
                break;
            }
            for _ in 0..3 {
                if s.read(COM1_BASE + LSR as u16) & LSR_DR != 0 {
                    got.push(s.read(COM1_BASE));
                }
            }
        }
        assert!(got == data);
    }

    /// The host buffer is bounded: beyond it, input is refused (the caller
    /// waits and retries), never dropped silently.
    #[test]
    fn host_buffer_is_bounded() {
        let mut s = SerialPort::new(Vec::new());
        let big = vec![b'x'; INPUT_BUFFER + 100];
        assert_eq!(s.queue_input(&big), INPUT_BUFFER);
        assert_eq!(s.queue_input(b"more"), 0);
        s.refill();
        assert_eq!(s.pending_input(), INPUT_BUFFER - FIFO_SIZE);
        assert_eq!(s.read(COM1_BASE), b'x');
        // Half the FIFO must drain before it is topped up.
        assert_eq!(s.pending_input(), INPUT_BUFFER - FIFO_SIZE);
        for _ in 0..31 {
            s.read(COM1_BASE);
        }
        assert_eq!(s.pending_input(), INPUT_BUFFER - FIFO_SIZE - 32);
        assert_eq!(s.queue_input(&big), FIFO_SIZE + 32);
    }
}
