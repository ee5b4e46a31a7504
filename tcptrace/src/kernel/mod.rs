//! The kernel side seen from user space: loading and attaching the programs, tracefs field
//! offsets, draining the ring buffer, decoding records into typed events.
pub mod errno;
mod error;
pub mod event;
pub mod probes;
pub mod tracefs;

pub use error::Error;
