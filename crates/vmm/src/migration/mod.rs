//! Migration: moving a running machine to another Vessel. [`stream`] is
//! the wire format, read as hostile input.

pub mod stream;
