//! What people read, built from snapshots only: the live `watch` and the `report`.
pub mod findings;
pub mod format;
pub mod report;
pub mod watch;
