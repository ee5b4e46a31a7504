//! Real-kernel tests of `tcptrace daemon`: reports and alerts for real leaks, port exhaustion
//! and churn; metrics scraped by a real Prometheus; control-socket security; clean shutdown;
//! config errors; memory caps; the deployment files.
//!
//! Every test starts its own daemon (own control socket, own metrics port), so they run in
//! parallel. Privileged tests print `SKIP` unless run as root. Run:
//!
//! ```text
//! TCPTRACE_BIN=target/release/tcptrace cargo test --release -p tcptrace-tests --test daemon -- --nocapture
//! ```

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::TcpListener,
    os::unix::{
        fs::{FileTypeExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcptrace_tests::{Netns, is_root, run, tcptrace_bin, url_encode};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

/// The tracepoint programs tcptrace attaches without stacks (BPF names may be cut to 15
/// characters). The state program as a BTF tracepoint, which this kernel loads. Not
/// `sys_enter_connect`: this kernel's BTF gives the layout of the saved registers, so
/// `sys_exit_connect` reads connect()'s arguments itself and the entry program is attached only
/// while stacks are on.
const PROGRAM_NAMES: [&str; 5] = [
    "inet_sock_set_state_btf",
    "inet_state_enter",
    "inet_state_rescue",
    "sys_exit_connect",
    "inet_sk_error_report",
];

const CAP_SYS_ADMIN: u32 = 21;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// True as root; otherwise prints the SKIP line.
fn root_or_skip(name: &str) -> bool {
    if is_root() {
        return true;
    }
    println!("SKIP {name}: needs root (run cargo xtask test as root)");
    false
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Calls `check` every 100 ms until it returns Ok or `secs` pass; Err carries the last reason.
fn poll<T>(secs: u64, mut check: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(format!("after {secs} s: {e}")),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall on a pid we started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Lines read from a pipe by a background thread.
#[derive(Clone, Default)]
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    open_readers: Arc<AtomicUsize>,
}

impl Lines {
    fn collect(&self, pipe: impl Read + Send + 'static) {
        self.open_readers.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                me.lines.lock().unwrap().push(line);
            }
            me.open_readers.fetch_sub(1, Ordering::SeqCst);
        });
    }

    fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        self.all().join("\n")
    }

    fn find(&self, prefix: &str) -> Option<String> {
        self.all().into_iter().find(|l| l.starts_with(prefix))
    }

    fn at_eof(&self) -> bool {
        self.open_readers.load(Ordering::SeqCst) == 0
    }
}

/// A child process whose stdout and stderr are collected; stopped (SIGTERM, then SIGKILL
/// after 5 s) when dropped.
struct Proc {
    what: String,
    child: Child,
    out: Lines,
    err: Lines,
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (out, err) = (Lines::default(), Lines::default());
        out.collect(child.stdout.take().unwrap());
        err.collect(child.stderr.take().unwrap());
        Proc {
            what: what.to_string(),
            child,
            out,
            err,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn describe(&self) -> String {
        format!(
            "{} (pid {})\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what,
            self.pid(),
            self.out.text(),
            self.err.text()
        )
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it, trimmed.
    fn expect(&mut self, prefix: &str, secs: u64) -> String {
        let found = poll(secs, || {
            if let Some(l) = self.out.find(prefix) {
                return Ok(l[prefix.len()..].trim().to_string());
            }
            if let Some(st) = self.exited() {
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "{} exited ({st}) before printing {prefix:?}:\n{}",
                    self.what,
                    self.describe()
                );
            }
            Err(format!("no line {prefix:?} yet"))
        });
        found.unwrap_or_else(|e| panic!("{e}\n{}", self.describe()))
    }

    /// Waits up to `secs` for the exit and the end of its output.
    fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let st = poll(secs, || self.exited().ok_or_else(String::new)).ok()?;
        let _ = poll(2, || {
            if self.out.at_eof() && self.err.at_eof() {
                Ok(())
            } else {
                Err(String::new())
            }
        });
        Some(st)
    }

    fn stop(&mut self) {
        if self.exited().is_none() {
            signal(self.pid(), libc::SIGTERM);
            if self.wait_exit(5).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn scenario(args: &[&str]) -> Proc {
    Proc::spawn(
        &format!("scenario {}", args.join(" ")),
        Command::new(SCENARIO).args(args),
    )
}

/// A leak-server holding `count` CLOSE_WAIT sockets (its clients have closed), its port, and
/// the clients process.
fn leak(count: usize) -> (Proc, u16, Proc) {
    let n = count.to_string();
    let mut server = scenario(&["leak-server", "--addr", "127.0.0.1:0", "--count", &n]);
    let port: u16 = server.expect("READY ", 20).parse().expect("READY <port>");
    let to = format!("127.0.0.1:{port}");
    let mut clients = scenario(&["clients", "--to", &to, "--count", &n]);
    clients.expect("DONE", 60);
    server.expect("ACCEPTED ", 30);
    (server, port, clients)
}

/// A directory under /tmp, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = PathBuf::from(format!(
            "/tmp/tcptrace-test-{name}-{}.d",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path(file);
        fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running daemon with its own control socket and metrics port.
struct Daemon {
    proc: Proc,
    socket: PathBuf,
    metrics: String,
}

impl Daemon {
    fn start(name: &str, extra: &[&str]) -> Daemon {
        Daemon::start_with(name, Command::new(tcptrace_bin()), extra)
    }

    /// `cmd` is the program (tcptrace, or a wrapper whose last argument is tcptrace); the
    /// daemon arguments are appended. Returns once `status` answers.
    fn start_with(name: &str, mut cmd: Command, extra: &[&str]) -> Daemon {
        let socket = PathBuf::from(format!(
            "/tmp/tcptrace-test-{name}-{}.sock",
            std::process::id()
        ));
        let _ = fs::remove_file(&socket);
        let metrics = format!("127.0.0.1:{}", free_port());
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-addr", &metrics])
            .args(extra);
        let mut d = Daemon {
            proc: Proc::spawn(&format!("tcptrace daemon ({name})"), &mut cmd),
            socket,
            metrics,
        };
        let ready = poll(20, || {
            if let Some(st) = d.proc.exited() {
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "daemon exited during start-up ({st}):\n{}",
                    d.proc.describe()
                );
            }
            if !d.socket.exists() {
                return Err("no socket file yet".into());
            }
            d.cli("status")
        });
        if let Err(e) = ready {
            panic!("daemon not ready: {e}\n{}", d.proc.describe());
        }
        d
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn stderr(&self) -> String {
        self.proc.err.text()
    }

    /// `tcptrace <sub> --socket S --json`, parsed.
    fn cli(&self, sub: &str) -> Result<Value, String> {
        let out = Command::new(tcptrace_bin())
            .arg(sub)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .output()
            .map_err(|e| format!("cannot run tcptrace {sub}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`tcptrace {sub}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "`tcptrace {sub} --json` printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn status(&self) -> Value {
        self.cli("status")
            .unwrap_or_else(|e| panic!("{e}\n{}", self.proc.describe()))
    }

    fn report(&self) -> Value {
        let r = self
            .cli("report")
            .unwrap_or_else(|e| panic!("{e}\n{}", self.proc.describe()));
        assert_eq!(
            r["source"],
            "daemon",
            "report did not come from the daemon: {r}\n{}",
            self.proc.describe()
        );
        r
    }

    /// Polls the report until `pid`'s entry satisfies `ok`; returns that entry.
    fn wait_process(&self, pid: u32, secs: u64, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        poll(secs, || {
            let r = self.report();
            match process(&r, pid) {
                Some(p) if ok(p) => Ok(p.clone()),
                Some(p) => Err(format!("pid {pid} in the report: {p}")),
                None => Err(format!("pid {pid} not in the report: {r}")),
            }
        })
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}\ndaemon stderr:\n{}", self.stderr()))
    }

    /// Alert lines on stderr with this message start and `pid=<pid>`.
    fn alerts(&self, msg_start: &str, pid: u32) -> Vec<String> {
        let msg = format!("msg=\"{msg_start}");
        let pid = format!("pid={pid}");
        self.proc
            .err
            .all()
            .into_iter()
            .filter(|l| l.contains(&msg) && l.split_whitespace().any(|t| t == pid))
            .collect()
    }

    /// SIGTERM; the exit status if it exits within `secs`.
    fn terminate(&mut self, secs: u64) -> Option<ExitStatus> {
        signal(self.pid(), libc::SIGTERM);
        self.proc.wait_exit(secs)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = fs::remove_file(&self.socket);
    }
}

fn process(report: &Value, pid: u32) -> Option<&Value> {
    report["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"] == pid)
}

fn has_finding(p: &Value, finding: &str) -> bool {
    p["findings"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == finding))
}

/// Waits until at least one alert line for `pid` appeared, waits `settle` more seconds, and
/// checks there is still exactly one (one line per episode, not one per second).
fn assert_one_alert(d: &Daemon, msg_start: &str, pid: u32, settle: u64) {
    poll(20, || {
        if d.alerts(msg_start, pid).is_empty() {
            Err("none yet".into())
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "no {msg_start:?} alert for pid {pid} ({e}); daemon stderr:\n{}",
            d.stderr()
        )
    });
    thread::sleep(Duration::from_secs(settle));
    let lines = d.alerts(msg_start, pid);
    assert_eq!(
        lines.len(),
        1,
        "want one {msg_start:?} alert for pid {pid}; daemon stderr:\n{}",
        d.stderr()
    );
}

/// Programs referenced by a process's descriptors (programs and the links holding them).
fn bpf_prog_ids_of(pid: u32) -> BTreeSet<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
    {
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("prog_id:") {
                ids.insert(id.trim().parse().expect("prog_id"));
            }
        }
    }
    ids
}

/// (id, name) of every loaded BPF program.
fn bpftool_progs() -> Vec<(u64, String)> {
    let out = run("bpftool", &["prog", "show", "-j"]);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool JSON ({e}): {out}"));
    v.as_array()
        .expect("bpftool prog show -j: a list")
        .iter()
        .map(|p| {
            (
                p["id"].as_u64().unwrap_or(0),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The full tcptrace program name a (possibly truncated) BPF name stands for.
fn tcptrace_program(bpf_name: &str) -> Option<&'static str> {
    PROGRAM_NAMES
        .into_iter()
        .find(|n| !bpf_name.is_empty() && n.starts_with(bpf_name))
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS kB")
}

fn cap_eff(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .expect("CapEff line");
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).expect("CapEff hex")
}

/// One GET over plain HTTP/1.0 (no chunked encoding in the answer); the body of a 200.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let (status, _, body) = tcptrace_tests::http_request(addr, path, "Connection: close\r\n")?;
    if !status.contains(" 200 ") {
        return Err(format!("GET {path}: {status}\r\n\r\n{body}"));
    }
    Ok(body)
}

/// One request line on the control socket; the reply parsed.
fn control(socket: &Path, request: &str) -> Value {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("send request");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("read reply");
    serde_json::from_str(reply.trim())
        .unwrap_or_else(|e| panic!("reply to {request:?} is not JSON ({e}): {reply:?}"))
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Values of `Key=` lines in the systemd unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix(key)?
                .strip_prefix('=')
                .map(|v| v.trim().to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn close_wait_leak_reported_and_alerted_once() {
    if !root_or_skip("close_wait_leak_reported_and_alerted_once") {
        return;
    }
    let dir = TempDir::new("leak");
    let cfg = dir.write(
        "tcptrace.toml",
        "[alerts]\nclose_wait = 2\nclose_wait_sustain_secs = 1\n",
    );
    let daemon = Daemon::start(
        "leak",
        &["--leak-after", "1", "--config", cfg.to_str().unwrap()],
    );
    let (server, port, _clients) = leak(4);
    let pid = server.pid();

    let p = daemon.wait_process(pid, 20, "4 leaked CLOSE_WAIT sockets", |p| {
        p["close_wait"]["leaked"] == 4
    });
    let cw = &p["close_wait"];
    assert_eq!(cw["count"], 4, "close_wait.count: {p}");
    assert_eq!(cw["leaked"], 4, "close_wait.leaked: {p}");
    let sockets = cw["sockets"]
        .as_array()
        .unwrap_or_else(|| panic!("no close_wait.sockets: {p}"));
    assert_eq!(sockets.len(), 4, "close_wait.sockets: {p}");
    for s in sockets {
        let local = s["local"].as_str().unwrap_or("");
        assert!(
            local.ends_with(&format!(":{port}")),
            "socket not on the server port {port}: {s} in {p}"
        );
    }
    assert!(has_finding(&p, "close_wait_leak"), "findings: {p}");

    assert_one_alert(&daemon, "CLOSE_WAIT leak", pid, 4);
}

#[test]
fn eaddrnotavail_reported_and_alerted_once() {
    if !root_or_skip("eaddrnotavail_reported_and_alerted_once") {
        return;
    }
    let ns = Netns::create();
    ns.sysctl("net.ipv4.ip_local_port_range=40000 40001");
    let daemon = Daemon::start("eaddrnotavail", &[]);
    // `ip netns exec` execs the command: the scenario keeps the child's pid.
    let mut ex = Proc::spawn(
        "scenario exhaust in netns",
        Command::new("ip").args([
            "netns", "exec", &ns.name, SCENARIO, "exhaust", "--count", "3",
        ]),
    );
    assert_eq!(ex.expect("DONE ", 20), "3");
    let pid = ex.pid();

    let p = daemon.wait_process(pid, 20, "3 EADDRNOTAVAIL", |p| {
        p["connects"]["failed"]["EADDRNOTAVAIL"] == 3
    });
    assert!(has_finding(&p, "port_exhaustion"), "findings: {p}");

    assert_one_alert(&daemon, "EADDRNOTAVAIL", pid, 3);
}

/// The state programs this kernel does not get by default (a raw tracepoint, the classic
/// tracepoint: the fallbacks of kernels without BTF tracepoints or without BTF), picked with
/// TCPTRACE_STATE_PROGRAM, count the same: 300 RST connections and a leak of 4 CLOSE_WAIT
/// sockets, exactly.
#[test]
fn fallback_state_programs_count_exactly() {
    if !root_or_skip("fallback_state_programs_count_exactly") {
        return;
    }
    for (hook, program) in [
        ("raw", "inet_sock_set_state_raw"),
        ("classic", "inet_sock_set_state"),
    ] {
        let mut cmd = Command::new(tcptrace_bin());
        cmd.env("TCPTRACE_STATE_PROGRAM", hook);
        let daemon = Daemon::start_with(&format!("hook-{hook}"), cmd, &["--leak-after", "1"]);
        let st = control(&daemon.socket, "{\"cmd\":\"status\"}\n");
        let attached = &st["status"]["programs_attached"];
        assert!(
            attached
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p == program)),
            "{hook}: {program} not attached: {st}"
        );

        let mut srv = scenario(&["serve", "--addr", "127.0.0.1:0"]);
        let to = format!("127.0.0.1:{}", srv.expect("READY ", 20));
        let mut churn = scenario(&["churn", "--to", &to, "--count", "300", "--rst"]);
        assert_eq!(churn.expect("DONE ", 60), "300");
        let p = daemon.wait_process(churn.pid(), 5, "300 closes", |p| {
            p["churn"]["closed_total"].as_u64() >= Some(300)
        });
        assert_eq!(p["churn"]["closed_total"], 300, "{hook}: {p}");
        assert_eq!(p["connects"]["ok"], 300, "{hook}: {p}");

        let (server, _port, _clients) = leak(4);
        let p = daemon.wait_process(server.pid(), 20, "4 leaked CLOSE_WAIT sockets", |p| {
            p["close_wait"]["leaked"] == 4
        });
        assert_eq!(p["close_wait"]["count"], 4, "{hook}: {p}");
    }
}

#[test]
fn churn_reported() {
    if !root_or_skip("churn_reported") {
        return;
    }
    let daemon = Daemon::start("churn", &[]);
    let mut srv = scenario(&["serve", "--addr", "127.0.0.1:0"]);
    let to = format!("127.0.0.1:{}", srv.expect("READY ", 20));
    let mut churn = scenario(&["churn", "--to", &to, "--count", "300", "--rst"]);
    assert_eq!(churn.expect("DONE ", 60), "300");
    let pid = churn.pid();

    // Right after DONE; the poll only covers the daemon's 10 ms drain interval.
    let p = daemon.wait_process(pid, 5, "300 closes", |p| {
        p["churn"]["closed_total"].as_u64() >= Some(300)
    });
    assert_eq!(p["churn"]["closed_total"], 300, "churn.closed_total: {p}");
    assert_eq!(p["connects"]["ok"], 300, "connects.ok: {p}");
    assert!(has_finding(&p, "connection_churn"), "findings: {p}");
}

#[test]
fn prometheus_scrapes_close_wait_gauge() {
    if !root_or_skip("prometheus_scrapes_close_wait_gauge") {
        return;
    }
    let prometheus = "/usr/bin/prometheus";
    assert!(
        Path::new(prometheus).exists(),
        "{prometheus} missing: `cargo xtask setup` installs it"
    );
    let daemon = Daemon::start("prometheus", &[]);
    let (server, _, _clients) = leak(3);
    let pid = server.pid();

    let dir = TempDir::new("prometheus");
    let config = dir.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tcptrace\n    static_configs:\n      - targets: ['{}']\n",
            daemon.metrics
        ),
    );
    let web = format!("127.0.0.1:{}", free_port());
    let prom = Proc::spawn(
        "prometheus",
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address={web}")),
    );

    let query = format!("tcptrace_close_wait_sockets{{pid=\"{pid}\"}}");
    let path = format!("/api/v1/query?query={}", url_encode(&query));
    let answer = poll(60, || {
        let body = http_get(&web, &path)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        match v["data"]["result"][0]["value"][1].as_str() {
            Some("3") => Ok(v),
            _ => Err(format!("query {query}: {body}")),
        }
    });
    if let Err(e) = answer {
        let own = http_get(&daemon.metrics, "/metrics").unwrap_or_else(|e| e);
        let ours: Vec<&str> = own
            .lines()
            .filter(|l| l.contains(&format!("pid=\"{pid}\"")))
            .collect();
        panic!(
            "Prometheus never returned 3: {e}\ndaemon's own series for pid {pid}: {ours:?}\n{}\ndaemon stderr:\n{}",
            prom.describe(),
            daemon.stderr()
        );
    }
    drop(prom);
}

#[test]
fn control_socket_is_private_and_robust() {
    if !root_or_skip("control_socket_is_private_and_robust") {
        return;
    }
    let daemon = Daemon::start("security", &[]);
    let meta = fs::metadata(&daemon.socket).expect("stat control socket");
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        daemon.socket.display()
    );
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "control socket mode {:o}",
        meta.permissions().mode()
    );

    // A world-readable copy of the binary, so that a refusal can only come from the socket.
    let dir = TempDir::new("security");
    let bin = dir.path("tcptrace");
    fs::copy(tcptrace_bin(), &bin).expect("copy tcptrace");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("status")
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nobody could ask the daemon: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.starts_with("tcptrace:") && err.contains("Permission denied"),
        "stderr as nobody: {err}"
    );

    let garbage = control(&daemon.socket, "hello, this is not JSON\n");
    assert_eq!(garbage["ok"], false, "reply to garbage: {garbage}");
    assert!(
        garbage["error"].as_str().is_some_and(|e| !e.is_empty()),
        "reply to garbage: {garbage}"
    );
    let unknown = control(&daemon.socket, "{\"cmd\":\"launch\"}\n");
    assert_eq!(
        unknown["ok"], false,
        "reply to an unknown command: {unknown}"
    );
    assert!(
        unknown["error"]
            .as_str()
            .is_some_and(|e| e.contains("launch")),
        "reply: {unknown}"
    );

    let raw = control(&daemon.socket, "{\"cmd\":\"status\"}\n");
    assert_eq!(raw["ok"], true, "raw status: {raw}");
    let st = daemon.status();
    assert_eq!(st["pid"], daemon.pid(), "status after garbage: {st}");
}

#[test]
fn sigterm_detaches_and_removes_socket() {
    if !root_or_skip("sigterm_detaches_and_removes_socket") {
        return;
    }
    let mut daemon = Daemon::start("sigterm", &[]);
    let pid = daemon.pid();
    let st = daemon.status();
    let mut attached: Vec<&str> = st["programs_attached"]
        .as_array()
        .unwrap_or_else(|| panic!("programs_attached: {st}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    attached.sort_unstable();
    let mut expected = PROGRAM_NAMES.to_vec();
    expected.sort_unstable();
    assert_eq!(attached, expected, "status: {st}");
    // Skipped program runs are counted apart from records lost to a full ring.
    assert!(st["events_missed"].is_u64(), "events_missed: {st}");

    // Debian's bpftool has no `pids` field (built without skeletons): the daemon's programs are
    // the ones its descriptors reference.
    let ids = bpf_prog_ids_of(pid);
    let ours: Vec<(u64, String)> = bpftool_progs()
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .collect();
    let names: BTreeSet<&str> = ours
        .iter()
        .filter_map(|(_, n)| tcptrace_program(n))
        .collect();
    assert!(
        ours.len() >= PROGRAM_NAMES.len() && names.len() == PROGRAM_NAMES.len(),
        "want the {} tcptrace programs held by pid {pid}; fdinfo ids {ids:?}, bpftool: {ours:?}",
        PROGRAM_NAMES.len()
    );

    let status = daemon.terminate(5).unwrap_or_else(|| {
        panic!(
            "daemon still running 5 s after SIGTERM:\n{}",
            daemon.proc.describe()
        )
    });
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        daemon.proc.describe()
    );
    assert!(
        !daemon.socket.exists(),
        "socket {} left behind",
        daemon.socket.display()
    );
    let left = poll(5, || {
        let left: Vec<_> = bpftool_progs()
            .into_iter()
            .filter(|(id, _)| ids.contains(id))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still loaded: {left:?}"))
        }
    });
    if let Err(e) = left {
        panic!(
            "programs of the stopped daemon: {e}\n{}",
            daemon.proc.describe()
        );
    }
}

#[test]
fn malformed_config_fails_before_loading() {
    if !root_or_skip("malformed_config_fails_before_loading") {
        return;
    }
    let dir = TempDir::new("badconfig");
    // Own command names (via symlinks), so the probe below sees only these daemons.
    let bad_comm = format!("tcbad{}", std::process::id());
    let good_comm = format!("tcgood{}", std::process::id());
    for comm in [&bad_comm, &good_comm] {
        std::os::unix::fs::symlink(tcptrace_bin(), dir.path(comm)).expect("symlink tcptrace");
    }
    let script = format!(
        "tracepoint:syscalls:sys_enter_bpf /args->cmd == 5 && (comm == \"{bad_comm}\" || comm == \"{good_comm}\")/ \
         {{ printf(\"LOAD %s\\n\", comm); }} \
         tracepoint:syscalls:sys_enter_perf_event_open /comm == \"{bad_comm}\" || comm == \"{good_comm}\"/ \
         {{ printf(\"PERF %s\\n\", comm); }}"
    );
    let mut probe = Proc::spawn(
        "bpftrace",
        Command::new("bpftrace").args(["-B", "line", "-e", &script]),
    );
    probe.expect("Attaching", 30);

    let cases = [
        (
            "type error",
            "socket = \"/tmp/x.sock\"\n[limits]\nmax_sockets = \"many\"\n",
            "line 3: key `limits.max_sockets`",
        ),
        (
            "out of range",
            "[alerts]\nport_share = 3\n",
            "key `alerts.port_share`",
        ),
        (
            "unknown key",
            "leak_after_secs = 2\n[alerts]\nclose_wiat = 3\n",
            "key `alerts.close_wiat`",
        ),
    ];
    for (i, (what, text, key)) in cases.iter().enumerate() {
        let file = dir.write(&format!("bad{i}.toml"), text);
        let socket = dir.path(&format!("bad{i}.sock"));
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(dir.path(&bad_comm));
        cmd.arg("daemon")
            .arg("--config")
            .arg(&file)
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-addr", &metrics]);
        let mut d = Proc::spawn(&format!("daemon with {what}"), &mut cmd);
        let st = d
            .wait_exit(5)
            .unwrap_or_else(|| panic!("{what}: still running after 5 s:\n{}", d.describe()));
        assert!(!st.success(), "{what}: exit {st}:\n{}", d.describe());
        let lines = d.err.all();
        assert!(
            lines.len() == 1
                && lines[0].starts_with("tcptrace: config ")
                && lines[0].contains(&file.display().to_string())
                && lines[0].contains(key),
            "{what}: want one stderr line naming {key}, got {lines:?}"
        );
        assert!(!socket.exists(), "{what}: socket file created");
    }

    // Control: a good daemon under the other name is seen loading programs, so silence from
    // the bad ones means something.
    let good = Daemon::start_with("badconfig-control", Command::new(dir.path(&good_comm)), &[]);
    let seen = poll(10, || {
        if probe.out.find(&format!("LOAD {good_comm}")).is_some() {
            Ok(())
        } else {
            Err(probe.out.text())
        }
    });
    drop(good);
    seen.unwrap_or_else(|e| {
        panic!(
            "the probe missed the good daemon's loads: {e}\n{}",
            probe.describe()
        )
    });
    let bad: Vec<String> = probe
        .out
        .all()
        .into_iter()
        .filter(|l| l.ends_with(&bad_comm))
        .collect();
    assert!(
        bad.is_empty(),
        "a daemon with a malformed config loaded or attached programs: {bad:?}"
    );
}

#[test]
fn memory_bounded_by_caps() {
    if !root_or_skip("memory_bounded_by_caps") {
        return;
    }
    let dir = TempDir::new("memory");
    let cfg = dir.write(
        "tcptrace.toml",
        "[limits]\nmax_sockets = 2000\nmax_processes = 16\n",
    );
    let daemon = Daemon::start("memory", &["--config", cfg.to_str().unwrap()]);
    let before = vm_rss_kib(daemon.pid());

    let mut srv = scenario(&["serve", "--addr", "127.0.0.1:0"]);
    let to = format!("127.0.0.1:{}", srv.expect("READY ", 20));
    let mut churn = scenario(&["churn", "--to", &to, "--count", "5000", "--rst"]);
    let (_server, _, _clients) = leak(1500);
    assert_eq!(churn.expect("DONE ", 90), "5000");

    let st = poll(10, || {
        let st = daemon.status();
        if st["evictions"]["sockets"].as_u64() > Some(0) {
            Ok(st)
        } else {
            Err(format!("status: {st}"))
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "no socket evictions: {e}\ndaemon stderr:\n{}",
            daemon.stderr()
        )
    });
    assert_eq!(st["max_sockets"], 2000, "status: {st}");
    assert_eq!(st["max_processes"], 16, "status: {st}");
    let tracked = st["sockets_tracked"].as_u64().unwrap_or(u64::MAX);
    assert!(tracked <= 2000, "sockets_tracked above the cap: {st}");
    let processes = st["processes_tracked"].as_u64().unwrap_or(u64::MAX);
    assert!(processes <= 16, "processes_tracked above the cap: {st}");

    let after = vm_rss_kib(daemon.pid());
    println!(
        "memory_bounded_by_caps: daemon VmRSS {before} KiB before the load, {after} KiB after; status {st}"
    );
    assert!(
        after < 64 * 1024,
        "daemon VmRSS {after} KiB after the load (before: {before} KiB)"
    );
}

#[test]
fn deployment_files_are_valid() {
    let daemonset = repo_file("deploy/kubernetes/daemonset.yaml");
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&daemonset)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubernetes-validate ({e}): `cargo xtask setup` installs it")
        });
    assert!(
        out.status.success(),
        "kubernetes-validate --strict {}: {}\n{}{}",
        daemonset.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let unit_path = repo_file("deploy/tcptrace.service");
    let unit =
        fs::read_to_string(&unit_path).unwrap_or_else(|e| panic!("{}: {e}", unit_path.display()));
    assert_eq!(
        unit_values(&unit, "NoNewPrivileges"),
        ["yes"],
        "NoNewPrivileges in {}",
        unit_path.display()
    );
    assert_eq!(
        unit_values(&unit, "ProtectSystem"),
        ["strict"],
        "ProtectSystem in {}",
        unit_path.display()
    );
    let caps = unit_values(&unit, "CapabilityBoundingSet");
    assert!(
        caps.len() == 1 && !caps[0].is_empty() && !caps[0].contains("CAP_SYS_ADMIN"),
        "want one CapabilityBoundingSet= without CAP_SYS_ADMIN, got {caps:?}"
    );
    let exec = unit_values(&unit, "ExecStart");
    assert!(
        exec.len() == 1 && exec[0].split_whitespace().nth(1) == Some("daemon"),
        "want ExecStart=<tcptrace> daemon ..., got {exec:?}"
    );
    // The daemon pings the watchdog (tests/tests/systemd.rs); the calls it needs are allowed.
    assert_eq!(unit_values(&unit, "Type"), ["notify"]);
    assert_eq!(unit_values(&unit, "WatchdogSec"), ["30s"]);
    assert_eq!(unit_values(&unit, "ProtectKernelTunables"), ["yes"]);
    assert_eq!(unit_values(&unit, "ConfigurationDirectory"), ["tcptrace"]);
    let filter = unit_values(&unit, "SystemCallFilter");
    assert!(
        filter.len() == 1
            && ["@system-service", "bpf", "perf_event_open", "setns"]
                .iter()
                .all(|c| filter[0].split_whitespace().any(|w| w == *c)),
        "SystemCallFilter= {filter:?}"
    );
}

#[test]
fn daemon_works_with_unit_capabilities() {
    if !root_or_skip("daemon_works_with_unit_capabilities") {
        return;
    }
    let unit = fs::read_to_string(repo_file("deploy/tcptrace.service"))
        .expect("read deploy/tcptrace.service");
    let caps = unit_values(&unit, "CapabilityBoundingSet");
    let caps = caps
        .first()
        .unwrap_or_else(|| panic!("no CapabilityBoundingSet= in the unit"));
    let keep: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let bounding = format!("--bounding-set=-all,{}", keep.join(","));
    println!("daemon_works_with_unit_capabilities: setpriv {bounding}");

    let mut cmd = Command::new("setpriv");
    cmd.arg(&bounding).arg(tcptrace_bin());
    let daemon = Daemon::start_with("unitcaps", cmd, &["--leak-after", "1"]);
    let eff = cap_eff(daemon.pid());
    assert_eq!(
        eff & (1 << CAP_SYS_ADMIN),
        0,
        "daemon kept CAP_SYS_ADMIN (CapEff {eff:x})"
    );

    let (server, _, _clients) = leak(2);
    let pid = server.pid();
    let p = daemon.wait_process(pid, 20, "2 leaked CLOSE_WAIT sockets", |p| {
        p["close_wait"]["leaked"] == 2
    });
    assert_eq!(p["close_wait"]["count"], 2, "close_wait.count: {p}");
    assert!(has_finding(&p, "close_wait_leak"), "findings: {p}");
}

#[test]
fn sighup_reloads_thresholds() {
    if !root_or_skip("sighup_reloads_thresholds") {
        return;
    }
    let dir = TempDir::new("sighup");
    let cfg = dir.write("tcptrace.toml", "leak_after_secs = 3600\n");
    let cfg_arg = cfg.to_str().expect("utf-8 path");
    let daemon = Daemon::start("sighup", &["--config", cfg_arg]);
    let (server, _port, _clients) = leak(2);
    let pid = server.pid();
    // With a one-hour threshold nothing is leaked yet.
    let p = daemon.wait_process(pid, 20, "2 CLOSE_WAIT", |p| p["close_wait"]["count"] == 2);
    assert_eq!(p["close_wait"]["leaked"], 0, "before reload: {p}");
    // Lower the threshold and reload: the same sockets now count as leaked.
    fs::write(&cfg, "leak_after_secs = 1\n").expect("rewrite config");
    signal(daemon.pid(), libc::SIGHUP);
    let p = daemon.wait_process(pid, 20, "2 leaked after SIGHUP", |p| {
        p["close_wait"]["leaked"] == 2
    });
    assert_eq!(p["close_wait"]["count"], 2, "after reload: {p}");
    assert!(
        daemon.stderr().contains("msg=\"config reloaded\""),
        "no reload line:\n{}",
        daemon.stderr()
    );
    // A broken file on reload keeps the running config and says so.
    fs::write(&cfg, "leak_after_secs = \"soon\"\n").expect("rewrite config");
    signal(daemon.pid(), libc::SIGHUP);
    poll(10, || {
        if daemon.stderr().contains("config reload failed") {
            Ok(())
        } else {
            Err(daemon.stderr())
        }
    })
    .unwrap_or_else(|e| panic!("no reload failure line: {e}"));
    let st = daemon.status();
    assert!(
        st["uptime_secs"].as_f64().is_some(),
        "daemon still serving: {st}"
    );
}

#[test]
fn report_without_daemon_shows_sockets_now() {
    if !root_or_skip("report_without_daemon_shows_sockets_now") {
        return;
    }
    let (server, port, _clients) = leak(3);
    let pid = server.pid();
    let socket = format!("/tmp/tcptrace-test-nodaemon-{}.sock", std::process::id());
    let out = Command::new(tcptrace_bin())
        .args(["report", "--json", "--socket", &socket])
        .output()
        .expect("run tcptrace report");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "report failed: {stderr}");
    assert!(
        stderr.contains("no daemon") && stderr.contains("need `tcptrace daemon`"),
        "stderr should say history needs the daemon: {stderr}"
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("report --json is JSON");
    assert_eq!(r["source"], "snapshot", "{r}");
    let p = process(&r, pid).unwrap_or_else(|| panic!("pid {pid} missing: {r}"));
    assert_eq!(p["close_wait"]["count"], 3, "{p}");
    let socks = p["close_wait"]["sockets"]
        .as_array()
        .expect("sockets listed");
    assert_eq!(socks.len(), 3, "{p}");
    assert!(
        socks
            .iter()
            .all(|s| s["local"] == format!("127.0.0.1:{port}")),
        "{p}"
    );
    assert!(
        r["host"]["ephemeral_port_range"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    );
}

/// A connect() whose sockaddr pointer is bad (EFAULT) is a real rare path of the kernel
/// programs: the sockaddr cannot be read, the connect program logs it (aya-log; at the exit,
/// where the syscall's arguments are read there), and the daemon writes the line to its log.
#[test]
fn kernel_log_reaches_the_daemon_log() {
    if !root_or_skip("kernel_log_reaches_the_daemon_log") {
        return;
    }
    let d = Daemon::start("klog", &[]);
    // SAFETY: plain syscalls; the kernel rejects the bad address with EFAULT.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::connect(fd, 8 as *const libc::sockaddr, 16);
        libc::close(fd);
        rc
    };
    assert_eq!(rc, -1, "connect with a bad address must fail");
    let want = format!(
        "level=warn msg=\"kernel: connect: reading the sockaddr from user memory failed (error -14, pid {}); connect not followed\"",
        std::process::id()
    );
    if let Err(e) = poll(10, || {
        d.proc
            .err
            .find(&want)
            .ok_or_else(|| "line not logged yet".to_string())
    }) {
        panic!("{e}: want {want}\n{}", d.proc.describe());
    }
}

/// `report` and `status` find the daemon through TCPTRACE_SOCKET, and `report` takes the filter
/// lists `watch` takes: `-p` comma-separated, `-c`.
#[test]
fn report_and_status_use_tcptrace_socket_and_filter_lists() {
    if !root_or_skip("report_and_status_use_tcptrace_socket_and_filter_lists") {
        return;
    }
    let daemon = Daemon::start("envsock", &[]);
    let (s1, _, _c1) = leak(2);
    let (s2, _, _c2) = leak(2);
    let (p1, p2) = (s1.pid(), s2.pid());
    if let Err(e) = poll(20, || {
        let r = daemon.cli("report")?;
        match (process(&r, p1), process(&r, p2)) {
            (Some(_), Some(_)) => Ok(()),
            _ => Err(format!("both servers in the report: {r}")),
        }
    }) {
        panic!("{e}\n{}", daemon.proc.describe());
    }
    // No --socket anywhere below: the environment says where the daemon is.
    let run = |args: &[&str]| -> Value {
        let out = Command::new(tcptrace_bin())
            .args(args)
            .env("TCPTRACE_SOCKET", &daemon.socket)
            .output()
            .expect("run tcptrace");
        assert!(out.status.success(), "tcptrace {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let pids = |r: &Value| -> BTreeSet<u64> {
        r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect()
    };
    assert_eq!(run(&["status", "--json"])["pid"], daemon.pid());
    let both = run(&["report", "--json", "-p", &format!("{p1},{p2}")]);
    assert_eq!(both["source"], "daemon", "{both}");
    assert_eq!(pids(&both), BTreeSet::from([p1 as u64, p2 as u64]));
    let one = run(&["report", "--json", "-c", "scenario", "-p", &p1.to_string()]);
    assert_eq!(pids(&one), BTreeSet::from([p1 as u64]));
    let none = run(&[
        "report",
        "--json",
        "-c",
        "not-scenario",
        "-p",
        &format!("{p1},{p2}"),
    ]);
    assert_eq!(pids(&none), BTreeSet::new());
}
