//! Emulated platform devices for the `emu` engine.

pub mod i8042;
pub mod serial;
