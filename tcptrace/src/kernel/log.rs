//! What the kernel programs log on their rare failure paths (aya-log), kept for the views.
//!
//! [`Probes::drain_kernel_log`](crate::kernel::probes::Probes::drain_kernel_log) moves the
//! records from the kernel's log ring into a [`KernelLog`] once per tick. The daemon takes the
//! lines and writes them to its log; `watch` writes them to stderr, except on its screen (which
//! must stay intact), where they only count. At most [`KEEP`] lines wait: a flood cannot grow the queue, and the
//! lines dropped are counted. aya-log's kernel ring (AYA_LOGS, 128 KiB) holds about 500
//! records; beyond that many in one tick the kernel drops them, uncounted.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

/// Lines kept until a view takes them; beyond, the oldest are dropped and counted.
pub const KEEP: usize = 64;

/// One line the kernel programs logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLogLine {
    /// `error`, `warn`, `info`, `debug` or `trace`, as logfmt writes levels.
    pub level: &'static str,
    /// The message, starting with `kernel: `.
    pub msg: String,
}

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<KernelLogLine>,
    /// Lines dropped since the last take.
    dropped: u64,
    /// Lines logged since start, dropped ones included.
    total: u64,
}

/// The kernel's log lines waiting for a view. Clones share one queue.
#[derive(Clone, Debug, Default)]
pub struct KernelLog(Arc<Mutex<Queue>>);

impl KernelLog {
    /// Adds a line, dropping the oldest when [`KEEP`] are waiting.
    pub fn push(&self, level: &'static str, msg: String) {
        let mut q = self.0.lock().unwrap();
        if q.lines.len() >= KEEP {
            q.lines.pop_front();
            q.dropped += 1;
        }
        q.lines.push_back(KernelLogLine { level, msg });
        q.total += 1;
    }

    /// Takes the waiting lines, oldest first. When some were dropped since the last take, a
    /// first line says how many.
    pub fn take(&self) -> Vec<KernelLogLine> {
        let mut q = self.0.lock().unwrap();
        let mut out = Vec::with_capacity(q.lines.len() + 1);
        if q.dropped > 0 {
            out.push(KernelLogLine {
                level: "warn",
                msg: format!(
                    "kernel: {} more lines dropped (over {KEEP} between two reads)",
                    q.dropped
                ),
            });
            q.dropped = 0;
        }
        out.extend(q.lines.drain(..));
        out
    }

    /// Lines the kernel programs logged since start, dropped ones included.
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().total
    }
}

/// The level as logfmt writes it.
pub fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// Where aya-log delivers the records it decodes: into a [`KernelLog`].
pub(crate) struct Collector(pub(crate) KernelLog);

impl log::Log for Collector {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.push(
            level_name(record.level()),
            format!("kernel: {}", record.args()),
        );
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use log::Log as _;

    use super::*;

    fn record(c: &Collector, level: log::Level, msg: &str) {
        c.log(
            &log::Record::builder()
                .level(level)
                .target("tcptrace")
                .file(Some("tcptrace-ebpf/src/main.rs"))
                .line(Some(1))
                .args(format_args!("{msg}"))
                .build(),
        );
    }

    #[test]
    fn records_become_prefixed_lines_with_logfmt_levels() {
        let log = KernelLog::default();
        let c = Collector(log.clone());
        record(&c, log::Level::Warn, "CONNECTS insert failed (error -12)");
        record(&c, log::Level::Error, "record lost");
        assert_eq!(
            log.take(),
            [
                KernelLogLine {
                    level: "warn",
                    msg: "kernel: CONNECTS insert failed (error -12)".into()
                },
                KernelLogLine {
                    level: "error",
                    msg: "kernel: record lost".into()
                },
            ]
        );
        assert!(log.take().is_empty(), "a take empties the queue");
        assert_eq!(log.total(), 2);
        assert_eq!(level_name(log::Level::Info), "info");
        assert_eq!(level_name(log::Level::Debug), "debug");
        assert_eq!(level_name(log::Level::Trace), "trace");
    }

    #[test]
    fn a_flood_keeps_the_newest_lines_and_says_how_many_were_dropped() {
        let log = KernelLog::default();
        for i in 0..KEEP + 5 {
            log.push("warn", format!("kernel: {i}"));
        }
        let lines = log.take();
        assert_eq!(lines.len(), KEEP + 1);
        assert_eq!(
            lines[0].msg,
            format!("kernel: 5 more lines dropped (over {KEEP} between two reads)")
        );
        assert_eq!(lines[1].msg, "kernel: 5");
        assert_eq!(lines[KEEP].msg, format!("kernel: {}", KEEP + 4));
        assert_eq!(log.total(), KEEP as u64 + 5);
        log.push("warn", "kernel: again".into());
        assert_eq!(log.take().len(), 1, "the drop count is reported once");
    }
}
