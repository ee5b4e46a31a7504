//! The kernel side seen from user space: loading and attaching the programs, tracefs field
//! offsets, draining the ring buffer, decoding records into typed events, forwarding what the
//! programs log.
pub mod errno;
mod error;
pub mod event;
pub mod log;
pub mod probes;
pub mod tracefs;

pub use error::Error;
