//! `cargo xtask bench`: what tracing costs a connection-churn workload, how fast a CLOSE_WAIT
//! leak is reported, and what start-up costs with many existing sockets. Writes BENCHMARKS.md.
//!
//! Phases of one run:
//! 1. Overhead. `churngen churn` (xtask/src/bin/churngen.rs) connects, accepts and closes on
//!    loopback for `--secs` under each configuration: nothing attached, each tcptrace variant,
//!    a bpftrace one-liner printing every transition (what bcc's tcpstates does) and one counting
//!    them in the kernel. Configurations are interleaved (A B C D A B C D ...) over `--rounds`,
//!    for two workloads: RST close in the root namespace, FIN close (TIME_WAIT, reused) in a
//!    namespace of our own. Tracers are attached before the load starts.
//! 2. In-kernel cost: one more RST round per tracer with BPF run-time statistics switched on.
//! 3. Leak latency: CLOSE_WAIT sockets made one at a time under `watch --leak-after 2` (and the
//!    daemon, asked on its control socket).
//! 4. Start-up: `watch` started in a namespace holding `--sockets` connected sockets.
//!
//! The load saturates every core, so other processes' CPU shows as overhead: before each round
//! the bench waits a little for the machine to go quiet, and the report gives, per
//! configuration, how much CPU other processes used meanwhile.
//!
//! Everything started here is killed and reaped on every path (also on error or Ctrl-C), and the
//! namespaces are deleted; the run ends by checking that no process, attached program or
//! namespace of ours is left.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct BenchArgs {
    /// Rounds of the overhead phase (every configuration runs once per round, interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds of load per configuration and round.
    #[arg(long, default_value_t = 4.0)]
    secs: f64,
    /// churngen client threads (as many acceptor threads run); default: one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// CLOSE_WAIT sockets of the leak-latency phase.
    #[arg(long, default_value_t = 20)]
    leak_sockets: usize,
    /// Existing sockets for the start-up phase (connected pairs on loopback).
    #[arg(long, default_value_t = 100_000)]
    sockets: usize,
    /// Where to write the report [default: BENCHMARKS.md at the workspace root; with --smoke, a
    /// file in the temporary directory].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
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
            threads: None,
            leak_sockets: 3,
            sockets: 1000,
            output: None,
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

/// The bcc tcpstates equivalent: one formatted line per transition.
const BPFTRACE_PRINT: &str = r#"tracepoint:sock:inet_sock_set_state { printf("%-16llx %-7d %-16s %-15s %-5d %-15s %-5d %d -> %d\n", args->skaddr, pid, comm, ntop(args->saddr), args->sport, ntop(args->daddr), args->dport, args->oldstate, args->newstate); }"#;
/// Counting in the kernel only.
const BPFTRACE_COUNT: &str = "tracepoint:sock:inet_sock_set_state { @[args->newstate] = count(); }";

pub fn run(bin: &Path, args: BenchArgs) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the benchmark attaches eBPF programs and creates network namespaces: run it as root"
        );
    }
    let plan = Plan::new(args);
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
    remove_stale_netns();
    let _ = std::fs::remove_file(DAEMON_SOCKET);

    let mut bench = Bench {
        variants: tracer_variants(&bin),
        bin,
        churngen,
        plan,
        quiet_budget: QUIET_BUDGET,
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
        let to = self.0.join(file.file_name().context("a file name")?);
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
    leak_sockets: usize,
    sockets: usize,
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
        let threads = a.threads.unwrap_or_else(cores).max(1);
        if a.smoke {
            Self {
                rounds: 1,
                secs: 1.0,
                threads,
                leak_sockets: 3,
                sockets: 1000,
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
                leak_sockets: a.leak_sockets.max(1),
                sockets: a.sockets.max(2),
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

// ---------------------------------------------------------------------------------------------
// Configurations

/// One way of running tcptrace during the overhead phase. Add new ones in [`tracer_variants`].
#[derive(Clone)]
struct TracerVariant {
    name: &'static str,
    args: Vec<&'static str>,
    /// How the bench tells that it is attached and reading.
    ready: Ready,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ready {
    /// The first `watch --json` line: by then the programs are attached and the table loaded.
    FirstJsonLine,
    /// `tcptrace status --json --socket DAEMON_SOCKET` succeeds.
    Status,
}

/// The tcptrace variants this binary supports: `watch` always, `daemon` once it exists.
fn tracer_variants(bin: &Path) -> Vec<TracerVariant> {
    let mut v = vec![TracerVariant {
        name: "tcptrace watch",
        args: vec!["watch", "--json", "--interval", "1"],
        ready: Ready::FirstJsonLine,
    }];
    let has_daemon = Command::new(bin)
        .args(["daemon", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_daemon {
        v.push(TracerVariant {
            name: "tcptrace daemon",
            args: vec![
                "daemon",
                "--socket",
                DAEMON_SOCKET,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            ready: Ready::Status,
        });
    }
    v
}

#[derive(Clone)]
enum Tracer {
    None,
    Tcptrace(TracerVariant),
    Bpftrace { program: &'static str, counts: bool },
}

#[derive(Clone)]
struct Config {
    name: String,
    tracer: Tracer,
}

impl Config {
    fn list(variants: &[TracerVariant]) -> Vec<Config> {
        let mut c = vec![Config {
            name: "baseline (nothing attached)".into(),
            tracer: Tracer::None,
        }];
        c.extend(variants.iter().map(|v| Config {
            name: v.name.into(),
            tracer: Tracer::Tcptrace(v.clone()),
        }));
        c.push(Config {
            name: "bpftrace printing (tcpstates)".into(),
            tracer: Tracer::Bpftrace {
                program: BPFTRACE_PRINT,
                counts: false,
            },
        });
        c.push(Config {
            name: "bpftrace counting in kernel".into(),
            tracer: Tracer::Bpftrace {
                program: BPFTRACE_COUNT,
                counts: true,
            },
        });
        c
    }
}

/// The churn workloads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// SO_LINGER {1,0} on both ends, root namespace.
    Rst,
    /// Normal close in our namespace (wide port range, tcp_tw_reuse=1).
    Fin,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::Rst, Workload::Fin];

    fn name(self) -> &'static str {
        match self {
            Workload::Rst => "RST close",
            Workload::Fin => "FIN close (netns)",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Bench {
    bin: PathBuf,
    churngen: PathBuf,
    plan: Plan,
    variants: Vec<TracerVariant>,
    /// What is left of the time the run may spend waiting for other processes to go quiet.
    quiet_budget: Duration,
}

/// One configuration's figures for one round.
#[derive(Clone, Debug, Default)]
struct Sample {
    cps: f64,
    connections: u64,
    failed: u64,
    /// Tracer process CPU time during the load, as a share of one core.
    cpu: Option<f64>,
    /// The part of it spent by tcptrace's ring-buffer reader thread.
    reader_cpu: Option<f64>,
    /// Tracer peak RSS (VmHWM), KiB.
    hwm_kib: Option<u64>,
    dropped: Option<u64>,
    /// Events the tracer says it saw (bpftrace count: its total).
    events: Option<u64>,
    /// Sockets of churngen that tcptrace counted as closed.
    closes_seen: Option<u64>,
    /// CPU used by other processes on the machine during the load, in cores: noise.
    background: f64,
}

/// Result of one churngen run.
struct Churn {
    pid: u32,
    connections: u64,
    failed: u64,
    cps: f64,
}

/// Per program: (runs, run time ns).
type ProgStats = BTreeMap<String, (u64, u64)>;

struct KernelCost {
    config: String,
    connections: u64,
    /// Per program: runs and ns over the round.
    progs: ProgStats,
    /// Tracer process CPU seconds over the round.
    user_cpu_secs: f64,
}

/// How the leak-latency phase learns that tcptrace reports a socket as leaked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LeakReporter {
    /// `watch --json --interval 1`: the objects it prints.
    Watch,
    /// The daemon: `report --json --pid` on its control socket, asked every [`DAEMON_POLL`].
    Daemon,
}

impl LeakReporter {
    fn name(self) -> &'static str {
        match self {
            LeakReporter::Watch => "tcptrace watch",
            LeakReporter::Daemon => "tcptrace daemon",
        }
    }
}

struct LeakResult {
    via: LeakReporter,
    /// Seconds from crossing the threshold to the first report including the socket.
    latencies: Vec<f64>,
}

struct StartupResult {
    sockets: usize,
    /// Sockets in the first JSON object's host totals.
    seen: u64,
    empty_secs: f64,
    empty_hwm_kib: u64,
    full_secs: f64,
    full_hwm_kib: u64,
    /// How long making the sockets took.
    make_secs: f64,
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
        let t = Instant::now();
        let costs = self.kernel_costs(&configs)?;
        took("kernel cost", t);
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

        if self.plan.smoke {
            smoke_checks(&configs, &samples, &costs, &leaks, &startup)?;
        }
        let waited = QUIET_BUDGET.saturating_sub(self.quiet_budget);
        Ok(render(
            &host, &self.plan, waited, &configs, &samples, &per_conn, &costs, &leaks, &startup,
        ))
    }

    /// Phase 1: every configuration on every workload, interleaved, `rounds` times.
    fn overhead(
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
                        .round(w, c, Some(ns))
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
    fn churn(&self, w: Workload, ns: Option<&Netns>, secs: f64) -> Result<Churn> {
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

    /// One configuration, one workload, one round.
    fn round(&self, w: Workload, c: &Config, ns: Option<&Netns>) -> Result<Sample> {
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
            Tracer::Tcptrace(_) => {
                // The daemon: totals from its control socket, once it has drained the ring.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(st) = daemon_status(&self.bin) {
                    s.dropped = st["events_dropped"].as_u64();
                    s.events = st["events_seen"].as_u64();
                }
                s.closes_seen = daemon_report(&self.bin, churn.pid)
                    .and_then(|r| process_entry(&r, churn.pid)?["churn"]["closed_total"].as_u64());
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
    fn start_tracer(&self, t: &Tracer) -> Result<Option<Proc>> {
        let p = match t {
            Tracer::None => return Ok(None),
            Tracer::Tcptrace(v) => {
                let p = Proc::spawn(v.name, Command::new(&self.bin).args(&v.args), true)?;
                match v.ready {
                    Ready::FirstJsonLine => {
                        parse_json(&p.line(Duration::from_secs(30))?.text)?;
                    }
                    Ready::Status => wait_until(Duration::from_secs(30), v.name, || {
                        daemon_status(&self.bin).is_some()
                    })?,
                }
                p
            }
            Tracer::Bpftrace { program, counts } => {
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
                        .any(|(owner, tp, _)| *owner == pid && tp == "inet_sock_set_state")
                })?;
                p
            }
        };
        remember_progs(p.pid());
        Ok(Some(p))
    }

    /// Phase 2: per-program run counts and run time with BPF statistics on (they cost a little
    /// themselves, so this is a round of its own, RST workload).
    fn kernel_costs(&self, configs: &[Config]) -> Result<Vec<KernelCost>> {
        let _stats = BpfStats::enable()?;
        let mut out = Vec::new();
        for c in configs.iter().filter(|c| !matches!(c.tracer, Tracer::None)) {
            check_interrupted()?;
            let mut t = self.start_tracer(&c.tracer)?.expect("a tracer");
            let pid = t.pid();
            let before = prog_stats(pid)?;
            let cpu0 = cpu_ticks(pid);
            let churn = self.churn(Workload::Rst, None, self.plan.secs.min(2.0))?;
            let cpu1 = cpu_ticks(pid);
            let after = prog_stats(pid)?;
            t.stop(libc::SIGINT)?;
            let progs = after
                .iter()
                .map(|(name, &(runs, ns))| {
                    let (r0, n0) = before.get(name).copied().unwrap_or((0, 0));
                    (
                        name.clone(),
                        (runs.saturating_sub(r0), ns.saturating_sub(n0)),
                    )
                })
                .collect();
            println!(
                "bench: kernel cost  {:<30} {:>9.0} conn/s (with BPF statistics on)",
                c.name, churn.cps
            );
            out.push(KernelCost {
                config: c.name.clone(),
                connections: churn.connections,
                progs,
                user_cpu_secs: cpu1
                    .zip(cpu0)
                    .map_or(0.0, |(b, a)| (b - a) as f64 / clk_tck()),
            });
        }
        Ok(out)
    }

    /// Phase 3: each leaked socket's report time minus the time it crossed `--leak-after`.
    fn leak_latency(&self, via: LeakReporter) -> Result<LeakResult> {
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

    /// Phase 4: time to the first JSON line and peak RSS, in an empty namespace and in one
    /// holding `sockets` sockets. tcptrace reads existing sockets of its own namespace only, so
    /// it runs in there too.
    fn startup(&self) -> Result<StartupResult> {
        let ns = Netns::create(&format!("{NETNS_PREFIX}{}-s", std::process::id()))?;
        let runs = if self.plan.smoke { 1 } else { 3 };
        let measure = |label: &str| -> Result<(f64, u64, u64)> {
            let mut secs = Vec::new();
            let mut hwm = Vec::new();
            let mut seen = 0;
            for _ in 0..runs {
                check_interrupted()?;
                let t0 = Instant::now();
                let mut p = Proc::spawn(
                    label,
                    ns.exec(&self.bin)
                        .args(["watch", "--json", "--interval", "1"]),
                    true,
                )?;
                let first = p.line(Duration::from_secs(60))?;
                secs.push(t0.elapsed().as_secs_f64());
                seen = parse_json(&first.text)?["host"]["total"]
                    .as_u64()
                    .unwrap_or(0);
                // One more interval, so that the first upkeep tick is in the peak too.
                p.line(Duration::from_secs(10))?;
                hwm.push(vm_hwm_kib(p.pid()).unwrap_or(0) as f64);
                p.stop(libc::SIGTERM)?;
            }
            Ok((median(&secs), median(&hwm) as u64, seen))
        };
        let (empty_secs, empty_hwm_kib, _) = measure("tcptrace watch (empty netns)")?;

        // One holder per ~9,000 pairs: a process may not have more descriptors than its hard
        // RLIMIT_NOFILE, which we cannot raise without CAP_SYS_RESOURCE.
        let pairs = self.plan.sockets.div_ceil(2);
        let per_proc = ((nofile_hard() as usize).saturating_sub(300) / 2).clamp(1, 9000);
        let t0 = Instant::now();
        let mut holders = Vec::new();
        let mut left = pairs;
        while left > 0 {
            let n = left.min(per_proc);
            left -= n;
            holders.push(Proc::spawn(
                "churngen hold",
                ns.exec(&self.churngen)
                    .args(["hold", "--pairs", &n.to_string()]),
                true,
            )?);
        }
        for h in &holders {
            h.line(Duration::from_secs(120))?; // "ready ..."
        }
        let make_secs = t0.elapsed().as_secs_f64();
        println!(
            "bench: start-up: {} sockets made in {make_secs:.1} s by {} processes",
            2 * pairs,
            holders.len()
        );
        let (full_secs, full_hwm_kib, seen) = measure("tcptrace watch (many sockets)")?;
        for mut h in holders {
            h.stop(libc::SIGTERM)?;
        }
        Ok(StartupResult {
            sockets: 2 * pairs,
            seen,
            empty_secs,
            empty_hwm_kib,
            full_secs,
            full_hwm_kib,
            make_secs,
        })
    }
}

fn took(phase: &str, since: Instant) {
    println!(
        "bench: {phase} phase took {:.0} s",
        since.elapsed().as_secs_f64()
    );
}

/// Transitions per connection for each workload, from the counting bpftrace rounds:
/// median of hits / connections.
fn transitions_per_connection(
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

/// `--smoke`: every phase ran and reported something.
fn smoke_checks(
    configs: &[Config],
    samples: &BTreeMap<(usize, usize), Vec<Sample>>,
    costs: &[KernelCost],
    leaks: &[LeakResult],
    startup: &StartupResult,
) -> Result<()> {
    for (wi, w) in Workload::ALL.iter().enumerate() {
        for (ci, c) in configs.iter().enumerate() {
            let s = samples
                .get(&(wi, ci))
                .and_then(|v| v.first())
                .with_context(|| format!("no sample for {} / {}", w.name(), c.name))?;
            if s.connections == 0 {
                bail!("{} / {}: no connections", w.name(), c.name);
            }
            if let Tracer::Tcptrace(v) = &c.tracer {
                if s.cpu.is_none() || s.hwm_kib.is_none() {
                    bail!("{} / {}: no CPU or RSS figure", w.name(), c.name);
                }
                if v.ready == Ready::FirstJsonLine && s.dropped.is_none() {
                    bail!(
                        "{} / {}: no dropped_events in watch's JSON",
                        w.name(),
                        c.name
                    );
                }
            }
            if matches!(c.tracer, Tracer::Bpftrace { counts: true, .. })
                && s.events.unwrap_or(0) == 0
            {
                bail!("{} / {}: bpftrace counted nothing", w.name(), c.name);
            }
        }
    }
    if costs
        .iter()
        .any(|k| k.progs.values().all(|&(runs, _)| runs == 0))
    {
        bail!("BPF statistics show no program runs");
    }
    if let Some(l) = leaks.iter().find(|l| l.latencies.is_empty()) {
        bail!("no leak latency from {}", l.via.name());
    }
    if startup.seen < startup.sockets as u64 {
        bail!(
            "start-up: watch saw {} sockets of {}",
            startup.seen,
            startup.sockets
        );
    }
    println!("bench: smoke checks passed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

struct HostInfo {
    kernel: String,
    cores: usize,
    date: String,
    loadavg: String,
}

impl HostInfo {
    fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cores: cores(),
            date: Command::new("date")
                .args(["-u", "+%Y-%m-%d %H:%M UTC"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default(),
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    host: &HostInfo,
    plan: &Plan,
    waited: Duration,
    configs: &[Config],
    samples: &BTreeMap<(usize, usize), Vec<Sample>>,
    per_conn: &[Option<f64>],
    costs: &[KernelCost],
    leaks: &[LeakResult],
    startup: &StartupResult,
) -> String {
    let mut r = String::new();
    let w = &mut r;
    let _ = writeln!(w, "# tcptrace benchmarks\n");
    let _ = writeln!(
        w,
        "Made by `{}` on {}: kernel {}, {} cores, load average {} at the start; {:.0} s spent \
         waiting for other processes to go quiet before rounds.{}\n",
        plan.command,
        host.date,
        host.kernel,
        host.cores,
        host.loadavg,
        waited.as_secs_f64(),
        if plan.smoke {
            " **Smoke run: the figures mean nothing.**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        w,
        "## Overhead on connection churn\n\n\
         `churngen churn` ({t} client threads, {t} acceptor threads per listener) connects, \
         accepts and closes on 127.0.0.1 for {secs} s per configuration and round; \
         configurations run interleaved, {rounds} round(s), each tracer attached before the load \
         starts. conn/s is the median over rounds, ± half the min-max range. *RST close*: \
         SO_LINGER {{1,0}} on both ends, one listener, root namespace. *FIN close*: normal close \
         (client first, so its end goes to TIME_WAIT) to {fl} listeners on fixed ports in a \
         network namespace with `ip_local_port_range=1024 65535`, `tcp_tw_reuse=1` and room for \
         every TIME_WAIT socket, after a warm-up that fills the TIME_WAIT pool.\n\n\
         Transitions generated = connections x transitions per connection, measured with the \
         counting bpftrace (its hits / connections): {rst} with RST close, {fin} with FIN close. \
         Events seen: the daemon's `events_seen` (`tcptrace status`), the counting bpftrace's \
         total; `watch` does not print it. Dropped: `dropped_events` (watch) or `events_dropped` \
         (daemon). Closes seen: churngen's sockets that tcptrace counted closed, of 2 per \
         connection. Tracer CPU: utime+stime of the tracer process over the round, as a share \
         of one core, median over rounds, with the part of tcptrace's ring-buffer reader thread \
         (the rest: its other threads, i.e. snapshots and upkeep); the BPF programs run in the \
         workload's context and cost it throughput, not tracer CPU. Peak RSS: the tracer's VmHWM. Other load: CPU used meanwhile by \
         processes that are not the bench's (median, in cores); the load saturates every core, \
         so anything above a few hundredths makes that configuration's figure low.\n",
        t = plan.threads,
        fl = FIN_LISTENERS,
        secs = plan.secs,
        rounds = plan.rounds,
        rst = per_conn[0].map_or("n/a".into(), |v| format!("{v:.2}")),
        fin = per_conn[1].map_or("n/a".into(), |v| format!("{v:.2}")),
    );
    let _ = writeln!(
        w,
        "| workload | configuration | conn/s | vs baseline | events seen / transitions generated | dropped | closes seen / made | tracer CPU | tracer peak RSS | other load |"
    );
    let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (wi, wl) in Workload::ALL.iter().enumerate() {
        let base = samples
            .get(&(wi, 0))
            .map(|v| median(&v.iter().map(|s| s.cps).collect::<Vec<_>>()));
        for (ci, c) in configs.iter().enumerate() {
            let Some(v) = samples.get(&(wi, ci)) else {
                continue;
            };
            let all: Vec<f64> = v.iter().map(|s| s.cps).collect();
            let cps = median(&all);
            // Half the min-max range, relative to the median: how much rounds disagreed.
            let spread = if all.len() > 1 && cps > 0.0 {
                let (lo, hi) = all
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                format!(" ±{:.0}%", 50.0 * (hi - lo) / cps)
            } else {
                String::new()
            };
            let conns: u64 = v.iter().map(|s| s.connections).sum();
            let failed: u64 = v.iter().map(|s| s.failed).sum();
            let generated = per_conn[wi].map(|p| (p * conns as f64) as u64);
            let sum_opt = |f: fn(&Sample) -> Option<u64>| -> Option<u64> {
                v.iter()
                    .map(f)
                    .collect::<Option<Vec<_>>>()
                    .map(|x| x.iter().sum())
            };
            let events = sum_opt(|s| s.events);
            let dropped = sum_opt(|s| s.dropped);
            let closes = sum_opt(|s| s.closes_seen);
            let cpu: Vec<f64> = v.iter().filter_map(|s| s.cpu).collect();
            let reader: Vec<f64> = v.iter().filter_map(|s| s.reader_cpu).collect();
            let hwm = v.iter().filter_map(|s| s.hwm_kib).max();
            let background = median(&v.iter().map(|s| s.background).collect::<Vec<_>>());
            let is_tracer = !matches!(c.tracer, Tracer::None);
            let _ = writeln!(
                w,
                "| {} | {} | {}{spread}{} | {} | {} / {} | {} | {} | {} | {} | {:.2} cores |",
                wl.name(),
                c.name,
                thousands(cps as u64),
                if failed > 0 {
                    format!(" ({failed} failed)")
                } else {
                    String::new()
                },
                base.filter(|b| *b > 0.0)
                    .map_or("-".into(), |b| format!("{:.1}%", 100.0 * cps / b)),
                if is_tracer {
                    events.map_or("n/a".into(), thousands)
                } else {
                    "-".into()
                },
                generated.map_or("n/a".into(), thousands),
                if is_tracer {
                    dropped.map_or("n/a".into(), thousands)
                } else {
                    "-".into()
                },
                closes.map_or("-".into(), |c| format!(
                    "{} / {}",
                    thousands(c),
                    thousands(2 * conns)
                )),
                match (cpu.is_empty(), reader.is_empty()) {
                    (true, _) => "-".into(),
                    (false, true) => format!("{:.1}%", 100.0 * median(&cpu)),
                    (false, false) => format!(
                        "{:.1}% (reader {:.1}%)",
                        100.0 * median(&cpu),
                        100.0 * median(&reader)
                    ),
                },
                hwm.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                background,
            );
        }
    }

    let _ = writeln!(
        w,
        "\n## Cost per connection (RST close, BPF run-time statistics on)\n\n\
         One more round per tracer with `BPF_ENABLE_STATS`: runs and run time of each of the \
         tracer's programs (in-kernel cost, paid by the workload), and the tracer process's own \
         CPU time. Statistics cost some throughput themselves, so these rounds are not in the \
         table above.\n"
    );
    let _ = writeln!(
        w,
        "| configuration | program | runs / connection | ns / run | kernel ns / connection |"
    );
    let _ = writeln!(w, "|---|---|---:|---:|---:|");
    for k in costs {
        let conns = k.connections.max(1) as f64;
        let mut total = 0.0;
        for (name, &(runs, ns)) in &k.progs {
            let per = ns as f64 / conns;
            total += per;
            let _ = writeln!(
                w,
                "| {} | {} | {:.2} | {:.0} | {:.0} |",
                k.config,
                name,
                runs as f64 / conns,
                if runs > 0 {
                    ns as f64 / runs as f64
                } else {
                    0.0
                },
                per
            );
        }
        let _ = writeln!(
            w,
            "| {} | **all programs** | | | **{:.0}** |\n| {} | **tracer process (user space), CPU ns / connection** | | | **{:.0}** |",
            k.config,
            total,
            k.config,
            k.user_cpu_secs * 1e9 / conns
        );
    }

    let _ = writeln!(
        w,
        "\n## CLOSE_WAIT leak detection latency\n\n\
         A process makes {n} CLOSE_WAIT sockets, one every {LEAK_EVERY} s (the peer closes, it \
         never does), with `--leak-after {LEAK_AFTER}`. Latency = when tcptrace first reported a \
         `leaked` count including the socket - (when the socket entered CLOSE_WAIT + \
         {LEAK_AFTER} s). watch: the objects `watch --json --interval 1` prints. daemon: \
         `tcptrace report --json --pid` asked every {poll} ms on the control socket.\n\n\
         | reported by | sockets | p50 | p99 | max |\n|---|---:|---:|---:|---:|",
        n = plan.leak_sockets,
        poll = DAEMON_POLL.as_millis(),
    );
    for l in leaks {
        let mut lat = l.latencies.clone();
        lat.sort_by(f64::total_cmp);
        let _ = writeln!(
            w,
            "| {} | {} | {:.3} s | {:.3} s | {:.3} s |",
            l.via.name(),
            lat.len(),
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            lat.last().copied().unwrap_or(0.0),
        );
    }

    let per_socket = (startup.full_hwm_kib as f64 - startup.empty_hwm_kib as f64) * 1024.0
        / startup.sockets as f64;
    let _ = writeln!(
        w,
        "\n## Start-up with existing sockets\n\n\
         `tcptrace watch --json` run with `ip netns exec` in a namespace holding {} connected \
         loopback sockets (made in {:.1} s), and in an empty one; time from spawn to the first \
         JSON line (median of {} runs) and peak RSS after the first upkeep tick. The first JSON \
         line counted {} sockets.\n\n\
         | sockets | time to first line | peak RSS |\n|---:|---:|---:|\n\
         | 0 | {:.3} s | {:.1} MiB |\n| {} | {:.3} s | {:.1} MiB |\n\n\
         Memory per tracked socket: {:.0} bytes.",
        thousands(startup.sockets as u64),
        startup.make_secs,
        if plan.smoke { 1 } else { 3 },
        thousands(startup.seen),
        startup.empty_secs,
        startup.empty_hwm_kib as f64 / 1024.0,
        thousands(startup.sockets as u64),
        startup.full_secs,
        startup.full_hwm_kib as f64 / 1024.0,
        per_socket,
    );

    // Targets of the performance issue (not asserted).
    let watch_rows: Vec<&Sample> = configs
        .iter()
        .position(|c| matches!(&c.tracer, Tracer::Tcptrace(v) if v.ready == Ready::FirstJsonLine))
        .map(|ci| {
            (0..Workload::ALL.len())
                .filter_map(|wi| samples.get(&(wi, ci)))
                .flatten()
                .collect()
        })
        .unwrap_or_default();
    let worst_ratio = configs
        .iter()
        .position(|c| matches!(&c.tracer, Tracer::Tcptrace(v) if v.ready == Ready::FirstJsonLine))
        .and_then(|ci| {
            (0..Workload::ALL.len())
                .filter_map(|wi| {
                    let m = |ci| {
                        samples
                            .get(&(wi, ci))
                            .map(|v| median(&v.iter().map(|s| s.cps).collect::<Vec<_>>()))
                    };
                    Some(m(ci)? / m(0)?)
                })
                .min_by(f64::total_cmp)
        });
    let dropped: u64 = watch_rows.iter().filter_map(|s| s.dropped).sum();
    let cpu = watch_rows
        .iter()
        .filter_map(|s| s.cpu)
        .max_by(f64::total_cmp)
        .unwrap_or(0.0);
    let mark = |ok: bool| if ok { "met" } else { "**not met**" };
    let p99 = leaks
        .iter()
        .find(|l| l.via == LeakReporter::Watch)
        .map_or(f64::NAN, |l| percentile_unsorted(&l.latencies, 99.0));
    let ratio = worst_ratio.unwrap_or(0.0);
    let _ = writeln!(
        w,
        "\n## Targets (tcptrace watch)\n\n| target | measured | |\n|---|---:|---|\n\
         | attached >= 95% of baseline conn/s | {:.1}% (worst workload) | {} |\n\
         | zero dropped events at the default ring size | {} | {} |\n\
         | tracer CPU < 25% of a core | {:.1}% (worst round) | {} |\n\
         | RSS < 64 MiB with {} sockets | {:.1} MiB | {} |\n\
         | leak reported within 1 s of crossing the threshold (p99) | {:.3} s | {} |\n\
         | start-up with {} sockets < 2 s | {:.3} s | {} |",
        ratio * 100.0,
        mark(ratio >= 0.95),
        dropped,
        mark(dropped == 0),
        cpu * 100.0,
        mark(cpu < 0.25),
        thousands(startup.sockets as u64),
        startup.full_hwm_kib as f64 / 1024.0,
        mark(startup.full_hwm_kib < 64 * 1024),
        p99,
        mark(p99 <= 1.0),
        thousands(startup.sockets as u64),
        startup.full_secs,
        mark(startup.full_secs < 2.0),
    );
    r
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn median(v: &[f64]) -> f64 {
    percentile_unsorted(v, 50.0)
}

fn percentile_unsorted(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, p)
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A line of a child's stdout and the wall-clock time it arrived.
struct Line {
    unix: f64,
    text: String,
}

/// Pids of every process the bench started, for the final check.
static SPAWNED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A child process: stdout read line by line on a thread, stderr kept for error messages, stdin
/// held open (churngen exits when it closes). Killed and reaped when dropped, so no error path
/// leaves one behind.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<Receiver<Line>>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, read_stdout: bool) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(if read_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        SPAWNED.lock().unwrap().push(child.id());
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for text in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx
                        .send(Line {
                            unix: unix_now(),
                            text,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            });
            rx
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut k = keep.lock().unwrap();
                    k.push_str(&String::from_utf8_lossy(&buf[..n]));
                    // Keep the tail only.
                    if k.len() > 8192 {
                        let cut = k.len() - 4096;
                        let cut = (cut..k.len()).find(|&i| k.is_char_boundary(i)).unwrap_or(0);
                        k.drain(..cut);
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().unwrap();
        let s = s.trim();
        if s.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                s.lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        }
    }

    /// The next stdout line, waiting at most `timeout`.
    fn line(&self, timeout: Duration) -> Result<Line> {
        let rx = self.lines.as_ref().context("stdout is not read")?;
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => return Ok(l),
                Err(RecvTimeoutError::Disconnected) => {
                    // Let the stderr reader catch up before quoting it.
                    std::thread::sleep(Duration::from_millis(100));
                    bail!("{} ended its output{}", self.name, self.stderr_tail())
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!(
                        "{} printed nothing for {timeout:?}{}",
                        self.name,
                        self.stderr_tail()
                    )
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn try_line(&self) -> Option<Line> {
        self.lines.as_ref()?.try_recv().ok()
    }

    /// Every line left, until the output ends (bounded wait).
    fn drain_lines(&self) -> Vec<Line> {
        let mut v = Vec::new();
        let Some(rx) = self.lines.as_ref() else {
            return v;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            v.push(l);
        }
        v
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` and closes stdin, waits up to 10 s, then kills. Fails if the process had to
    /// be killed.
    fn stop(&mut self, sig: libc::c_int) -> Result<ExitStatus> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill() on our own child's pid, which is not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
        self.stdin.take();
        match self.wait_exit(Duration::from_secs(10)) {
            Ok(st) => Ok(st),
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(e)
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `ok` every 50 ms until it holds.
fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C and SIGTERM: stop at the next check and clean up through the Drop guards.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// A network namespace of ours with lo up, a wide port range (minus the FIN listeners' ports),
/// TIME_WAIT reuse and room for every TIME_WAIT socket the FIN workload makes; deleted when
/// dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        crate::sh(Command::new("ip").args(["netns", "add", name]))?;
        // The guard exists from here on: a failure below still deletes the namespace.
        let ns = Self {
            name: name.to_string(),
        };
        crate::sh(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        let reserved = format!(
            "net.ipv4.ip_local_reserved_ports={FIN_PORT}-{}",
            FIN_PORT + FIN_LISTENERS as u16 - 1
        );
        crate::sh(ns.exec(Path::new("sysctl")).args([
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            &reserved,
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.tcp_max_tw_buckets=1000000",
        ]))?;
        Ok(ns)
    }

    /// `ip netns exec NAME program`: `ip` execs the program, so the child's pid is its pid.
    fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("bench: could not delete network namespace {}", self.name);
        }
    }
}

fn netns_names() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes namespaces left by a bench run that died without cleaning up (its pid is gone).
fn remove_stale_netns() {
    for name in netns_names() {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            println!("bench: deleting stale network namespace {name}");
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel-side facts: attached programs and their statistics

/// `bpftool perf list`: (owner pid, tracepoint, program id) of every perf-event link.
fn perf_links() -> Vec<(u32, String, u64)> {
    let Ok(o) = Command::new("bpftool")
        .args(["-j", "perf", "list"])
        .output()
    else {
        return Vec::new();
    };
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&o.stdout) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| {
            Some((
                i["pid"].as_u64()? as u32,
                i["tracepoint"].as_str().unwrap_or("").to_string(),
                i["prog_id"].as_u64()?,
            ))
        })
        .collect()
}

/// Ids of the BPF programs `pid` holds a descriptor of (aya keeps its tracepoints as bpf_link
/// descriptors, which `bpftool perf list` does not show; every loader holds the program's).
fn prog_ids(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog")
        })
        .filter_map(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Programs our tracers loaded, for the final check that none is left.
static TRACER_PROGS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Notes the programs of a tracer that is up.
fn remember_progs(pid: u32) {
    TRACER_PROGS.lock().unwrap().extend(prog_ids(pid));
}

/// Run count and run time of every program `pid` holds, by program name.
fn prog_stats(pid: u32) -> Result<ProgStats> {
    let mut out = ProgStats::new();
    for id in prog_ids(pid) {
        let o = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .context("running bpftool")?;
        let v: Value = serde_json::from_slice(&o.stdout).context("bpftool prog show output")?;
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let e = out.entry(name).or_default();
        e.0 += v["run_cnt"].as_u64().unwrap_or(0);
        e.1 += v["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(out)
}

/// Ids of every BPF program loaded in the kernel (`bpftool prog list`).
fn loaded_prog_ids() -> Result<HashSet<u64>> {
    let o = Command::new("bpftool")
        .args(["-j", "prog", "list"])
        .output()
        .context("running bpftool prog list")?;
    let v: Value = serde_json::from_slice(&o.stdout).context("bpftool prog list output")?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

/// BPF run-time statistics, on while this lives (BPF_ENABLE_STATS: the kernel switches them
/// off when the descriptor closes, even if we die).
struct BpfStats {
    _fd: std::os::fd::OwnedFd,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }, type 0 = BPF_STATS_RUN_TIME.
        let attr = [0u64; 1];
        // SAFETY: a zeroed attribute of the size we pass.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                size_of_val(&attr) as libc::c_uint,
            )
        };
        if fd < 0 {
            bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd as _;
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Self {
            _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Fails when a process we started is still alive, a program one of our tracers loaded is
/// still loaded (`bpftool prog list`), or a namespace of ours still exists.
fn check_clean() -> Result<()> {
    let me = std::process::id();
    let spawned = SPAWNED.lock().unwrap().clone();
    let mut problems = Vec::new();
    // Our children are reaped by their guards: any process whose parent is us is a stray.
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(stat) = proc_stat_fields(pid)
                && stat.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me)
            {
                problems.push(format!("process {pid} still running"));
            }
        }
    }
    for (pid, tp, id) in perf_links() {
        if spawned.contains(&pid) {
            problems.push(format!("program {id} on {tp} still attached by pid {pid}"));
        }
    }
    let ours = TRACER_PROGS.lock().unwrap().clone();
    let loaded = loaded_prog_ids()?;
    for id in ours.iter().filter(|id| loaded.contains(id)) {
        problems.push(format!("program {id} still loaded"));
    }
    let mine = [
        format!("{NETNS_PREFIX}{me}"),
        format!("{NETNS_PREFIX}{me}-s"),
    ];
    for name in netns_names() {
        if mine.contains(&name) {
            problems.push(format!("network namespace {name} left"));
        }
    }
    if !problems.is_empty() {
        bail!("the bench left things behind: {}", problems.join("; "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc and parsing helpers

/// Fields of /proc/PID/stat after the command name: [0] is the state (field 3).
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU ticks used so far by every user-space process but this one and those we started
/// (children that already exited count through their parent's cutime/cstime). Kernel threads
/// are left out: ksoftirqd does the workload's own network work.
fn background_ticks() -> u64 {
    let me = std::process::id();
    let ours = SPAWNED.lock().unwrap().clone();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid != 2 && !ours.contains(&pid))
        .filter_map(proc_stat_fields)
        // [1] is the parent: kthreadd (2) parents every kernel thread.
        .filter(|f| f.get(1).map(String::as_str) != Some("2"))
        .map(|f| {
            // utime, stime, cutime, cstime: fields 14 to 17.
            f.iter()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Name (comm) of tcptrace's ring-buffer reader thread.
const READER_THREAD: &str = "tcptrace-reader";

/// utime + stime of the threads of `pid` whose name starts with `name`, in clock ticks; None
/// when there is none.
fn thread_ticks(pid: u32, name: &str) -> Option<u64> {
    let mut total = None;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        *total.get_or_insert(0) += t;
    }
    total
}

/// utime + stime of a process (all threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = proc_stat_fields(pid)?;
    // Fields 14 and 15 of /proc/PID/stat.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Peak resident set size (VmHWM) in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `a=1 b=2` -> {a: 1, b: 2}
fn key_values(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

fn parse_json(line: &str) -> Result<Value> {
    serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))
}

/// The `processes` entry of `pid` in a snapshot.
fn process_entry(snap: &Value, pid: u32) -> Option<&Value> {
    snap["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid as u64))
}

/// `tcptrace <args> --json --socket DAEMON_SOCKET`, parsed, when the daemon answers.
fn daemon_json(bin: &Path, args: &[&str]) -> Option<Value> {
    let o = Command::new(bin)
        .args(args)
        .args(["--json", "--socket", DAEMON_SOCKET])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// `tcptrace status`, when the daemon answers.
fn daemon_status(bin: &Path) -> Option<Value> {
    daemon_json(bin, &["status"])
}

/// `tcptrace report --pid PID` from the daemon, when it answers.
fn daemon_report(bin: &Path, pid: u32) -> Option<Value> {
    daemon_json(bin, &["report", "--pid", &pid.to_string()])
}

/// Leaked CLOSE_WAIT sockets of `pid` in a snapshot or report.
fn leaked_of(snap: &Value, pid: u32) -> u64 {
    process_entry(snap, pid)
        .and_then(|p| p["close_wait"]["leaked"].as_u64())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn churngen_result_line() {
        let kv = key_values("connections=10 failed=0 secs=1.000 cps=10.0");
        assert_eq!(kv["connections"], "10");
        assert_eq!(kv["cps"], "10.0");
    }
}
