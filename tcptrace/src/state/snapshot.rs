//! What every view shows, computed from the table: the same structure (and field names) for
//! `watch --json`, `report --json` and the metrics. The types live here, beside the table that
//! builds them, so that views depend on the state and never the other way round.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use rustc_hash::FxHashMap as HashMap;
use serde::Serialize;

use super::{
    holders::HeldAs,
    processes::ProcId,
    sockets::Sock,
    table::{NS, Table},
};
use crate::kernel::event::TcpState;

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
    /// Processes whose descriptor tables hold the socket, with the fd; empty until looked up.
    pub holders: Vec<HolderView>,
    /// Still in the listener's accept queue: no process has accepted it.
    pub unaccepted: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HolderView {
    pub pid: u32,
    pub fd: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CloseWaitView {
    /// CLOSE_WAIT sockets the process holds (a socket several processes hold counts for each).
    pub count: u64,
    pub leaked: u64,
    /// CLOSE_WAIT sockets in the accept queues of this process's listeners (not in `count`).
    pub unaccepted: u64,
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
    /// `connects_failed` by errno name (keeps host-wide failure counters monotonic).
    pub failed_by_errno: BTreeMap<String, u64>,
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

/// Which processes a snapshot shows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub ports: Vec<u16>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.comms.is_empty() && self.ports.is_empty()
    }
    /// Whether an event-stream line with these fields passes.
    pub fn matches_event(&self, pid: u32, comm: &str, ports: [u16; 2]) -> bool {
        (self.pids.is_empty() || self.pids.contains(&pid))
            && (self.comms.is_empty() || self.comms.iter().any(|c| c == comm))
            && (self.ports.is_empty() || ports.iter().any(|p| self.ports.contains(p)))
    }
}

/// Options of [`Table::snapshot`].
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    pub filter: Filter,
    /// Include every CLOSE_WAIT socket and the command line (reports).
    pub detail: bool,
    /// Unix time of `now`, for the `ts` field.
    pub unix_now: f64,
    pub dropped_events: u64,
    pub port_range: (u16, u16),
    /// Most destinations listed (None: 50 with `detail`, else 20); metrics ask for all of
    /// them to sum the ones past their top N under `remote="other"`.
    pub max_destinations: Option<usize>,
}

impl Table {
    /// Builds what the views show.
    pub fn snapshot(&self, now_ns: u64, opts: &SnapshotOptions) -> Snapshot {
        #[derive(Default)]
        struct Acc<'a> {
            cw: Vec<&'a Sock>,
            /// CLOSE_WAIT sockets in this process's listeners' accept queues.
            backlog: Vec<&'a Sock>,
            tw_now: u64,
            ports: HashMap<SocketAddr, u64>,
            port_match: bool,
        }
        let mut host = HostCounts::default();
        let mut per_proc: HashMap<ProcId, Acc> = HashMap::default();
        let mut dest_ports: HashMap<SocketAddr, u64> = HashMap::default();
        let filter = &opts.filter;
        let port_hit = |l: &SocketAddr, r: &SocketAddr| {
            filter.ports.contains(&l.port()) || filter.ports.contains(&r.port())
        };
        for s in self.sockets.values() {
            match s.state {
                TcpState::Established => host.established += 1,
                TcpState::CloseWait => host.close_wait += 1,
                TcpState::Listen => host.listen += 1,
                _ => {}
            }
            host.total += 1;
            let uses_port = !s.inbound
                && !matches!(s.state, TcpState::Listen | TcpState::Close)
                && s.local.port() != 0
                && s.remote.port() != 0;
            if uses_port {
                *dest_ports.entry(s.remote).or_default() += 1;
            }
            if s.state == TcpState::CloseWait {
                match s.held_by() {
                    HeldAs::Holders(by) => {
                        for (id, _) in by {
                            per_proc.entry(*id).or_default().cw.push(s);
                        }
                    }
                    HeldAs::Backlog(Some(id)) => per_proc.entry(id).or_default().backlog.push(s),
                    HeldAs::Hint(Some(id)) => per_proc.entry(id).or_default().cw.push(s),
                    HeldAs::Backlog(None) | HeldAs::Hint(None) => {}
                }
            }
            if let Some(id) = s.owner {
                let acc = per_proc.entry(id).or_default();
                if uses_port {
                    *acc.ports.entry(s.remote).or_default() += 1;
                }
                acc.port_match |= !filter.ports.is_empty() && port_hit(&s.local, &s.remote);
            }
        }
        for tw in &self.time_wait {
            if !self.tw_live(tw) {
                continue;
            }
            host.time_wait += 1;
            host.total += 1;
            if !tw.inbound {
                *dest_ports.entry(tw.remote).or_default() += 1;
            }
            if let Some(id) = tw.owner {
                let acc = per_proc.entry(id).or_default();
                acc.tw_now += 1;
                if !tw.inbound {
                    *acc.ports.entry(tw.remote).or_default() += 1;
                }
            }
        }
        let leak_ns = self.cfg.leak_after_ns;
        let mut processes = Vec::new();
        for (id, p) in &self.procs {
            let acc = per_proc.remove(id).unwrap_or_default();
            if !filter.pids.is_empty() && !filter.pids.contains(&p.pid) {
                continue;
            }
            if !filter.comms.is_empty() && !filter.comms.contains(&p.meta.comm) {
                continue;
            }
            if !filter.ports.is_empty()
                && !acc.port_match
                && !p.dests.keys().any(|d| filter.ports.contains(&d.port()))
            {
                continue;
            }
            let mut cw = CloseWaitView {
                count: acc.cw.len() as u64,
                unaccepted: acc.backlog.len() as u64,
                ..Default::default()
            };
            let mut remotes: HashMap<SocketAddr, u64> = HashMap::default();
            let mut sockets = Vec::new();
            for s in &acc.cw {
                let age = now_ns.saturating_sub(s.since_ns);
                // Leaked only once its holders were looked up: the hint may name the wrong
                // process.
                if age > leak_ns && (s.held.checked_ns.is_some() || !self.cfg.resolve_holders) {
                    cw.leaked += 1;
                }
                cw.oldest_secs = cw.oldest_secs.max(age as f64 / NS as f64);
                *remotes.entry(s.remote).or_default() += 1;
            }
            // The oldest CLOSE_WAIT sockets with their ages: all of them in reports, the 10
            // oldest in live views.
            let mut oldest: Vec<&&Sock> = acc.cw.iter().chain(&acc.backlog).collect();
            let keep = if opts.detail { oldest.len() } else { 10 };
            if oldest.len() > keep {
                oldest.select_nth_unstable_by_key(keep, |s| s.since_ns);
                oldest.truncate(keep);
            }
            for s in oldest {
                let age = now_ns.saturating_sub(s.since_ns);
                sockets.push(SocketView {
                    local: s.local.to_string(),
                    remote: s.remote.to_string(),
                    age_secs: round3(age as f64 / NS as f64),
                    holders: s
                        .held
                        .by
                        .iter()
                        .filter_map(|(id, fd)| {
                            let pid = self.procs.get(id)?.pid;
                            Some(HolderView { pid, fd: *fd })
                        })
                        .collect(),
                    unaccepted: s.held.unaccepted,
                });
            }
            cw.oldest_secs = round3(cw.oldest_secs);
            let mut remotes: Vec<RemoteCount> = remotes
                .into_iter()
                .map(|(r, count)| RemoteCount {
                    remote: r.to_string(),
                    count,
                })
                .collect();
            remotes.sort_by(|a, b| b.count.cmp(&a.count).then(a.remote.cmp(&b.remote)));
            remotes.truncate(if opts.detail { 20 } else { 5 });
            cw.remotes = remotes;
            cw.new_per_min = p.cw_entries.len() as f64;
            sockets.sort_by(|a, b| {
                b.age_secs
                    .total_cmp(&a.age_secs)
                    .then_with(|| a.remote.cmp(&b.remote))
            });
            cw.sockets = Some(sockets);
            let mut destinations: Vec<ProcDestView> = p
                .dests
                .iter()
                .map(|(r, d)| ProcDestView {
                    remote: r.to_string(),
                    connects: ConnectsView {
                        ok: d.ok,
                        failed: d.failed.by_name(),
                    },
                    ports_in_use: acc.ports.get(r).copied().unwrap_or(0),
                })
                .collect();
            destinations.sort_by(|a, b| {
                (b.connects.failed_total(), b.ports_in_use, b.connects.ok)
                    .cmp(&(a.connects.failed_total(), a.ports_in_use, a.connects.ok))
                    .then(a.remote.cmp(&b.remote))
            });
            destinations.truncate(if opts.detail { 20 } else { 5 });
            processes.push(ProcessView {
                pid: p.pid,
                comm: p.meta.comm.clone(),
                start_time: p.start_time,
                cmdline: opts.detail.then(|| p.meta.cmdline.clone()),
                cgroup: (opts.detail && !p.meta.cgroup.is_empty()).then(|| p.meta.cgroup.clone()),
                container: p.meta.container.clone(),
                exited: p.exited_ns.is_some(),
                close_wait: cw,
                connects: ConnectsView {
                    ok: p.connects_ok,
                    failed: p.failed.by_name(),
                },
                churn: ChurnView {
                    closed_total: p.closed_total,
                    closed_per_sec: round3(p.close_rate(now_ns)),
                    closed_last_min: p.closes_in(now_ns, 60),
                    time_wait_total: p.time_wait_total,
                    time_wait: acc.tw_now,
                },
                destinations,
                findings: None,
            });
        }
        processes.retain(|p| {
            p.close_wait.count > 0
                || p.close_wait.unaccepted > 0
                || p.connects.ok > 0
                || !p.connects.failed.is_empty()
                || p.churn.closed_total > 0
                || p.churn.time_wait > 0
        });
        sort_processes(&mut processes);

        let mut destinations: Vec<DestView> = dest_ports
            .iter()
            .map(|(r, &n)| (*r, n))
            .chain(
                self.dests
                    .keys()
                    .filter(|r| !dest_ports.contains_key(r))
                    .map(|r| (*r, 0)),
            )
            .filter(|(r, _)| filter.ports.is_empty() || filter.ports.contains(&r.port()))
            .map(|(r, ports_in_use)| {
                let d = self.dests.get(&r);
                DestView {
                    remote: r.to_string(),
                    ports_in_use,
                    connects_ok: d.map_or(0, |d| d.ok),
                    connects_failed: d.map(|d| d.failed.by_name()).unwrap_or_default(),
                }
            })
            .collect();
        destinations.sort_by(|a, b| {
            let fa: u64 = a.connects_failed.values().sum();
            let fb: u64 = b.connects_failed.values().sum();
            (fb, b.ports_in_use, b.connects_ok)
                .cmp(&(fa, a.ports_in_use, a.connects_ok))
                .then(a.remote.cmp(&b.remote))
        });
        destinations.truncate(
            opts.max_destinations
                .unwrap_or(if opts.detail { 50 } else { 20 }),
        );

        Snapshot {
            ts: round3(opts.unix_now),
            host,
            dropped_events: opts.dropped_events,
            ephemeral_port_range: [opts.port_range.0, opts.port_range.1],
            processes,
            destinations,
            exited: self.exited.clone(),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Worst first: leaked CLOSE_WAIT, then connect failures, then churn, then CLOSE_WAIT count.
pub fn sort_processes(ps: &mut [ProcessView]) {
    ps.sort_by(|a, b| {
        b.close_wait
            .leaked
            .cmp(&a.close_wait.leaked)
            .then(b.connects.failed_total().cmp(&a.connects.failed_total()))
            .then(b.churn.closed_per_sec.total_cmp(&a.churn.closed_per_sec))
            .then(b.close_wait.count.cmp(&a.close_wait.count))
            .then(b.churn.closed_total.cmp(&a.churn.closed_total))
            .then(a.pid.cmp(&b.pid))
    });
}
