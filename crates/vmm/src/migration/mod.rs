//! Migration: moving a running machine to another Vessel (docs/MIGRATION.md).
//! [`stream`] is the wire format, read as hostile input; [`dirty`] tracks
//! the pages guest and devices write; [`send`] is the source's engine,
//! cold or live pre-copy.

pub mod dirty;
pub mod failover;
pub mod send;
pub mod stream;

use serde::{Deserialize, Serialize};

/// Where a migration stands, as QEMU's `query-migrate` says it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    None,
    Setup,
    Active,
    Completed,
    Failed,
    Cancelled,
}

/// `GET /migration`: the figures of the current or last migration, on
/// either side.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub status: Status,
    /// "source" or "destination" (absent before any migration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// "cold" or "live".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub total_time_ms: u64,
    /// Remaining bytes at the measured bandwidth (source, during pre-copy).
    pub expected_downtime_ms: u64,
    /// The measured pause, from the source's last vCPU stop to the
    /// destination's first vCPU run; set at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub dirty_rate_bytes_per_s: u64,
    /// Pre-copy rounds sent (the first sends all memory).
    pub iterations: u64,
    pub throttle_percent: u8,
    /// Guest memory in bytes.
    pub total_bytes: u64,
    /// Why it failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
