//! The daemon's control socket: bound private (0600, or 0660 for a group), removed on exit,
//! one request and one reply per connection.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::protocol::reply_line;

/// Removes the control socket file when dropped (normal exit, error, panic unwinding).
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create directory {}", dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("a tcptrace daemon is already running on {} (stop it, or use --socket)", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("cannot remove stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind control socket {}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key `socket_group`: no group named `{0}` in /etc/group")]
    NoSuchGroup(String),
    #[error("cannot give {} to group {group}", path.display())]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
}

/// Binds the control socket with mode 0600 (or 0660 and `group`), refusing to replace the
/// socket of a daemon that is running.
pub fn bind_control(
    path: &Path,
    group: Option<&str>,
) -> Result<(UnixListener, SocketFile), ControlError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|source| ControlError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
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
    let listener = bound.map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let file = SocketFile(path.to_path_buf());
    if let Some(gid) = gid {
        let chown = |source| ControlError::Chown {
            path: path.to_path_buf(),
            group: group.unwrap_or("").to_string(),
            source,
        };
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(chown)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(chown)?;
    }
    Ok((listener, file))
}

fn group_id(name: &str) -> Result<u32, ControlError> {
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
        .ok_or_else(|| ControlError::NoSuchGroup(name.to_string()))
}

/// Reads one request line and writes the reply `answer` gives for it.
pub async fn serve_control(stream: UnixStream, answer: impl FnOnce(&str) -> Bytes) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd.take(64 * 1024));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => answer(&line),
        Ok(Err(e)) => reply_line(
            &serde_json::json!({"ok": false, "error": format!("cannot read request: {e}")}),
        ),
        Err(_) => reply_line(&serde_json::json!({"ok": false, "error": "no request within 5 s"})),
    };
    let _ = wr.write_all(&reply).await;
    let _ = wr.shutdown().await;
}
