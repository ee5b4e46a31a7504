//! What every view shows, computed from the table: the same structure (and field names) for
//! `watch --json`, `report --json` and the metrics.

use std::collections::BTreeMap;

use serde::Serialize;

/// Socket counts of the whole host by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostCounts {
    pub established: u64,
    pub time_wait: u64,
    pub close_wait: u64,
    pub listen: u64,
    pub total: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SocketView {
    pub local: String,
    pub remote: String,
    pub age_secs: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CloseWaitView {
    pub count: u64,
    pub leaked: u64,
    pub oldest_secs: f64,
    /// New CLOSE_WAIT sockets per minute over the last minute.
    pub new_per_min: f64,
    /// Remote endpoints of the CLOSE_WAIT sockets, most frequent first.
    pub remotes: Vec<RemoteCount>,
    /// CLOSE_WAIT sockets with their ages, oldest first: every one in reports, the 10 oldest in
    /// live views.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockets: Option<Vec<SocketView>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteCount {
    pub remote: String,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectsView {
    pub ok: u64,
    /// errno name -> count; errnos never seen are left out.
    pub failed: BTreeMap<String, u64>,
}

impl ConnectsView {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChurnView {
    pub closed_total: u64,
    /// Average over the last 5 seconds.
    pub closed_per_sec: f64,
    /// Closes in the last 60 seconds.
    pub closed_last_min: u64,
    pub time_wait_total: u64,
    /// Sockets of this process in TIME_WAIT now.
    pub time_wait: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcDestView {
    pub remote: String,
    pub connects: ConnectsView,
    pub ports_in_use: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessView {
    pub pid: u32,
    pub comm: String,
    /// Process start time (clock ticks since boot, as in /proc/PID/stat); with `pid` it names one
    /// process even when the pid is reused.
    pub start_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub exited: bool,
    pub close_wait: CloseWaitView,
    pub connects: ConnectsView,
    pub churn: ChurnView,
    pub destinations: Vec<ProcDestView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub findings: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DestView {
    pub remote: String,
    pub ports_in_use: u64,
    pub connects_ok: u64,
    pub connects_failed: BTreeMap<String, u64>,
}

/// Totals of processes that exited and left the live view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitedTotals {
    pub processes: u64,
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub closed_total: u64,
    pub time_wait_total: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub ts: f64,
    pub host: HostCounts,
    pub dropped_events: u64,
    pub ephemeral_port_range: [u16; 2],
    pub processes: Vec<ProcessView>,
    pub destinations: Vec<DestView>,
    pub exited: ExitedTotals,
}
