//! Differential tests for exec/x87.rs.
