//! The per-interval views of `watch`: plain text lines (piped, or drawn on the screen) and JSON.

use std::io::Write;

use crate::{
    state::snapshot::{ProcessView, Snapshot},
    views::format::{clock, escape, escape_cut, fmt_age},
};

pub(super) fn print_json(snap: &Snapshot) -> bool {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, snap).is_ok()
        && out.write_all(b"\n").is_ok()
        && out.flush().is_ok()
}

pub(super) fn print_text(snap: &Snapshot, wide: bool, leak_after_ns: u64) -> bool {
    let mut out = std::io::stdout().lock();
    let width = if wide { usize::MAX } else { 80 };
    let lines = render(snap, wide, leak_after_ns, width, 20);
    for l in lines {
        if writeln!(out, "{l}").is_err() {
            return false;
        }
    }
    writeln!(out).is_ok() && out.flush().is_ok()
}
fn top_error(p: &ProcessView) -> String {
    p.connects
        .failed
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(e, _)| e.clone())
        .unwrap_or_else(|| "-".into())
}

/// The lines of one screen: a host summary, then processes worst first (at most `rows`).
/// Lines are cut to `width` characters.
pub fn render(
    snap: &Snapshot,
    wide: bool,
    leak_after_ns: u64,
    width: usize,
    rows: usize,
) -> Vec<String> {
    let h = &snap.host;
    let mut lines = vec![
        format!(
            "{} {}  established {}  time_wait {}  close_wait {}  listen {}  total {}",
            &clock(snap.ts)[..8],
            crate::views::format::zone(snap.ts),
            h.established,
            h.time_wait,
            h.close_wait,
            h.listen,
            h.total,
        ),
        format!(
            "dropped events {}{}  ports {}-{}  leak after {}s  exited processes {}",
            snap.dropped_events,
            crate::views::report::missed_note(snap.missed_events),
            snap.ephemeral_port_range[0],
            snap.ephemeral_port_range[1],
            leak_after_ns as f64 / 1e9,
            snap.exited.processes
        ),
    ];
    let mut header = format!(
        "{:>7} {:<15} {:>6} {:>6} {:>6} {:>6} {:>6} {:<13} {:>7}",
        "PID", "COMM", "CLWAIT", "LEAKED", "OLDEST", "CONN", "FAILED", "ERROR", "CLOSE/s"
    );
    if wide {
        header.push_str(&format!(" {:>6} {:<22} {}", "TW", "TOP REMOTE", "COMMAND"));
    }
    lines.push(header);
    for p in snap.processes.iter().take(rows) {
        let comm = escape_cut(&p.comm, 15);
        let mut l = format!(
            "{:>7} {:<15} {:>6} {:>6} {:>6} {:>6} {:>6} {:<13} {:>7.1}",
            p.pid,
            comm,
            p.close_wait.count,
            p.close_wait.leaked,
            fmt_age(p.close_wait.oldest_secs),
            p.connects.ok,
            p.connects.failed_total(),
            top_error(p),
            p.churn.closed_per_sec,
        );
        if wide {
            let remote = p
                .close_wait
                .remotes
                .first()
                .map(|r| r.remote.clone())
                .or_else(|| p.destinations.first().map(|d| d.remote.clone()))
                .unwrap_or_else(|| "-".into());
            l.push_str(&format!(
                " {:>6} {:<22} {}",
                p.churn.time_wait,
                remote,
                escape(p.cmdline.as_deref().unwrap_or(""))
            ));
        }
        lines.push(l);
    }
    if snap.processes.is_empty() {
        lines.push("(no TCP activity seen yet)".into());
    }
    for l in &mut lines {
        if l.chars().count() > width {
            *l = l.chars().take(width).collect();
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{CloseWaitView, ConnectsView};

    fn snap() -> Snapshot {
        let mut failed = std::collections::BTreeMap::new();
        failed.insert("EADDRNOTAVAIL".to_string(), 7);
        Snapshot {
            ts: 3600.0 * 10.0 + 61.5,
            processes: vec![ProcessView {
                pid: 4242,
                comm: "a-very-long-command-name".into(),
                close_wait: CloseWaitView {
                    count: 3,
                    leaked: 2,
                    oldest_secs: 75.0,
                    ..Default::default()
                },
                connects: ConnectsView { ok: 10, failed },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn screen_lines_fit_80_columns() {
        let lines = render(&snap(), false, 5_000_000_000, 80, 20);
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
        assert_eq!(
            lines[0],
            "10:01:01 UTC  established 0  time_wait 0  close_wait 0  listen 0  total 0"
        );
        assert_eq!(
            lines[1],
            "dropped events 0  ports 0-0  leak after 5s  exited processes 0"
        );
        assert_eq!(
            lines[3],
            "   4242 a-very-long-com      3      2   1.2m     10      7 EADDRNOTAVAIL     0.0"
        );
    }
}
