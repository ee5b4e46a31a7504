//! Phase 1: connection-churn throughput under every configuration, interleaved over rounds.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    Bench, FIN_LISTENERS, FIN_PORT, QUIET_CORES, QUIET_MAX_WAIT,
    bpf_stats::{perf_links, remember_progs},
    configs::{Config, DAEMON_ARGS, EMPTY_PROGRAMS_VAR, Ready, Tracer, Workload},
    host::{READER_THREAD, background_ticks, clk_tck, cpu_ticks, thread_ticks, vm_hwm_kib},
    netns::Netns,
    numbers::median,
    parse::{daemon_report, daemon_status, key_values, parse_json, process_entry},
    procs::{Proc, check_interrupted, unix_now, wait_until},
};

/// One configuration's figures for one round.
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    pub(super) cps: f64,
    pub(super) connections: u64,
    pub(super) failed: u64,
    /// Tracer process CPU time during the load, as a share of one core.
    pub(super) cpu: Option<f64>,
    /// The part of it spent by tcptrace's ring-buffer reader thread.
    pub(super) reader_cpu: Option<f64>,
    /// Tracer peak RSS (VmHWM), KiB.
    pub(super) hwm_kib: Option<u64>,
    pub(super) dropped: Option<u64>,
    /// Events the tracer says it saw (bpftrace count: its total).
    pub(super) events: Option<u64>,
    /// Sockets of churngen that tcptrace counted as closed.
    pub(super) closes_seen: Option<u64>,
    /// CPU used by other processes on the machine during the load, in cores: noise.
    pub(super) background: f64,
}

/// Result of one churngen run.
pub(super) struct Churn {
    pid: u32,
    pub(super) connections: u64,
    pub(super) failed: u64,
    pub(super) cps: f64,
}

impl Bench {
    /// Phase 1: every configuration on every workload, interleaved, `rounds` times.
    pub(super) fn overhead(
        &mut self,
        configs: &[Config],
        ns: &Netns,
    ) -> Result<BTreeMap<(usize, usize), Vec<Sample>>> {
        // Warm-up, not measured: fills the namespace's TIME_WAIT pool (up to one reusable socket
        // per ephemeral port and listener) so that every FIN round runs in the same steady state.
        let warm = if self.plan.smoke { 1.0 } else { 4.0 };
        for w in Workload::ALL {
            self.churn(w, Some(ns), warm)?;
        }
        let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
        let mut last_background = None;
        for round in 1..=self.plan.rounds {
            for (wi, &w) in Workload::ALL.iter().enumerate() {
                for (ci, c) in configs.iter().enumerate() {
                    check_interrupted()?;
                    self.wait_for_quiet(last_background)?;
                    let s = self
                        .round_or_retry(w, c, Some(ns))
                        .with_context(|| format!("{} / {}", w.name(), c.name))?;
                    println!(
                        "bench: round {round}/{} {:<18} {:<30} {:>9.0} conn/s{}, other load {:.2} cores",
                        self.plan.rounds,
                        w.name(),
                        c.name,
                        s.cps,
                        s.cpu
                            .map(|c| format!(", tracer CPU {:.0}%", c * 100.0))
                            .unwrap_or_default(),
                        s.background,
                    );
                    last_background = Some(s.background);
                    samples.entry((wi, ci)).or_default().push(s);
                }
            }
        }
        Ok(samples)
    }

    /// On a shared machine, waits (within a budget for the whole run) until other processes
    /// use less than [`QUIET_CORES`] for half a second: the load saturates every core, so any
    /// other work shows as overhead. No wait when they were quiet during the last round.
    fn wait_for_quiet(&mut self, last_background: Option<f64>) -> Result<()> {
        if self.plan.smoke || last_background.is_some_and(|b| b < QUIET_CORES) {
            return Ok(());
        }
        let start = Instant::now();
        let window = Duration::from_millis(500);
        loop {
            check_interrupted()?;
            let b0 = background_ticks();
            std::thread::sleep(window);
            let cores = background_ticks().saturating_sub(b0) as f64 / clk_tck() / 0.5;
            if cores < QUIET_CORES || start.elapsed() >= self.quiet_budget.min(QUIET_MAX_WAIT) {
                break;
            }
        }
        self.quiet_budget = self.quiet_budget.saturating_sub(start.elapsed());
        Ok(())
    }

    /// Runs churngen for `secs`; FIN runs in the namespace.
    pub(super) fn churn(&self, w: Workload, ns: Option<&Netns>, secs: f64) -> Result<Churn> {
        let mut cmd = match (w, ns) {
            (Workload::Fin, Some(ns)) => ns.exec(&self.churngen),
            _ => Command::new(&self.churngen),
        };
        cmd.args(["churn", "--secs", &secs.to_string()])
            .args(["--threads", &self.plan.threads.to_string()]);
        match w {
            Workload::Rst => cmd.args(["--close", "rst"]),
            Workload::Fin => cmd
                .args(["--close", "fin", "--port", &FIN_PORT.to_string()])
                .args(["--listeners", &FIN_LISTENERS.to_string()]),
        };
        let mut p = Proc::spawn("churngen", &mut cmd, true)?;
        let line = p.line(Duration::from_secs_f64(secs + 30.0))?;
        p.wait_exit(Duration::from_secs(10))?;
        let kv = key_values(&line.text);
        let get = |k: &str| {
            kv.get(k)
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("churngen printed no {k}: {:?}", line.text))
        };
        Ok(Churn {
            pid: p.pid(),
            connections: get("connections")? as u64,
            failed: get("failed")? as u64,
            cps: get("cps")?,
        })
    }

    /// [`Bench::round`], run again once when it fails (a tracer slow to exit on a busy shared
    /// machine, say): one bad round must not throw away a long run. A second failure fails.
    pub(super) fn round_or_retry(
        &self,
        w: Workload,
        c: &Config,
        ns: Option<&Netns>,
    ) -> Result<Sample> {
        match self.round(w, c, ns) {
            Ok(s) => Ok(s),
            Err(e) => {
                check_interrupted()?;
                println!(
                    "bench: {} / {}: {e:#}; running that round again",
                    w.name(),
                    c.name
                );
                self.round(w, c, ns)
            }
        }
    }

    /// One configuration, one workload, one round.
    pub(super) fn round(&self, w: Workload, c: &Config, ns: Option<&Netns>) -> Result<Sample> {
        let mut tracer = self.start_tracer(&c.tracer)?;
        let cpu0 = tracer.as_ref().and_then(|t| cpu_ticks(t.pid()));
        let reader0 = tracer
            .as_ref()
            .and_then(|t| thread_ticks(t.pid(), READER_THREAD));
        let bg0 = background_ticks();
        let t0 = Instant::now();
        let churn = self.churn(w, ns, self.plan.secs)?;
        let wall = t0.elapsed().as_secs_f64();
        let mut s = Sample {
            cps: churn.cps,
            connections: churn.connections,
            failed: churn.failed,
            background: background_ticks().saturating_sub(bg0) as f64 / clk_tck() / wall,
            ..Default::default()
        };
        let Some(t) = tracer.as_mut() else {
            return Ok(s);
        };
        let share = |now: Option<u64>, before: Option<u64>| {
            now.zip(before)
                .map(|(b, a)| b.saturating_sub(a) as f64 / clk_tck() / wall)
        };
        s.cpu = share(cpu_ticks(t.pid()), cpu0);
        s.reader_cpu = share(thread_ticks(t.pid(), READER_THREAD), reader0);
        s.hwm_kib = vm_hwm_kib(t.pid());
        let done = unix_now();
        match &c.tracer {
            Tracer::Tcptrace(v) if v.ready == Ready::FirstJsonLine => {
                // The first object printed after the load ended has everything it caused.
                let snap = loop {
                    let l = t.line(Duration::from_secs(5))?;
                    if l.unix > done + 0.05 {
                        break parse_json(&l.text)?;
                    }
                };
                s.dropped = snap["dropped_events"].as_u64();
                s.closes_seen = process_entry(&snap, churn.pid)
                    .and_then(|p| p["churn"]["closed_total"].as_u64());
                t.stop(libc::SIGTERM)?;
            }
            Tracer::Tcptrace(v) => {
                // The daemon: totals from its control socket, once it has drained the ring.
                std::thread::sleep(Duration::from_millis(200));
                let bin = v.bin(&self.bin);
                if let Some(st) = daemon_status(bin) {
                    s.dropped = st["events_dropped"].as_u64();
                    s.events = st["events_seen"].as_u64();
                }
                s.closes_seen = daemon_report(bin, churn.pid)
                    .and_then(|r| process_entry(&r, churn.pid)?["churn"]["closed_total"].as_u64());
                t.stop(libc::SIGTERM)?;
            }
            Tracer::Floor => {
                std::thread::sleep(Duration::from_millis(200));
                s.events = daemon_status(&self.bin).and_then(|st| st["events_seen"].as_u64());
                t.stop(libc::SIGTERM)?;
            }
            Tracer::Bpftrace { counts: true, .. } => {
                // On SIGINT bpftrace prints its map: one `@[STATE]: COUNT` line per state.
                t.stop(libc::SIGINT)?;
                s.events = Some(
                    t.drain_lines()
                        .iter()
                        .filter_map(|l| l.text.split_once("]: "))
                        .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
                        .sum(),
                );
            }
            Tracer::Bpftrace { .. } | Tracer::None => {
                t.stop(libc::SIGINT)?;
            }
        }
        Ok(s)
    }

    /// Starts a tracer and waits until it is attached (not part of the measured load).
    pub(super) fn start_tracer(&self, t: &Tracer) -> Result<Option<Proc>> {
        let p = match t {
            Tracer::None => return Ok(None),
            Tracer::Tcptrace(v) => {
                let bin = v.bin(&self.bin);
                let p = Proc::spawn(v.name, Command::new(bin).args(&v.args), true)?;
                match v.ready {
                    Ready::FirstJsonLine => {
                        parse_json(&p.line(Duration::from_secs(30))?.text)?;
                    }
                    Ready::Status => wait_until(Duration::from_secs(30), v.name, || {
                        daemon_status(bin).is_some()
                    })?,
                }
                p
            }
            Tracer::Floor => {
                let name = "tcptrace daemon (empty programs)";
                let mut cmd = Command::new(&self.bin);
                cmd.env(EMPTY_PROGRAMS_VAR, "1").args(DAEMON_ARGS);
                let p = Proc::spawn(name, &mut cmd, true)?;
                wait_until(Duration::from_secs(30), name, || {
                    daemon_status(&self.bin).is_some()
                })?;
                p
            }
            Tracer::Bpftrace {
                program,
                counts,
                attached,
            } => {
                // The printing one writes to /dev/null; attachment is read from the kernel
                // (`bpftool perf list` names the process holding the tracepoint link).
                let p = Proc::spawn(
                    "bpftrace",
                    Command::new("bpftrace").args(["-e", program]),
                    *counts,
                )?;
                let pid = p.pid();
                wait_until(Duration::from_secs(30), "bpftrace attaching", || {
                    perf_links()
                        .iter()
                        .any(|(owner, tp, _)| *owner == pid && tp == attached)
                })?;
                p
            }
        };
        remember_progs(p.pid());
        Ok(Some(p))
    }
}

/// Transitions per connection for each workload, from the counting bpftrace rounds:
/// median of hits / connections.
pub(super) fn transitions_per_connection(
    configs: &[Config],
    samples: &BTreeMap<(usize, usize), Vec<Sample>>,
) -> Vec<Option<f64>> {
    let counter = configs
        .iter()
        .position(|c| matches!(c.tracer, Tracer::Bpftrace { counts: true, .. }));
    (0..Workload::ALL.len())
        .map(|wi| {
            let ratios: Vec<f64> = samples
                .get(&(wi, counter?))?
                .iter()
                .filter(|s| s.connections > 0)
                .filter_map(|s| Some(s.events? as f64 / s.connections as f64))
                .collect();
            (!ratios.is_empty()).then(|| median(&ratios))
        })
        .collect()
}
