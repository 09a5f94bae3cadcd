//! Differential tests for exec/alu.rs.
