//! What people read, built from snapshots only: the live `watch` and the `report`.
pub mod report;
pub mod watch;
