//! The one state table: every socket and process tcptrace knows, split by what it tracks.
//! [`Table::apply`], [`Table::tick`] and [`Table::snapshot`] are its doors (plus
//! [`Table::load_existing`] and [`Table::assign_owners`] for what /proc tells at start-up and
//! later, [`Table::reconcile`] for the kernel's socket list after lost records); views only read the [`Snapshot`]s it hands out.
mod connects;
mod destinations;
mod filter;
mod holders;
mod processes;
mod reconcile;
pub mod snapshot;
mod sockets;
mod stacks;
mod table;
mod time_wait;

pub use connects::ConnectFailure;
pub use holders::{HeldBy, HolderQuery, RECHECK_NS};
pub use processes::{ProcMeta, ProcSource};
pub use reconcile::KernelSocket;
pub use snapshot::{Filter, Snapshot, SnapshotOptions, sort_processes};
pub use sockets::ExistingSocket;
pub use stacks::{LeakStack, LeakStackView, StackQuery};
pub use table::{Reconciled, Table, TableConfig, TableStats};
pub use time_wait::TIME_WAIT_NS;

#[cfg(test)]
mod tests;
