//! `tcptrace daemon` and its clients: server, control protocol, metrics, alerts, config, logging.
pub mod alerts;
pub mod client;
pub mod config;
pub mod logfmt;
pub mod metrics;
pub mod server;
