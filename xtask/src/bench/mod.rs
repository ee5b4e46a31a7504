//! `cargo xtask bench`: what tracing costs a connection-churn workload, how fast a CLOSE_WAIT
//! leak is reported, and what start-up costs with many existing sockets. Writes BENCHMARKS.md.
//!
//! Phases of one run:
//! 1. Overhead. `churngen churn` (xtask/src/bin/churngen.rs) connects, accepts and closes on
//!    loopback for `--secs` under each configuration: nothing attached, each tcptrace variant,
//!    the floor (tcptrace's hooks with programs that return at once), a bpftrace one-liner
//!    printing every transition (what bcc's tcpstates does) and one counting them in the kernel. Configurations are interleaved (A B C D A B C D ...) over `--rounds`,
//!    for two workloads: RST close in the root namespace, FIN close (TIME_WAIT, reused) in a
//!    namespace of our own. Tracers are attached before the load starts.
//! 2. In-kernel cost: one more RST round per tracer with BPF run-time statistics switched on.
//! 3. Leak latency: CLOSE_WAIT sockets made one at a time under `watch --leak-after 2` (and the
//!    daemon, asked on its control socket).
//! 4. Start-up: `watch` started in a namespace holding `--sockets` connected sockets.
//! 5. Holders: the daemon's CPU while it keeps track of who holds `--holder-sockets` CLOSE_WAIT
//!    sockets among `--holder-procs` processes.
//! 6. Scaling (when `--threads` lists several counts, e.g. `--threads 1,2,4,16`): the RST churn
//!    at each thread count for the baseline, a floor (the same hooks, empty programs), tcptrace
//!    and the counting bpftrace, with the in-kernel cost per program run at each.
//!
//! The load saturates every core, so other processes' CPU shows as overhead: before each round
//! the bench waits a little for the machine to go quiet, and the report gives, per
//! configuration, how much CPU other processes used meanwhile.
//!
//! Everything started here is killed and reaped on every path (also on error or Ctrl-C), and the
//! namespaces are deleted; the run ends by checking that no process, attached program or
//! namespace of ours is left.

mod accounting;
mod bpf_stats;
mod configs;
mod holders;
mod host;
mod kernel_cost;
mod leak_latency;
mod netns;
mod numbers;
mod overhead;
mod parse;
mod procs;
mod report;
mod scaling;
mod smoke;
mod startup;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use bpf_stats::check_clean;
use configs::{Config, Ready, TracerVariant, tracer_variants};
use leak_latency::LeakReporter;
use netns::{Netns, remove_stale_netns};
use overhead::transitions_per_connection;
use procs::catch_signals;
use report::{HostInfo, render};
use smoke::smoke_checks;

#[derive(Args)]
pub struct BenchArgs {
    /// Rounds of the overhead phase (every configuration runs once per round, interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds of load per configuration and round.
    #[arg(long, default_value_t = 4.0)]
    secs: f64,
    /// churngen client threads (as many acceptor threads run); default: one per core. A list
    /// (`--threads 1,2,4,16`) also runs the scaling phase at each count.
    #[arg(long, value_delimiter = ',', value_name = "N[,N...]")]
    threads: Vec<usize>,
    /// CLOSE_WAIT sockets of the leak-latency phase.
    #[arg(long, default_value_t = 20)]
    leak_sockets: usize,
    /// Existing sockets for the start-up phase (connected pairs on loopback).
    #[arg(long, default_value_t = 100_000)]
    sockets: usize,
    /// CLOSE_WAIT sockets of the holder phase.
    #[arg(long, default_value_t = 50_000)]
    holder_sockets: usize,
    /// Idle processes of the holder phase (what a scan of every process must read).
    #[arg(long, default_value_t = 5_000)]
    holder_procs: usize,
    /// Seconds the holder phase measures the daemon's CPU.
    #[arg(long, default_value_t = 60.0)]
    holder_secs: f64,
    /// Where to write the report [default: BENCHMARKS.md at the workspace root; with --smoke, a
    /// file in the temporary directory].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Also runs `tcptrace daemon` from another build (BIN) in the overhead, in-kernel cost and
    /// scaling phases, as a configuration named NAME: an A/B of two builds in one interleaved
    /// run (e.g. a branch against main). Repeatable.
    #[arg(long, value_name = "NAME=BIN", value_parser = configs::parse_compare)]
    compare: Vec<(String, PathBuf)>,
    /// A quick run of every phase (one round of 1 s, 3 leaked sockets, 1,000 sockets at start-up)
    /// that checks the benchmark works; it leaves BENCHMARKS.md alone.
    #[arg(long)]
    smoke: bool,
}

impl BenchArgs {
    /// The smoke run `cargo xtask test` makes so that the harness cannot rot.
    pub fn smoke() -> Self {
        Self {
            rounds: 1,
            secs: 1.0,
            threads: vec![1, 2],
            leak_sockets: 3,
            sockets: 1000,
            holder_sockets: 500,
            holder_procs: 50,
            holder_secs: 3.0,
            output: None,
            compare: Vec::new(),
            smoke: true,
        }
    }
}

/// Where the daemon variant listens during the benchmark.
const DAEMON_SOCKET: &str = "/run/tcptrace-bench.sock";
/// `--leak-after` of the leak-latency phase, seconds.
const LEAK_AFTER: f64 = 2.0;
/// Seconds between two leaked sockets: not a multiple of the 1 s interval, so the sockets cross
/// the threshold at different points of watch's cycle.
const LEAK_EVERY: f64 = 0.23;
/// First listening port of the FIN workload in our namespace, and how many listeners. Fixed
/// ports bound the TIME_WAIT sockets to one per (ephemeral port, listener), all reusable after
/// 1 s, so that every round runs in the same steady state; past the namespace's
/// tcp_max_tw_buckets the kernel would skip TIME_WAIT and the same load would run twice as
/// fast. One listener caps FIN churn at about 30,000 connections/s by port reuse alone (each
/// local port once a second), so several are used to keep the load CPU-bound.
const FIN_PORT: u16 = 5000;
const FIN_LISTENERS: usize = 4;
/// Other processes' CPU (in cores) below which the machine counts as quiet before a round.
const QUIET_CORES: f64 = 0.05;
/// Longest wait for quiet before one round, and in all.
const QUIET_MAX_WAIT: Duration = Duration::from_secs(5);
const QUIET_BUDGET: Duration = Duration::from_secs(30);
/// How often the leak-latency phase asks the daemon.
const DAEMON_POLL: Duration = Duration::from_millis(100);
/// Prefix of the network namespaces we create; the suffix starts with our pid.
const NETNS_PREFIX: &str = "tcptrace-bench-";

pub fn run(bin: &Path, mut args: BenchArgs) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the benchmark attaches eBPF programs and creates network namespaces: run it as root"
        );
    }
    let compare = std::mem::take(&mut args.compare);
    let plan = Plan::new(args);
    if bpf_stats::stats_sysctl_on() {
        bail!(
            "kernel.bpf_stats_enabled is 1: every BPF program run would also time itself, which \
             adds to each traced configuration in proportion to its programs (tcptrace runs \
             three per transition, the counting bpftrace one) and skews every figure; run \
             `sysctl -w kernel.bpf_stats_enabled=0` and start again (the bench switches the \
             statistics on itself, only for its in-kernel cost rounds)"
        );
    }
    for tool in ["ip", "bpftrace", "bpftool"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            bail!("`{tool}` is missing (cargo xtask setup installs it)");
        }
    }
    catch_signals();
    let churngen = build_churngen()?;
    // Run copies: others may rebuild target/release while the bench runs.
    let scratch = Scratch::new()?;
    let bin = scratch.copy(bin)?;
    let churngen = scratch.copy(&churngen)?;
    let mut variants = tracer_variants(&bin);
    for (i, (name, other)) in compare.iter().enumerate() {
        let copy = scratch.copy_as(other, format!("compare-{i}"))?;
        variants.push(TracerVariant::compared(name, copy));
    }
    remove_stale_netns();
    let _ = std::fs::remove_file(DAEMON_SOCKET);

    let mut bench = Bench {
        variants,
        bin,
        churngen,
        plan,
        quiet_budget: QUIET_BUDGET,
        failures: Vec::new(),
    };
    let result = bench.all_phases();
    let _ = std::fs::remove_file(DAEMON_SOCKET);
    // Checked even after a failure, so that a leak of ours is always reported.
    let clean = check_clean();
    let report = result?;
    clean?;

    print!("\n{report}");
    let out = bench.plan.output.clone();
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("bench: report written to {}", out.display());
    if !bench.failures.is_empty() {
        bail!("{}", bench.failures.join("; "));
    }
    Ok(())
}

/// A directory of ours in the temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("tcptrace-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// Copies a file in, keeping its name.
    fn copy(&self, file: &Path) -> Result<PathBuf> {
        self.copy_as(file, file.file_name().context("a file name")?)
    }

    /// Copies a file in under another name.
    fn copy_as(&self, file: &Path, name: impl AsRef<Path>) -> Result<PathBuf> {
        let to = self.0.join(name);
        std::fs::copy(file, &to).with_context(|| format!("copying {}", file.display()))?;
        Ok(to)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The run's parameters after `--smoke` is applied.
struct Plan {
    rounds: u32,
    secs: f64,
    threads: usize,
    /// Thread counts of the scaling phase (none: no scaling phase).
    scaling: Vec<usize>,
    leak_sockets: usize,
    sockets: usize,
    holder_sockets: usize,
    holder_procs: usize,
    holder_secs: f64,
    output: PathBuf,
    smoke: bool,
    command: String,
}

impl Plan {
    fn new(a: BenchArgs) -> Self {
        let command = std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        // One count: the overhead phase's; several: the scaling phase's, the overhead phase
        // keeping one thread per core.
        let threads = match a.threads.as_slice() {
            [one] => (*one).max(1),
            _ => cores(),
        };
        let scaling: Vec<usize> = if a.threads.len() > 1 {
            a.threads.iter().map(|&t| t.max(1)).collect()
        } else {
            Vec::new()
        };
        if a.smoke {
            Self {
                rounds: 1,
                secs: 1.0,
                threads,
                scaling,
                leak_sockets: 3,
                sockets: 1000,
                holder_sockets: 500,
                holder_procs: 50,
                holder_secs: 3.0,
                output: a
                    .output
                    .unwrap_or_else(|| std::env::temp_dir().join("tcptrace-bench-smoke.md")),
                smoke: true,
                command,
            }
        } else {
            Self {
                rounds: a.rounds.max(1),
                secs: a.secs.max(0.5),
                threads,
                scaling,
                leak_sockets: a.leak_sockets.max(1),
                sockets: a.sockets.max(2),
                holder_sockets: a.holder_sockets.max(1),
                holder_procs: a.holder_procs,
                holder_secs: a.holder_secs.max(1.0),
                output: a
                    .output
                    .unwrap_or_else(|| crate::workspace_root().join("BENCHMARKS.md")),
                smoke: false,
                command,
            }
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// `cargo build --release -p xtask --bin churngen`; returns the binary's path.
fn build_churngen() -> Result<PathBuf> {
    let root = crate::workspace_root();
    crate::sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "xtask",
                "--bin",
                "churngen",
            ]),
    )?;
    Ok(root.join("target/release/churngen"))
}

struct Bench {
    bin: PathBuf,
    churngen: PathBuf,
    plan: Plan,
    variants: Vec<TracerVariant>,
    /// What is left of the time the run may spend waiting for other processes to go quiet.
    quiet_budget: Duration,
    /// Checks that failed: the report is still written, then the run fails.
    failures: Vec<String>,
}

impl Bench {
    fn all_phases(&mut self) -> Result<String> {
        let host = HostInfo::read();
        let configs = Config::list(&self.variants);
        let ns = Netns::create(&format!("{NETNS_PREFIX}{}", std::process::id()))?;

        let t = Instant::now();
        let samples = self.overhead(&configs, &ns)?;
        let per_conn = transitions_per_connection(&configs, &samples);
        took("overhead", t);
        if bpf_stats::stats_sysctl_on() {
            self.failures.push(
                "kernel.bpf_stats_enabled was switched on during the overhead phase: its figures \
                 include the statistics' cost"
                    .into(),
            );
        }
        let t = Instant::now();
        let costs = self.kernel_costs(&configs)?;
        took("kernel cost", t);
        let t = Instant::now();
        let accounting = self.ring_accounting()?;
        took("ring accounting", t);
        if !accounting.exact() {
            self.failures
                .push("ring accounting: the daemon did not account for every transition".into());
        }
        let t = Instant::now();
        let mut leaks = vec![self.leak_latency(LeakReporter::Watch)?];
        if self.variants.iter().any(|v| v.ready == Ready::Status) {
            leaks.push(self.leak_latency(LeakReporter::Daemon)?);
        }
        took("leak latency", t);
        drop(ns);
        let t = Instant::now();
        let startup = self.startup()?;
        took("start-up", t);
        let t = Instant::now();
        let holder = self.holder_cost()?;
        took("holders", t);
        let scales = if self.plan.scaling.is_empty() {
            Vec::new()
        } else {
            let t = Instant::now();
            let scale_configs = Config::scaling(&self.variants);
            let counts = self.plan.scaling.clone();
            let s = self.scaling(&scale_configs, &counts)?;
            took("scaling", t);
            if self.plan.smoke && s.iter().any(|x| x.samples.iter().any(|v| v.is_empty())) {
                anyhow::bail!("scaling: a configuration has no sample");
            }
            vec![(scale_configs, s)]
        };

        if self.plan.smoke {
            smoke_checks(&configs, &samples, &costs, &leaks, &startup)?;
        }
        let waited = QUIET_BUDGET.saturating_sub(self.quiet_budget);
        let mut report = render(
            &host, &self.plan, waited, &configs, &samples, &per_conn, &costs, &leaks, &startup,
        );
        report.push_str(&accounting.render());
        report.push_str(&holders::render(&holder));
        for (configs, s) in &scales {
            report.push_str(&scaling::render(
                configs,
                s,
                self.plan.secs,
                self.plan.rounds,
                host.cores,
            ));
        }
        Ok(report)
    }
}

fn took(phase: &str, since: Instant) {
    println!(
        "bench: {phase} phase took {:.0} s",
        since.elapsed().as_secs_f64()
    );
}
