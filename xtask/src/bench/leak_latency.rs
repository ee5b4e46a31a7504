//! Phase 3: how long after crossing `--leak-after` a CLOSE_WAIT socket is reported.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{
    Bench, DAEMON_POLL, DAEMON_SOCKET, LEAK_AFTER, LEAK_EVERY,
    bpf_stats::remember_progs,
    parse::{daemon_report, daemon_status, key_values, leaked_of, parse_json},
    procs::{Proc, check_interrupted, unix_now, wait_until},
};

/// How the leak-latency phase learns that tcptrace reports a socket as leaked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum LeakReporter {
    /// `watch --json --interval 1`: the objects it prints.
    Watch,
    /// The daemon: `report --json --pid` on its control socket, asked every [`DAEMON_POLL`].
    Daemon,
}

impl LeakReporter {
    pub(super) fn name(self) -> &'static str {
        match self {
            LeakReporter::Watch => "tcptrace watch",
            LeakReporter::Daemon => "tcptrace daemon",
        }
    }
}

pub(super) struct LeakResult {
    pub(super) via: LeakReporter,
    /// Seconds from crossing the threshold to the first report including the socket.
    pub(super) latencies: Vec<f64>,
}

impl Bench {
    /// Phase 3: each leaked socket's report time minus the time it crossed `--leak-after`.
    pub(super) fn leak_latency(&self, via: LeakReporter) -> Result<LeakResult> {
        let n = self.plan.leak_sockets;
        let after = LEAK_AFTER.to_string();
        let mut tracer = match via {
            LeakReporter::Watch => {
                let args = ["watch", "--json", "--interval", "1", "--leak-after", &after];
                let p = Proc::spawn(via.name(), Command::new(&self.bin).args(args), true)?;
                p.line(Duration::from_secs(30))?;
                p
            }
            LeakReporter::Daemon => {
                let args = [
                    "daemon",
                    "--socket",
                    DAEMON_SOCKET,
                    "--metrics-addr",
                    "127.0.0.1:0",
                ];
                let p = Proc::spawn(
                    via.name(),
                    Command::new(&self.bin)
                        .args(args)
                        .args(["--leak-after", &after]),
                    false,
                )?;
                wait_until(Duration::from_secs(30), via.name(), || {
                    daemon_status(&self.bin).is_some()
                })?;
                p
            }
        };
        remember_progs(tracer.pid());
        let mut leak = Proc::spawn(
            "churngen leak",
            Command::new(&self.churngen).args([
                "leak",
                "--count",
                &n.to_string(),
                "--every",
                &LEAK_EVERY.to_string(),
            ]),
            true,
        )?;
        let pid = leak.pid();
        leak.line(Duration::from_secs(10))?; // "leaking port=..."
        let mut entered: Vec<f64> = Vec::new(); // unix time each socket entered CLOSE_WAIT
        let mut reported: Vec<f64> = Vec::new(); // unix time of the first report including it
        // The k-th socket crosses the threshold k-th: a leaked count of k includes it.
        let note = |reported: &mut Vec<f64>, leaked: u64, at: f64| {
            while reported.len() < (leaked as usize).min(n) {
                reported.push(at);
            }
        };
        let deadline =
            Instant::now() + Duration::from_secs_f64(n as f64 * LEAK_EVERY + LEAK_AFTER + 30.0);
        let mut last_ask = Instant::now();
        while entered.len() < n || reported.len() < n {
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not report all {n} leaked sockets in time",
                    via.name()
                );
            }
            while let Some(l) = leak.try_line() {
                if let Some(t) = key_values(&l.text).get("unix").and_then(|v| v.parse().ok()) {
                    entered.push(t);
                }
            }
            match via {
                LeakReporter::Watch => {
                    while let Some(l) = tracer.try_line() {
                        let snap = parse_json(&l.text)?;
                        note(&mut reported, leaked_of(&snap, pid), l.unix);
                    }
                }
                LeakReporter::Daemon if last_ask.elapsed() >= DAEMON_POLL => {
                    last_ask = Instant::now();
                    if let Some(r) = daemon_report(&self.bin, pid) {
                        note(&mut reported, leaked_of(&r, pid), unix_now());
                    }
                }
                LeakReporter::Daemon => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        leak.stop(libc::SIGTERM)?;
        tracer.stop(libc::SIGTERM)?;
        let latencies = entered
            .iter()
            .zip(&reported)
            .map(|(e, r)| r - (e + LEAK_AFTER))
            .collect();
        println!(
            "bench: leak latency ({}) measured over {n} sockets",
            via.name()
        );
        Ok(LeakResult { via, latencies })
    }
}
