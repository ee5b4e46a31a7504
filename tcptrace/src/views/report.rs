//! `tcptrace report`: per-process findings, worst first, with what usually causes each problem
//! and what to change. Built from a detailed [`Snapshot`] (daemon) or from the sockets that
//! exist right now (no daemon).

use std::{collections::HashMap, fmt::Write as _, sync::OnceLock};

use serde::{Deserialize, Serialize};

use crate::{
    daemon::config::Alerts,
    state::snapshot::{DestView, HostCounts, ProcessView, Snapshot},
};

pub const CLOSE_WAIT_LEAK: &str = "close_wait_leak";
pub const CONNECTION_CHURN: &str = "connection_churn";
pub const PORT_EXHAUSTION: &str = "port_exhaustion";

/// Host counts plus the port range, as `report --json` shows them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportHost {
    pub established: u64,
    pub time_wait: u64,
    pub close_wait: u64,
    pub listen: u64,
    pub total: u64,
    pub ephemeral_port_range: [u16; 2],
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// "daemon" (full history) or "snapshot" (sockets now, no history).
    pub source: String,
    pub ts: f64,
    pub host: ReportHost,
    pub dropped_events: u64,
    /// Host-level rules of thumb crossed, in plain words.
    pub thresholds_crossed: Vec<String>,
    pub processes: Vec<serde_json::Value>,
    pub destinations: Vec<serde_json::Value>,
}

/// The findings of one process under `alerts`' thresholds.
pub fn findings(p: &ProcessView, range_size: u64, alerts: &Alerts) -> Vec<String> {
    let mut f = Vec::new();
    if p.close_wait.leaked > 0 {
        f.push(CLOSE_WAIT_LEAK.to_string());
    }
    // A fifth of the host TIME_WAIT rule of thumb in one process is churn too.
    let many_tw = p.churn.time_wait > 0 && p.churn.time_wait >= alerts.time_wait / 5;
    // Churning now, or on average over the last minute (a report often comes after the burst).
    let per_sec_1m = p.churn.closed_last_min as f64 / 60.0;
    if p.churn.closed_per_sec >= alerts.churn_per_sec
        || per_sec_1m >= alerts.churn_per_sec
        || many_tw
    {
        f.push(CONNECTION_CHURN.to_string());
    }
    let near_full = range_size > 0
        && p.destinations
            .iter()
            .any(|d| d.ports_in_use as f64 >= alerts.port_share * range_size as f64);
    if p.connects.failed.contains_key("EADDRNOTAVAIL") || near_full {
        f.push(PORT_EXHAUSTION.to_string());
    }
    f
}

fn range_size(r: [u16; 2]) -> u64 {
    if r[1] >= r[0] && r[1] > 0 {
        (r[1] - r[0]) as u64 + 1
    } else {
        0
    }
}

/// Host rules of thumb: CLOSE_WAIT above 10, TIME_WAIT above 5000 (configurable).
pub fn host_thresholds(h: &HostCounts, alerts: &Alerts) -> Vec<String> {
    let mut v = Vec::new();
    if h.close_wait > alerts.close_wait {
        v.push(format!(
            "close_wait {} > {}",
            h.close_wait, alerts.close_wait
        ));
    }
    if h.time_wait > alerts.time_wait {
        v.push(format!("time_wait {} > {}", h.time_wait, alerts.time_wait));
    }
    v
}

/// Builds the report from a detailed snapshot.
pub fn build(snap: &Snapshot, source: &str, alerts: &Alerts) -> Report {
    let size = range_size(snap.ephemeral_port_range);
    let processes = snap
        .processes
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.findings = Some(findings(&p, size, alerts));
            serde_json::to_value(&p).unwrap_or_default()
        })
        .collect();
    let destinations = snap
        .destinations
        .iter()
        .map(|d| serde_json::to_value(dest_json(d)).unwrap_or_default())
        .collect();
    let h = snap.host;
    Report {
        source: source.to_string(),
        ts: snap.ts,
        host: ReportHost {
            established: h.established,
            time_wait: h.time_wait,
            close_wait: h.close_wait,
            listen: h.listen,
            total: h.total,
            ephemeral_port_range: snap.ephemeral_port_range,
        },
        dropped_events: snap.dropped_events,
        thresholds_crossed: host_thresholds(&h, alerts),
        processes,
        destinations,
    }
}

#[derive(Serialize)]
struct DestJson<'a> {
    remote: &'a str,
    service: Option<&'static str>,
    ports_in_use: u64,
    connects_ok: u64,
    connects_failed: &'a std::collections::BTreeMap<String, u64>,
}

fn dest_json(d: &DestView) -> DestJson<'_> {
    DestJson {
        remote: &d.remote,
        service: service_of(&d.remote),
        ports_in_use: d.ports_in_use,
        connects_ok: d.connects_ok,
        connects_failed: &d.connects_failed,
    }
}

/// Well-known service name of an "ip:port" endpoint, from /etc/services (TCP) or a short
/// built-in list when that file is missing.
pub fn service_of(endpoint: &str) -> Option<&'static str> {
    static SERVICES: OnceLock<HashMap<u16, &'static str>> = OnceLock::new();
    let port: u16 = endpoint.rsplit(':').next()?.parse().ok()?;
    SERVICES
        .get_or_init(|| {
            let mut m = HashMap::new();
            if let Ok(text) = std::fs::read_to_string("/etc/services") {
                for line in text.lines() {
                    let line = line.split('#').next().unwrap_or("");
                    let mut it = line.split_whitespace();
                    let (Some(name), Some(pp)) = (it.next(), it.next()) else {
                        continue;
                    };
                    if let Some(p) = pp.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) {
                        m.entry(p)
                            .or_insert_with(|| &*Box::leak(name.to_string().into_boxed_str()));
                    }
                }
            }
            for (p, n) in [
                (22, "ssh"),
                (53, "domain"),
                (80, "http"),
                (443, "https"),
                (3306, "mysql"),
                (5432, "postgresql"),
                (6379, "redis"),
                (8080, "http-alt"),
                (9092, "kafka"),
                (11211, "memcache"),
                (27017, "mongodb"),
            ] {
                m.entry(p).or_insert(n);
            }
            m
        })
        .get(&port)
        .copied()
}

/// Plain-language explanation and advice for a finding.
pub fn advice(finding: &str) -> &'static str {
    match finding {
        CLOSE_WAIT_LEAK => {
            "CLOSE_WAIT leak: the peer closed these connections and this process never called close(). \
             Usually a socket or response stream not closed on an error or timeout path, or a pool that \
             never evicts dead connections. Close sockets on every path (try/finally, using, defer), \
             dispose HTTP response bodies, enable idle eviction in the connection pool."
        }
        CONNECTION_CHURN => {
            "Connection churn: connections are opened and closed instead of reused. Usually a new \
             HTTP client or connection per request, or keep-alive disabled. Reuse one client, use a \
             connection pool, enable keep-alive; the closer leaves TIME_WAIT sockets holding ports."
        }
        PORT_EXHAUSTION => {
            "Port exhaustion: connect() finds no free local port for this destination (EADDRNOTAVAIL), \
             or the destination holds most of ip_local_port_range. Usually churn to one destination \
             with TIME_WAIT piling up. Reuse connections (pool, keep-alive); as stopgaps widen \
             net.ipv4.ip_local_port_range or spread over more destination addresses."
        }
        _ => "",
    }
}

fn fmt_counts(m: &serde_json::Map<String, serde_json::Value>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as text for a terminal.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    let h = &r.host;
    let _ = writeln!(
        o,
        "tcptrace report ({})",
        match r.source.as_str() {
            "daemon" => "from the running daemon",
            _ => "snapshot of the sockets now; churn and connect failures need `tcptrace daemon`",
        }
    );
    let _ = writeln!(
        o,
        "host: established {}  time_wait {}  close_wait {}  listen {}  total {}  dropped events {}",
        h.established, h.time_wait, h.close_wait, h.listen, h.total, r.dropped_events
    );
    let _ = writeln!(
        o,
        "ephemeral ports: {}-{} ({} ports)",
        h.ephemeral_port_range[0],
        h.ephemeral_port_range[1],
        range_size(h.ephemeral_port_range)
    );
    for t in &r.thresholds_crossed {
        let _ = writeln!(o, "threshold crossed: {t}");
    }
    let busiest: Vec<String> = r
        .destinations
        .iter()
        .filter(|d| d["ports_in_use"].as_u64().unwrap_or(0) > 0)
        .take(5)
        .map(|d| {
            format!(
                "{}{} {} ports",
                d["remote"].as_str().unwrap_or("?"),
                d["service"]
                    .as_str()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                d["ports_in_use"]
            )
        })
        .collect();
    if !busiest.is_empty() {
        let _ = writeln!(
            o,
            "destinations nearest to exhausting the range: {}",
            busiest.join(", ")
        );
    }
    if r.processes.is_empty() {
        let _ = writeln!(o, "\nno process with TCP problems or activity seen");
    }
    for p in &r.processes {
        let cw = &p["close_wait"];
        let _ = writeln!(
            o,
            "\nPID {} {}{}{}",
            p["pid"],
            p["comm"].as_str().unwrap_or("?"),
            if p["exited"].as_bool() == Some(true) {
                " (exited)"
            } else {
                ""
            },
            p["container"]
                .as_str()
                .map(|c| format!("  container {c}"))
                .unwrap_or_default(),
        );
        if let Some(c) = p["cmdline"].as_str().filter(|c| !c.is_empty()) {
            let _ = writeln!(o, "  command: {c}");
        }
        if let Some(c) = p["cgroup"].as_str() {
            let _ = writeln!(o, "  cgroup: {c}");
        }
        let _ = writeln!(
            o,
            "  CLOSE_WAIT {} (leaked {}), oldest {:.1}s, {} new in the last minute",
            cw["count"],
            cw["leaked"],
            cw["oldest_secs"].as_f64().unwrap_or(0.0),
            cw["new_per_min"]
        );
        if let Some(rs) = cw["remotes"].as_array().filter(|a| !a.is_empty()) {
            let rs: Vec<String> = rs
                .iter()
                .map(|x| {
                    let remote = x["remote"].as_str().unwrap_or("?");
                    format!(
                        "{remote}{} x{}",
                        service_of(remote)
                            .map(|s| format!(" ({s})"))
                            .unwrap_or_default(),
                        x["count"]
                    )
                })
                .collect();
            let _ = writeln!(o, "    to: {}", rs.join(", "));
        }
        let failed = p["connects"]["failed"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  connects: ok {}, failed: {}",
            p["connects"]["ok"],
            fmt_counts(&failed)
        );
        let ch = &p["churn"];
        let _ = writeln!(
            o,
            "  churn: {} closed ({}/s now, {} in the last minute), TIME_WAIT now {} (total {})",
            ch["closed_total"],
            ch["closed_per_sec"],
            ch["closed_last_min"],
            ch["time_wait"],
            ch["time_wait_total"]
        );
        for d in p["destinations"].as_array().into_iter().flatten().take(5) {
            let remote = d["remote"].as_str().unwrap_or("?");
            let failed = d["connects"]["failed"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "    {remote}{}: ok {}, failed {}, ports in use {}",
                service_of(remote)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                d["connects"]["ok"],
                fmt_counts(&failed),
                d["ports_in_use"]
            );
        }
        for f in p["findings"].as_array().into_iter().flatten() {
            let f = f.as_str().unwrap_or("");
            let _ = writeln!(o, "  finding: {}", advice(f));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{ChurnView, CloseWaitView, ConnectsView, ProcDestView};

    #[test]
    fn findings_follow_the_thresholds() {
        let a = Alerts::default();
        let mut p = ProcessView::default();
        assert!(findings(&p, 28232, &a).is_empty());
        p.close_wait = CloseWaitView {
            count: 3,
            leaked: 1,
            ..Default::default()
        };
        p.churn = ChurnView {
            closed_per_sec: 6.0,
            ..Default::default()
        };
        p.connects = ConnectsView {
            ok: 0,
            failed: [("EADDRNOTAVAIL".to_string(), 2)].into(),
        };
        assert_eq!(
            findings(&p, 28232, &a),
            vec![CLOSE_WAIT_LEAK, CONNECTION_CHURN, PORT_EXHAUSTION]
        );
        let q = ProcessView {
            destinations: vec![ProcDestView {
                remote: "10.0.0.1:443".into(),
                ports_in_use: 90,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(findings(&q, 100, &a), vec![PORT_EXHAUSTION]);
    }

    #[test]
    fn host_rules_of_thumb() {
        let h = HostCounts {
            close_wait: 11,
            time_wait: 5001,
            ..Default::default()
        };
        assert_eq!(
            host_thresholds(&h, &Alerts::default()),
            vec!["close_wait 11 > 10", "time_wait 5001 > 5000"]
        );
    }

    #[test]
    fn services() {
        assert_eq!(service_of("10.0.0.1:5432"), Some("postgresql"));
        assert_eq!(service_of("[::1]:443"), Some("https"));
        assert_eq!(service_of("10.0.0.1:1"), service_of("10.0.0.1:1"));
    }
}
