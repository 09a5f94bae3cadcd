//! A minimal i8042 keyboard controller: only what Linux needs to reset the
//! machine (`reboot=k`: command 0xFE on port 0x64), as Firecracker does.

use serde::{Deserialize, Serialize};

pub const DATA_PORT: u16 = 0x60;
pub const STATUS_PORT: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042 {
    /// The guest asked for a reset.
    pub reset_requested: bool,
}

impl I8042 {
    pub fn read(&mut self, port: u16) -> u8 {
        // Status 0: no data, input buffer empty, so the guest never spins.
        let _ = port;
        0
    }

    pub fn write(&mut self, port: u16, value: u8) {
        if port == STATUS_PORT && value == CMD_RESET_CPU {
            self.reset_requested = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let mut k = I8042::default();
        assert_eq!(k.read(STATUS_PORT), 0);
        k.write(DATA_PORT, CMD_RESET_CPU);
        assert!(!k.reset_requested);
        k.write(STATUS_PORT, CMD_RESET_CPU);
        assert!(k.reset_requested);
    }
}
