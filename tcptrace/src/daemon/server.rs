//! `tcptrace daemon`: the tracer in the background of a service manager, a local control socket
//! for `report` and `status`, a Prometheus endpoint, and alert lines on stderr.
//!
//! Control protocol: one JSON request line (`{"cmd":"report"}` or `{"cmd":"status"}`), one JSON
//! reply line (`{"ok":true,"report":{..}}`, `{"ok":true,"status":{..}}` or
//! `{"ok":false,"error":"..."}`).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
};

use crate::{
    daemon::alerts::Alerter,
    daemon::config::Config,
    daemon::logfmt::log,
    daemon::metrics,
    host::signals::{Received, Signals},
    kernel::probes::{ProbeOptions, check_privileges},
    state::table::{SnapshotOptions, TableConfig},
    tracer::{Tracer, TracerOptions, unix_now},
    views::report,
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evictions {
    pub sockets: u64,
    pub processes: u64,
}

/// What `tcptrace status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub uptime_secs: f64,
    pub programs_attached: Vec<String>,
    /// What works less well on this kernel.
    pub degraded: Vec<String>,
    /// Records applied to the table.
    pub events_seen: u64,
    /// Records the kernel lost (ring buffer full).
    pub events_dropped: u64,
    pub events_unknown_socket: u64,
    pub sockets_tracked: u64,
    pub processes_tracked: u64,
    pub evictions: Evictions,
    pub max_sockets: usize,
    pub max_processes: usize,
    pub socket: PathBuf,
    pub metrics_addr: String,
    pub config_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Request {
    cmd: String,
}

/// Removes the control socket file when dropped (normal exit, error, panic unwinding).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the control socket with mode 0600 (or 0660 and `group`), refusing to replace the
/// socket of a daemon that is running.
fn bind_control(path: &Path, group: Option<&str>) -> Result<(UnixListener, SocketFile)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "a tcptrace daemon is already running on {} (stop it, or use --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let gid = match group {
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    // Created with no permission for anyone but the owner, then widened to the group if asked:
    // there is no moment when another user can connect.
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener =
        bound.with_context(|| format!("cannot bind control socket {}", path.display()))?;
    let file = SocketFile(path.to_path_buf());
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot give {} to group {}",
                path.display(),
                group.unwrap_or("")
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok((listener, file))
}

fn group_id(name: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|l| {
            let mut it = l.split(':');
            (it.next() == Some(name))
                .then(|| it.nth(1).and_then(|g| g.parse().ok()))
                .flatten()
        })
        .ok_or_else(|| anyhow!("key `socket_group`: no group named `{name}` in /etc/group"))
}

/// Tells systemd (Type=notify) that start-up is done; a no-op without NOTIFY_SOCKET.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = r {
        log("warn", "sd_notify failed", &[("error", e.to_string())]);
    }
}

fn table_config(cfg: &Config) -> TableConfig {
    TableConfig {
        leak_after_ns: (cfg.leak_after_secs * 1e9) as u64,
        max_sockets: cfg.limits.max_sockets,
        max_processes: cfg.limits.max_processes,
        max_time_wait: crate::host::procfs::max_tw_buckets()
            .unwrap_or(TableConfig::default().max_time_wait),
        ..Default::default()
    }
}

struct State {
    tracer: Tracer,
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
        Status {
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
            events_unknown_socket: stats.unknown_socket_events,
            sockets_tracked: stats.sockets,
            processes_tracked: stats.processes,
            evictions: Evictions {
                sockets: stats.evicted_sockets,
                processes: stats.evicted_processes,
            },
            max_sockets: cfg.limits.max_sockets,
            max_processes: cfg.limits.max_processes,
            socket: cfg.socket.clone(),
            metrics_addr: cfg.metrics_addr.clone(),
            config_file: self.config_file.clone(),
        }
    }

    fn report(&self) -> report::Report {
        let alerts = self.cfg.lock().unwrap().alerts.clone();
        let snap = self.tracer.snapshot(&SnapshotOptions {
            detail: true,
            ..Default::default()
        });
        report::build(&snap, "daemon", &alerts)
    }

    fn metrics(&self) -> String {
        let limits = self.cfg.lock().unwrap().limits.clone();
        let snap = self.tracer.snapshot(&SnapshotOptions {
            detail: true,
            ..Default::default()
        });
        metrics::render(
            &snap,
            &self.status(),
            limits.metrics_top_processes,
            limits.metrics_top_destinations,
        )
    }
}

/// Answers one control request.
fn answer(state: &State, line: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            return serde_json::json!({"ok": false, "error": format!(
                "malformed request ({e}): send one JSON line such as {{\"cmd\":\"report\"}}"
            )});
        }
    };
    match req.cmd.as_str() {
        "report" => serde_json::json!({"ok": true, "report": state.report()}),
        "status" => serde_json::json!({"ok": true, "status": state.status()}),
        other => serde_json::json!({"ok": false, "error": format!(
            "unknown command `{other}`: expected \"report\" or \"status\""
        )}),
    }
}

async fn serve_control(state: Arc<State>, stream: UnixStream) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd.take(64 * 1024));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => answer(&state, &line),
        Ok(Err(e)) => {
            serde_json::json!({"ok": false, "error": format!("cannot read request: {e}")})
        }
        Err(_) => serde_json::json!({"ok": false, "error": "no request within 5 s"}),
    };
    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
    bytes.push(b'\n');
    let _ = wr.write_all(&bytes).await;
    let _ = wr.shutdown().await;
}

async fn serve_metrics(state: Arc<State>, mut stream: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (we only need its first line).
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    if head.is_err() {
        return;
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let first = req.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics(),
        )
    } else if path == "/" {
        (
            "200 OK",
            "text/plain",
            "tcptrace: metrics at /metrics\n".to_string(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found; metrics are at /metrics\n".to_string(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config, config_file: Option<PathBuf>) -> Result<()> {
    cfg.validate()?;
    check_privileges()?;
    let mut signals = Signals::new()?;
    let metrics_addr = cfg.metrics()?;
    let (control, socket_file) = bind_control(&cfg.socket, cfg.socket_group.as_deref())?;
    let metrics_listener = match metrics_addr {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
            format!("cannot listen for metrics on {a} (in use? set --metrics-addr or metrics_addr)")
        })?),
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
        cfg: Mutex::new(shown_cfg),
        config_file: config_file.clone(),
        metrics_configured: cfg.metrics_addr.clone(),
    });
    log(
        "info",
        "tcptrace daemon started",
        &[
            ("socket", cfg.socket.display().to_string()),
            ("metrics", metrics_local),
            ("programs", state.tracer.attached().len().to_string()),
            ("leak_after_secs", cfg.leak_after_secs.to_string()),
        ],
    );
    for d in state.tracer.degraded() {
        log("warn", "degraded", &[("reason", d.clone())]);
    }
    notify_ready();

    let mut alerter = Alerter::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            r = control.accept() => {
                if let Ok((s, _)) = r {
                    tokio::spawn(serve_control(state.clone(), s));
                }
            }
            r = async {
                match &metrics_listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Ok((s, _)) = r {
                    tokio::spawn(serve_metrics(state.clone(), s));
                }
            }
            _ = tick.tick() => {
                for line in state.tracer.kernel_log().take() {
                    log(line.level, &line.msg, &[]);
                }
                let alerts_cfg = state.cfg.lock().unwrap().alerts.clone();
                let snap = state.tracer.snapshot(&SnapshotOptions::default());
                for a in alerter.evaluate(&snap, unix_now(), &alerts_cfg) {
                    log(a.level, a.msg, &a.fields);
                }
            }
            sig = signals.recv() => match sig {
                Received::Terminate => break Ok(()),
                Received::Reload => reload(&state, config_file.as_deref()),
            }
        }
    };
    log("info", "tcptrace daemon stopping", &[]);
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

/// SIGHUP: re-reads the config file; thresholds and caps apply at once, addresses need a restart.
fn reload(state: &State, file: Option<&Path>) {
    let Some(file) = file else {
        log(
            "info",
            "SIGHUP: no config file to reload (started without --config)",
            &[],
        );
        return;
    };
    match Config::load(file) {
        Err(e) => log(
            "error",
            "config reload failed; keeping the running config",
            &[("error", format!("{e:#}"))],
        ),
        Ok(new) => {
            let mut cur = state.cfg.lock().unwrap();
            if new.socket != cur.socket || new.metrics_addr != state.metrics_configured {
                log(
                    "warn",
                    "socket and metrics address changes take effect after a restart",
                    &[],
                );
            }
            let table = table_config(&new);
            state.tracer.with_table(|t| t.set_config(table));
            cur.leak_after_secs = new.leak_after_secs;
            cur.limits = new.limits;
            cur.alerts = new.alerts;
            log(
                "info",
                "config reloaded",
                &[("file", file.display().to_string())],
            );
        }
    }
}

/// Sends one request to the daemon; Err when there is no daemon or it refused.
pub async fn request(socket: &Path, cmd: &str) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).await?;
    let mut req = serde_json::to_vec(&serde_json::json!({"cmd": cmd}))?;
    req.push(b'\n');
    s.write_all(&req).await?;
    let mut reply = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(s).read_line(&mut reply),
    )
    .await
    .context("the daemon did not answer within 30 s")??;
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("malformed reply from the daemon")?;
    if v["ok"].as_bool() != Some(true) {
        bail!(
            "the daemon refused: {}",
            v["error"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(v)
}
