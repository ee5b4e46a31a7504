//! Metrics rendered from hand-made snapshots and from a table fed synthetic events.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::*;
use crate::views::findings;
use crate::{
    kernel::event::{Owner, OwnerSource, TcpEvent},
    state::{
        ProcMeta, ProcSource, SnapshotOptions, Table, TableConfig,
        snapshot::{CloseWaitView, ConnectsView, DestView, ProcessView},
    },
};

const CAPS: Caps = Caps {
    top_processes: 1,
    top_destinations: 10,
};

/// The value of the sample that starts with `series` (the whole name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn gauges_by_pid_top_n_and_other() {
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
    let text = Metrics::default().render(&snap, &Status::default(), CAPS, Instant::now());
    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    assert_eq!(
        v("tcptrace_close_wait_sockets{pid=\"1\",comm=\"p1\",container_id=\"\"}"),
        5.0
    );
    let other = "{pid=\"other\",comm=\"other\",container_id=\"\"}";
    assert_eq!(v(&format!("tcptrace_close_wait_sockets{other}")), 4.0);
    assert_eq!(
        v(&format!("tcptrace_close_wait_oldest_seconds{other}")),
        3.0
    );
    // Counters: by comm (the cap of 1 key sends p2 and p3 to comm="other"), and host-wide.
    assert_eq!(
        v(
            "tcptrace_process_connect_failures_total{comm=\"p1\",container_id=\"\",errno=\"ECONNREFUSED\"}"
        ),
        2.0
    );
    assert_eq!(
        v(
            "tcptrace_process_connect_failures_total{comm=\"other\",container_id=\"\",errno=\"ECONNREFUSED\"}"
        ),
        4.0
    );
    assert_eq!(
        v("tcptrace_connect_failures_total{errno=\"ECONNREFUSED\"}"),
        6.0
    );
    assert_eq!(v("tcptrace_connects_total"), 3.0);
    assert_eq!(v("tcptrace_ephemeral_port_range_size"), 28232.0);
    assert_eq!(v("tcptrace_dropped_events_total"), 0.0);
    assert!(!text.contains("pid=\"2\""), "{text}");
    for reserved in ["instance=", "job=", "pod=", "namespace=", "container="] {
        assert!(
            !text.lines().any(
                |l| l.contains(&format!("{{{reserved}")) || l.contains(&format!(",{reserved}"))
            ),
            "label {reserved} collides with a target label:\n{text}"
        );
    }
}

#[test]
fn containers_have_an_info_series_and_names_are_escaped() {
    let p = |pid: u32, comm: &str, pod: &str| ProcessView {
        pid,
        comm: comm.to_string(),
        container: Some("0123456789ab".into()),
        container_id: Some(format!("0123456789ab{}", "c".repeat(52))),
        pod_uid: Some("5f6e7d8c-0000-4000-8000-000000000001".into()),
        pod: Some(crate::state::snapshot::PodView {
            namespace: "shop".into(),
            name: pod.into(),
            container: "web".into(),
        }),
        close_wait: CloseWaitView {
            count: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let snap = Snapshot {
        // Two processes of one container: one info series.
        processes: vec![
            p(1, "ev\x1b[2Jil", "cart-7d\n9"),
            p(2, "other", "cart-7d\n9"),
        ],
        ..Default::default()
    };
    let caps = Caps {
        top_processes: 2,
        top_destinations: 10,
    };
    let text = Metrics::default().render(&snap, &Status::default(), caps, Instant::now());
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tcptrace_container_info{"))
        .collect();
    assert_eq!(
        info,
        [format!(
            "tcptrace_container_info{{container_id=\"0123456789ab\",full_container_id=\"0123456789ab{}\",pod_uid=\"5f6e7d8c-0000-4000-8000-000000000001\",pod_namespace=\"shop\",pod_name=\"cart-7d\\\\x0a9\",container_name=\"web\"}} 1",
            "c".repeat(52)
        )],
        "{text}"
    );
    // No control byte reaches the exposition; the comm's ESC is written as \x1b.
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(
        text.contains("comm=\"ev\\\\x1b[2Jil\""),
        "{}",
        text.lines().find(|l| l.contains("ev")).unwrap_or("")
    );
}

#[test]
fn sockets_by_state_add_up_without_a_total() {
    let h = HostCounts {
        established: 3,
        time_wait: 2,
        close_wait: 1,
        listen: 4,
        fin_wait2: 1,
        total: 13,
    };
    let states = socket_states(&h);
    assert_eq!(states.iter().map(|(_, n)| n).sum::<u64>(), h.total);
    assert!(states.contains(&("other", 2)), "{states:?}");
    assert!(!states.iter().any(|(s, _)| *s == "total"), "{states:?}");
}

/// pid -> comm of the processes running; a removed pid has exited.
#[derive(Clone, Default)]
struct Procs(Arc<Mutex<Vec<(u32, &'static str)>>>);

impl ProcSource for Procs {
    fn start_time(&mut self, pid: u32) -> Option<u64> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.0 == pid)
            .then_some(7)
    }
    fn meta(&mut self, pid: u32) -> Option<ProcMeta> {
        let procs = self.0.lock().unwrap();
        let comm = procs.iter().find(|p| p.0 == pid)?.1;
        Some(ProcMeta {
            comm: comm.into(),
            container: Some("0123456789ab".into()),
            ..Default::default()
        })
    }
}

/// Counters stay where they were when the process that counted them exits, is marked
/// exited, and leaves the table (its counts move to the exited totals).
#[test]
fn counters_never_go_down_when_processes_exit() {
    const S: u64 = 1_000_000_000;
    let procs = Procs::default();
    procs
        .0
        .lock()
        .unwrap()
        .extend([(30, "client"), (31, "busy")]);
    let mut t = Table::new(TableConfig::default(), Box::new(procs.clone()));
    let connect = |pid: u32, ts: u64, ret: i32| TcpEvent::Connect {
        ts_ns: ts,
        sk: 0,
        remote: "127.0.0.1:47001".parse().unwrap(),
        ret,
        owner: Owner {
            pid,
            cgroup: 0,
            comm: [0; 16],
            source: OwnerSource::Current,
        },
        netns: 0,
    };
    t.apply(&connect(30, S, -99));
    t.apply(&connect(30, S, -99));
    let mut m = Metrics::default();
    let t0 = Instant::now();
    let series = [
        "tcptrace_connect_failures_total{errno=\"EADDRNOTAVAIL\"}",
        "tcptrace_process_connect_failures_total{comm=\"client\",container_id=\"0123456789ab\",errno=\"EADDRNOTAVAIL\"}",
        "tcptrace_destination_connect_failures_total{remote=\"127.0.0.1:47001\",errno=\"EADDRNOTAVAIL\"}",
    ];
    let opts = SnapshotOptions {
        max_destinations: Some(usize::MAX),
        ..Default::default()
    };
    let mut scrape = |t: &Table, now: u64| {
        let text = m.render(
            &t.snapshot(now, &opts),
            &Status::default(),
            CAPS,
            t0 + Duration::from_nanos(now),
        );
        series.map(|s| value(&text, s).unwrap_or_else(|| panic!("no {s} at {now} ns:\n{text}")))
    };
    assert_eq!(scrape(&t, 2 * S), [2.0; 3]);
    // Another process takes the first place in the ranking: no matter.
    for _ in 0..5 {
        t.apply(&connect(31, 3 * S, -101));
    }
    assert_eq!(scrape(&t, 3 * S), [2.0; 3]);
    let ranked = t.snapshot(3 * S, &opts).processes;
    assert_eq!(ranked[0].pid, 31, "{ranked:?}");
    procs.0.lock().unwrap().retain(|p| p.0 != 30);
    t.tick(4 * S);
    assert_eq!(scrape(&t, 4 * S), [2.0; 3], "exited, still in the view");
    t.tick(40 * S);
    assert!(
        t.snapshot(40 * S, &opts)
            .processes
            .iter()
            .all(|p| p.pid != 30)
    );
    assert_eq!(scrape(&t, 40 * S), [2.0; 3], "gone from the table");
}

#[test]
fn text_format_for_promtool() {
    let om = "# HELP a_b Connects.\n# TYPE a_b counter\na_b_total 3\n# HELP v Version.\n# TYPE v info\nv_info{version=\"1\"} 1\n# HELP g Gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1.5\n# EOF\n";
    assert_eq!(
        to_text_format(om),
        "# HELP a_b_total Connects.\n# TYPE a_b_total counter\na_b_total 3\n# HELP v_info Version.\n# TYPE v_info gauge\nv_info{version=\"1\"} 1\n# HELP g Gauge.\n# TYPE g gauge\ng 1.5\n"
    );
    // Help texts are written as they are: none may need escaping.
    let text = Metrics::default().render(
        &Snapshot::default(),
        &Status::default(),
        CAPS,
        Instant::now(),
    );
    for line in text.lines().filter(|l| l.starts_with("# HELP")) {
        assert!(!line.contains('\\') && !line.contains('"'), "{line}");
    }
    assert!(text.contains("tcptrace_build_info{version=\""), "{text}");
}

/// Families named by the alert rules and the dashboard, each known to a rendered page.
const DEPLOYED: [(&str, &str); 2] = [
    (
        "deploy/prometheus/tcptrace-rules.yml",
        include_str!("../../../../deploy/prometheus/tcptrace-rules.yml"),
    ),
    (
        "deploy/grafana/tcptrace.json",
        include_str!("../../../../deploy/grafana/tcptrace.json"),
    ),
];

#[test]
fn rules_and_dashboard_use_metrics_that_exist_and_rules_carry_the_advice() {
    // One process and one destination with something in every field: every family shows.
    let snap = Snapshot {
        processes: vec![ProcessView {
            pid: 1,
            comm: "p".into(),
            connects: ConnectsView {
                ok: 1,
                failed: [("EADDRNOTAVAIL".to_string(), 1)].into(),
            },
            ..Default::default()
        }],
        destinations: vec![DestView {
            remote: "127.0.0.1:1".into(),
            ports_in_use: 1,
            connects_ok: 1,
            connects_failed: [("EADDRNOTAVAIL".to_string(), 1)].into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = Status {
        degraded: vec!["a reason".into()],
        ..Default::default()
    };
    let page = to_text_format(&Metrics::default().render(&snap, &status, CAPS, Instant::now()));
    for (file, text) in DEPLOYED {
        let mut names: Vec<&str> = text
            .match_indices("tcptrace_")
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|n| !n.ends_with('_'))
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() > 3, "{file}: {names:?}");
        for name in names {
            assert!(
                page.contains(&format!("# TYPE {name} ")),
                "{file} uses {name}, which tcptrace does not export:\n{page}"
            );
        }
    }
    let rules = DEPLOYED[0].1;
    for finding in [
        findings::CLOSE_WAIT_LEAK,
        findings::CONNECTION_CHURN,
        findings::PORT_EXHAUSTION,
        findings::ACCEPT_BACKLOG,
    ] {
        let advice = findings::advice(finding);
        assert!(
            rules.contains(&format!("description: \"{advice}\"")),
            "no rule carries the advice for {finding}: {advice}"
        );
    }
}

#[test]
fn drops_by_cpu_are_a_counter_per_cpu_that_lost_any() {
    use crate::daemon::protocol::CpuDrops;
    let status = Status {
        events_dropped: 12,
        events_dropped_by_cpu: vec![
            CpuDrops { cpu: 0, dropped: 2 },
            CpuDrops {
                cpu: 17,
                dropped: 10,
            },
        ],
        ..Default::default()
    };
    let text = Metrics::default().render(&Snapshot::default(), &status, CAPS, Instant::now());
    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    assert_eq!(v("tcptrace_dropped_events_by_cpu_total{cpu=\"0\"}"), 2.0);
    assert_eq!(v("tcptrace_dropped_events_by_cpu_total{cpu=\"17\"}"), 10.0);
    let series = text
        .lines()
        .filter(|l| l.starts_with("tcptrace_dropped_events_by_cpu_total{"))
        .count();
    assert_eq!(series, 2, "{text}");
}
