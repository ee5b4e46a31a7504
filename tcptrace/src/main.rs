//! The `tcptrace` command line.

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tcptrace::{
    bpf::ProbeOptions,
    table::Filter,
    tracer::TracerOptions,
    watch::{self, WatchOptions},
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
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// Seconds between refreshes.
    #[arg(long, short = 'i', default_value = "1", value_parser = positive_secs, value_name = "SECS")]
    interval: f64,
    /// Print every state transition and failed connect instead of the per-process view.
    #[arg(long, short = 'e')]
    events: bool,
    /// Newline-delimited JSON: one object per interval (or per event with --events).
    #[arg(long, short = 'j')]
    json: bool,
    /// A socket in CLOSE_WAIT for longer than this many seconds counts as leaked.
    #[arg(long, default_value = "5", value_parser = non_negative_secs, value_name = "SECS")]
    leak_after: f64,
    /// Show only this process (repeatable).
    #[arg(long, short = 'p', value_name = "PID")]
    pid: Vec<u32>,
    /// Show only processes with this command name (repeatable).
    #[arg(long, short = 'c', value_name = "NAME")]
    comm: Vec<String>,
    /// Show only processes with a socket or connect on this local or remote port (repeatable).
    #[arg(long, value_name = "PORT")]
    port: Vec<u16>,
    /// Exit after this many seconds.
    #[arg(long, short = 'd', value_parser = positive_secs, value_name = "SECS")]
    duration: Option<f64>,
    /// Wide output: TIME_WAIT count, top remote endpoint and command line.
    #[arg(long, short = 'w')]
    wide: bool,
    /// Kernel ring buffer size in KiB (rounded up to a power of two).
    #[arg(long, default_value_t = tcptrace_common::DEFAULT_RING_BYTES / 1024, value_name = "KIB")]
    ring_buffer_kib: u32,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds >= 0")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            Command::Watch(a) => watch::run(watch_options(a)).await,
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

fn watch_options(a: WatchArgs) -> WatchOptions {
    WatchOptions {
        interval: Duration::from_secs_f64(a.interval),
        events: a.events,
        json: a.json,
        wide: a.wide,
        filter: Filter {
            pids: a.pid,
            comms: a.comm,
            ports: a.port,
        },
        duration: a.duration.map(Duration::from_secs_f64),
        tracer: TracerOptions {
            probes: ProbeOptions {
                ring_bytes: a.ring_buffer_kib.saturating_mul(1024),
                ..Default::default()
            },
            table: watch::table_config(a.leak_after),
            ..Default::default()
        },
    }
}
