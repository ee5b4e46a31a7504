//! `tcptrace report`: per-process findings, worst first, with what usually causes each problem
//! and what to change. Built from a detailed [`Snapshot`] (daemon) or from the sockets that
//! exist right now (no daemon).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    findings::{Thresholds, advice, findings, host_thresholds, range_size},
    format::escape,
};
use crate::{
    host::services::service_of,
    state::snapshot::{DestView, Snapshot},
};

/// Host counts plus the port range, as `report --json` shows them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportHost {
    pub established: u64,
    pub time_wait: u64,
    pub close_wait: u64,
    pub listen: u64,
    #[serde(default)]
    pub fin_wait2: u64,
    pub total: u64,
    pub ephemeral_port_range: [u16; 2],
    /// The host's (tcptrace's) network namespace; processes in others are marked.
    #[serde(default)]
    pub netns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// "daemon" (full history) or "snapshot" (sockets now, no history).
    pub source: String,
    pub ts: f64,
    pub host: ReportHost,
    pub dropped_events: u64,
    /// Program runs the kernel skipped (another BPF program was running on the CPU).
    #[serde(default)]
    pub missed_events: u64,
    /// Host-level rules of thumb crossed, in plain words.
    pub thresholds_crossed: Vec<String>,
    pub processes: Vec<serde_json::Value>,
    pub destinations: Vec<serde_json::Value>,
}
/// Builds the report from a detailed snapshot.
pub fn build(snap: &Snapshot, source: &str, thresholds: &Thresholds) -> Report {
    let size = range_size(snap.ephemeral_port_range);
    let processes = snap
        .processes
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.findings = Some(findings(&p, size, thresholds));
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
            fin_wait2: h.fin_wait2,
            total: h.total,
            ephemeral_port_range: snap.ephemeral_port_range,
            netns: snap.netns,
        },
        dropped_events: snap.dropped_events,
        missed_events: snap.missed_events,
        thresholds_crossed: host_thresholds(&h, thresholds),
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
fn fmt_counts(m: &serde_json::Map<String, serde_json::Value>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{} {v}", escape(k)))
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
        "host: established {}  time_wait {}  close_wait {}  fin_wait2 {}  listen {}  total {}  dropped events {}{}",
        h.established,
        h.time_wait,
        h.close_wait,
        h.fin_wait2,
        h.listen,
        h.total,
        r.dropped_events,
        missed_note(r.missed_events)
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
                escape(d["remote"].as_str().unwrap_or("?")),
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
            "\nPID {} {}{}{}{}",
            p["pid"],
            escape(p["comm"].as_str().unwrap_or("?")),
            if p["exited"].as_bool() == Some(true) {
                " (exited)"
            } else {
                ""
            },
            p["container"]
                .as_str()
                .map(|c| format!("  container {}", escape(c)))
                .unwrap_or_default(),
            match p["netns"].as_u64() {
                Some(n) if n != 0 && n != r.host.netns => format!("  netns {n}"),
                _ => String::new(),
            },
        );
        if let Some(c) = p["cmdline"].as_str().filter(|c| !c.is_empty()) {
            let _ = writeln!(o, "  command: {}", escape(c));
        }
        if let Some(pod) = p["pod"].as_object() {
            let f = |k: &str| escape(pod.get(k).and_then(Value::as_str).unwrap_or("?"));
            let _ = writeln!(
                o,
                "  pod: {}/{} container {}",
                f("namespace"),
                f("name"),
                f("container")
            );
        }
        if let Some(c) = p["cgroup"].as_str() {
            let _ = writeln!(o, "  cgroup: {}", escape(c));
        }
        let _ = writeln!(
            o,
            "  CLOSE_WAIT {} (leaked {}{}), oldest {:.1}s, {} new in the last minute",
            cw["count"],
            cw["leaked"],
            match cw["unaccepted"].as_u64() {
                Some(n) if n > 0 => format!(", {n} more never accepted"),
                _ => String::new(),
            },
            cw["oldest_secs"].as_f64().unwrap_or(0.0),
            cw["new_per_min"]
        );
        if let Some(rs) = cw["remotes"].as_array().filter(|a| !a.is_empty()) {
            let rs: Vec<String> = rs
                .iter()
                .map(|x| {
                    let remote = x["remote"].as_str().unwrap_or("?");
                    format!(
                        "{}{} x{}",
                        escape(remote),
                        service_of(remote)
                            .map(|s| format!(" ({s})"))
                            .unwrap_or_default(),
                        x["count"]
                    )
                })
                .collect();
            let _ = writeln!(o, "    to: {}", rs.join(", "));
        }
        for g in p["leak_stacks"].as_array().into_iter().flatten() {
            let frames: Vec<&str> = g["stack"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let n = g["sockets"].as_u64().unwrap_or(0);
            let _ = writeln!(
                o,
                "    {n} socket{} opened by {} from {}",
                if n == 1 { "" } else { "s" },
                g["opened"].as_str().unwrap_or("?"),
                escape(&stack_line(&frames))
            );
            for f in &frames {
                let _ = writeln!(o, "        {}", escape(f));
            }
            if let Some(problem) = g["problem"].as_str() {
                let _ = writeln!(o, "      note: {}", escape(problem));
            }
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
                "    {}{}: ok {}, failed {}, ports in use {}{}",
                escape(remote),
                service_of(remote)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                d["connects"]["ok"],
                fmt_counts(&failed),
                d["ports_in_use"],
                match (d["port_range"].as_array(), d["port_share"].as_f64()) {
                    (Some(r), Some(share)) if r.len() == 2 && r[1].as_u64() != Some(0) =>
                        format!(" of {}-{} ({:.0}%)", r[0], r[1], share * 100.0),
                    _ => String::new(),
                }
            );
        }
        for f in p["findings"].as_array().into_iter().flatten() {
            let f = f.as_str().unwrap_or("");
            let _ = writeln!(o, "  finding: {}", advice(f));
        }
    }
    o
}

/// A stack as one line, outermost call first: "main -> handle_upload -> connect" (function
/// names without their source lines; the entry points every stack starts from left out).
pub fn stack_line(frames: &[&str]) -> String {
    const ENTRY: &[&str] = &[
        "_start",
        "__libc_start_main",
        "__libc_start_call_main",
        "start_thread",
        "clone",
        "clone3",
        "__clone",
        "__clone3",
    ];
    let names: Vec<&str> = frames
        .iter()
        .rev()
        .map(|f| f.split(" (").next().unwrap_or(f))
        .filter(|f| !ENTRY.contains(f) && !f.starts_with("__libc_start_main"))
        .collect();
    if names.is_empty() {
        "(no frames)".to_string()
    } else {
        names.join(" -> ")
    }
}

/// "  missed N" when the kernel skipped program runs, else nothing (the usual case).
pub fn missed_note(missed: u64) -> String {
    if missed == 0 {
        String::new()
    } else {
        format!("  missed {missed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_is_one_line_outermost_first() {
        let frames = [
            "__libc_connect (connect.c:26)",
            "fetch_thumbnail (thumb.c:10)",
            "handle_upload (up.c:42)",
            "main (main.c:7)",
            "__libc_start_call_main (libc_start_call_main.h:58)",
        ];
        assert_eq!(
            stack_line(&frames),
            "main -> handle_upload -> fetch_thumbnail -> __libc_connect"
        );
        assert_eq!(stack_line(&[]), "(no frames)");
    }
}
