//! The `tcptrace` command line.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use tcptrace::{
    daemon::client,
    daemon::config::{Config, DEFAULT_CONFIG, DEFAULT_SOCKET, bounds},
    daemon::server as daemon,
    kernel::{event::TcpState, probes::ProbeOptions},
    state::Filter,
    tracer::TracerOptions,
    views::watch::{self, WatchOptions},
};

/// Names the process behind CLOSE_WAIT leaks, connection churn and connect failures, live.
///
/// tcptrace follows every TCP socket on the host with eBPF tracepoints and keeps, per process,
/// the sockets stuck in CLOSE_WAIT, the connections opened and closed, and every failed
/// connect() with its errno. Needs root (or CAP_BPF and CAP_PERFMON).
#[derive(Parser, Debug)]
#[command(name = "tcptrace", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Live view of the processes with leaking, churning or failing TCP sockets.
    ///
    /// A top-like screen on a terminal, plain text lines when piped, newline-delimited JSON with
    /// --json, or a stream of state transitions and failed connects with --events.
    Watch(WatchArgs),
    /// Run in the background (systemd, Kubernetes): control socket, Prometheus metrics, alerts.
    ///
    /// Logs to stderr in logfmt (level=... msg=... key=value). SIGTERM/SIGINT stop it cleanly,
    /// SIGHUP reloads the config file.
    Daemon(DaemonArgs),
    /// Per-process findings, worst first, from the running daemon; without a daemon, a snapshot
    /// of the sockets that exist now.
    Report(ReportArgs),
    /// Uptime, attached programs, events seen and dropped, table size and evictions of the daemon.
    Status(StatusArgs),
    /// Shell completions on stdout, e.g. `tcptrace completions bash > /etc/bash_completion.d/tcptrace`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The manual page (roff) on stdout, e.g. `tcptrace man | man -l -`.
    Man,
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Control socket for `report` and `status` [default: /run/tcptrace/tcptrace.sock]
    #[arg(long, value_name = "PATH", env = "TCPTRACE_SOCKET")]
    socket: Option<PathBuf>,
    /// Prometheus endpoint, ADDR:PORT, or "off" [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<String>,
    /// TOML config file (thresholds, addresses, caps); flags override it [default:
    /// /etc/tcptrace/tcptrace.toml when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A socket in CLOSE_WAIT for longer than this many seconds counts as leaked [default: 5]
    #[arg(long, value_parser = leak_after_secs, value_name = "SECS")]
    leak_after: Option<f64>,
    /// Record the call stack each socket is opened with and show it beside leaked sockets in
    /// reports (`stacks = true` in the config file, switchable with SIGHUP).
    #[arg(long)]
    stacks: bool,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "TCPTRACE_SOCKET")]
    socket: PathBuf,
    /// One JSON object instead of text.
    #[arg(long, short = 'j')]
    json: bool,
    /// Only these processes (comma-separated or repeated).
    #[arg(long, short = 'p', value_name = "PID", value_delimiter = ',')]
    pid: Vec<u32>,
    /// Only processes with this command name (repeatable).
    #[arg(long, short = 'c', value_name = "NAME")]
    comm: Vec<String>,
    /// Only processes of these containers: an id or a prefix of it (at least 4 hex digits), or
    /// a pod name (comma-separated or repeated).
    #[arg(long, value_name = "ID", value_parser = container_selector, value_delimiter = ',')]
    container: Vec<String>,
    /// Family and port filters keep the processes with a CLOSE_WAIT socket or a destination
    /// that passes them.
    #[command(flatten)]
    sockets: SocketFilterArgs,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "TCPTRACE_SOCKET")]
    socket: PathBuf,
    /// One JSON object instead of text.
    #[arg(long, short = 'j')]
    json: bool,
}

/// Family and port filters, shared by watch and report (bcc's and ss's letters).
#[derive(Args, Debug, Default)]
struct SocketFilterArgs {
    /// Only IPv4 sockets and destinations.
    #[arg(long = "ipv4", short = '4', conflicts_with = "ipv6")]
    ipv4: bool,
    /// Only IPv6 sockets and destinations.
    #[arg(long = "ipv6", short = '6')]
    ipv6: bool,
    /// Only processes with a socket or connect on one of these local or remote ports
    /// (comma-separated or repeated).
    #[arg(long, value_name = "PORT", value_delimiter = ',')]
    port: Vec<u16>,
    /// Only sockets on these local ports (comma-separated, like tcpstates -L).
    #[arg(
        long = "local-port",
        short = 'L',
        value_name = "PORT",
        value_delimiter = ','
    )]
    local_port: Vec<u16>,
    /// Only sockets and connects to these remote ports (comma-separated, like tcpstates -D).
    #[arg(
        long = "remote-port",
        short = 'D',
        value_name = "PORT",
        value_delimiter = ','
    )]
    remote_port: Vec<u16>,
}

impl SocketFilterArgs {
    /// Adds these filters to `f`.
    fn apply(self, f: &mut Filter) {
        f.family = match (self.ipv4, self.ipv6) {
            (true, _) => Some(4),
            (_, true) => Some(6),
            _ => None,
        };
        f.ports = self.port;
        f.local_ports = self.local_port;
        f.remote_ports = self.remote_port;
    }
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// Seconds between refreshes (0.1 to 86400).
    #[arg(long, short = 'i', default_value = "1", value_parser = interval_secs, value_name = "SECS")]
    interval: f64,
    /// Print every state transition and failed connect instead of the per-process view.
    #[arg(long, short = 'e')]
    events: bool,
    /// With --events: only transitions from or to these states, named as ss names them
    /// (established, syn-sent, syn-recv, fin-wait-1, fin-wait-2, time-wait, close, close-wait,
    /// last-ack, listen, closing; comma-separated or repeated). Failed connects are still shown.
    #[arg(long, value_name = "STATE", value_delimiter = ',', value_parser = state_name, requires = "events")]
    state: Vec<TcpState>,
    /// Timestamps of the text output in local time (with its UTC offset) instead of UTC.
    #[arg(long = "local-time", short = 'T')]
    local_time: bool,
    /// Newline-delimited JSON: one object per interval (or per event with --events).
    #[arg(long, short = 'j')]
    json: bool,
    /// A socket in CLOSE_WAIT for longer than this many seconds (0 to 86400) counts as leaked.
    #[arg(long, default_value = "5", value_parser = leak_after_secs, value_name = "SECS")]
    leak_after: f64,
    /// Show only these processes (comma-separated or repeated).
    #[arg(long, short = 'p', value_name = "PID", value_delimiter = ',')]
    pid: Vec<u32>,
    /// Show only processes with this command name (repeatable).
    #[arg(long, short = 'c', value_name = "NAME")]
    comm: Vec<String>,
    /// Show only processes of these containers: an id or a prefix of it (at least 4 hex
    /// digits), or a pod name (comma-separated or repeated).
    #[arg(long, value_name = "ID", value_parser = container_selector, value_delimiter = ',')]
    container: Vec<String>,
    #[command(flatten)]
    sockets: SocketFilterArgs,
    /// Exit after this many seconds (0.1 to ten years).
    #[arg(long, short = 'd', value_parser = duration_secs, value_name = "SECS")]
    duration: Option<f64>,
    /// Wide output: TIME_WAIT count, top remote endpoint and command line.
    #[arg(long, short = 'w')]
    wide: bool,
    /// Kernel ring buffers in KiB, 4 to 1048576: the total, split between one ring per CPU (up
    /// to 16 rings, each at least 4 KiB, sizes rounded up to a power of two).
    #[arg(long, default_value_t = tcptrace_common::DEFAULT_RING_BYTES / 1024, value_parser = ring_buffer_kib, value_name = "KIB")]
    ring_buffer_kib: u32,
    /// Record the call stack each socket is opened with (connect, accept) and show it beside
    /// leaked sockets. Costs about a microsecond per connect and accept; needs binaries built
    /// with frame pointers (or a perf map) for complete stacks.
    #[arg(long)]
    stacks: bool,
}

/// Seconds within `range`, for the flags; the bounds are the config file's.
fn secs_in(s: &str, range: (f64, f64)) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    bounds::secs(v, range)
}

/// A TCP state as ss names it (`close-wait`), or as the kernel does (`CLOSE_WAIT`).
fn state_name(s: &str) -> Result<TcpState, String> {
    let want: String = s
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .collect::<String>()
        .to_ascii_uppercase();
    (1..=12)
        .filter_map(TcpState::from_u8)
        .filter(|t| !matches!(t, TcpState::NewSynRecv))
        .find(|t| t.name().replace('_', "") == want)
        .ok_or_else(|| {
            format!(
                "`{s}` is not a TCP state: established, syn-sent, syn-recv, fin-wait-1, \
                 fin-wait-2, time-wait, close, close-wait, last-ack, listen or closing"
            )
        })
}

fn interval_secs(s: &str) -> Result<f64, String> {
    secs_in(s, bounds::INTERVAL_SECS)
}

fn duration_secs(s: &str) -> Result<f64, String> {
    secs_in(s, bounds::DURATION_SECS)
}

fn leak_after_secs(s: &str) -> Result<f64, String> {
    secs_in(s, bounds::LEAK_AFTER_SECS)
}

fn ring_buffer_kib(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of KiB"))?;
    bounds::ring_buffer_kib(v)
}

/// A container id (or a prefix of at least 4 hex digits) or a pod name, lowercased.
fn container_selector(s: &str) -> Result<String, String> {
    let v = s.trim().to_ascii_lowercase();
    // Ids are hex, pod names DNS labels (lowercase letters, digits, '-', '.').
    let name = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if v.is_empty() || v.len() > 253 || !name {
        return Err(format!(
            "`{s}` is not a container id (4 to 64 hex digits) or a pod name"
        ));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the definitions above; nothing to trace, no runtime needed.
    let generated = match cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tcptrace", &mut out);
            Some(out)
        }
        Command::Man => {
            let mut out = Vec::new();
            // Writing to memory does not fail.
            let _ = clap_mangen::Man::new(Cli::command()).render(&mut out);
            Some(out)
        }
        _ => None,
    };
    if let Some(out) = generated {
        use std::io::Write as _;
        return match std::io::stdout().lock().write_all(&out) {
            // `| head`: the reader has what it wanted.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                eprintln!("tcptrace: writing to stdout: {e}");
                ExitCode::FAILURE
            }
            _ => ExitCode::SUCCESS,
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcptrace: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Watch(a) => Ok(watch::run(watch_options(a)).await?),
            Command::Daemon(mut a) => match daemon_config(&mut a) {
                Ok(cfg) => Ok(daemon::run(cfg, a.config).await?),
                Err(e) => Err(e),
            },
            Command::Report(a) => {
                let mut f = Filter {
                    pids: a.pid,
                    comms: a.comm,
                    containers: a.container,
                    ..Default::default()
                };
                a.sockets.apply(&mut f);
                Ok(client::report(&a.socket, a.json, &f).await?)
            }
            Command::Status(a) => Ok(client::status(&a.socket, a.json).await?),
            Command::Completions { .. } | Command::Man => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcptrace: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config file (if any) with the flags applied on top, validated.
fn daemon_config(a: &mut DaemonArgs) -> anyhow::Result<Config> {
    if a.config.is_none() && Path::new(DEFAULT_CONFIG).is_file() {
        a.config = Some(PathBuf::from(DEFAULT_CONFIG));
    }
    let mut cfg = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(s) = &a.socket {
        cfg.socket = s.clone();
    }
    if let Some(m) = &a.metrics_addr {
        cfg.metrics_addr = m.clone();
    }
    if a.stacks {
        cfg.stacks = true;
    }
    if let Some(l) = a.leak_after {
        cfg.leak_after_secs = l;
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid setting: {e}"))?;
    Ok(cfg)
}

fn watch_options(a: WatchArgs) -> WatchOptions {
    tcptrace::views::format::use_local_time(a.local_time);
    WatchOptions {
        interval: Duration::from_secs_f64(a.interval),
        events: a.events,
        json: a.json,
        wide: a.wide,
        filter: {
            let mut f = Filter {
                pids: a.pid,
                comms: a.comm,
                containers: a.container,
                ..Default::default()
            };
            a.sockets.apply(&mut f);
            f
        },
        states: a.state,
        duration: a.duration.map(Duration::from_secs_f64),
        tracer: TracerOptions {
            probes: ProbeOptions {
                ring_bytes: a.ring_buffer_kib.saturating_mul(1024),
                // The event stream shows every transition.
                all_transitions: a.events,
                stacks: a.stacks.then_some(true),
                ..Default::default()
            },
            table: watch::table_config(a.leak_after),
            ..Default::default()
        },
    }
}
