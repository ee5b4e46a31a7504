//! tcptrace: kernel programs -> ring buffer -> typed events -> one state table -> views.
//!
//! * [`bpf`]: loads and attaches the kernel programs, drains the ring buffer.
//! * [`event`]: decodes raw records into [`event::TcpEvent`].
//! * [`table`]: the one state table of sockets and processes.
//! * [`tracer`]: the running pipeline (probes, reader thread, table).
//! * [`view`]: what views show, computed from the table; [`watch`] shows it.
//! * [`procinfo`]: sockets and processes that exist already, from /proc.
pub mod alerts;
pub mod bpf;
pub mod client;
pub mod config;
pub mod daemon;
pub mod errno;
pub mod event;
pub mod logfmt;
pub mod metrics;
pub mod procinfo;
pub mod report;
pub mod signals;
pub mod table;
pub mod tracefs;
pub mod tracer;
pub mod view;
pub mod watch;
