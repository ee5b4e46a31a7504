//! `tcptrace daemon`: the tracer in the background of a service manager, a local control socket
//! for `report` and `status` (see [`super::protocol`]), a Prometheus endpoint, and alert lines
//! on stderr.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{net::TcpListener, sync::Semaphore};

use super::{
    alerts::Alerter,
    config::{Config, ConfigError},
    control::{ControlError, MAX_CONTROL_CLIENTS, bind_control, refuse_busy, serve_control},
    http::{MAX_METRICS_CLIENTS, refuse_busy as refuse_metrics_busy, serve_metrics},
    logfmt::{self, error_chain, log_at},
    metrics,
    protocol::{CpuDrops, Evictions, Request, Status, reply_line},
    systemd::{Notifier, notify_reloaded, notify_reloading, notify_stopping},
};
use crate::{
    host::clock::unix_now,
    host::signals::{Received, SignalError, Signals},
    kernel::probes::{MissingPrivilege, ProbeOptions, check_privileges},
    state::{SnapshotOptions, TableConfig},
    tracer::{Tracer, TracerError, TracerOptions},
    views::report,
};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privileges(#[from] MissingPrivilege),
    #[error(transparent)]
    Signals(#[from] SignalError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot listen for metrics on {addr} (in use? set --metrics-addr or metrics_addr)")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tracer(#[from] TracerError),
}

fn table_config(cfg: &Config) -> TableConfig {
    TableConfig {
        leak_after_ns: (cfg.leak_after_secs * 1e9) as u64,
        max_sockets: cfg.limits.max_sockets,
        max_processes: cfg.limits.max_processes,
        max_time_wait: crate::host::procfs::max_tw_buckets()
            .unwrap_or(TableConfig::default().max_time_wait),
        resolve_holders: true,
        ..Default::default()
    }
}

/// How long one rendered report or metrics page is served to every client that asks: short
/// enough that a leak shows in `report` well within a second of crossing the threshold, long
/// enough that any number of clients costs at most four renders a second.
const REPLY_INTERVAL: Duration = Duration::from_millis(250);

/// One rendered reply, shared (not copied) by every client within [`REPLY_INTERVAL`]: memory
/// does not grow with the number of clients, and at most one is rendered at a time.
#[derive(Default)]
struct SharedReply(Mutex<Option<(Instant, Bytes)>>);

impl SharedReply {
    fn get(&self, render: impl FnOnce() -> Bytes) -> Bytes {
        let mut slot = self.0.lock().unwrap();
        if let Some((at, bytes)) = &*slot
            && at.elapsed() < REPLY_INTERVAL
        {
            return bytes.clone();
        }
        // Drop the old one before rendering the new one: one copy at a time.
        *slot = None;
        let bytes = render();
        *slot = Some((Instant::now(), bytes.clone()));
        bytes
    }

    /// Forgets a reply past its interval (the clients still writing it keep their reference).
    fn expire(&self) {
        let mut slot = self.0.lock().unwrap();
        if slot
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() >= REPLY_INTERVAL)
        {
            *slot = None;
        }
    }
}

struct State {
    tracer: Tracer,
    report_reply: SharedReply,
    metrics_reply: SharedReply,
    /// What the metrics' counters keep between scrapes.
    metrics: Mutex<metrics::Metrics>,
    cfg: Mutex<Config>,
    config_file: Option<PathBuf>,
    /// `metrics_addr` as configured (the running config shows the bound address).
    metrics_configured: String,
}

impl State {
    fn status(&self) -> Status {
        let cfg = self.cfg.lock().unwrap().clone();
        let stats = self.tracer.with_table(|t| t.stats());
        let k = self.tracer.kernel_counters();
        let (stacks, stacks_error) = self.tracer.stacks();
        let stack_problems = self.tracer.with_table(|t| t.stack_problems(10));
        Status {
            stacks,
            stacks_error,
            stack_problems,
            pid: std::process::id(),
            uptime_secs: (self.tracer.uptime().as_secs_f64() * 10.0).round() / 10.0,
            programs_attached: self
                .tracer
                .attached()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            degraded: self.tracer.degraded().to_vec(),
            events_seen: stats.events,
            events_dropped: k.dropped,
            events_dropped_by_cpu: k
                .dropped_by_cpu
                .iter()
                .map(|&(cpu, dropped)| CpuDrops { cpu, dropped })
                .collect(),
            events_missed: k.missed,
            transitions_seen: stats.transitions,
            transitions_dropped: k.dropped_transitions,
            transitions_missed: k.missed_transitions,
            transitions_not_sent: k.not_sent,
            transitions_found_missing: stats.gaps,
            transitions_stale: stats.stale,
            events_unknown_socket: stats.unknown_socket_events,
            sockets_tracked: stats.sockets,
            processes_tracked: stats.processes,
            evictions: Evictions {
                sockets: stats.evicted_sockets,
                processes: stats.evicted_processes,
            },
            reconciled: stats.reconciled,
            max_sockets: cfg.limits.max_sockets,
            max_processes: cfg.limits.max_processes,
            socket: cfg.socket.clone(),
            metrics_addr: cfg.metrics_addr.clone(),
            config_file: self.config_file.clone(),
        }
    }

    /// The `report` reply line, rendered at most once per [`REPLY_INTERVAL`].
    fn report_reply(&self) -> Bytes {
        self.report_reply.get(|| {
            let alerts = self.cfg.lock().unwrap().alerts.clone();
            let snap = self.tracer.snapshot(&SnapshotOptions {
                detail: true,
                ..Default::default()
            });
            let report = report::build(&snap, "daemon", &alerts.thresholds());
            drop(snap);
            // Serialized straight from the report, without a JSON tree in between.
            #[derive(serde::Serialize)]
            struct Reply<'a> {
                ok: bool,
                report: &'a report::Report,
            }
            let mut bytes = serde_json::to_vec(&Reply {
                ok: true,
                report: &report,
            })
            .unwrap_or_default();
            bytes.push(b'\n');
            Bytes::from(bytes)
        })
    }

    /// The metrics page, rendered at most once per [`REPLY_INTERVAL`].
    fn metrics(&self) -> Bytes {
        self.metrics_reply.get(|| {
            let limits = self.cfg.lock().unwrap().limits.clone();
            let snap = self.tracer.snapshot(&SnapshotOptions {
                max_destinations: Some(usize::MAX),
                ..Default::default()
            });
            let caps = metrics::Caps {
                top_processes: limits.metrics_top_processes,
                top_destinations: limits.metrics_top_destinations,
            };
            let status = self.status();
            Bytes::from(
                self.metrics
                    .lock()
                    .unwrap()
                    .render(&snap, &status, caps, Instant::now()),
            )
        })
    }
}

/// Answers one control request.
fn answer(state: &State, line: &[u8]) -> Bytes {
    let req: Request = match serde_json::from_slice(line.trim_ascii()) {
        Ok(r) => r,
        Err(e) => {
            return reply_line(&serde_json::json!({"ok": false, "error": format!(
                "malformed request ({e}): send one JSON line such as {{\"cmd\":\"report\"}}"
            )}));
        }
    };
    match req.cmd.as_str() {
        "report" => state.report_reply(),
        "status" => reply_line(&serde_json::json!({"ok": true, "status": state.status()})),
        other => reply_line(&serde_json::json!({"ok": false, "error": format!(
            "unknown command `{other}`: expected \"report\" or \"status\""
        )})),
    }
}
/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config, config_file: Option<PathBuf>) -> Result<(), DaemonError> {
    logfmt::init();
    cfg.validate()?;
    check_privileges()?;
    let mut signals = Signals::new()?;
    let metrics_addr = cfg.metrics()?;
    let (control, socket_file) = bind_control(&cfg.socket, cfg.socket_group.as_deref())?;
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let metrics_local = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "off".into());
    let tracer = Tracer::start(
        TracerOptions {
            probes: ProbeOptions {
                ring_bytes: cfg.ring_buffer_kib.saturating_mul(1024),
                all_transitions: false,
                // Room for stacks always: a reload may switch them on.
                stacks: Some(cfg.stacks),
                ..Default::default()
            },
            table: table_config(&cfg),
            ..Default::default()
        },
        None,
    )?;
    let mut shown_cfg = cfg.clone();
    shown_cfg.metrics_addr = metrics_local.clone();
    let state = Arc::new(State {
        tracer,
        report_reply: SharedReply::default(),
        metrics_reply: SharedReply::default(),
        metrics: Mutex::default(),
        cfg: Mutex::new(shown_cfg),
        config_file: config_file.clone(),
        metrics_configured: cfg.metrics_addr.clone(),
    });
    tracing::info!(
        socket = %cfg.socket.display(),
        metrics = %metrics_local,
        programs = state.tracer.attached().len(),
        leak_after_secs = %cfg.leak_after_secs,
        "tcptrace daemon started"
    );
    for reason in state.tracer.degraded() {
        tracing::warn!(reason, "degraded");
    }
    let mut notifier = Notifier::from_env();
    notifier.ready(status_line(
        &state.tracer.snapshot(&SnapshotOptions::default()),
    ));

    let mut alerter = Alerter::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut watchdog = notifier
        .ping_every()
        .map(|every| tokio::time::interval(every.max(Duration::from_millis(100))));
    let control_slots = Arc::new(Semaphore::new(MAX_CONTROL_CLIENTS));
    let metrics_slots = Arc::new(Semaphore::new(MAX_METRICS_CLIENTS));
    let result = loop {
        tokio::select! {
            r = control.accept() => {
                if let Ok((s, _)) = r {
                    match control_slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let state = state.clone();
                            tokio::spawn(serve_control(s, permit, move |line| answer(&state, line)));
                        }
                        Err(_) => refuse_busy(&s),
                    }
                }
            }
            r = async {
                match &metrics_listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Ok((s, _)) = r {
                    match metrics_slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (st, state) = (state.clone(), state.clone());
                            tokio::spawn(serve_metrics(
                                s,
                                permit,
                                move || !st.tracer.attached().is_empty(),
                                move || state.metrics(),
                            ));
                        }
                        Err(_) => refuse_metrics_busy(&s),
                    }
                }
            }
            _ = tick.tick() => {
                for line in state.tracer.kernel_log().take() {
                    log_at!(line.level, "{}", line.msg);
                }
                state.report_reply.expire();
                state.metrics_reply.expire();
                let alerts_cfg = state.cfg.lock().unwrap().alerts.clone();
                let snap = state.tracer.snapshot(&SnapshotOptions::default());
                for a in alerter.evaluate(&snap, unix_now(), &alerts_cfg) {
                    logfmt::alert(&a);
                }
                notifier.status(status_line(&snap));
            }
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => w.tick().await,
                    None => std::future::pending().await,
                }
            } => notifier.ping(state.tracer.drains()),
            sig = signals.recv() => match sig {
                Received::Terminate => break Ok(()),
                Received::Reload => {
                    notify_reloading();
                    reload(&state, config_file.as_deref());
                    notify_reloaded();
                }
            }
        }
    };
    notify_stopping();
    tracing::info!("tcptrace daemon stopping");
    drop(control);
    drop(socket_file);
    match Arc::try_unwrap(state) {
        Ok(s) => s.tracer.stop(),
        Err(s) => {
            // A request is still being answered; the programs detach when it finishes and the
            // process exits right after.
            drop(s);
        }
    }
    result
}

/// The STATUS line systemd shows: what is tracked and what leaks.
fn status_line(snap: &crate::state::Snapshot) -> String {
    let leaking = snap
        .processes
        .iter()
        .filter(|p| p.close_wait.leaked > 0)
        .count();
    let leaked: u64 = snap.processes.iter().map(|p| p.close_wait.leaked).sum();
    format!(
        "{} sockets ({} CLOSE_WAIT, {} TIME_WAIT); {leaked} leaked CLOSE_WAIT in {leaking} \
         processes; {} records dropped",
        snap.host.total, snap.host.close_wait, snap.host.time_wait, snap.dropped_events
    )
}

/// SIGHUP: re-reads the config file; thresholds and caps apply at once, addresses need a restart.
fn reload(state: &State, file: Option<&Path>) {
    let Some(file) = file else {
        tracing::info!("SIGHUP: no config file to reload (started without --config)");
        return;
    };
    match Config::load(file) {
        Err(e) => tracing::error!(
            error = error_chain(&e),
            "config reload failed; keeping the running config"
        ),
        Ok(new) => {
            let mut cur = state.cfg.lock().unwrap();
            if new.socket != cur.socket || new.metrics_addr != state.metrics_configured {
                tracing::warn!("socket and metrics address changes take effect after a restart");
            }
            let table = table_config(&new);
            state.tracer.with_table(|t| t.set_config(table));
            cur.leak_after_secs = new.leak_after_secs;
            if new.stacks != cur.stacks {
                match state.tracer.set_stacks(new.stacks) {
                    Ok(()) => {
                        cur.stacks = new.stacks;
                        tracing::info!("stacks {}", if new.stacks { "on" } else { "off" });
                    }
                    Err(error) => tracing::error!(error, "stacks could not be switched"),
                }
            }
            cur.limits = new.limits;
            cur.alerts = new.alerts;
            tracing::info!(file = %file.display(), "config reloaded");
        }
    }
}
