//! Real-kernel tests of the daemon's hardening: what it does with the file and directory at
//! `--socket`, clients that check who answers, bounded memory under many slow report clients
//! with a connection cap, oversized requests, and the metrics endpoint (HEAD, bare LF, top-N
//! destinations with `remote="other"`).
//!
//! Every test starts its own daemon with its own socket path (`/tmp/tcptrace-hd-*`) and metrics
//! port. Run:
//!
//! ```text
//! TCPTRACE_BIN=target/release/tcptrace cargo test --release -p tcptrace-tests --test hardening_daemon -- --nocapture
//! ```

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcptrace_tests::{free_port, poll, require_root, tcptrace_bin};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");
const NOBODY: u32 = 65534;

/// A path under /tmp unique to this test process, removed (whatever it is) when dropped.
struct TmpPath(PathBuf);

impl TmpPath {
    fn new(name: &str) -> TmpPath {
        let p = PathBuf::from(format!("/tmp/tcptrace-hd-{name}-{}", std::process::id()));
        clean(&p);
        TmpPath(p)
    }
}

fn clean(p: &Path) {
    let _ = fs::remove_file(p);
    let _ = fs::remove_dir_all(p);
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        clean(&self.0);
    }
}

/// `tcptrace daemon --socket SOCKET --metrics-addr ...` run to its end, for start-up refusals.
fn daemon_refusal(socket: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(tcptrace_bin());
    cmd.arg("daemon").arg("--socket").arg(socket);
    if !extra.contains(&"--metrics-addr") {
        cmd.args(["--metrics-addr", "off"]);
    }
    let child = cmd
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcptrace daemon");
    let out = wait_output(child, 20);
    assert!(
        !out.status.success(),
        "daemon on {} should have refused to start: {}",
        socket.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits up to `secs` for the child, killing it past that.
fn wait_output(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("wait_with_output")
}

/// The one stderr line of a refusal.
fn one_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    lines[0].to_string()
}

/// A running daemon; stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    metrics: String,
}

impl Daemon {
    fn start(socket: &Path, extra: &[&str]) -> Daemon {
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(tcptrace_bin())
            .arg("daemon")
            .arg("--socket")
            .arg(socket)
            .args(["--metrics-addr", &metrics])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcptrace daemon");
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            metrics,
        };
        let ready = poll(30, || {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                let mut err = String::new();
                let _ = d
                    .child
                    .as_mut()
                    .unwrap()
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err);
                panic!("daemon exited during start-up ({st}): {err}");
            }
            let out = d.cli("status", &[]);
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).to_string())
            }
        });
        ready.unwrap_or_else(|e| panic!("daemon not ready: {e}"));
        d
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn cli(&self, sub: &str, extra: &[&str]) -> Output {
        Command::new(tcptrace_bin())
            .arg(sub)
            .arg("--socket")
            .arg(&self.socket)
            .args(extra)
            .output()
            .expect("run tcptrace client")
    }

    /// SIGTERM and wait for the exit; the exit status and stderr.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.take().expect("daemon running");
        // SAFETY: plain syscall on a pid we started.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let out = wait_output(child, 15);
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS kB")
}

// ---------------------------------------------------------------------------------------------
// Item 2: what is at --socket
// ---------------------------------------------------------------------------------------------

#[test]
fn socket_path_never_removes_what_is_not_a_stale_socket_of_ours() {
    require_root!("socket_path_never_removes_what_is_not_a_stale_socket_of_ours");
    let p = TmpPath::new("foreign");

    // A root-owned regular file, then the same owned by nobody: refused, left as it was.
    for owner in [0, NOBODY] {
        fs::write(&p.0, "precious\n").unwrap();
        std::os::unix::fs::chown(&p.0, Some(owner), Some(owner)).unwrap();
        let line = one_line(&daemon_refusal(&p.0, &[]));
        assert!(
            line.contains(&format!(
                "refusing to replace {} (a regular file)",
                p.0.display()
            )),
            "{line}"
        );
        assert_eq!(fs::read_to_string(&p.0).unwrap(), "precious\n");
        clean(&p.0);
    }

    // A symbolic link (to a file that must survive).
    let target = TmpPath::new("foreign-target");
    fs::write(&target.0, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target.0, &p.0).unwrap();
    let line = one_line(&daemon_refusal(&p.0, &[]));
    assert!(line.contains("(a symbolic link)"), "{line}");
    assert!(fs::symlink_metadata(&p.0).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_to_string(&target.0).unwrap(), "precious\n");
    clean(&p.0);

    // Another user's socket that nobody answers: not ours to remove.
    drop(UnixListener::bind(&p.0).unwrap());
    std::os::unix::fs::chown(&p.0, Some(NOBODY), None).unwrap();
    let line = one_line(&daemon_refusal(&p.0, &[]));
    assert!(line.contains("(a socket owned by uid 65534)"), "{line}");
    assert!(p.0.exists());
    clean(&p.0);

    // A live listener of ours: a daemon is running there.
    let live = UnixListener::bind(&p.0).unwrap();
    let line = one_line(&daemon_refusal(&p.0, &[]));
    assert!(line.contains("already running"), "{line}");
    drop(live);

    // Our own stale socket (the listener is gone): removed, and the daemon starts.
    let mut d = Daemon::start(&p.0, &[]);
    let (st, err) = d.stop();
    assert!(st.success(), "{st}: {err}");
    assert!(!p.0.exists(), "socket left behind after exit");
}

#[test]
fn socket_directory_must_be_ours_and_private() {
    require_root!("socket_directory_must_be_ours_and_private");
    let dir = TmpPath::new("dir");
    let sock = dir.0.join("tcptrace.sock");
    // Pre-made by nobody (world-writable): refused, whatever its mode.
    fs::create_dir(&dir.0).unwrap();
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(NOBODY)).unwrap();
    let line = one_line(&daemon_refusal(&sock, &[]));
    assert!(
        line.contains(&format!(
            "refusing control socket directory {}: it is owned by uid 65534",
            dir.0.display()
        )),
        "{line}"
    );
    assert!(!sock.exists());
    // Root's but writable by everyone (no sticky bit): refused too.
    std::os::unix::fs::chown(&dir.0, Some(0), Some(0)).unwrap();
    let line = one_line(&daemon_refusal(&sock, &[]));
    assert!(line.contains("writable by everyone (mode 0777)"), "{line}");
    // Root's, 0755: used.
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = Daemon::start(&sock, &[]);
    d.stop();
    assert!(
        dir.0.is_dir(),
        "a directory we did not create is left alone"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 9: the directory it creates
// ---------------------------------------------------------------------------------------------

#[test]
fn socket_directory_created_last_component_only_and_removed() {
    require_root!("socket_directory_created_last_component_only_and_removed");
    // A tree that does not exist: nothing is created.
    let top = TmpPath::new("tree");
    let deep = top.0.join("a/b/tcptrace.sock");
    let line = one_line(&daemon_refusal(&deep, &[]));
    assert!(
        line.contains(&format!(
            "directory {} does not exist",
            top.0.join("a").display()
        )),
        "{line}"
    );
    assert!(!top.0.exists(), "{} was created", top.0.display());

    // The last directory is created 0700, root's, and removed on exit.
    let dir = TmpPath::new("mkdir");
    let sock = dir.0.join("tcptrace.sock");
    let mut d = Daemon::start(&sock, &[]);
    let m = fs::metadata(&dir.0).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o700, 0), "{m:?}");
    let (st, err) = d.stop();
    assert!(st.success(), "{st}: {err}");
    assert!(!dir.0.exists(), "created directory left behind after exit");

    // With socket_group: 0750 and that group.
    let cfg = TmpPath::new("mkdir-cfg");
    fs::write(&cfg.0, "socket_group = \"0\"\n").unwrap();
    let cfg_arg = cfg.0.to_str().unwrap();
    let mut d = Daemon::start(&sock, &["--config", cfg_arg]);
    let m = fs::metadata(&dir.0).unwrap();
    assert_eq!((m.mode() & 0o7777, m.gid()), (0o750, 0), "{m:?}");
    d.stop();
    assert!(!dir.0.exists());

    // A failure after the directory was made (metrics port taken): removed too.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = one_line(&daemon_refusal(&sock, &["--metrics-addr", &addr]));
    assert!(line.contains("cannot listen for metrics"), "{line}");
    assert!(
        !dir.0.exists(),
        "created directory left behind after a failed start"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 5: clients check who answers
// ---------------------------------------------------------------------------------------------

/// Runs `f` in a thread whose effective uid is `uid` (the raw syscall changes only that
/// thread's credentials, not the test process's other threads).
fn as_uid<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        // SAFETY: raw setresuid on this thread only; -1 keeps the real and saved uids (root),
        // so the thread can switch back.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, uid as i64, -1i64) };
        assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
        let v = f();
        // SAFETY: as above, back to root.
        unsafe { libc::syscall(libc::SYS_setresuid, -1i64, 0i64, -1i64) };
        v
    })
    .join()
    .expect("thread")
}

#[test]
fn clients_refuse_a_listener_not_run_by_root() {
    require_root!("clients_refuse_a_listener_not_run_by_root");
    let p = TmpPath::new("fake");
    let path = p.0.clone();
    // A fake daemon listening as nobody (SO_PEERCRED names the listener's creator).
    let listener = as_uid(NOBODY, move || {
        UnixListener::bind(&path).expect("bind as nobody")
    });
    assert_eq!(fs::metadata(&p.0).unwrap().uid(), NOBODY);
    let server = thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while Instant::now() < deadline && served < 2 {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(20));
                continue;
            };
            served += 1;
            s.set_nonblocking(false).unwrap();
            let fake = "{\"ok\":true,\"status\":{\"pid\":1,\"uptime_secs\":99999,\"programs_attached\":[\"\\u001b[2J\"],\"degraded\":[],\"events_seen\":0,\"events_dropped\":0,\"events_unknown_socket\":0,\"sockets_tracked\":0,\"processes_tracked\":0,\"evictions\":{\"sockets\":0,\"processes\":0},\"max_sockets\":0,\"max_processes\":0,\"socket\":\"/x\",\"metrics_addr\":\"off\",\"config_file\":null},\"report\":{\"source\":\"daemon\",\"ts\":0,\"host\":{\"established\":0,\"time_wait\":0,\"close_wait\":0,\"listen\":0,\"total\":0,\"ephemeral_port_range\":[0,0]},\"dropped_events\":0,\"thresholds_crossed\":[],\"processes\":[],\"destinations\":[]}}\n";
            let _ = s.write_all(fake.as_bytes());
        }
    });
    for sub in ["status", "report"] {
        let out = Command::new(tcptrace_bin())
            .arg(sub)
            .arg("--socket")
            .arg(&p.0)
            .output()
            .unwrap();
        assert!(!out.status.success(), "`{sub}` believed the fake daemon");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !stdout.contains("pid 1") && !stdout.contains('\x1b'),
            "{stdout}"
        );
        let line = one_line(&out);
        assert!(
            line.contains(&p.0.display().to_string()) && line.contains("uid 65534"),
            "`{sub}`: {line}"
        );
    }
    let _ = UnixStream::connect(&p.0);
    let _ = UnixStream::connect(&p.0);
    server.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Item 3: memory and the connection cap
// ---------------------------------------------------------------------------------------------

fn scenario(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut c = Command::new(SCENARIO)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start scenario");
    let out = BufReader::new(c.stdout.take().unwrap());
    (c, out)
}

fn expect_line(out: &mut BufReader<std::process::ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "EOF before {prefix}");
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client that sends a report request and never reads (past the cap the daemon answers
/// "busy" and closes before reading: the write may then fail).
fn slow_client(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect control socket");
    let _ = s.write_all(b"{\"cmd\":\"report\"}\n");
    s
}

/// `n` `tcptrace report --json` started at once (stdout discarded, stderr kept).
fn parallel_reports(socket: &Path, n: usize) -> Vec<Child> {
    (0..n)
        .map(|_| {
            Command::new(tcptrace_bin())
                .args(["report", "--json", "--socket"])
                .arg(socket)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tcptrace report")
        })
        .collect()
}

#[test]
fn report_memory_bounded_under_slow_clients_and_connections_capped() {
    require_root!("report_memory_bounded_under_slow_clients_and_connections_capped");
    const LEAKED: usize = 5000;
    let sock = TmpPath::new("mem.sock");
    let d = Daemon::start(&sock.0, &[]);
    let n = LEAKED.to_string();
    let (server, mut sout) = scenario(&["leak-server", "--addr", "127.0.0.1:0", "--count", &n]);
    let server = Killed(server);
    let port = expect_line(&mut sout, "READY ");
    let (clients, mut cout) = scenario(&[
        "clients",
        "--to",
        &format!("127.0.0.1:{port}"),
        "--count",
        &n,
    ]);
    let _clients = Killed(clients);
    expect_line(&mut cout, "DONE");
    expect_line(&mut sout, "ACCEPTED ");
    let spid = server.0.id();
    let reply_len = poll(30, || {
        let out = d.cli("report", &["--json", "--pid", &spid.to_string()]);
        let r: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let cw = r["processes"][0]["close_wait"]["count"].as_u64();
        if cw == Some(LEAKED as u64) {
            Ok(out.stdout.len())
        } else {
            Err(format!("close_wait {cw:?}"))
        }
    })
    .expect("daemon sees the leak");
    // Warm: a few full reports.
    for _ in 0..3 {
        assert!(d.cli("report", &["--json"]).status.success());
    }
    let before = vm_rss_kib(d.pid());

    // 100 clients that never read, then 20 parallel `report --json`.
    let slow: Vec<UnixStream> = (0..100).map(|_| slow_client(&d.socket)).collect();
    thread::sleep(Duration::from_millis(500));
    let parallel = parallel_reports(&d.socket, 20);
    // While the slow clients hold every slot: the next client is told "busy".
    let busy = d.cli("status", &[]);
    let busy_err = String::from_utf8_lossy(&busy.stderr).to_string();
    for c in parallel {
        wait_output(c, 60);
    }
    let during = vm_rss_kib(d.pid());
    println!(
        "report reply {reply_len} bytes for {LEAKED} CLOSE_WAIT; daemon RSS {before} kB before, {during} kB with 100 slow clients + 20 parallel reports"
    );
    assert!(
        during < before + 40 * 1024,
        "RSS grew from {before} kB to {during} kB"
    );
    assert!(!busy.status.success(), "status answered past the cap");
    assert!(
        busy_err.contains("busy: 32 requests are being answered"),
        "{busy_err}"
    );
    // Slow clients are dropped after the write timeout (10 s): the slots come back.
    poll(20, || {
        let out = d.cli("status", &[]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    })
    .expect("slots freed after the write timeout");
    drop(slow);
    // 20 parallel reports that read: all answered.
    for c in parallel_reports(&d.socket, 20) {
        let out = wait_output(c, 60);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = vm_rss_kib(d.pid());
    println!("daemon RSS {after} kB after 20 more parallel reports");
    assert!(
        after < before + 40 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
}

// ---------------------------------------------------------------------------------------------
// Items 12 and 13: metrics endpoint, oversized requests
// ---------------------------------------------------------------------------------------------

fn http_raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    // The daemon keeps HTTP/1.1 connections alive: a closed write side ends the exchange. (A
    // connection refused as busy may be reset already.)
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).to_string()
}

/// `series{labels} value` lines of one metric, as (labels, value).
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn remote_of(labels: &str) -> &str {
    labels
        .split("remote=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("")
}

#[test]
fn metrics_http_head_bare_lf_keep_alive_timeout_and_cap() {
    require_root!("metrics_http_head_bare_lf_keep_alive_timeout_and_cap");
    let sock = TmpPath::new("http.sock");
    let d = Daemon::start(&sock.0, &[]);

    // HEAD: GET's head, no body.
    let get = http_raw(&d.metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = http_raw(&d.metrics, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD got a body: {head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: "),
        "{head}"
    );
    assert!(get.contains("tcptrace_events_total"), "{get}");
    // A request head ended by bare LFs.
    let lf = http_raw(&d.metrics, b"GET /metrics HTTP/1.0\nHost: x\n\n");
    // HTTP/1.0 asked, HTTP/1.0 answered.
    assert!(lf.starts_with("HTTP/1.0 200 OK"), "bare LF: {lf:?}");
    assert!(lf.contains("tcptrace_events_total"), "{lf}");

    // Keep-alive: a second request on the connection of the first, answered.
    {
        let mut s = TcpStream::connect(&d.metrics).expect("connect metrics");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok\n") {
            let n = s.read(&mut buf).expect("first answer");
            assert!(
                n > 0,
                "closed after one request: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = s.read_to_end(&mut got);
        let two = String::from_utf8_lossy(&got);
        assert_eq!(two.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{two}");
        assert!(two.ends_with("ready\n"), "{two}");
    }
    let nope = http_raw(&d.metrics, b"GET /nope HTTP/1.0\r\n\r\n");
    assert!(nope.starts_with("HTTP/1.0 404 "), "{nope}");

    // Connections that send nothing hold every slot: the next one is told to retry, and the
    // silent ones are closed once the header timeout (5 s) has passed.
    let silent: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(&d.metrics).expect("connect metrics"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    // The answer comes at once, before any request (one sent would be unread when the daemon
    // closes, and the kernel would reset the connection).
    let mut ninth = TcpStream::connect(&d.metrics).expect("connect metrics");
    ninth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut busy = Vec::new();
    let _ = ninth.read_to_end(&mut busy);
    let busy = String::from_utf8_lossy(&busy);
    assert!(busy.starts_with("HTTP/1.1 503 "), "9th connection: {busy}");
    assert!(busy.contains("Retry-After: 1\r\n"), "{busy}");
    let t = Instant::now();
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(r.is_ok(), "a silent connection not closed: {r:?}");
    }
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "silent connections closed after {waited:?}"
    );
    let again = http_raw(&d.metrics, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert!(
        again.starts_with("HTTP/1.0 200 OK"),
        "after the timeout: {again}"
    );
}

#[test]
fn metrics_top_destinations_as_configured_and_the_rest_as_other() {
    require_root!("metrics_top_destinations_as_configured_and_the_rest_as_other");
    let sock = TmpPath::new("metrics.sock");
    let cfg = TmpPath::new("metrics.toml");
    fs::write(&cfg.0, "[limits]\nmetrics_top_destinations = 100\n").unwrap();
    let d = Daemon::start(&sock.0, &["--config", cfg.0.to_str().unwrap()]);

    // 300 refused connects to 300 destinations (127.0.0.3 has no listener on these ports).
    let mut refused = 0;
    for port in 47001..47301u16 {
        if let Err(e) = TcpStream::connect(("127.0.0.3", port))
            && e.kind() == std::io::ErrorKind::ConnectionRefused
        {
            refused += 1;
        }
    }
    assert!(refused >= 290, "only {refused} of 300 connects refused");
    let ours = |remote: &str| remote.starts_with("127.0.0.3:47");
    let text = poll(15, || {
        thread::sleep(Duration::from_millis(1100));
        let text = http_raw(&d.metrics, b"GET /metrics HTTP/1.0\r\n\r\n");
        let fails = series(&text, "tcptrace_destination_connect_failures_total");
        let named: std::collections::BTreeSet<&str> = fails
            .iter()
            .map(|(l, _)| remote_of(l))
            .filter(|r| *r != "other")
            .collect();
        let other: f64 = fails
            .iter()
            .filter(|(l, _)| remote_of(l) == "other" && l.contains("ECONNREFUSED"))
            .map(|(_, v)| v)
            .sum();
        let ours_named: f64 = fails
            .iter()
            .filter(|(l, _)| ours(remote_of(l)) && l.contains("ECONNREFUSED"))
            .map(|(_, v)| v)
            .sum();
        if named.len() == 100 && ours_named + other >= refused as f64 {
            Ok(text)
        } else {
            Err(format!(
                "{} named destinations, ours named {ours_named} + other {other} of {refused}",
                named.len()
            ))
        }
    })
    .expect("100 destination series and the rest under remote=\"other\"");
    assert!(text.contains("remote=\"other\""));
}

#[test]
fn control_request_over_64_kib_is_too_large() {
    require_root!("control_request_over_64_kib_is_too_large");
    let sock = TmpPath::new("big.sock");
    let d = Daemon::start(&sock.0, &[]);

    // A control request over 64 KiB.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut big = vec![b'x'; 70 * 1024];
    big.push(b'\n');
    let _ = s.write_all(&big);
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    let v: Value = serde_json::from_str(&reply).expect("JSON reply");
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("request too large"),
        "{v}"
    );
}
