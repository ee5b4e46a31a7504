//! The detail pane of the selected process: its CLOSE_WAIT sockets (local, remote, age,
//! holders), its destinations with the ports in use against the range as bars, its connects by
//! errno, its churn, and its findings with their advice.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    text::{Line, Span},
    widgets::{Block, Borders, Paragraph, Sparkline, Wrap},
};

use super::{
    app::App,
    draw::{Palette, View, container},
};
use crate::{
    state::snapshot::ProcessView,
    views::{
        findings::{advice, findings, range_size},
        format::{escape, fmt_age},
        report::stack_line,
    },
};

/// CLOSE_WAIT sockets listed before "... and N more".
const MAX_SOCKETS: usize = 10;
const BAR: usize = 20;
/// Leak stacks listed before "... and N more".
const MAX_STACKS: usize = 3;

pub fn draw(f: &mut Frame, area: Rect, app: &App, v: &View) {
    let (title, body) = match v.detail {
        Some(p) => (
            format!("pid {} {}  (PgUp/PgDn scroll)", p.pid, escape(&p.comm)),
            lines(p, v),
        ),
        None => (
            "detail".into(),
            vec![Line::from(
                "the selected process has no TCP sockets any more",
            )],
        ),
    };
    let block = Block::new()
        .borders(Borders::TOP)
        .title(Span::styled(title, v.palette.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    // Churn over time: the process's closes per second over the last refreshes.
    let [graph, text] = Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(inner);
    let churn: Vec<u64> = v
        .detail
        .and_then(|p| app.history.closes_by_pid.get(&p.pid))
        .map(|q| {
            q.iter()
                .skip(q.len().saturating_sub(graph.width as usize))
                .copied()
                .collect()
        })
        .unwrap_or_default();
    let now = churn.last().copied().unwrap_or(0);
    let max = churn.iter().max().copied().unwrap_or(0);
    f.render_widget(
        Sparkline::default()
            .block(Block::new().title(format!("closes/s {now} (max {max})")))
            .style(v.palette.churn())
            .data(&churn),
        graph,
    );
    // Never scrolled past the last line.
    let scroll = app
        .detail_scroll
        .min(u16::try_from(body.len().saturating_sub(1)).unwrap_or(u16::MAX));
    f.render_widget(
        Paragraph::new(body)
            .wrap(Wrap { trim: false })
            .scroll((scroll, 0)),
        text,
    );
}

/// `[#####.....]` for `used` of `total`.
pub fn bar(used: u64, total: u64) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((used.min(total) as f64 / total as f64) * BAR as f64).ceil() as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR - filled))
}

pub fn lines(p: &ProcessView, v: &View) -> Vec<Line<'static>> {
    let pal: Palette = v.palette;
    let mut out = Vec::new();
    out.push(Line::from(format!(
        "container {}  cmdline {}",
        container(p),
        escape(p.cmdline.as_deref().unwrap_or("-"))
    )));
    let cw = &p.close_wait;
    let head = format!(
        "CLOSE_WAIT {} (leaked {}, unaccepted {}, oldest {}, {:.1} new/min)",
        cw.count,
        cw.leaked,
        cw.unaccepted,
        fmt_age(cw.oldest_secs),
        cw.new_per_min
    );
    out.push(Line::from(Span::styled(
        head,
        if cw.leaked > 0 {
            pal.bad()
        } else {
            pal.title()
        },
    )));
    let sockets = cw.sockets.as_deref().unwrap_or(&[]);
    if !sockets.is_empty() {
        out.push(Line::from(format!(
            "  {:<28} {:<28} {:>7}  HOLDERS (pid/fd)",
            "LOCAL", "REMOTE", "AGE"
        )));
    }
    for s in sockets.iter().take(MAX_SOCKETS) {
        let holders = if s.unaccepted {
            "not accepted".to_string()
        } else if s.holders.is_empty() {
            "-".to_string()
        } else {
            s.holders
                .iter()
                .map(|h| format!("{}/{}", h.pid, h.fd))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let est = if s.age_estimated { "~" } else { "" };
        out.push(Line::from(format!(
            "  {:<28} {:<28} {:>7}  {holders}",
            s.local,
            s.remote,
            format!("{est}{}", fmt_age(s.age_secs))
        )));
    }
    if sockets.len() > MAX_SOCKETS {
        out.push(Line::from(format!(
            "  ... and {} more",
            sockets.len() - MAX_SOCKETS
        )));
    }
    // The code paths that opened them (--stacks): one line per stack, most sockets first.
    for g in p.leak_stacks.iter().take(MAX_STACKS) {
        let frames: Vec<&str> = g.stack.iter().map(String::as_str).collect();
        out.push(Line::from(Span::styled(
            format!(
                "  {} opened by {} from {}",
                g.sockets,
                g.opened,
                escape(&stack_line(&frames))
            ),
            pal.bad(),
        )));
        if let Some(problem) = &g.problem {
            out.push(Line::from(format!("    note: {}", escape(problem))));
        }
    }
    if p.leak_stacks.len() > MAX_STACKS {
        out.push(Line::from(format!(
            "  ... and {} more stacks (tcptrace report)",
            p.leak_stacks.len() - MAX_STACKS
        )));
    }
    let failed = if p.connects.failed.is_empty() {
        "none".to_string()
    } else {
        p.connects
            .failed
            .iter()
            .map(|(e, n)| format!("{e} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push(Line::from(Span::styled(
        format!("connects ok {}, failed: {failed}", p.connects.ok),
        if p.connects.failed.is_empty() {
            pal.title()
        } else {
            pal.warn()
        },
    )));
    out.push(Line::from(format!(
        "churn {:.1} closes/s, {} in the last minute, {} total; TIME_WAIT {} now",
        p.churn.closed_per_sec, p.churn.closed_last_min, p.churn.closed_total, p.churn.time_wait
    )));
    for d in &p.destinations {
        let total = range_size(d.port_range);
        let style = if d.port_share >= v.thresholds.port_share {
            pal.bad()
        } else {
            Default::default()
        };
        out.push(Line::from(Span::styled(
            format!(
                "  {:<28} {} {} of {} ports ({:.1}%), failed {}",
                d.remote,
                bar(d.ports_in_use, total),
                d.ports_in_use,
                total,
                d.port_share * 100.0,
                d.connects.failed_total()
            ),
            style,
        )));
    }
    let range = range_size(v.snap.ephemeral_port_range);
    let found = findings(p, range, v.thresholds);
    if found.is_empty() {
        out.push(Line::from("no findings"));
    }
    for name in found {
        out.push(Line::from(Span::styled(name.clone(), pal.bad())));
        out.push(Line::from(format!("  {}", advice(&name))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{CloseWaitView, HolderView, Snapshot, SocketView};
    use crate::views::findings::Thresholds;

    #[test]
    fn bars_and_lines() {
        assert_eq!(bar(0, 100), format!("[{}]", ".".repeat(20)));
        assert_eq!(
            bar(50, 100),
            format!("[{}{}]", "#".repeat(10), ".".repeat(10))
        );
        assert_eq!(bar(1, 28232), format!("[#{}]", ".".repeat(19)));
        assert_eq!(bar(9, 0), format!("[{}]", ".".repeat(20)));
        let p = ProcessView {
            pid: 7,
            comm: "srv\x1b[2J".into(),
            close_wait: CloseWaitView {
                count: 1,
                leaked: 1,
                sockets: Some(vec![SocketView {
                    local: "127.0.0.1:47100".into(),
                    remote: "127.0.0.1:51000".into(),
                    age_secs: 12.0,
                    holders: vec![HolderView { pid: 7, fd: 5 }],
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        };
        let snap = Snapshot::default();
        let th = Thresholds::default();
        let v = View {
            snap: &snap,
            rows: &[],
            detail: Some(&p),
            leak_after_ns: 5_000_000_000,
            thresholds: &th,
            palette: Palette { color: false },
        };
        let text: Vec<String> = lines(&p, &v).iter().map(|l| l.to_string()).collect();
        let all = text.join("\n");
        assert!(all.contains("127.0.0.1:47100"), "{all}");
        assert!(all.contains("127.0.0.1:51000"), "{all}");
        assert!(all.contains("7/5"), "{all}");
        assert!(all.contains("close_wait_leak"), "{all}");
        assert!(all.contains("CLOSE_WAIT leak: the peer closed"), "{all}");
    }
}
