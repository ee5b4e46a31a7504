//! `tcptrace daemon` and its clients: the server and its upkeep, the control socket and its
//! protocol, the client commands (`report`, `status`), Prometheus metrics over HTTP, alerts,
//! the config file, logging and systemd readiness.
pub mod alerts;
pub mod client;
pub mod config;
pub mod control;
pub mod http;
pub mod logfmt;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod systemd;
