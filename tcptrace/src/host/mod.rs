//! What already exists on the host, read on demand: /proc (sockets, processes, sysctls),
//! sock_diag (the kernel's socket list) and process signals.
pub mod clock;
pub mod containers;
pub mod holders;
pub mod procfs;
pub mod services;
pub mod signals;
pub mod sockdiag;
pub mod symbols;
