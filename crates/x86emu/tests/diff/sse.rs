//! Differential tests for exec/sse.rs.
