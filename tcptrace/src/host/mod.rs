//! What already exists on the host, read on demand: /proc (sockets, processes, sysctls) and
//! process signals.
pub mod procfs;
pub mod signals;
