//! What already exists on the host, read on demand: /proc (sockets, processes, sysctls) and
//! process signals.
pub mod clock;
pub mod holders;
pub mod procfs;
pub mod services;
pub mod signals;
