//! tcptrace: kernel programs -> ring buffer -> typed events -> one state table -> views.
pub mod bpf;
pub mod tracefs;
