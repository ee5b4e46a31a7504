//! `tcptrace watch`: the live view (terminal screen, plain text when piped, JSON per interval)
//! and the event stream (`--events`).

use std::{
    io::{IsTerminal as _, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    host::signals::{Received, Signals},
    kernel::errno,
    kernel::event::TcpEvent,
    state::snapshot::{ProcessView, Snapshot},
    state::{Filter, SnapshotOptions, TableConfig},
    tracer::{EventContext, EventSink, Tracer, TracerOptions, monotonic_ns, unix_now},
};

#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub interval: Duration,
    pub events: bool,
    pub json: bool,
    pub wide: bool,
    pub filter: Filter,
    pub duration: Option<Duration>,
    pub tracer: TracerOptions,
}

/// One line of the event stream (`--events --json`).
#[derive(Serialize)]
struct EventLine<'a> {
    ts: f64,
    #[serde(rename = "type")]
    kind: &'static str,
    pid: u32,
    comm: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<String>,
    remote: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<String>,
}

/// Prints the event stream; runs on the reader thread.
fn event_sink(json: bool, filter: Filter) -> EventSink {
    // Offset from the kernel's monotonic clock to wall-clock time.
    let offset = unix_now() - monotonic_ns() as f64 / 1e9;
    let out = std::io::stdout();
    if !json {
        let _ = writeln!(
            out.lock(),
            "{:<12} {:>7} {:<15} {:<26} {:<26} TRANSITION",
            "TIME",
            "PID",
            "COMM",
            "LOCAL",
            "REMOTE"
        );
    }
    Box::new(move |ev: &TcpEvent, ctx: &EventContext| {
        let ts = offset + ev.ts_ns() as f64 / 1e9;
        let mut lines: Vec<EventLine> = Vec::new();
        if let TcpEvent::State {
            old,
            new,
            local,
            remote,
            ..
        } = *ev
            && filter.matches_event(ctx.pid, &ctx.comm, [local.port(), remote.port()])
        {
            lines.push(EventLine {
                ts,
                kind: "state",
                pid: ctx.pid,
                comm: &ctx.comm,
                local: Some(local.to_string()),
                remote: remote.to_string(),
                old: Some(old.name()),
                new: Some(new.name()),
                ms: ctx.prev_ns.map(|ns| (ns as f64 / 1e3).round() / 1e3),
                errno: None,
            });
        }
        // Failures as the table counted them (a refused non-blocking connect is decided by its
        // error report, not by connect()'s return value).
        for f in &ctx.failures {
            if filter.matches_event(f.pid, &f.comm, [0, f.remote.port()]) {
                lines.push(EventLine {
                    ts,
                    kind: "connect_failed",
                    pid: f.pid,
                    comm: &f.comm,
                    local: None,
                    remote: f.remote.to_string(),
                    old: None,
                    new: None,
                    ms: None,
                    errno: Some(errno::name(f.errno).into_owned()),
                });
            }
        }
        if lines.is_empty() {
            return;
        }
        let mut out = out.lock();
        for line in &lines {
            let r = if json {
                serde_json::to_writer(&mut out, line)
                    .map_err(std::io::Error::other)
                    .and_then(|_| out.write_all(b"\n"))
            } else {
                writeln!(out, "{}", text_event(line))
            };
            if r.is_err() {
                // stdout closed (e.g. `| head`): nothing more to print. Exiting closes the
                // program and link descriptors, which detaches everything.
                std::process::exit(0);
            }
        }
        let _ = out.flush();
    })
}

fn text_event(l: &EventLine) -> String {
    let time = clock(l.ts);
    let comm: String = l.comm.chars().take(15).collect();
    match l.kind {
        "state" => format!(
            "{time:<12} {:>7} {comm:<15} {:<26} {:<26} {} -> {}{}",
            l.pid,
            l.local.as_deref().unwrap_or(""),
            l.remote,
            l.old.unwrap_or(""),
            l.new.unwrap_or(""),
            l.ms.map(|ms| format!(" ({ms:.3} ms)")).unwrap_or_default()
        ),
        _ => format!(
            "{time:<12} {:>7} {comm:<15} {:<26} {:<26} connect failed: {}",
            l.pid,
            "-",
            l.remote,
            l.errno.as_deref().unwrap_or("")
        ),
    }
}

/// HH:MM:SS.mmm (UTC) of a unix time.
fn clock(ts: f64) -> String {
    let ms = (ts * 1000.0) as u64;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// Runs `watch` until Ctrl-C, SIGTERM or `--duration`.
pub async fn run(opts: WatchOptions) -> Result<()> {
    let sink = opts
        .events
        .then(|| event_sink(opts.json, opts.filter.clone()));
    let mut signals = Signals::new()?;
    let tracer = Tracer::start(opts.tracer.clone(), sink)?;
    for d in tracer.degraded() {
        eprintln!("tcptrace: warning: {d}");
    }
    let deadline = opts.duration.map(|d| Instant::now() + d);
    let mode = if opts.events {
        Mode::Events
    } else if opts.json {
        Mode::Json
    } else if std::io::stdout().is_terminal() {
        Mode::Screen
    } else {
        Mode::Text
    };
    let mut screen = (mode == Mode::Screen).then(Screen::enter);
    let snap_opts = SnapshotOptions {
        filter: opts.filter.clone(),
        ..Default::default()
    };
    let leak_after = opts.tracer.table.leak_after_ns;
    let mut next = Instant::now();
    let mut dropped_seen = 0;
    let result: Result<()> = async {
        loop {
            if mode == Mode::Events {
                // No silent loss: say when the kernel could not hand over events.
                let dropped = tracer.kernel_counters().dropped;
                if dropped > dropped_seen {
                    print_dropped(opts.json, dropped - dropped_seen, dropped);
                    dropped_seen = dropped;
                }
            } else {
                let snap = tracer.snapshot(&snap_opts);
                let ok = match mode {
                    Mode::Json => print_json(&snap),
                    Mode::Text => print_text(&snap, opts.wide, leak_after),
                    Mode::Screen => {
                        screen.as_mut().unwrap().draw(&snap, opts.wide, leak_after);
                        true
                    }
                    Mode::Events => true,
                };
                if !ok {
                    return Ok(());
                }
            }
            next += opts.interval;
            let now = Instant::now();
            let wake = match deadline {
                Some(d) if d <= next => d,
                _ => next,
            };
            if let Some(d) = deadline
                && now >= d
            {
                return Ok(());
            }
            let sleep = wake.saturating_duration_since(now);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                r = signals.recv() => if r == Received::Terminate { return Ok(()); },
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
        }
    }
    .await;
    drop(screen.take());
    // Detach before returning.
    tracer.stop();
    result
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Events,
    Json,
    Screen,
    Text,
}

fn print_dropped(json: bool, new: u64, total: u64) {
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"ts": unix_now(), "type": "dropped", "count": new, "dropped_events": total})
        )
    } else {
        writeln!(
            out,
            "{} {new} events dropped: the ring buffer was full (raise --ring-buffer-kib or filter less)",
            clock(unix_now())
        )
    };
    let _ = out.flush();
}

fn print_json(snap: &Snapshot) -> bool {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, snap).is_ok()
        && out.write_all(b"\n").is_ok()
        && out.flush().is_ok()
}

fn print_text(snap: &Snapshot, wide: bool, leak_after_ns: u64) -> bool {
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

fn fmt_age(secs: f64) -> String {
    if secs <= 0.0 {
        "-".into()
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{:.1}m", secs / 60.0)
    } else if secs < 86400.0 {
        format!("{:.1}h", secs / 3600.0)
    } else {
        format!("{:.1}d", secs / 86400.0)
    }
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
            "{} UTC  established {}  time_wait {}  close_wait {}  listen {}  total {}",
            &clock(snap.ts)[..8],
            h.established,
            h.time_wait,
            h.close_wait,
            h.listen,
            h.total,
        ),
        format!(
            "dropped events {}  ports {}-{}  leak after {}s  exited processes {}",
            snap.dropped_events,
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
        let comm: String = p.comm.chars().take(15).collect();
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
                p.cmdline.as_deref().unwrap_or("")
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

/// The live terminal screen: alternate buffer, redrawn every interval, restored on drop.
struct Screen;

impl Screen {
    fn enter() -> Self {
        let mut out = std::io::stdout();
        let _ = crossterm::execute!(
            out,
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        );
        Screen
    }

    fn draw(&mut self, snap: &Snapshot, wide: bool, leak_after_ns: u64) {
        let (cols, rows) = match crossterm::terminal::size() {
            Ok((c, r)) if c > 0 && r > 0 => (c, r),
            _ => (80, 24),
        };
        let lines = render(
            snap,
            wide,
            leak_after_ns,
            cols as usize,
            (rows as usize).saturating_sub(5),
        );
        let mut out = std::io::stdout().lock();
        let _ = crossterm::queue!(
            out,
            crossterm::cursor::MoveTo(0, 0),
            crossterm::terminal::Clear(crossterm::terminal::ClearType::All)
        );
        for (i, l) in lines.iter().enumerate() {
            let _ = crossterm::queue!(out, crossterm::cursor::MoveTo(0, i as u16));
            let _ = write!(out, "{l}");
        }
        let _ = crossterm::queue!(out, crossterm::cursor::MoveTo(0, rows.saturating_sub(1)));
        let _ = write!(out, "tcptrace watch: Ctrl-C to quit");
        let _ = out.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
    }
}

/// The table settings `watch` and `daemon` share.
pub fn table_config(leak_after: f64) -> TableConfig {
    let d = TableConfig::default();
    TableConfig {
        leak_after_ns: (leak_after * 1e9) as u64,
        max_time_wait: crate::host::procfs::max_tw_buckets().unwrap_or(d.max_time_wait),
        ..d
    }
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

    #[test]
    fn event_lines() {
        let l = EventLine {
            ts: 1.25,
            kind: "connect_failed",
            pid: 7,
            comm: "curl",
            local: None,
            remote: "127.0.0.1:1".into(),
            old: None,
            new: None,
            ms: None,
            errno: Some("ECONNREFUSED".into()),
        };
        assert!(
            text_event(&l).ends_with("127.0.0.1:1                connect failed: ECONNREFUSED")
        );
        let j = serde_json::to_value(&l).unwrap();
        assert_eq!(j["type"], "connect_failed");
        assert_eq!(j["errno"], "ECONNREFUSED");
        assert!(j.get("old").is_none());
    }
}
