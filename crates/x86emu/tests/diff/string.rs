//! Differential tests for exec/string.rs.
