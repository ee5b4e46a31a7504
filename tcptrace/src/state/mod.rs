//! The one state table: every socket and process tcptrace knows. `Table::apply`, `tick` and
//! `snapshot` are its doors; views only read the snapshots it hands out.
pub mod snapshot;
pub mod table;
