//! The hardware-reduced ACPI power registers: how an ACPI guest powers the
//! machine off or resets it (Cloud Hypervisor's "ACPI shutdown device").
//!
//! The FADT ([`crate::acpi`]) names three byte-wide I/O ports:
//! - the sleep control register: the guest writes `SLP_TYP << 2 | SLP_EN`
//!   (bit 5) to enter a sleep state; `SLP_TYP` comes from the DSDT's `_S5`
//!   package, [`S5_SLEEP_TYPE`], so S5 (soft off) is `5 << 2 | 1 << 5`;
//! - the sleep status register (reads 0: never woken);
//! - the reset register, to which the guest writes [`RESET_VALUE`].
//!
//! The device has no state: [`action`] decodes a write.

/// Sleep control register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Reset register.
pub const RESET_PORT: u16 = 0x602;
/// What the guest writes to [`RESET_PORT`] to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// `SLP_TYP` of S5, as the DSDT's `_S5` package says.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 7 << SLP_TYP_SHIFT;

/// True for the ports of this device.
pub fn handles(port: u16) -> bool {
    (SLEEP_CONTROL_PORT..=RESET_PORT).contains(&port)
}

/// What a write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    None,
    PowerOff,
    Reset,
}

/// Decode a guest write of `value` to `port`.
pub fn action(port: u16, value: u8) -> PowerAction {
    match port {
        SLEEP_CONTROL_PORT if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE => {
            PowerAction::PowerOff
        }
        RESET_PORT if value == RESET_VALUE => PowerAction::Reset,
        _ => PowerAction::None,
    }
}

/// A read of one of the ports: all zero (no wake status, nothing pending).
pub fn read(_port: u16) -> u8 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_writes() {
        // What Linux's acpi_hw_extended_sleep(ACPI_STATE_S5) writes.
        assert_eq!(action(SLEEP_CONTROL_PORT, (5 << 2) | (1 << 5)), PowerAction::PowerOff);
        // SLP_EN without S5, or S5 without SLP_EN: nothing.
        assert_eq!(action(SLEEP_CONTROL_PORT, (3 << 2) | (1 << 5)), PowerAction::None);
        assert_eq!(action(SLEEP_CONTROL_PORT, 5 << 2), PowerAction::None);
        assert_eq!(action(RESET_PORT, RESET_VALUE), PowerAction::Reset);
        assert_eq!(action(RESET_PORT, 0), PowerAction::None);
        // Clearing the wake status is harmless.
        assert_eq!(action(SLEEP_STATUS_PORT, 0x80), PowerAction::None);
        for v in 0..=255u8 {
            let a = action(SLEEP_STATUS_PORT, v);
            assert_eq!(a, PowerAction::None);
        }
        assert!(handles(0x600) && handles(0x602) && !handles(0x603) && !handles(0x5ff));
        assert_eq!(read(SLEEP_STATUS_PORT), 0);
    }
}
