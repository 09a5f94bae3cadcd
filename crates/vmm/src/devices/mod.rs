//! Emulated platform devices for the `emu` engine.

pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod serial;
