//! The event stream of `watch --events`: one line (or JSON object) per state transition and
//! per connect failure the table counted, printed from the reader thread.

use std::{
    io::Write,
    sync::{Arc, Once},
};

use serde::Serialize;

use crate::{
    host::clock::{monotonic_ns, unix_now},
    kernel::{
        errno,
        event::{TcpEvent, TcpState},
        probes::KernelCounters,
    },
    state::Filter,
    tracer::{EventContext, EventSink},
    views::format::{clock, cpu_drops, escape_cut, zone},
};

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

/// The header line of the text event stream, printed once: by [`EventHeader::print`] once the
/// tracer is attached, or before the first event if that comes first. Nothing is printed
/// before the tracer is attached, so a start that fails leaves stdout empty.
#[derive(Clone)]
pub(super) struct EventHeader(Arc<Once>);

impl EventHeader {
    pub(super) fn new() -> Self {
        EventHeader(Arc::new(Once::new()))
    }

    pub(super) fn print(&self, json: bool) {
        self.0.call_once(|| {
            if json {
                return;
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{:<12} {:>7} {:<15} {:<26} {:<26} TRANSITION",
                format!("TIME ({})", zone(unix_now())),
                "PID",
                "COMM",
                "LOCAL",
                "REMOTE"
            );
            let _ = out.flush();
        });
    }
}

/// Prints the event stream; runs on the reader thread. `states`: print only transitions from or
/// to one of these (all when empty).
pub(super) fn event_sink(
    json: bool,
    filter: Filter,
    states: Vec<TcpState>,
    header: EventHeader,
) -> EventSink {
    // Offset from the kernel's monotonic clock to wall-clock time.
    let offset = unix_now() - monotonic_ns() as f64 / 1e9;
    let out = std::io::stdout();
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
            && filter.matches_event(ctx.pid, &ctx.comm, Some(&local), &remote)
            && (states.is_empty() || states.contains(&old) || states.contains(&new))
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
            if filter.matches_event(f.pid, &f.comm, None, &f.remote) {
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
        header.print(json);
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
    let comm = escape_cut(l.comm, 15);
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
/// Says that `new` events were lost since the last call (`k`: the totals so far).
pub(super) fn print_dropped(json: bool, new: u64, k: &KernelCounters) {
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"ts": unix_now(), "type": "dropped", "count": new,
                "dropped_events": k.dropped, "missed_events": k.missed,
                "dropped_by_cpu": k.dropped_by_cpu.iter()
                    .map(|&(cpu, n)| serde_json::json!({"cpu": cpu, "dropped": n}))
                    .collect::<Vec<_>>()})
        )
    } else {
        writeln!(
            out,
            "{} {new} events lost ({} so far because the ring buffer was full{}: raise \
             --ring-buffer-kib; {} skipped by the kernel while another BPF program ran)",
            clock(unix_now()),
            k.dropped,
            cpu_drops(&k.dropped_by_cpu),
            k.missed
        )
    };
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A name with control bytes is shown escaped in text, kept as it is in JSON.
        let hostile = EventLine {
            comm: "\x1b]0;pwned\x07",
            ..l
        };
        let text = text_event(&hostile);
        assert!(text.contains(" \\x1b]0;pwned "), "{text}");
        let j = serde_json::to_value(&hostile).unwrap();
        assert_eq!(j["comm"], "\x1b]0;pwned\x07");
    }
}
