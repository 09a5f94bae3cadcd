//! The HTTP API: Firecracker's, over a Unix socket, served by hyper.
//! Requests become [`crate::control::VmmAction`]s that the VMM's main loop
//! hands to its one controller; the answer comes back on a oneshot channel.

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod routes;
pub mod server;

pub use server::{serve, MAX_PAYLOAD};
