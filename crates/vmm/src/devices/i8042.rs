//! An i8042 keyboard controller with a PS/2 keyboard behind it: what
//! Linux's i8042 and atkbd drivers need to find a keyboard, so that the VMM
//! can press Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`), and command
//! 0xFE on port 0x64 to reset the machine (`reboot=k`). Modelled on
//! Firecracker's `devices/legacy/i8042.rs`; no mouse (AUX) port.
//!
//! Port 0x64 reads the status, and takes controller commands; port 0x60
//! reads the output buffer, and takes command parameters or bytes for the
//! keyboard. The controller takes every byte at once, so its input buffer
//! never looks full and a guest polling the status never spins. Bytes from
//! the keyboard raise IRQ 1 (when the guest enabled the keyboard interrupt
//! in the controller configuration byte); the owner delivers it
//! ([`I8042::take_irq`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub const DATA_PORT: u16 = 0x60;
pub const STATUS_PORT: u16 = 0x64;
/// The keyboard's interrupt line (ISA IRQ 1).
pub const KBD_IRQ: u32 = 1;

// Status register.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
/// The last write went to port 0x64 (a command).
const STS_CMD: u8 = 0x08;
/// Keyboard not inhibited (the key lock is open).
const STS_UNLOCKED: u8 = 0x10;

// Controller configuration byte (CTR).
const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Controller answers.
const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// AUX port test: "clock line stuck low", which tells Linux there is no
/// mouse port (after the loop test failed) without any timeout.
const AUX_ABSENT: u8 = 0x01;

// Keyboard commands (port 0x60) and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_REPEAT: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_RESET_DISABLE: u8 = 0xf5;
const KBD_RESET_DEFAULT: u8 = 0xf6;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
/// An MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Bytes the output buffer holds at most; Linux's i8042 flush reads at
/// most 16 before it gives up on a controller.
pub const BUF_SIZE: usize = 16;

/// Ctrl-Alt-Del in scan code set 2: Ctrl (0x14), Alt (0x11) and Delete
/// (0xE0 0x71) pressed, then released (0xF0 prefix) in reverse order.
const CTRL_ALT_DEL: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

/// Why keys could not be sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the i8042 output buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
    #[error("the guest has disabled its keyboard")]
    KeyboardDisabled,
    #[error("the VM is paused (resume it first)")]
    Paused,
}

/// The controller and its keyboard; serde state for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042 {
    /// The guest asked for a reset.
    pub reset_requested: bool,
    status: u8,
    ctr: u8,
    outp: u8,
    /// A controller command waiting for its parameter on port 0x60.
    cmd: Option<u8>,
    /// A keyboard command waiting for its parameter.
    kbd_cmd: Option<u8>,
    /// The keyboard sends scan codes (enabled with 0xF4, off after 0xF5).
    scanning: bool,
    out: VecDeque<u8>,
    /// IRQ 1 is due.
    irq: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        I8042 {
            reset_requested: false,
            status: STS_UNLOCKED | STS_SYS,
            // No translation (XLATE): the keyboard's set 2 codes reach
            // the driver as they are, which is what we send.
            ctr: CTR_KBDINT | CTR_SYS | CTR_AUXDIS,
            outp: 0x01,
            cmd: None,
            kbd_cmd: None,
            scanning: true,
            out: VecDeque::with_capacity(BUF_SIZE),
            irq: false,
        }
    }
}

impl I8042 {
    /// A guest read of `port` (0x60 or 0x64).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            STATUS_PORT => self.status_reg(),
            DATA_PORT => {
                let byte = self.out.pop_front().unwrap_or(0);
                // More waiting: interrupt again for the next byte.
                if !self.out.is_empty() {
                    self.raise();
                }
                byte
            }
            _ => 0xff,
        }
    }

    /// A guest write of `value` to `port` (0x60 or 0x64).
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            STATUS_PORT => {
                self.status |= STS_CMD;
                self.command(value);
            }
            DATA_PORT => {
                self.status &= !STS_CMD;
                match self.cmd.take() {
                    Some(cmd) => self.command_parameter(cmd, value),
                    None => self.keyboard(value),
                }
            }
            _ => {}
        }
    }

    /// Whether IRQ 1 is due (cleared by the call): the owner triggers the
    /// line. Only keyboard bytes interrupt, and only while the guest has
    /// the keyboard interrupt enabled.
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq)
    }

    /// Press and release Ctrl-Alt-Del, as the keyboard would: Linux (with
    /// its default `ctrl_alt_del` setting) restarts.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), KeyError> {
        self.send_keys(&CTRL_ALT_DEL)
    }

    /// Queue scan codes from the keyboard, all or none.
    fn send_keys(&mut self, codes: &[u8]) -> Result<(), KeyError> {
        if !self.scanning {
            return Err(KeyError::KeyboardDisabled);
        }
        if BUF_SIZE - self.out.len() < codes.len() {
            return Err(KeyError::BufferFull);
        }
        for &c in codes {
            self.push_kbd(c);
        }
        Ok(())
    }

    fn status_reg(&self) -> u8 {
        let mut s = self.status & !STS_OBF;
        if !self.out.is_empty() {
            s |= STS_OBF;
        }
        s
    }

    fn raise(&mut self) {
        if self.ctr & CTR_KBDINT != 0 {
            self.irq = true;
        }
    }

    /// A byte from the keyboard: queued, with an interrupt.
    fn push_kbd(&mut self, byte: u8) {
        if self.out.len() < BUF_SIZE {
            self.out.push_back(byte);
            self.raise();
        }
    }

    /// A controller's answer to a command: it replaces whatever waited in
    /// the output buffer (the driver polls for it, no interrupt).
    fn answer(&mut self, byte: u8) {
        self.out.clear();
        self.out.push_back(byte);
    }

    fn command(&mut self, cmd: u8) {
        self.cmd = None;
        match cmd {
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_KBD_LOOP | CMD_AUX_LOOP | CMD_AUX_SEND => self.cmd = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.answer(AUX_ABSENT),
            CMD_SELF_TEST => {
                self.status |= STS_SYS;
                self.answer(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.answer(PORT_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_READ_OUTP => self.answer(self.outp),
            CMD_RESET_CPU => self.reset_requested = true,
            // Other commands (pulse output lines, read input port, ...)
            // have nothing to do here.
            _ => {}
        }
    }

    fn command_parameter(&mut self, cmd: u8, value: u8) {
        match cmd {
            CMD_WRITE_CTR => {
                self.ctr = value;
                if value & CTR_SYS != 0 {
                    self.status |= STS_SYS;
                } else {
                    self.status &= !STS_SYS;
                }
            }
            CMD_WRITE_OUTP => {
                self.outp = value;
                // Output port bit 0 low: the CPU reset line.
                if value & 1 == 0 {
                    self.reset_requested = true;
                }
            }
            // As if the keyboard had sent it.
            CMD_KBD_LOOP => {
                self.out.clear();
                self.push_kbd(value);
            }
            // There is no AUX port: the echo comes back without the AUX
            // flag, which tells Linux so at once.
            CMD_AUX_LOOP => self.answer(value),
            // Bytes for a mouse that is not there.
            _ => {}
        }
    }

    /// A byte for the keyboard: a command, or a command's parameter.
    fn keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.kbd_cmd.take() {
            self.push_kbd(KBD_ACK);
            if cmd == KBD_SCANCODE_SET && value == 0 {
                // "Which set?": set 2.
                self.push_kbd(2);
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_REPEAT => {
                self.kbd_cmd = Some(value);
                self.push_kbd(KBD_ACK);
            }
            KBD_ECHO => self.push_kbd(KBD_ECHO),
            KBD_GET_ID => {
                self.push_kbd(KBD_ACK);
                self.push_kbd(KBD_ID[0]);
                self.push_kbd(KBD_ID[1]);
            }
            KBD_ENABLE => {
                self.scanning = true;
                self.push_kbd(KBD_ACK);
            }
            KBD_RESET_DISABLE => {
                self.scanning = false;
                self.push_kbd(KBD_ACK);
            }
            KBD_RESET_DEFAULT => {
                self.scanning = true;
                self.push_kbd(KBD_ACK);
            }
            KBD_RESET => {
                self.scanning = true;
                self.push_kbd(KBD_ACK);
                self.push_kbd(KBD_BAT_OK);
            }
            // Set-3 key modes and the like: acknowledged, ignored.
            0xf7..=0xfd => self.push_kbd(KBD_ACK),
            // Anything else this keyboard does not know.
            _ => self.push_kbd(KBD_RESEND),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's i8042_command: write the command, its parameters, poll for
    /// the answers (never more than a few status reads each).
    fn command(k: &mut I8042, cmd: u8, params: &[u8], answers: usize) -> Vec<u8> {
        assert_eq!(k.read(STATUS_PORT) & 0x02, 0, "input buffer full");
        k.write(STATUS_PORT, cmd);
        for &p in params {
            k.write(DATA_PORT, p);
        }
        (0..answers)
            .map(|_| {
                assert_ne!(k.read(STATUS_PORT) & STS_OBF, 0, "no answer to {cmd:#x}");
                k.read(DATA_PORT)
            })
            .collect()
    }

    /// Send a keyboard command and read what comes back, as the ps2 layer
    /// does from the interrupt handler.
    fn kbd(k: &mut I8042, bytes: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        for &b in bytes {
            k.write(DATA_PORT, b);
            while k.read(STATUS_PORT) & STS_OBF != 0 {
                got.push(k.read(DATA_PORT));
            }
        }
        got
    }

    #[test]
    fn reset_command() {
        let mut k = I8042::default();
        assert_eq!(k.read(STATUS_PORT) & (STS_OBF | 0x02), 0);
        k.write(DATA_PORT, CMD_RESET_CPU);
        assert!(!k.reset_requested);
        k.write(STATUS_PORT, CMD_RESET_CPU);
        assert!(k.reset_requested);
        let mut k = I8042::default();
        command(&mut k, CMD_WRITE_OUTP, &[0xfe], 0);
        assert!(k.reset_requested);
    }

    /// The sequence Linux's i8042 probe and atkbd connect go through.
    #[test]
    fn linux_probe_sequence() {
        let mut k = I8042::default();
        assert_eq!(command(&mut k, CMD_SELF_TEST, &[], 1), [SELF_TEST_OK]);
        let ctr = command(&mut k, CMD_READ_CTR, &[], 1)[0];
        assert_eq!(command(&mut k, CMD_READ_CTR, &[], 1)[0], ctr, "a stable CTR");
        assert_eq!(ctr & 0x40, 0, "no translation");
        assert_ne!(k.read(STATUS_PORT) & STS_UNLOCKED, 0, "no key lock");
        command(&mut k, CMD_WRITE_CTR, &[(ctr | CTR_KBDDIS) & !CTR_KBDINT], 0);
        // The AUX loop echo lacks the AUX flag, and the AUX test fails:
        // Linux concludes there is no mouse port.
        assert_eq!(command(&mut k, CMD_AUX_LOOP, &[0x5a], 1), [0x5a]);
        assert_eq!(k.status & 0x20, 0);
        assert_eq!(command(&mut k, CMD_AUX_TEST, &[], 1), [AUX_ABSENT]);
        // Enable the keyboard port and its interrupt.
        let ctr = command(&mut k, CMD_READ_CTR, &[], 1)[0];
        command(&mut k, CMD_WRITE_CTR, &[(ctr & !CTR_KBDDIS) | CTR_KBDINT], 0);
        assert!(!k.take_irq());
        // atkbd: get ID, disable, LEDs, typematic rate, enable.
        assert_eq!(kbd(&mut k, &[KBD_GET_ID]), [KBD_ACK, 0xab, 0x83]);
        assert!(k.take_irq());
        assert_eq!(kbd(&mut k, &[KBD_RESET_DISABLE]), [KBD_ACK]);
        assert_eq!(kbd(&mut k, &[KBD_SET_LEDS, 0]), [KBD_ACK, KBD_ACK]);
        assert_eq!(kbd(&mut k, &[KBD_SET_REPEAT, 0x20]), [KBD_ACK, KBD_ACK]);
        assert_eq!(kbd(&mut k, &[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 2]);
        assert_eq!(k.trigger_ctrl_alt_del(), Err(KeyError::KeyboardDisabled));
        assert_eq!(kbd(&mut k, &[KBD_ENABLE]), [KBD_ACK]);
        assert_eq!(kbd(&mut k, &[0x42]), [KBD_RESEND]);
        assert_eq!(kbd(&mut k, &[KBD_RESET]), [KBD_ACK, KBD_BAT_OK]);
    }

    #[test]
    fn ctrl_alt_del_scancodes_and_interrupts() {
        let mut k = I8042::default();
        k.trigger_ctrl_alt_del().unwrap();
        assert!(k.take_irq());
        let mut got = Vec::new();
        while k.read(STATUS_PORT) & STS_OBF != 0 {
            got.push(k.read(DATA_PORT));
            // One interrupt per byte while more wait.
            assert_eq!(k.take_irq(), k.read(STATUS_PORT) & STS_OBF != 0);
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // With the keyboard interrupt off, the codes wait, silently.
        command(&mut k, CMD_WRITE_CTR, &[CTR_SYS], 0);
        k.trigger_ctrl_alt_del().unwrap();
        assert!(!k.take_irq());
        // The buffer is bounded: a second sequence does not fit.
        assert_eq!(k.trigger_ctrl_alt_del(), Err(KeyError::BufferFull));
        assert_eq!(k.out.len(), CTRL_ALT_DEL.len());
        // Reading an empty buffer gives 0.
        let mut k = I8042::default();
        assert_eq!(k.read(DATA_PORT), 0);
    }

    /// A hostile guest: random port traffic never panics, never grows the
    /// buffer past its bound, and never makes the status claim a full
    /// input buffer (a guest polling for room would spin forever).
    #[test]
    fn hostile_port_traffic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let mut k = I8042::default();
            for _ in 0..2000 {
                let r = next();
                let port = [DATA_PORT, STATUS_PORT, 0x61, 0x65][(r & 3) as usize];
                let value = (r >> 8) as u8;
                match (r >> 16) % 5 {
                    0 | 1 => {
                        k.read(port);
                    }
                    2 | 3 => k.write(port, value),
                    _ => {
                        let _ = k.trigger_ctrl_alt_del();
                    }
                }
                assert!(k.out.len() <= BUF_SIZE);
                assert_eq!(k.read(STATUS_PORT) & 0x02, 0);
                let _ = k.take_irq();
            }
        }
    }
}
