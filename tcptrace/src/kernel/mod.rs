//! The kernel side seen from user space: loading and attaching the programs, tracefs field
//! offsets, draining the ring buffer, decoding records into typed events.
pub mod btf;
pub mod errno;
pub mod event;
pub mod probes;
pub mod tracefs;
