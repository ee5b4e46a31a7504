//! Prometheus exposition of the table's figures (prometheus-client), built per scrape.
//!
//! Label cardinality is bounded: per-process series exist for the `top_processes` worst
//! processes (same order as `watch`), the others are summed under `pid="other"`; destination
//! series exist for the `top_destinations` busiest destinations, the others summed under
//! `remote="other"`. Errno labels come from a fixed set of names.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

use super::protocol::Status;
use crate::state::snapshot::Snapshot;

type Labels = Vec<(String, String)>;
type FGauge = Gauge<f64, AtomicU64>;

struct Families {
    cw: Family<Labels, Gauge>,
    leaked: Family<Labels, Gauge>,
    oldest: Family<Labels, FGauge>,
    connects: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    tw_entered: Family<Labels, Counter>,
    tw_now: Family<Labels, Gauge>,
    dest_ports: Family<Labels, Gauge>,
    dest_failures: Family<Labels, Counter>,
    host: Family<Labels, Gauge>,
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The exposition text for one scrape.
pub fn render(
    snap: &Snapshot,
    status: &Status,
    top_processes: usize,
    top_destinations: usize,
) -> String {
    let mut reg = Registry::default();
    let f = Families {
        cw: Family::default(),
        leaked: Family::default(),
        oldest: Family::default(),
        connects: Family::default(),
        failures: Family::default(),
        closed: Family::default(),
        tw_entered: Family::default(),
        tw_now: Family::default(),
        dest_ports: Family::default(),
        dest_failures: Family::default(),
        host: Family::default(),
    };
    reg.register(
        "tcptrace_close_wait_sockets",
        "Sockets in CLOSE_WAIT owned by the process",
        f.cw.clone(),
    );
    reg.register(
        "tcptrace_close_wait_leaked_sockets",
        "Sockets of the process in CLOSE_WAIT for longer than the leak threshold",
        f.leaked.clone(),
    );
    reg.register(
        "tcptrace_close_wait_oldest_seconds",
        "Age of the process's oldest CLOSE_WAIT socket",
        f.oldest.clone(),
    );
    reg.register(
        "tcptrace_connects",
        "Successful outbound TCP connects",
        f.connects.clone(),
    );
    reg.register(
        "tcptrace_connect_failures",
        "Failed TCP connects by errno",
        f.failures.clone(),
    );
    reg.register(
        "tcptrace_connections_closed",
        "Established TCP connections closed",
        f.closed.clone(),
    );
    reg.register(
        "tcptrace_time_wait_entered",
        "Sockets that entered TIME_WAIT (active closes)",
        f.tw_entered.clone(),
    );
    reg.register(
        "tcptrace_time_wait_sockets",
        "Sockets of the process in TIME_WAIT now",
        f.tw_now.clone(),
    );
    reg.register(
        "tcptrace_destination_ports_in_use",
        "Local ports held by sockets (TIME_WAIT included) to this remote endpoint",
        f.dest_ports.clone(),
    );
    reg.register(
        "tcptrace_destination_connect_failures",
        "Failed connects to this remote endpoint by errno",
        f.dest_failures.clone(),
    );
    reg.register(
        "tcptrace_sockets",
        "TCP sockets on the host by state",
        f.host.clone(),
    );

    let range = snap.ephemeral_port_range;
    let range_size = if range[1] >= range[0] && range[1] > 0 {
        (range[1] - range[0]) as i64 + 1
    } else {
        0
    };
    let g = Gauge::<i64>::default();
    g.set(range_size);
    reg.register(
        "tcptrace_ephemeral_port_range_size",
        "Ports in net.ipv4.ip_local_port_range",
        g,
    );
    let c = |name: &str, help: &str, v: u64, reg: &mut Registry| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name.to_string(), help.to_string(), c);
    };
    c(
        "tcptrace_dropped_events",
        "Kernel records lost because the ring buffer was full",
        snap.dropped_events,
        &mut reg,
    );
    c(
        "tcptrace_events",
        "Kernel records applied to the table",
        status.events_seen,
        &mut reg,
    );
    let ev: Family<Labels, Counter> = Family::default();
    ev.get_or_create(&l(&[("kind", "socket")]))
        .inc_by(status.evictions.sockets);
    ev.get_or_create(&l(&[("kind", "process")]))
        .inc_by(status.evictions.processes);
    reg.register(
        "tcptrace_evictions",
        "Table entries evicted to respect the caps",
        ev,
    );
    let tracked: Family<Labels, Gauge> = Family::default();
    tracked
        .get_or_create(&l(&[("kind", "socket")]))
        .set(status.sockets_tracked as i64);
    tracked
        .get_or_create(&l(&[("kind", "process")]))
        .set(status.processes_tracked as i64);
    reg.register("tcptrace_tracked", "Table entries tracked now", tracked);
    let rec: Family<Labels, Counter> = Family::default();
    let r = &status.reconciled;
    for (kind, v) in [
        ("removed", r.removed),
        ("added", r.added),
        ("fixed", r.fixed),
    ] {
        rec.get_or_create(&l(&[("kind", kind)])).inc_by(v);
    }
    reg.register(
        "tcptrace_reconciled",
        "Table corrections from the kernel's socket list after lost records",
        rec,
    );

    let h = &snap.host;
    for (state, v) in [
        ("established", h.established),
        ("time_wait", h.time_wait),
        ("close_wait", h.close_wait),
        ("listen", h.listen),
        ("fin_wait2", h.fin_wait2),
        ("total", h.total),
    ] {
        f.host.get_or_create(&l(&[("state", state)])).set(v as i64);
    }

    let other = l(&[("pid", "other"), ("comm", "other"), ("container", "")]);
    for (i, p) in snap.processes.iter().enumerate() {
        let pid = p.pid.to_string();
        let labels = if i < top_processes {
            l(&[
                ("pid", pid.as_str()),
                ("comm", p.comm.as_str()),
                ("container", p.container.as_deref().unwrap_or("")),
            ])
        } else {
            other.clone()
        };
        f.cw.get_or_create(&labels)
            .inc_by(p.close_wait.count as i64);
        f.leaked
            .get_or_create(&labels)
            .inc_by(p.close_wait.leaked as i64);
        let oldest = f.oldest.get_or_create(&labels);
        if p.close_wait.oldest_secs > oldest.get() {
            oldest.set(p.close_wait.oldest_secs);
        }
        f.connects.get_or_create(&labels).inc_by(p.connects.ok);
        for (errno, n) in &p.connects.failed {
            let mut el = labels.clone();
            el.push(("errno".into(), errno.clone()));
            f.failures.get_or_create(&el).inc_by(*n);
        }
        f.closed.get_or_create(&labels).inc_by(p.churn.closed_total);
        f.tw_entered
            .get_or_create(&labels)
            .inc_by(p.churn.time_wait_total);
        f.tw_now
            .get_or_create(&labels)
            .inc_by(p.churn.time_wait as i64);
    }
    for (i, d) in snap.destinations.iter().enumerate() {
        let remote = if i < top_destinations {
            d.remote.as_str()
        } else {
            "other"
        };
        f.dest_ports
            .get_or_create(&l(&[("remote", remote)]))
            .inc_by(d.ports_in_use as i64);
        for (errno, n) in &d.connects_failed {
            f.dest_failures
                .get_or_create(&l(&[("remote", remote), ("errno", errno)]))
                .inc_by(*n);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{CloseWaitView, ConnectsView, ProcessView};

    #[test]
    fn top_n_and_other() {
        let p = |pid: u32, cw: u64| ProcessView {
            pid,
            comm: format!("p{pid}"),
            close_wait: CloseWaitView {
                count: cw,
                leaked: cw,
                oldest_secs: cw as f64,
                ..Default::default()
            },
            connects: ConnectsView {
                ok: 1,
                failed: [("ECONNREFUSED".to_string(), 2)].into(),
            },
            ..Default::default()
        };
        let snap = Snapshot {
            ephemeral_port_range: [32768, 60999],
            processes: vec![p(1, 5), p(2, 3), p(3, 1)],
            ..Default::default()
        };
        let text = render(&snap, &Status::default(), 1, 10);
        assert!(
            text.contains("tcptrace_close_wait_sockets{pid=\"1\",comm=\"p1\",container=\"\"} 5"),
            "{text}"
        );
        assert!(
            text.contains(
                "tcptrace_close_wait_sockets{pid=\"other\",comm=\"other\",container=\"\"} 4"
            ),
            "{text}"
        );
        assert!(text.contains("tcptrace_close_wait_oldest_seconds{pid=\"other\",comm=\"other\",container=\"\"} 3.0"), "{text}");
        assert!(text.contains("tcptrace_connect_failures_total{pid=\"other\",comm=\"other\",container=\"\",errno=\"ECONNREFUSED\"} 4"), "{text}");
        assert!(
            text.contains("tcptrace_ephemeral_port_range_size 28232"),
            "{text}"
        );
        assert!(text.contains("tcptrace_dropped_events_total 0"), "{text}");
        assert!(!text.contains("pid=\"2\""));
    }

    #[test]
    fn fin_wait2_and_reconciled_series() {
        let mut snap = Snapshot::default();
        snap.host.fin_wait2 = 7;
        let status = Status {
            reconciled: crate::state::Reconciled {
                removed: 3,
                added: 2,
                fixed: 1,
            },
            ..Default::default()
        };
        let text = render(&snap, &status, 1, 10);
        for line in [
            "tcptrace_sockets{state=\"fin_wait2\"} 7",
            "tcptrace_reconciled_total{kind=\"removed\"} 3",
            "tcptrace_reconciled_total{kind=\"added\"} 2",
            "tcptrace_reconciled_total{kind=\"fixed\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
