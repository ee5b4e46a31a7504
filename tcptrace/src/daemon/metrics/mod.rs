//! Prometheus exposition of the table's figures (prometheus-client), built per scrape.
//!
//! * Host series: unlabelled totals (connects, failures by errno, closes, TIME_WAIT entered,
//!   events, drops) counted over live processes plus the exited totals, so they never go
//!   down; sockets by state; table size and capacity; degradations; the build.
//! * Per-process gauges (`pid`, `comm`, `container_id`) for the `top_processes` worst
//!   processes (same order as `watch`), the others summed under `pid="other"`.
//! * Per-process counters keyed by `comm` and `container_id`, never by rank: a
//!   [`Ledger`] keeps their identity between scrapes and past the processes' lives.
//! * Per-destination gauges for the `top_destinations` busiest (the rest `remote="other"`),
//!   per-destination counters through a [`Ledger`] keyed by the remote endpoint.
//!
//! Label names never collide with the target labels Prometheus adds (`instance`, `job`, and on
//! Kubernetes `pod`, `namespace`, `container`). Errno labels come from a fixed set of names.

use std::{collections::BTreeMap, fmt::Write as _, sync::atomic::AtomicU64, time::Instant};

mod counters;

use counters::{Counts, Ledger};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Metric, Registry},
};

use super::protocol::Status;
use crate::state::snapshot::{HostCounts, ProcessView, Snapshot};
use crate::views::format::escape;

type Labels = Vec<(String, String)>;
type FGauge = Gauge<f64, AtomicU64>;

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A labelled family, registered.
fn family<M>(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, M>
where
    M: Default,
    Family<Labels, M>: Metric + Clone,
{
    let f = Family::<Labels, M>::default();
    reg.register(name, help, f.clone());
    f
}

/// An unlabelled counter, registered with its value.
fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// An unlabelled gauge, registered with its value.
fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

/// `tcptrace_sockets{state}`: every state the snapshot counts, and the sockets in the others
/// as `other`, so that the series add up to all sockets (no `total` beside its parts). A state
/// [`HostCounts`] learns to count is one more line here.
pub fn socket_states(h: &HostCounts) -> Vec<(&'static str, u64)> {
    let named = [
        ("established", h.established),
        ("close_wait", h.close_wait),
        ("listen", h.listen),
        ("time_wait", h.time_wait),
        ("fin_wait2", h.fin_wait2),
    ];
    let rest = h.total.saturating_sub(named.iter().map(|(_, n)| n).sum());
    named.into_iter().chain([("other", rest)]).collect()
}

/// How many series the per-process and per-destination families may have.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Processes with their own gauges; also the most (comm, container_id) counter keys.
    pub top_processes: usize,
    /// Destinations with their own gauges; also the most destination counter keys.
    pub top_destinations: usize,
}

/// Counters by (comm, container_id) besides the failures: name, help, value.
type KeyedCounter = (&'static str, &'static str, fn(&Counts) -> u64);
const PROCESS_COUNTERS: [KeyedCounter; 3] = [
    (
        "tcptrace_process_connects",
        "Successful outbound TCP connects by command name and container",
        |c| c.connects,
    ),
    (
        "tcptrace_process_connections_closed",
        "Established TCP connections closed, by command name and container",
        |c| c.closed,
    ),
    (
        "tcptrace_process_time_wait_entered",
        "Sockets that entered TIME_WAIT (active closes), by command name and container",
        |c| c.time_wait,
    ),
];

/// The metrics of one daemon: what the counters keep between scrapes.
#[derive(Default)]
pub struct Metrics {
    /// Sources (pid, start time), keys (comm, container_id).
    procs: Ledger<(u32, u64), (String, String)>,
    /// Sources and keys: remote endpoints.
    dests: Ledger<String, String>,
}

impl Metrics {
    /// The exposition text (OpenMetrics) for one scrape at `now`.
    pub fn render(&mut self, snap: &Snapshot, status: &Status, caps: Caps, now: Instant) -> String {
        let mut reg = Registry::default();
        host(&mut reg, snap, status);
        per_process_gauges(&mut reg, snap, caps.top_processes);
        container_info(&mut reg, snap);
        self.procs.record(
            snap.processes.iter().map(|p| {
                let key = (
                    escape(&p.comm).into_owned(),
                    escape(p.container.as_deref().unwrap_or("")).into_owned(),
                );
                let counts = Counts {
                    connects: p.connects.ok,
                    failed: p.connects.failed.clone(),
                    closed: p.churn.closed_total,
                    time_wait: p.churn.time_wait_total,
                };
                ((p.pid, p.start_time), key, counts)
            }),
            caps.top_processes,
            now,
        );
        let plain: Vec<_> = PROCESS_COUNTERS
            .iter()
            .map(|(name, help, _)| family::<Counter>(&mut reg, name, help))
            .collect();
        let failures = family::<Counter>(
            &mut reg,
            "tcptrace_process_connect_failures",
            "Failed TCP connects by command name, container and errno",
        );
        let other = (String::from("other"), String::new());
        let keyed = self
            .procs
            .totals()
            .chain(self.procs.other().map(|c| (&other, c)));
        for ((comm, container), c) in keyed {
            let labels = l(&[("comm", comm), ("container_id", container)]);
            for ((_, _, value), f) in PROCESS_COUNTERS.iter().zip(&plain) {
                f.get_or_create(&labels).inc_by(value(c));
            }
            for (errno, n) in &c.failed {
                let mut el = labels.clone();
                el.push(("errno".into(), errno.clone()));
                failures.get_or_create(&el).inc_by(*n);
            }
        }
        self.destinations(&mut reg, snap, caps.top_destinations, now);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }

    fn destinations(&mut self, reg: &mut Registry, snap: &Snapshot, top: usize, now: Instant) {
        let ports = family::<Gauge>(
            reg,
            "tcptrace_destination_ports_in_use",
            "Local ports held by sockets (TIME_WAIT included) to this remote endpoint",
        );
        for (i, d) in snap.destinations.iter().enumerate() {
            let remote = if i < top { d.remote.as_str() } else { "other" };
            ports
                .get_or_create(&l(&[("remote", remote)]))
                .inc_by(d.ports_in_use as i64);
        }
        self.dests.record(
            snap.destinations.iter().map(|d| {
                let counts = Counts {
                    connects: d.connects_ok,
                    failed: d.connects_failed.clone(),
                    ..Default::default()
                };
                (d.remote.clone(), d.remote.clone(), counts)
            }),
            top,
            now,
        );
        let connects = family::<Counter>(
            reg,
            "tcptrace_destination_connects",
            "Successful connects to this remote endpoint",
        );
        let failures = family::<Counter>(
            reg,
            "tcptrace_destination_connect_failures",
            "Failed connects to this remote endpoint by errno",
        );
        let other = String::from("other");
        let keyed = self
            .dests
            .totals()
            .chain(self.dests.other().map(|c| (&other, c)));
        for (remote, c) in keyed {
            connects
                .get_or_create(&l(&[("remote", remote)]))
                .inc_by(c.connects);
            for (errno, n) in &c.failed {
                failures
                    .get_or_create(&l(&[("remote", remote), ("errno", errno)]))
                    .inc_by(*n);
            }
        }
    }
}

/// Host series: totals that never go down, sockets by state, the table, the kernel side.
fn host(reg: &mut Registry, snap: &Snapshot, status: &Status) {
    reg.register(
        "tcptrace_build",
        "tcptrace's version",
        Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );
    // Live processes plus those that left the table: a process's counts move from one to the
    // other when it goes, so the sums never go down.
    let ex = &snap.exited;
    let live = |f: fn(&ProcessView) -> u64| -> u64 { snap.processes.iter().map(f).sum() };
    counter(
        reg,
        "tcptrace_connects",
        "Successful outbound TCP connects on the host",
        ex.connects_ok + live(|p| p.connects.ok),
    );
    let mut failed: BTreeMap<&str, u64> = BTreeMap::new();
    for (errno, n) in snap
        .processes
        .iter()
        .flat_map(|p| &p.connects.failed)
        .chain(&ex.failed_by_errno)
    {
        *failed.entry(errno).or_default() += n;
    }
    let failures = family::<Counter>(
        reg,
        "tcptrace_connect_failures",
        "Failed TCP connects on the host by errno",
    );
    for (errno, n) in failed {
        failures.get_or_create(&l(&[("errno", errno)])).inc_by(n);
    }
    counter(
        reg,
        "tcptrace_connections_closed",
        "Established TCP connections closed on the host",
        ex.closed_total + live(|p| p.churn.closed_total),
    );
    counter(
        reg,
        "tcptrace_time_wait_entered",
        "Sockets that entered TIME_WAIT on the host (active closes)",
        ex.time_wait_total + live(|p| p.churn.time_wait_total),
    );
    counter(
        reg,
        "tcptrace_events",
        "Kernel records applied to the table",
        status.events_seen,
    );
    counter(
        reg,
        "tcptrace_dropped_events",
        "Kernel records lost because the ring buffer was full",
        snap.dropped_events,
    );
    let by_cpu = family::<Counter>(
        reg,
        "tcptrace_dropped_events_by_cpu",
        "tcptrace_dropped_events by the CPU that lost them (CPU c writes to ring c % 16); \
         CPUs that lost none are not listed",
    );
    for c in &status.events_dropped_by_cpu {
        by_cpu
            .get_or_create(&l(&[("cpu", &c.cpu.to_string())]))
            .inc_by(c.dropped);
    }
    counter(
        reg,
        "tcptrace_missed_events",
        "Program runs the kernel skipped because another BPF program was running on the CPU",
        snap.missed_events,
    );
    counter(
        reg,
        "tcptrace_transitions_found_missing",
        "State transitions that never arrived, found from the next transition of their socket",
        status.transitions_found_missing,
    );
    let states = family::<Gauge>(
        reg,
        "tcptrace_sockets",
        "TCP sockets on the host by state (other: states not counted apart)",
    );
    for (state, n) in socket_states(&snap.host) {
        states.get_or_create(&l(&[("state", state)])).set(n as i64);
    }
    let range = snap.ephemeral_port_range;
    let range_size = if range[1] >= range[0] && range[1] > 0 {
        (range[1] - range[0]) as i64 + 1
    } else {
        0
    };
    gauge(
        reg,
        "tcptrace_ephemeral_port_range_size",
        "Ports in net.ipv4.ip_local_port_range",
        range_size,
    );
    let ev = family::<Counter>(
        reg,
        "tcptrace_evictions",
        "Table entries evicted to respect the caps",
    );
    ev.get_or_create(&l(&[("kind", "socket")]))
        .inc_by(status.evictions.sockets);
    ev.get_or_create(&l(&[("kind", "process")]))
        .inc_by(status.evictions.processes);
    let rec = family::<Counter>(
        reg,
        "tcptrace_reconciled",
        "Table corrections from the kernel's socket list after lost records",
    );
    let r = &status.reconciled;
    for (kind, v) in [
        ("removed", r.removed),
        ("added", r.added),
        ("fixed", r.fixed),
    ] {
        rec.get_or_create(&l(&[("kind", kind)])).inc_by(v);
    }
    let tracked = family::<Gauge>(reg, "tcptrace_tracked", "Table entries tracked now");
    let capacity = family::<Gauge>(
        reg,
        "tcptrace_capacity",
        "Most table entries tracked (limits.max_sockets, limits.max_processes)",
    );
    for (kind, n, cap) in [
        ("socket", status.sockets_tracked, status.max_sockets),
        ("process", status.processes_tracked, status.max_processes),
    ] {
        tracked.get_or_create(&l(&[("kind", kind)])).set(n as i64);
        capacity
            .get_or_create(&l(&[("kind", kind)]))
            .set(cap as i64);
    }
    gauge(
        reg,
        "tcptrace_degradations",
        "What works less well on this kernel: how many reasons (0 when all works)",
        status.degraded.len() as i64,
    );
    let degraded = family::<Gauge>(
        reg,
        "tcptrace_degraded",
        "1 for each reason something works less well on this kernel",
    );
    for reason in &status.degraded {
        degraded.get_or_create(&l(&[("reason", reason)])).set(1);
    }
}

/// How a per-process gauge is read from a process, and summed under `pid="other"`.
struct ProcessGauge {
    name: &'static str,
    help: &'static str,
    value: fn(&ProcessView) -> f64,
    /// `other` takes the maximum rather than the sum (an age).
    max: bool,
}

const PROCESS_GAUGES: [ProcessGauge; 6] = [
    ProcessGauge {
        name: "tcptrace_close_wait_sockets",
        help: "Sockets in CLOSE_WAIT held by the process",
        value: |p| p.close_wait.count as f64,
        max: false,
    },
    ProcessGauge {
        name: "tcptrace_close_wait_leaked_sockets",
        help: "Sockets of the process in CLOSE_WAIT for longer than the leak threshold",
        value: |p| p.close_wait.leaked as f64,
        max: false,
    },
    ProcessGauge {
        name: "tcptrace_close_wait_oldest_seconds",
        help: "Age of the process's oldest CLOSE_WAIT socket",
        value: |p| p.close_wait.oldest_secs,
        max: true,
    },
    ProcessGauge {
        name: "tcptrace_close_wait_unaccepted_sockets",
        help: "CLOSE_WAIT sockets in the accept queues of the process's listeners, never accepted",
        value: |p| p.close_wait.unaccepted as f64,
        max: false,
    },
    ProcessGauge {
        name: "tcptrace_time_wait_sockets",
        help: "Sockets of the process in TIME_WAIT now",
        value: |p| p.churn.time_wait as f64,
        max: false,
    },
    ProcessGauge {
        name: "tcptrace_connections_closed_per_second",
        help: "Connections the process closed per second, averaged over the last minute",
        value: |p| p.churn.closed_last_min as f64 / 60.0,
        max: false,
    },
];

/// One series (value 1) per container the snapshot's processes are in: what the short
/// `container_id` label of the other series stands for (the full id, and on Kubernetes the pod's
/// uid, namespace and name and the container's name), to join on, e.g.
/// `tcptrace_close_wait_sockets * on (container_id) group_left (pod_namespace, pod_name)
/// tcptrace_container_info`. Names come from other processes and the node's files: escaped.
fn container_info(reg: &mut Registry, snap: &Snapshot) {
    let f = family::<Gauge>(
        reg,
        "tcptrace_container_info",
        "Containers of the traced processes: full id, Kubernetes pod and container names",
    );
    let mut seen = std::collections::BTreeSet::new();
    for p in &snap.processes {
        let Some(short) = p.container.as_deref() else {
            continue;
        };
        if !seen.insert(short) {
            continue;
        }
        let pod = p.pod.as_ref();
        let labels = l(&[
            ("container_id", &escape(short)),
            (
                "full_container_id",
                &escape(p.container_id.as_deref().unwrap_or("")),
            ),
            ("pod_uid", &escape(p.pod_uid.as_deref().unwrap_or(""))),
            ("pod_namespace", &escape(pod.map_or("", |x| &x.namespace))),
            ("pod_name", &escape(pod.map_or("", |x| &x.name))),
            ("container_name", &escape(pod.map_or("", |x| &x.container))),
        ]);
        f.get_or_create(&labels).set(1);
    }
}

/// Gauges by pid for the `top` worst processes; the rest summed (ages: the maximum) under
/// `pid="other"`.
fn per_process_gauges(reg: &mut Registry, snap: &Snapshot, top: usize) {
    let families: Vec<Family<Labels, FGauge>> = PROCESS_GAUGES
        .iter()
        .map(|g| family::<FGauge>(reg, g.name, g.help))
        .collect();
    let other = l(&[("pid", "other"), ("comm", "other"), ("container_id", "")]);
    for (i, p) in snap.processes.iter().enumerate() {
        let pid = p.pid.to_string();
        let labels = if i < top {
            l(&[
                ("pid", pid.as_str()),
                ("comm", &escape(&p.comm)),
                (
                    "container_id",
                    &escape(p.container.as_deref().unwrap_or("")),
                ),
            ])
        } else {
            other.clone()
        };
        for (g, f) in PROCESS_GAUGES.iter().zip(&families) {
            let v = (g.value)(p);
            let gauge = f.get_or_create(&labels);
            if !g.max {
                gauge.inc_by(v);
            } else if v > gauge.get() {
                gauge.set(v);
            }
        }
    }
}

/// Content type of [`Metrics::render`]'s text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`to_text_format`]'s text.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same page in Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics
/// (`curl | promtool check metrics`): counter and info families take the `_total` and `_info`
/// names of their samples, info becomes gauge, `# UNIT` and `# EOF` go.
pub fn to_text_format(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                let _ = writeln!(out, "# HELP {name}{suffix} {text}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
        } else if !line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests;
