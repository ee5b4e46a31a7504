//! The daemon's log: it logs with `tracing`'s macros (`tracing::warn!(reason = %r, "degraded")`),
//! and [`Logfmt`], a tracing-subscriber layer installed by [`init`], writes each event as one
//! logfmt line on stderr (`level=warn msg="..." key=value`), which journald keeps as is and
//! log pipelines parse. Under systemd each line starts with its syslog priority.

use std::fmt::Write as _;

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    layer::{Context, Layer, SubscriberExt as _},
    util::SubscriberInitExt as _,
};

use crate::views::format::{needs_escape, push_escaped};

/// An error and its causes on one line, "what failed: why: why", as `{:#}` shows an
/// anyhow error; for the daemon's log lines, where errors are not turned into anyhow's.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Quotes a value when it needs it. Inside quotes `"` and `\\` are escaped with a backslash,
/// newline as `\n`, and every other control or invisible formatting character as the views
/// write it (`\x1b`, `\u{9b}`): values come from other processes (command names, cgroups)
/// and must not reach a terminal that shows the log, nor split or forge a log line.
fn push_value(out: &mut String, v: &str) {
    if !v.is_empty()
        && !v.contains(|c: char| c.is_whitespace() || c == '"' || c == '=' || needs_escape(c))
    {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => push_escaped(out, c),
        }
    }
    out.push('"');
}

/// Formats one line.
pub fn line(level: &str, msg: &str, fields: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(64);
    let _ = write!(out, "level={level} msg=");
    push_value(&mut out, msg);
    for (k, v) in fields {
        out.push(' ');
        out.push_str(k);
        out.push('=');
        push_value(&mut out, v);
    }
    out
}

/// The syslog priority journald gives a line starting with `<N>` (sd-daemon(3)): so that
/// `journalctl -p warning` shows the alerts.
fn priority(level: &str) -> u8 {
    match level {
        "error" => 3,
        "warn" => 4,
        "info" => 6,
        _ => 7,
    }
}

/// Whether stderr is connected to the journal: JOURNAL_STREAM names its device and inode
/// (systemd sets it for the service; a redirected stderr no longer matches).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    static JOURNAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
            return false;
        };
        let Ok(meta) = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
        else {
            return false;
        };
        use std::os::unix::fs::MetadataExt as _;
        dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
    })
}

/// Writes one line to stderr (with its priority prefix when stderr is the journal).
fn write_line(level: &str, msg: &str, fields: &[(&str, String)]) {
    if stderr_is_journal() {
        eprintln!("<{}>{}", priority(level), line(level, msg, fields));
    } else {
        eprintln!("{}", line(level, msg, fields));
    }
}

/// Installs [`Logfmt`] as the process's tracing subscriber (once; later calls do nothing).
pub fn init() {
    let _ = tracing_subscriber::registry().with(Logfmt).try_init();
}

/// The tracing layer that writes events as logfmt lines: `level`, then the event's message as
/// `msg`, then its other fields in the order the event gives them. Values are escaped as
/// [`line`] does: they may come from other processes.
pub struct Logfmt;

impl<S: Subscriber> Layer<S> for Logfmt {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        write_line(level_name(*event.metadata().level()), &f.msg, &f.fields);
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        _ => "debug",
    }
}

/// One event's message and fields, as text.
#[derive(Default)]
struct Fields {
    msg: String,
    fields: Vec<(&'static str, String)>,
}

impl Fields {
    fn set(&mut self, field: &Field, text: String) {
        if field.name() == "message" {
            self.msg = text;
        } else {
            self.fields.push((field.name(), text));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // Messages and `%value` fields format through Display here.
        self.set(field, format!("{value:?}"));
    }
}

/// A tracing event at a level known only at run time (`"error"`, `"warn"`, `"info"`, else
/// debug): `log_at!(level, key = value, ..., "message")`.
macro_rules! log_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            "error" => tracing::error!($($rest)+),
            "warn" => tracing::warn!($($rest)+),
            "info" => tracing::info!($($rest)+),
            _ => tracing::debug!($($rest)+),
        }
    };
}
pub(crate) use log_at;

/// Every field name an alert may carry, in the order they are logged.
const ALERT_FIELDS: [&str; 11] = [
    "pid",
    "comm",
    "container",
    "close_wait",
    "leaked",
    "oldest_secs",
    "threshold",
    "eaddrnotavail_total",
    "remote",
    "ports_in_use",
    "range_size",
];

/// Logs one alert: its level, message and the fields it has (names from [`ALERT_FIELDS`]).
pub fn alert(a: &super::alerts::Alert) {
    debug_assert!(
        a.fields.iter().all(|(n, _)| ALERT_FIELDS.contains(n)),
        "an alert field is not logged: {:?}",
        a.fields
    );
    let f = |name: &str| {
        a.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    log_at!(
        a.level,
        pid = f("pid"),
        comm = f("comm"),
        container = f("container"),
        close_wait = f("close_wait"),
        leaked = f("leaked"),
        oldest_secs = f("oldest_secs"),
        threshold = f("threshold"),
        eaddrnotavail_total = f("eaddrnotavail_total"),
        remote = f("remote"),
        ports_in_use = f("ports_in_use"),
        range_size = f("range_size"),
        "{}",
        a.msg
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields as the layer collects them from a real tracing event.
    /// Level, message and fields of one event.
    type Logged = (String, String, Vec<(&'static str, String)>);

    fn collected(emit: impl FnOnce()) -> Vec<Logged> {
        use std::sync::{Arc, Mutex};
        struct Grab(Arc<Mutex<Vec<Logged>>>);
        impl<S: Subscriber> Layer<S> for Grab {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                let mut f = Fields::default();
                event.record(&mut f);
                let level = level_name(*event.metadata().level()).to_string();
                self.0.lock().unwrap().push((level, f.msg, f.fields));
            }
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let sub = tracing_subscriber::registry().with(Grab(out.clone()));
        tracing::subscriber::with_default(sub, emit);
        Arc::try_unwrap(out).unwrap().into_inner().unwrap()
    }

    #[test]
    fn events_become_message_and_fields() {
        let comm = "a \"b\"";
        let none: Option<&str> = None;
        let got = collected(|| {
            log_at!("warn", pid = 42, comm, absent = none, ready = %true, "CLOSE_WAIT leak");
            log_at!("error", "{}: {}", "kernel", "record lost");
        });
        assert_eq!(
            got,
            vec![
                (
                    "warn".to_string(),
                    "CLOSE_WAIT leak".to_string(),
                    vec![
                        ("pid", "42".to_string()),
                        ("comm", comm.to_string()),
                        ("ready", "true".to_string())
                    ]
                ),
                (
                    "error".to_string(),
                    "kernel: record lost".to_string(),
                    vec![]
                ),
            ]
        );
        let (level, msg, fields) = &got[0];
        assert_eq!(
            line(level, msg, fields),
            "level=warn msg=\"CLOSE_WAIT leak\" pid=42 comm=\"a \\\"b\\\"\" ready=true"
        );
    }

    /// Every `("name", value)` pair the alerts build names a field [`alert`] logs.
    #[test]
    fn alerts_log_every_field_they_carry() {
        let src = include_str!("alerts.rs");
        let names: std::collections::BTreeSet<&str> = src
            .split("(\"")
            .skip(1)
            .filter_map(|rest| rest.split_once("\", "))
            .map(|(name, _)| name)
            .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        assert!(names.len() >= 10, "{names:?}");
        for n in &names {
            assert!(ALERT_FIELDS.contains(n), "alert field {n} is never logged");
        }
    }

    #[test]
    fn journal_priorities() {
        assert_eq!(
            ["error", "warn", "info", "debug"].map(priority),
            [3, 4, 6, 7]
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(
            line(
                "warn",
                "CLOSE_WAIT leak",
                &[
                    ("pid", "42".into()),
                    ("cmdline", "a \"b\"".into()),
                    ("x", "".into())
                ]
            ),
            "level=warn msg=\"CLOSE_WAIT leak\" pid=42 cmdline=\"a \\\"b\\\"\" x=\"\""
        );
    }

    #[test]
    fn controls_are_escaped() {
        let l = line(
            "warn",
            "leak",
            &[
                ("comm", "\x1b[2J\x1b]0;pwned\x07".into()),
                ("cmdline", "a\nlevel=error msg=forged\u{9b}\\".into()),
            ],
        );
        assert_eq!(
            l,
            "level=warn msg=leak comm=\"\\x1b[2J\\x1b]0;pwned\\x07\" \
             cmdline=\"a\\nlevel=error msg=forged\\u{9b}\\\\\""
        );
        assert!(!l.chars().any(char::is_control), "{l:?}");
    }
}
