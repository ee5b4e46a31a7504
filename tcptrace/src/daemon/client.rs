//! `tcptrace report` and `tcptrace status`: ask the daemon over its control socket.

use std::path::{Path, PathBuf};

use crate::{
    daemon::protocol::{self, RequestError, Status},
    host::clock::{monotonic_ns, unix_now},
    state::{
        SnapshotOptions, Table, TableConfig,
        snapshot::{Filter, PodView, container_selected},
    },
    tracer::{SysProcs, existing_sockets},
    views::findings::Thresholds,
    views::format::cpu_drops,
    views::report::{self, Report},
};

/// Why `report` or `status` could not show anything.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no tcptrace daemon on {}: start one with `tcptrace daemon` (or pass --socket)", socket.display())]
    NoDaemon { socket: PathBuf },
    #[error("{}: the listener there runs as uid {uid}, not root: not trusting it (a tcptrace daemon runs as root; remove that socket or pass --socket)", socket.display())]
    Untrusted { socket: PathBuf, uid: u32 },
    #[error("asking the daemon on {}", socket.display())]
    Daemon {
        socket: PathBuf,
        source: RequestError,
    },
    #[error("malformed {what} from the daemon")]
    Malformed {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot encode the JSON output")]
    Encode(#[source] serde_json::Error),
    #[error("reading /proc/net/tcp")]
    Sockets(#[source] std::io::Error),
}

/// The sockets that exist now and their owners, without history.
fn snapshot_report() -> Result<Report, ClientError> {
    let mut table = Table::new(TableConfig::default(), Box::new(SysProcs::default()));
    let now = monotonic_ns();
    table.load_existing(&existing_sockets(false).map_err(ClientError::Sockets)?, now);
    let snap = table.snapshot(
        now,
        &SnapshotOptions {
            detail: true,
            unix_now: unix_now(),
            port_range: crate::host::procfs::ephemeral_port_range().unwrap_or((0, 0)),
            ..Default::default()
        },
    );
    Ok(report::build(&snap, "snapshot", &Thresholds::default()))
}

/// The error for a failed request that is not "no daemon".
fn daemon_error(socket: &Path, source: RequestError) -> ClientError {
    match source {
        RequestError::Untrusted { uid } => ClientError::Untrusted {
            socket: socket.to_path_buf(),
            uid,
        },
        source => ClientError::Daemon {
            socket: socket.to_path_buf(),
            source,
        },
    }
}

/// A string from the daemon, with control bytes shown as escapes rather than sent raw.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Whether a process of a report passes `f` (pid, command, container; family and ports
/// against its CLOSE_WAIT sockets and destinations).
fn report_selects(f: &Filter, p: &serde_json::Value) -> bool {
    use std::net::SocketAddr;
    let addr = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<SocketAddr>().ok());
    let pid_ok = f.pids.is_empty()
        || p["pid"]
            .as_u64()
            .is_some_and(|pid| f.pids.contains(&(pid as u32)));
    let comm_ok = f.comms.is_empty()
        || p["comm"]
            .as_str()
            .is_some_and(|c| f.comms.iter().any(|w| w == c));
    let container_ok = f.containers.is_empty() || {
        let pod: Option<PodView> = serde_json::from_value(p["pod"].clone()).ok();
        container_selected(&f.containers, p["container_id"].as_str(), pod.as_ref())
    };
    let sockets_ok = !f.selects_sockets()
        || p["close_wait"]["sockets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| match (addr(&s["local"]), addr(&s["remote"])) {
                (Some(l), Some(r)) => f.socket_hit(Some(&l), &r),
                _ => false,
            })
        || p["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| addr(&d["remote"]))
            .any(|r| f.socket_hit(None, &r));
    pid_ok && comm_ok && container_ok && sockets_ok
}

pub async fn report(socket: &Path, json: bool, filter: &Filter) -> Result<(), ClientError> {
    let mut r: Report = match protocol::request(socket, "report").await {
        Ok(v) => serde_json::from_value(v["report"].clone()).map_err(|source| {
            ClientError::Malformed {
                what: "report",
                source,
            }
        })?,
        Err(e) if e.no_daemon() => {
            eprintln!(
                "tcptrace: no daemon on {}: showing the sockets that exist now; churn, connect failures and leak ages need `tcptrace daemon`",
                socket.display()
            );
            if !rustix::process::geteuid().is_root() {
                eprintln!(
                    "tcptrace: not root: sockets of other users' processes are shown without owner"
                );
            }
            snapshot_report()?
        }
        Err(source) => return Err(daemon_error(socket, source)),
    };
    r.processes.retain(|p| report_selects(filter, p));
    if json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(ClientError::Encode)?
        );
    } else {
        print!("{}", report::render_text(&r));
    }
    Ok(())
}

pub async fn status(socket: &Path, json: bool) -> Result<(), ClientError> {
    let v = match protocol::request(socket, "status").await {
        Ok(v) => v,
        Err(e) if e.no_daemon() => {
            return Err(ClientError::NoDaemon {
                socket: socket.to_path_buf(),
            });
        }
        Err(source) => return Err(daemon_error(socket, source)),
    };
    let s: Status =
        serde_json::from_value(v["status"].clone()).map_err(|source| ClientError::Malformed {
            what: "status",
            source,
        })?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&s).map_err(ClientError::Encode)?
        );
        return Ok(());
    }
    println!("tcptrace daemon pid {}, up {:.0}s", s.pid, s.uptime_secs);
    println!(
        "programs attached: {} ({})",
        s.programs_attached.len(),
        printable(&s.programs_attached.join(", "))
    );
    println!(
        "stacks: {}",
        match (&s.stacks_error, s.stacks) {
            (Some(e), _) => format!("could not be switched on: {}", printable(e)),
            (None, true) => "on".to_string(),
            (None, false) => "off (`stacks = true` in the config file, then SIGHUP)".to_string(),
        }
    );
    for p in &s.stack_problems {
        println!("  {}", printable(p));
    }
    let by_cpu: Vec<(u32, u64)> = (s.events_dropped_by_cpu.iter())
        .map(|c| (c.cpu, c.dropped))
        .collect();
    println!(
        "events seen {}, dropped {}{}, missed {}, for unknown sockets {}",
        s.events_seen,
        s.events_dropped,
        cpu_drops(&by_cpu),
        s.events_missed,
        s.events_unknown_socket
    );
    println!(
        "state transitions seen {}, dropped {}, missed {}, not sent (nothing tracked changes) {}, \
         found missing afterwards {} (late records dropped {})",
        s.transitions_seen,
        s.transitions_dropped,
        s.transitions_missed,
        s.transitions_not_sent,
        s.transitions_found_missing,
        s.transitions_stale
    );
    println!(
        "tracked: {} sockets (cap {}), {} processes (cap {})",
        s.sockets_tracked, s.max_sockets, s.processes_tracked, s.max_processes
    );
    println!(
        "evictions: {} sockets, {} processes; reconciled after lost records: {} removed, {} added, {} fixed",
        s.evictions.sockets,
        s.evictions.processes,
        s.reconciled.removed,
        s.reconciled.added,
        s.reconciled.fixed
    );
    println!(
        "control socket {}, metrics {}",
        printable(&s.socket.to_string_lossy()),
        printable(&s.metrics_addr)
    );
    if let Some(c) = &s.config_file {
        println!("config {}", printable(&c.to_string_lossy()));
    }
    Ok(())
}
