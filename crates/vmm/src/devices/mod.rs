//! Emulated platform devices for the `emu` engine.

pub mod acpi_pm;
pub mod fuzzing;
pub mod i8042;
pub mod ioapic;
pub mod irq;
pub mod irq_line;
pub mod lapic;
pub mod mptable;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod serial;
