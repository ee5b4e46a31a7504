//! tcptrace: kernel programs -> ring buffer -> typed events -> one state table -> views.
//!
//! Data flows one way, one folder per stage; a stage imports only the stages before it:
//!
//! * [`kernel`]: loads and attaches the kernel programs, reads tracefs offsets, drains the ring
//!   buffer and decodes its records into [`kernel::event::TcpEvent`]s.
//! * [`host`]: what already exists on the host: /proc (sockets, processes, sysctls), signals.
//! * [`state`]: the one table of sockets and processes, and the snapshots it gives the views.
//! * [`tracer`]: the running pipeline: kernel -> decode -> state, and the periodic upkeep.
//! * [`views`]: what people read: `watch` and `report`, from snapshots.
//! * [`daemon`]: the long-running service: control socket, metrics, alerts, config, logging.
pub mod daemon;
pub mod host;
pub mod kernel;
pub mod state;
pub mod tracer;
pub mod views;
