//! Differential tests for exec/bits.rs.
