//! `tcptrace watch`: the live view (terminal screen, plain text when piped, JSON per interval)
//! and the event stream (`--events`).

mod events;
mod screen;
mod text;

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use self::{
    events::{EventHeader, event_sink, print_dropped},
    text::{print_json, print_text},
};

use crate::{
    host::signals::{Received, SignalError, Signals},
    kernel::event::TcpState,
    state::{Filter, SnapshotOptions, TableConfig},
    tracer::{Tracer, TracerError, TracerOptions},
};

/// Why `watch` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Signals(#[from] SignalError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    /// The interactive screen could not use the terminal.
    #[error("drawing on the terminal (pipe the output for plain text instead)")]
    Terminal(#[source] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub interval: Duration,
    pub events: bool,
    pub json: bool,
    pub wide: bool,
    pub filter: Filter,
    /// With `events`: only transitions from or to these states (all when empty).
    pub states: Vec<TcpState>,
    pub duration: Option<Duration>,
    pub tracer: TracerOptions,
}
/// Runs `watch` until Ctrl-C, SIGTERM or `--duration`.
pub async fn run(opts: WatchOptions) -> Result<(), WatchError> {
    let header = EventHeader::new();
    let sink = opts.events.then(|| {
        event_sink(
            opts.json,
            opts.filter.clone(),
            opts.states.clone(),
            header.clone(),
        )
    });
    let mut signals = Signals::new()?;
    let tracer = Tracer::start(opts.tracer.clone(), sink)?;
    for d in tracer.degraded() {
        eprintln!("tcptrace: warning: {d}");
    }
    if opts.events {
        header.print(opts.json);
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
    let snap_opts = snapshot_options(&opts, mode);
    let leak_after = opts.tracer.table.leak_after_ns;
    if mode == Mode::Screen {
        let r = screen::run(
            &tracer,
            &mut signals,
            snap_opts,
            opts.interval,
            deadline,
            leak_after,
        )
        .await;
        tracer.stop();
        return r.map_err(WatchError::Terminal);
    }
    let mut next = Instant::now();
    let mut dropped_seen = 0;
    let result: Result<(), WatchError> = async {
        loop {
            // Off the screen, the kernel programs' rare failure lines go to stderr.
            for line in tracer.kernel_log().take() {
                eprintln!("tcptrace: {}: {}", line.level, line.msg);
            }
            if mode == Mode::Events {
                // No silent loss: say when the kernel could not hand over events.
                let k = tracer.kernel_counters();
                if k.lost() > dropped_seen {
                    print_dropped(opts.json, k.lost() - dropped_seen, &k);
                    dropped_seen = k.lost();
                }
            } else {
                let snap = tracer.snapshot(&snap_opts);
                let ok = match mode {
                    Mode::Json => print_json(&snap),
                    Mode::Text => print_text(&snap, opts.wide, leak_after),
                    Mode::Screen | Mode::Events => true,
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
/// What the snapshots of `watch` hold: with `--wide` on the screen or in text, the command
/// line (the COMMAND column) too.
fn snapshot_options(opts: &WatchOptions, mode: Mode) -> SnapshotOptions {
    SnapshotOptions {
        filter: opts.filter.clone(),
        detail: opts.wide && matches!(mode, Mode::Screen | Mode::Text),
        ..Default::default()
    }
}

/// The table settings `watch` and `daemon` share.
pub fn table_config(leak_after: f64) -> TableConfig {
    let d = TableConfig::default();
    TableConfig {
        leak_after_ns: (leak_after * 1e9) as u64,
        max_time_wait: crate::host::procfs::max_tw_buckets().unwrap_or(d.max_time_wait),
        resolve_holders: true,
        ..d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(wide: bool) -> WatchOptions {
        WatchOptions {
            interval: Duration::from_secs(1),
            events: false,
            json: false,
            wide,
            filter: Filter::default(),
            states: Vec::new(),
            duration: None,
            tracer: TracerOptions::default(),
        }
    }

    #[test]
    fn wide_text_asks_for_the_command_line() {
        assert!(snapshot_options(&opts(true), Mode::Text).detail);
        assert!(snapshot_options(&opts(true), Mode::Screen).detail);
        assert!(!snapshot_options(&opts(false), Mode::Text).detail);
        assert!(!snapshot_options(&opts(true), Mode::Json).detail);
    }
}
