//! The control protocol between `tcptrace daemon` and `tcptrace report` / `status`, over a
//! Unix socket: one JSON request line (`{"cmd":"report"}` or `{"cmd":"status"}`), one JSON
//! reply line (`{"ok":true,"report":{..}}`, `{"ok":true,"status":{..}}` or
//! `{"ok":false,"error":"..."}`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evictions {
    pub sockets: u64,
    pub processes: u64,
}

/// Records one CPU lost because its ring buffer was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuDrops {
    pub cpu: u32,
    pub dropped: u64,
}

/// What `tcptrace status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub uptime_secs: f64,
    pub programs_attached: Vec<String>,
    /// Call stacks of opened sockets are recorded (`stacks`).
    #[serde(default)]
    pub stacks: bool,
    /// Why stacks could not be switched on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stacks_error: Option<String>,
    /// Why recorded stacks are incomplete: each names the binary and how to fix it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_problems: Vec<String>,
    /// What works less well on this kernel.
    pub degraded: Vec<String>,
    /// Records applied to the table.
    pub events_seen: u64,
    /// Records the kernel lost (ring buffer full).
    pub events_dropped: u64,
    /// `events_dropped` by the CPU that lost them (CPU `c` writes to ring `c % 16`), only CPUs
    /// that lost any, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events_dropped_by_cpu: Vec<CpuDrops>,
    /// Program runs the kernel skipped (another BPF program was running on the CPU).
    #[serde(default)]
    pub events_missed: u64,
    /// The state transitions among `events_seen`.
    #[serde(default)]
    pub transitions_seen: u64,
    /// The state transitions among `events_dropped`.
    #[serde(default)]
    pub transitions_dropped: u64,
    /// The state transitions among `events_missed`.
    #[serde(default)]
    pub transitions_missed: u64,
    /// Transitions the kernel programs sent no record for by design (nothing tracked changes:
    /// LISTEN -> SYN_RECV; not TCP). Transitions seen + dropped + missed + not sent = the
    /// tracepoint's hits (`cargo xtask bench` checks it).
    #[serde(default)]
    pub transitions_not_sent: u64,
    /// Transitions that never arrived although the next transition of their socket shows they
    /// happened (records lost, or tracepoint hits the kernel ran no program for); the table
    /// makes up for them.
    #[serde(default)]
    pub transitions_found_missing: u64,
    /// Records of a socket that arrived after the first record of the next socket at its
    /// address, dropped (their socket's end was already made up for).
    #[serde(default)]
    pub transitions_stale: u64,
    pub events_unknown_socket: u64,
    pub sockets_tracked: u64,
    pub processes_tracked: u64,
    pub evictions: Evictions,
    /// Corrections from the kernel's socket list after lost records.
    #[serde(default)]
    pub reconciled: crate::state::Reconciled,
    pub max_sockets: usize,
    pub max_processes: usize,
    pub socket: PathBuf,
    pub metrics_addr: String,
    pub config_file: Option<PathBuf>,
}
#[derive(Deserialize)]
pub struct Request {
    pub cmd: String,
}
/// One reply line: the JSON value and its newline, ready to write (and to share between
/// clients).
pub fn reply_line(v: &serde_json::Value) -> Bytes {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Why a request to the daemon got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No daemon listens on the socket (or it cannot be reached).
    #[error(transparent)]
    Connect(std::io::Error),
    #[error(transparent)]
    Io(std::io::Error),
    #[error("the daemon did not answer within 30 s")]
    Timeout,
    #[error("malformed reply from the daemon")]
    Malformed(#[source] serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// What listens there runs as another user than root or us: not a daemon to believe.
    #[error(
        "the listener there runs as uid {uid}, not root: not trusting it (a tcptrace daemon runs as root; remove that socket or pass --socket)"
    )]
    Untrusted { uid: u32 },
}

impl RequestError {
    /// Whether nothing listens there (as opposed to a daemon that failed).
    pub fn no_daemon(&self) -> bool {
        matches!(self, RequestError::Connect(io) if matches!(
            io.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ))
    }
}

/// Whether a daemon running as `uid` may be believed by a client running as `me`: root, or
/// ourselves (a process of our own user could do anything to us anyway).
pub fn trusted_peer(uid: u32, me: u32) -> bool {
    uid == 0 || uid == me
}

/// Sends one request to the daemon, after checking (SO_PEERCRED) that root or we run it.
pub async fn request(socket: &Path, cmd: &str) -> Result<serde_json::Value, RequestError> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(RequestError::Connect)?;
    let peer = s.peer_cred().map_err(RequestError::Io)?;
    if !trusted_peer(peer.uid(), rustix::process::geteuid().as_raw()) {
        return Err(RequestError::Untrusted { uid: peer.uid() });
    }
    let req = reply_line(&serde_json::json!({"cmd": cmd}));
    // A busy daemon answers before reading and closes: its reply is still there to read.
    let sent = s.write_all(&req).await;
    let mut reply = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(s).read_line(&mut reply),
    )
    .await
    .map_err(|_| RequestError::Timeout)?
    .map_err(RequestError::Io)?;
    if reply.is_empty() {
        sent.map_err(RequestError::Io)?;
    }
    let v: serde_json::Value = serde_json::from_str(&reply).map_err(RequestError::Malformed)?;
    if v["ok"].as_bool() != Some(true) {
        return Err(RequestError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ));
    }
    Ok(v)
}
