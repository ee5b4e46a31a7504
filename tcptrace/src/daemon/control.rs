//! The daemon's control socket: bound private (0600, or 0660 for a group) in a directory only
//! root (or the daemon's own user) can write, removed on exit, one request and one reply per
//! connection, a bounded number of connections at a time.
//!
//! What is at the socket path before we bind is only removed when it is a stale socket this
//! daemon's kind could have made: a socket file, owned by root or by us, that nobody answers.
//! Anything else (a regular file, a symlink, another user's socket, a live daemon) is refused.
//! A missing directory is created (only the last component, 0700 or 0750 with a group) and
//! removed again on exit.

use std::{
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::OwnedSemaphorePermit,
};

use super::protocol::reply_line;

/// Longest request line accepted (the newline included).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Control connections served at once; the next one is answered "busy" and closed.
pub const MAX_CONTROL_CLIENTS: usize = 32;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to read its whole reply; a client that reads slower is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Removes the control socket file when dropped (normal exit, error, panic unwinding), if it is
/// still the one we bound, and the directory we created for it, if any.
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket we bound; None until bound (then nothing is removed).
    bound: Option<(u64, u64)>,
    created_dir: Option<PathBuf>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let (Some(id), Ok(m)) = (self.bound, std::fs::symlink_metadata(&self.path))
            && (m.dev(), m.ino()) == id
        {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.created_dir {
            // Only succeeds when empty: never removes what someone else put there.
            let _ = std::fs::remove_dir(dir);
        }
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
    #[error("directory {} does not exist: create it (root-owned, not writable by others) or choose another --socket", dir.display())]
    NoParent { dir: PathBuf },
    #[error("{} is not a directory: choose another --socket", dir.display())]
    NotADir { dir: PathBuf },
    #[error("refusing control socket directory {}: {why}, so another user could replace the socket; use a directory only root can write (e.g. /run/tcptrace) or fix its owner and mode", dir.display())]
    UnsafeDir { dir: PathBuf, why: String },
    #[error("cannot inspect {}", path.display())]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to replace {} ({what}): remove it yourself or choose another --socket", path.display())]
    NotOurs { path: PathBuf, what: String },
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
    #[error("key `socket_group`: no group named `{0}` (getent group lists them)")]
    NoSuchGroup(String),
    #[error("cannot give {} to group {group}", path.display())]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Root and the daemon's own user are the only owners we accept for the socket and its
/// directory.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// Why `dir` is not safe to hold the socket, if it is not: owned by another user, or writable
/// by others (unless root-owned and sticky, like /tmp, where nobody else can rename our files).
fn unsafe_dir(m: &std::fs::Metadata) -> Option<String> {
    let mode = m.mode();
    if !trusted_owner(m.uid()) {
        return Some(format!("it is owned by uid {}", m.uid()));
    }
    let sticky_root = mode & 0o1000 != 0 && m.uid() == 0;
    if mode & 0o022 != 0 && !sticky_root {
        return Some(format!(
            "it is writable by {} (mode {:04o})",
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    None
}

fn check_dir(dir: &Path, m: &std::fs::Metadata) -> Result<(), ControlError> {
    if !m.is_dir() {
        return Err(ControlError::NotADir {
            dir: dir.to_path_buf(),
        });
    }
    match unsafe_dir(m) {
        Some(why) => Err(ControlError::UnsafeDir {
            dir: dir.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

/// Checks the socket's directory, or creates it (the last component only) when its parent
/// exists. Returns the directory if we created it.
fn prepare_dir(dir: &Path, gid: Option<u32>) -> Result<Option<PathBuf>, ControlError> {
    match std::fs::metadata(dir) {
        Ok(m) => return check_dir(dir, &m).map(|_| None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ControlError::Inspect {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let pm = match std::fs::metadata(parent) {
        Ok(m) => m,
        Err(_) => {
            return Err(ControlError::NoParent {
                dir: parent.to_path_buf(),
            });
        }
    };
    check_dir(parent, &pm)?;
    let create = |source| ControlError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(create)?;
    // Mode set explicitly (the umask may have narrowed it); group access only when asked.
    let widened = match gid {
        Some(gid) => std::os::unix::fs::chown(dir, None, Some(gid))
            .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))),
        None => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
    };
    if let Err(source) = widened {
        let _ = std::fs::remove_dir(dir);
        return Err(create(source));
    }
    Ok(Some(dir.to_path_buf()))
}

/// Removes what is at `path` only if it is a stale socket of ours; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Inspect {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let ft = m.file_type();
    let not_ours = |what: String| ControlError::NotOurs {
        path: path.to_path_buf(),
        what,
    };
    if !ft.is_socket() {
        let what = if ft.is_symlink() {
            "a symbolic link"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        return Err(not_ours(what.to_string()));
    }
    if !trusted_owner(m.uid()) {
        return Err(not_ours(format!("a socket owned by uid {}", m.uid())));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyRunning {
            path: path.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path)
            .map_err(|source| ControlError::RemoveStale {
                path: path.to_path_buf(),
                source,
            }),
        // Busy (backlog full) or unreachable: something may live there; leave it.
        Err(e) => Err(not_ours(format!(
            "a socket that answers connects with: {e}"
        ))),
    }
}

/// Binds the control socket with mode 0600 (or 0660 and `group`), refusing to replace the
/// socket of a daemon that is running or anything that is not a stale socket of ours.
pub fn bind_control(
    path: &Path,
    group: Option<&str>,
) -> Result<(UnixListener, SocketFile), ControlError> {
    let gid = group.map(group_id).transpose()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("/"),
    };
    // From here on, dropping `file` undoes what we did (the directory we created).
    let mut file = SocketFile {
        path: path.to_path_buf(),
        bound: None,
        created_dir: prepare_dir(dir, gid)?,
    };
    clear_stale(path)?;
    // Created with no permission for anyone but the owner, then widened to the group if asked:
    // there is no moment when another user can connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let m = std::fs::symlink_metadata(path).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    file.bound = Some((m.dev(), m.ino()));
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

/// The gid of group `name` (a number is taken as it is), through the C library's group
/// database (NSS: /etc/group, and LDAP or sssd where the host uses them).
fn group_id(name: &str) -> Result<u32, ControlError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let missing = || ControlError::NoSuchGroup(name.to_string());
    let cname = std::ffi::CString::new(name).map_err(|_| missing())?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: zeroed plain-data struct, filled by getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated name, buffer and out pointers that live across the call.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if !found.is_null() => return Ok(grp.gr_gid),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            _ => return Err(missing()),
        }
    }
}

fn error_reply(msg: &str) -> Bytes {
    reply_line(&serde_json::json!({"ok": false, "error": msg}))
}

/// Answers a connection over the cap at once ("busy") without waiting for its request; the
/// reply is small enough for the socket buffer, so this never blocks.
pub fn refuse_busy(stream: &UnixStream) {
    let reply = error_reply(&format!(
        "busy: {MAX_CONTROL_CLIENTS} requests are being answered; try again in a few seconds"
    ));
    let _ = stream.try_write(&reply);
}

/// Reads one request line (at most [`MAX_REQUEST`] bytes) and writes the reply `answer` gives
/// for it; `_permit` holds one of the connection slots until the reply is written or the
/// client is dropped for reading too slowly.
pub async fn serve_control(
    stream: UnixStream,
    _permit: OwnedSemaphorePermit,
    answer: impl FnOnce(&[u8]) -> Bytes,
) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, rd.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Ok(Ok(_)) if line.len() > MAX_REQUEST => error_reply(&format!(
            "request too large (over {} KiB): send one JSON line such as {{\"cmd\":\"report\"}}",
            MAX_REQUEST / 1024
        )),
        Ok(Ok(_)) => answer(&line),
        Ok(Err(e)) => error_reply(&format!("cannot read request: {e}")),
        Err(_) => error_reply(&format!("no request within {} s", READ_TIMEOUT.as_secs())),
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = wr.write_all(&reply).await;
        let _ = wr.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("root").ok(), Some(0));
        assert_eq!(group_id("42").ok(), Some(42));
        assert!(matches!(
            group_id("no-such-group-tcptrace"),
            Err(ControlError::NoSuchGroup(g)) if g == "no-such-group-tcptrace"
        ));
        assert!(group_id("bad\0name").is_err());
    }

    async fn ask(request: Vec<u8>) -> serde_json::Value {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let permit = sem.try_acquire_owned().unwrap();
        let server = tokio::spawn(serve_control(a, permit, |l| {
            reply_line(&serde_json::json!({"ok": true, "len": l.len()}))
        }));
        b.write_all(&request).await.unwrap();
        // One line; the daemon closed with the rest of an oversized request unread, so what
        // follows the line is a reset.
        let mut out = Vec::new();
        BufReader::new(b).read_until(b'\n', &mut out).await.unwrap();
        server.await.unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[tokio::test]
    async fn oversized_request_says_too_large() {
        let mut big = vec![b'a'; MAX_REQUEST + 10];
        big.push(b'\n');
        let v = ask(big).await;
        assert_eq!(v["ok"], false, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.starts_with("request too large (over 64 KiB)"), "{e}");
        // Just under the limit still reaches `answer`.
        let mut fits = vec![b' '; MAX_REQUEST - 1];
        fits.push(b'\n');
        assert_eq!(ask(fits).await["len"], MAX_REQUEST);
    }

    #[test]
    fn directory_rules() {
        let dir = std::env::temp_dir().join(format!("tcptrace-ctl-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let mode = |m: u32| {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
            unsafe_dir(&std::fs::metadata(&dir).unwrap())
        };
        assert_eq!(mode(0o700), None);
        assert_eq!(mode(0o755), None);
        assert!(mode(0o777).unwrap().contains("writable by everyone"));
        assert!(mode(0o775).unwrap().contains("writable by its group"));
        // Sticky and world-writable is only fine when root owns it (like /tmp).
        let sticky = mode(0o1777);
        assert_eq!(sticky.is_none(), euid() == 0, "{sticky:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_stale_sockets_of_ours_are_removed() {
        let dir = std::env::temp_dir().join(format!("tcptrace-ctl-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "keep").unwrap();
        let e = clear_stale(&file).unwrap_err().to_string();
        assert!(e.contains("(a regular file)"), "{e}");
        assert!(file.exists());
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            clear_stale(&link)
                .unwrap_err()
                .to_string()
                .contains("symbolic link")
        );
        let live = dir.join("live.sock");
        let l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(matches!(
            clear_stale(&live),
            Err(ControlError::AlreadyRunning { .. })
        ));
        drop(l);
        clear_stale(&live).unwrap();
        assert!(!live.exists(), "a stale socket of ours is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
