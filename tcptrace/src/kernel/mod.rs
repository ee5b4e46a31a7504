//! The kernel side seen from user space: loading and attaching the programs, tracefs field
//! offsets, struct offsets from BTF, draining the ring buffer, decoding records into typed
//! events, forwarding what the programs log.
pub mod btf;
mod counters;
pub mod errno;
mod error;
pub mod event;
pub mod log;
pub mod offsets;
pub mod order;
pub mod probes;
pub mod stacks;
pub mod state_hook;
pub mod tracefs;

pub use error::Error;
