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
    /// FIN_WAIT2: full sockets (shut down, or closed with tcp_fin_timeout above 60 s) and the
    /// mini-sockets of closed ones waiting for the peer's FIN, as `ss` counts them.
    pub fin_wait2: u64,
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
    pub netns: u64,
    /// The age is an estimate: the socket is older than tracing (from the kernel's tcp_info).
    pub age_estimated: bool,
    /// The call stack that opened it, innermost frame first (`--stacks`; absent when not
    /// recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<Vec<String>>,
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
    /// Sockets of this process in FIN_WAIT2 now (the peer has not closed its end).
    pub fin_wait2: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcDestView {
    pub remote: String,
    /// Network namespace the connections were made in (0: unknown).
    pub netns: u64,
    pub connects: ConnectsView,
    pub ports_in_use: u64,
    /// `ip_local_port_range` of that namespace, and the share of it in use.
    pub port_range: [u16; 2],
    pub port_share: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessView {
    pub pid: u32,
    pub comm: String,
    /// Process start time (clock ticks since boot, as in /proc/PID/stat); with `pid` it names one
    /// process even when the pid is reused.
    pub start_time: u64,
    /// Network namespace of the process (the inode of /proc/PID/ns/net; 0: unknown).
    pub netns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The full container id (null outside containers) and the Kubernetes pod uid (null
    /// outside pods).
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Pod namespace, pod name and container name, where the node shows them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodView>,
    pub exited: bool,
    pub close_wait: CloseWaitView,
    pub connects: ConnectsView,
    pub churn: ChurnView,
    pub destinations: Vec<ProcDestView>,
    /// Its CLOSE_WAIT sockets grouped by the call stack that opened them, most sockets first
    /// (`--stacks`; absent when no stack is known).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leak_stacks: Vec<super::stacks::LeakStackView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub findings: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub container: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DestView {
    pub remote: String,
    pub netns: u64,
    pub ports_in_use: u64,
    pub port_range: [u16; 2],
    pub port_share: f64,
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
    /// tcptrace's own network namespace (the host's, run as intended); others are shown.
    pub netns: u64,
    pub host: HostCounts,
    pub dropped_events: u64,
    /// Program runs the kernel skipped (another BPF program was running on the CPU).
    pub missed_events: u64,
    pub ephemeral_port_range: [u16; 2],
    pub processes: Vec<ProcessView>,
    pub destinations: Vec<DestView>,
    pub exited: ExitedTotals,
}

pub use super::filter::{Filter, container_selected, family_of};

/// Options of [`Table::snapshot`].
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    pub filter: Filter,
    /// Include every CLOSE_WAIT socket and the command line (reports).
    pub detail: bool,
    /// Unix time of `now`, for the `ts` field.
    pub unix_now: f64,
    pub dropped_events: u64,
    pub missed_events: u64,
    pub port_range: (u16, u16),
    /// `ip_local_port_range` of other network namespaces, by namespace; `port_range` for the
    /// others (and for namespace 0, unknown).
    pub port_ranges: std::collections::HashMap<u64, (u16, u16)>,
    /// tcptrace's own network namespace.
    pub host_netns: u64,
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
            fw2_now: u64,
            ports: HashMap<(u64, SocketAddr), u64>,
            port_match: bool,
        }
        let mut host = HostCounts::default();
        let mut per_proc: HashMap<ProcId, Acc> = HashMap::default();
        let mut dest_ports: HashMap<(u64, SocketAddr), u64> = HashMap::default();
        let range_of = |netns: u64| -> [u16; 2] {
            let r = opts
                .port_ranges
                .get(&netns)
                .copied()
                .unwrap_or(opts.port_range);
            [r.0, r.1]
        };
        let share = |n: u64, r: [u16; 2]| -> f64 {
            let size = if r[1] >= r[0] && r[1] > 0 {
                (r[1] - r[0]) as u64 + 1
            } else {
                0
            };
            if size == 0 {
                0.0
            } else {
                round3(n as f64 / size as f64)
            }
        };
        let filter = &opts.filter;
        for s in self.sockets.values() {
            match s.state {
                TcpState::Established => host.established += 1,
                TcpState::CloseWait => host.close_wait += 1,
                TcpState::Listen => host.listen += 1,
                TcpState::FinWait2 => host.fin_wait2 += 1,
                _ => {}
            }
            host.total += 1;
            let uses_port = !s.inbound
                && !matches!(s.state, TcpState::Listen | TcpState::Close)
                && s.local.port() != 0
                && s.remote.port() != 0;
            if uses_port {
                *dest_ports.entry((s.netns, s.remote)).or_default() += 1;
            }
            if s.state == TcpState::CloseWait {
                match s.held_by() {
                    HeldAs::Holders(by) => {
                        let hit = filter.selects_sockets()
                            && filter.socket_hit(Some(&s.local), &s.remote);
                        for (id, _) in by {
                            let acc = per_proc.entry(*id).or_default();
                            acc.cw.push(s);
                            acc.port_match |= hit;
                        }
                    }
                    HeldAs::Backlog(Some(id)) => per_proc.entry(id).or_default().backlog.push(s),
                    HeldAs::Hint(Some(id)) => per_proc.entry(id).or_default().cw.push(s),
                    HeldAs::Backlog(None) | HeldAs::Hint(None) => {}
                }
            }
            if let Some(id) = s.owner {
                let acc = per_proc.entry(id).or_default();
                if s.state == TcpState::FinWait2 {
                    acc.fw2_now += 1;
                }
                if uses_port {
                    *acc.ports.entry((s.netns, s.remote)).or_default() += 1;
                }
                acc.port_match |=
                    filter.selects_sockets() && filter.socket_hit(Some(&s.local), &s.remote);
            }
        }
        // Mini-sockets: TIME_WAIT (false) and FIN_WAIT2 (true).
        let minis = (self.time_wait.iter())
            .filter(|tw| self.tw_live(tw))
            .map(|tw| (tw, false))
            .chain(self.fin_wait2.by_pair.values().map(|fw| (fw, true)));
        for (tw, fin_wait2) in minis {
            *if fin_wait2 {
                &mut host.fin_wait2
            } else {
                &mut host.time_wait
            } += 1;
            host.total += 1;
            if !tw.inbound {
                *dest_ports.entry((tw.netns, tw.remote)).or_default() += 1;
            }
            if let Some(id) = tw.owner {
                let acc = per_proc.entry(id).or_default();
                *if fin_wait2 {
                    &mut acc.fw2_now
                } else {
                    &mut acc.tw_now
                } += 1;
                if !tw.inbound {
                    *acc.ports.entry((tw.netns, tw.remote)).or_default() += 1;
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
            if !filter.containers.is_empty()
                && !container_selected(
                    &filter.containers,
                    p.meta.container_id.as_deref(),
                    p.meta.pod.as_ref(),
                )
            {
                continue;
            }
            // Family and port filters: a socket of the process, or one of its destinations,
            // passes them (destinations have no local port: `-L` needs a socket).
            if filter.selects_sockets()
                && !acc.port_match
                && !p.dests.keys().any(|d| filter.socket_hit(None, &d.1))
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
                    netns: s.netns,
                    age_estimated: s.age_estimated,
                    stack: s.held.stack.as_ref().map(|st| st.frames.clone()),
                });
            }
            cw.oldest_secs = round3(cw.oldest_secs);
            let leak_stacks =
                super::stacks::group(acc.cw.iter().filter_map(|s| s.held.stack.as_ref()));
            // The most frequent remotes: chosen before any is formatted (a leaking server can
            // have one remote per socket, thousands of them).
            let top = if opts.detail { 20 } else { 5 };
            let mut by_count: Vec<(SocketAddr, u64)> = remotes.into_iter().collect();
            if by_count.len() > top {
                by_count.select_nth_unstable_by(top, |a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                by_count.truncate(top);
            }
            let mut remotes: Vec<RemoteCount> = by_count
                .into_iter()
                .map(|(r, count)| RemoteCount {
                    remote: r.to_string(),
                    count,
                })
                .collect();
            remotes.sort_by(|a, b| b.count.cmp(&a.count).then(a.remote.cmp(&b.remote)));
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
                .map(|(key, d)| {
                    let ports_in_use = acc.ports.get(key).copied().unwrap_or(0);
                    let port_range = range_of(key.0);
                    ProcDestView {
                        remote: key.1.to_string(),
                        netns: key.0,
                        connects: ConnectsView {
                            ok: d.ok,
                            failed: d.failed.by_name(),
                        },
                        ports_in_use,
                        port_range,
                        port_share: share(ports_in_use, port_range),
                    }
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
                netns: p.netns.unwrap_or(0),
                cmdline: opts.detail.then(|| p.meta.cmdline.clone()),
                cgroup: (opts.detail && !p.meta.cgroup.is_empty()).then(|| p.meta.cgroup.clone()),
                container: p.meta.container.clone(),
                container_id: p.meta.container_id.clone(),
                pod_uid: p.meta.pod_uid.clone(),
                pod: p.meta.pod.clone(),
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
                    fin_wait2: acc.fw2_now,
                },
                destinations,
                leak_stacks,
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
                || p.churn.fin_wait2 > 0
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
            .filter(|(r, _)| filter.ports.is_empty() || filter.ports.contains(&r.1.port()))
            .map(|(key, ports_in_use)| {
                let d = self.dests.get(&key);
                let port_range = range_of(key.0);
                DestView {
                    remote: key.1.to_string(),
                    netns: key.0,
                    ports_in_use,
                    port_range,
                    port_share: share(ports_in_use, port_range),
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
            netns: opts.host_netns,
            host,
            dropped_events: opts.dropped_events,
            missed_events: opts.missed_events,
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
