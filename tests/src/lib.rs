//! Support for the privileged real-kernel scenario tests in `tests/scenarios.rs`: child process
//! guards, a tcptrace runner that collects its JSON output, a network namespace guard, the `ss`
//! oracle and small JSON accessors.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any wait for tcptrace or a scenario process may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns from the calling test, after saying so, when not running as root.
#[macro_export]
macro_rules! require_root {
    ($name:expr) => {
        if !$crate::is_root() {
            println!(
                "SKIP {}: needs root (run via cargo xtask test as root)",
                $name
            );
            return;
        }
    };
}

/// The tcptrace binary under test: `$TCPTRACE_BIN`, else the workspace's release build.
pub fn tcptrace_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TCPTRACE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TCPTRACE_BIN={} is not a file", p.display());
        return p;
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcptrace");
    if !p.is_file() {
        panic!(
            "no tcptrace binary: TCPTRACE_BIN is unset and {} does not exist; run `cargo xtask test`",
            p.display()
        );
    }
    p
}

/// Bounded buffer of a child's stderr, for failure messages.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<String>>);

impl Captured {
    pub fn collect(&self, mut from: impl Read + Send + 'static) {
        let this = self.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = this.0.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                // Keep the tail only.
                if s.len() > 64 * 1024 {
                    let mut cut = s.len() - 32 * 1024;
                    while !s.is_char_boundary(cut) {
                        cut += 1;
                    }
                    s.drain(..cut);
                }
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// The last `max` bytes, for messages.
    pub fn tail(&self, max: usize) -> String {
        let s = self.text();
        if s.len() <= max {
            return s;
        }
        let mut cut = s.len() - max;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        format!("...{}", &s[cut..])
    }
}

/// A spawned child that is killed and reaped when the guard is dropped, even on panic.
pub struct Guarded {
    pub name: String,
    pub child: Child,
    pub stderr: Captured,
}

impl Guarded {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGINT, waits up to `grace` for the exit, then SIGKILLs.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.exited() {
            return Some(st);
        }
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One run of the `scenario` helper binary, with its stdout lines on a channel.
pub struct Scenario {
    pub proc: Guarded,
    lines: Receiver<String>,
    seen: Vec<String>,
    stdin: Option<ChildStdin>,
}

impl Scenario {
    /// Runs `scenario <args>`, optionally prefixed by a wrapper such as `ip netns exec NS`
    /// (the wrapper must exec the scenario so the child's pid is the scenario's pid).
    pub fn spawn(scenario_bin: &str, wrapper: &[&str], args: &[&str]) -> Scenario {
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(scenario_bin);
                c
            }
            None => Command::new(scenario_bin),
        };
        cmd.args(args);
        Scenario::from_command(cmd, format!("scenario {}", args.join(" ")))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits for the next stdout line starting with `word` and returns the rest of it.
    pub fn expect(&mut self, word: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line == word {
                        return String::new();
                    }
                    if let Some(rest) = line.strip_prefix(word).and_then(|r| r.strip_prefix(' ')) {
                        return rest.to_string();
                    }
                }
                Err(e) => {
                    thread::sleep(Duration::from_millis(100)); // let stderr arrive
                    let why = match e {
                        RecvTimeoutError::Timeout => "timed out".to_string(),
                        RecvTimeoutError::Disconnected => {
                            format!("stdout closed, exit {:?}", self.proc.exited())
                        }
                    };
                    panic!(
                        "{} (pid {}): waiting for {word:?}: {why}\nstdout so far: {:?}\nstderr: {}",
                        self.proc.name,
                        self.pid(),
                        self.seen,
                        self.proc.stderr.tail(4000)
                    );
                }
            }
        }
    }

    /// Waits for `READY <port>` and returns the port.
    pub fn ready_port(&mut self) -> u16 {
        let info = self.expect("READY");
        info.parse()
            .unwrap_or_else(|e| panic!("{}: READY {info:?}: {e}", self.proc.name))
    }

    /// Writes one line to the scenario's stdin (for `clients --wait-stdin`).
    pub fn send_line(&mut self) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(b"go\n")
            .and_then(|_| stdin.flush())
            .expect("write to scenario stdin");
    }
}

/// A running tcptrace; every stdout line is kept, as text and parsed as JSON.
pub struct Tcptrace {
    pub proc: Guarded,
    pub args: Vec<String>,
    lines: Arc<Mutex<Vec<Result<Value, String>>>>,
    text: Arc<Mutex<Vec<String>>>,
}

impl Tcptrace {
    pub fn start(args: &[&str]) -> Tcptrace {
        Tcptrace::start_env(args, &[])
    }

    /// Like `start`, with these environment variables set for tcptrace.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Tcptrace {
        let bin = tcptrace_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stderr = Captured::default();
        stderr.collect(child.stderr.take().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let text = Arc::new(Mutex::new(Vec::new()));
        let (sink, text_sink) = (lines.clone(), text.clone());
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let parsed =
                    serde_json::from_str::<Value>(&line).map_err(|e| format!("{e}: {line}"));
                sink.lock().unwrap().push(parsed);
                text_sink.lock().unwrap().push(line);
            }
        });
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let name = format!("tcptrace {}", args.join(" "));
        Tcptrace {
            proc: Guarded {
                name,
                child,
                stderr,
            },
            args,
            lines,
            text,
        }
    }

    /// Every stdout line so far, as printed (text output).
    pub fn text_lines(&self) -> Vec<String> {
        self.text.lock().unwrap().clone()
    }

    /// `tcptrace watch --json --interval 1 <extra>`; returns once the first snapshot is out.
    pub fn watch(extra: &[&str]) -> (Tcptrace, Value) {
        let mut args = vec!["watch", "--json", "--interval", "1"];
        args.extend_from_slice(extra);
        let mut t = Tcptrace::start(&args);
        let first = t.wait_line("the first JSON snapshot", |_| true);
        (t, first)
    }

    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// All JSON lines so far (panics on a line that is not JSON).
    pub fn values(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .map(|l| match l {
                Ok(v) => v.clone(),
                Err(e) => panic!(
                    "{}: stdout line is not JSON: {e}\nstderr: {}",
                    self.proc.name,
                    self.proc.stderr.tail(4000)
                ),
            })
            .collect()
    }

    /// Context for failure messages: tcptrace's stderr tail and exit status.
    pub fn context(&mut self) -> String {
        let status = self.proc.exited();
        format!(
            "[{} (pid {}), exit status {:?}, {} stdout lines]\ntcptrace stderr:\n{}",
            self.proc.name,
            self.proc.pid(),
            status,
            self.count(),
            self.proc.stderr.tail(6000)
        )
    }

    /// Polls until some JSON line (in order, starting with the first) satisfies `pred`, and
    /// returns it. On the deadline, or if tcptrace exits, panics with `what`, the last line and
    /// stderr.
    pub fn wait_line(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_line_from(0, what, pred, |v| v.to_string())
    }

    /// Like `wait_line`, from line index `from`, with `show` choosing what of the last line to
    /// print on failure.
    pub fn wait_line_from(
        &mut self,
        from: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
        show: impl Fn(&Value) -> String,
    ) -> Value {
        let end = Instant::now() + DEADLINE;
        let mut next = from;
        loop {
            let vals = self.values();
            for v in &vals[next.min(vals.len())..] {
                if pred(v) {
                    return v.clone();
                }
            }
            next = next.max(vals.len());
            let exited = self.proc.exited();
            if Instant::now() >= end || exited.is_some() {
                if exited.is_some() {
                    thread::sleep(Duration::from_millis(200)); // let the last output arrive
                }
                let last = vals
                    .last()
                    .map(&show)
                    .unwrap_or_else(|| "<no JSON line at all>".into());
                let context = self.context();
                panic!(
                    "{}: gave up waiting for {what} after {:?}{}\nlast JSON: {last}\n{context}",
                    self.proc.name,
                    DEADLINE,
                    if exited.is_some() {
                        " (tcptrace exited)"
                    } else {
                        ""
                    },
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a snapshot (after line `from`) whose entry for `pid` satisfies `pred`; returns
    /// that entry. The failure message shows the last snapshot's entry for `pid`.
    pub fn wait_proc(
        &mut self,
        from: usize,
        pid: u32,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let snap = self.wait_line_from(
            from,
            &format!("pid {pid}: {what}"),
            |v| process(v, pid).is_some_and(&pred),
            |v| describe_pid(v, pid),
        );
        process(&snap, pid).unwrap().clone()
    }
}

/// Shows `pid`'s entry of a snapshot, or which pids there are when it is missing.
pub fn describe_pid(snap: &Value, pid: u32) -> String {
    match process(snap, pid) {
        Some(p) => {
            // Every entry with this pid (a reused pid has two), and what the kernel lost.
            let all: Vec<&Value> = snap["processes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|q| q.get("pid").and_then(Value::as_u64) == Some(pid as u64))
                .collect();
            format!(
                "(ts {}, dropped_events {}, missed_events {}, host {}) pid {pid}: {p}{}",
                snap["ts"],
                snap["dropped_events"],
                snap["missed_events"],
                snap["host"],
                if all.len() > 1 {
                    format!("\nall {} entries of pid {pid}: {all:?}", all.len())
                } else {
                    String::new()
                }
            )
        }
        None => format!(
            "pid {pid} absent; pids present: {:?}; host: {}",
            pids(snap),
            snap["host"]
        ),
    }
}

/// The `processes` entry for `pid`, if any.
pub fn process(snap: &Value, pid: u32) -> Option<&Value> {
    snap.get("processes")?
        .as_array()?
        .iter()
        .find(|p| p.get("pid").and_then(Value::as_u64) == Some(pid as u64))
}

/// All pids of a snapshot's `processes`.
pub fn pids(snap: &Value) -> Vec<u64> {
    snap.get("processes")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("pid").and_then(Value::as_u64))
                .collect()
        })
        .unwrap_or_default()
}

/// Follows a dotted path such as `close_wait.count`.
pub fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

pub fn u64_at(v: &Value, path: &str) -> Option<u64> {
    at(v, path)?.as_u64()
}

pub fn f64_at(v: &Value, path: &str) -> Option<f64> {
    at(v, path)?.as_f64()
}

/// Count of `errno` in the `failed` map at `path` (e.g. `connects.failed`). The map leaves out
/// zero counts, so an absent errno is 0 — but the map itself must be there.
pub fn failed(v: &Value, path: &str, errno: &str) -> Option<u64> {
    let map = at(v, path)?.as_object()?;
    match map.get(errno) {
        None => Some(0),
        Some(n) => n.as_u64(),
    }
}

/// The entry of a process's `destinations` whose `remote` is `remote`.
pub fn destination<'a>(proc_entry: &'a Value, remote: &str) -> Option<&'a Value> {
    proc_entry
        .get("destinations")?
        .as_array()?
        .iter()
        .find(|d| d.get("remote").and_then(Value::as_str) == Some(remote))
}

/// Number of sockets `ss -tanpH state <state>` shows as owned by `pid`.
pub fn ss_count(state: &str, pid: u32) -> (usize, String) {
    let out = Command::new("ss")
        .args(["-tanpH", "state", state])
        .output()
        .expect("run ss");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let needle = format!("pid={pid},");
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(&needle)).collect();
    (mine.len(), mine.join("\n"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made for one test and deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `tctest-<pid>-<n>` with its loopback up.
    pub fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tctest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// `sysctl -qw key=value` inside the namespace.
    pub fn sysctl(&self, key_value: &str) {
        run(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-qw", key_value],
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A TCP port on 127.0.0.1 that is bound but not listening, held for the guard's lifetime:
/// connects to it are refused, and nothing else can take the port meanwhile.
pub struct ClosedPort {
    fd: libc::c_int,
    pub port: u16,
}

impl ClosedPort {
    pub fn bind() -> ClosedPort {
        // SAFETY: plain syscalls on a descriptor we own; results are checked.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut sin: libc::sockaddr_in = std::mem::zeroed();
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd, (&raw const sin).cast(), len);
            assert!(
                rc == 0,
                "bind 127.0.0.1:0: {}",
                std::io::Error::last_os_error()
            );
            let mut got: libc::sockaddr_in = std::mem::zeroed();
            let mut got_len = len;
            let rc = libc::getsockname(fd, (&raw mut got).cast(), &mut got_len);
            assert!(rc == 0, "getsockname: {}", std::io::Error::last_os_error());
            ClosedPort {
                fd,
                port: u16::from_be(got.sin_port),
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }
}

impl Drop for ClosedPort {
    fn drop(&mut self) {
        // SAFETY: we own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// Calls `check` every 100 ms until it returns Ok or `secs` pass; the Err says after how long
/// and carries the last reason.
pub fn poll<T>(secs: u64, mut check: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = check();
    while last.is_err() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        last = check();
    }
    last.map_err(|e| format!("after {secs} s: {e}"))
}

/// A loopback TCP port free a moment ago (for a daemon's metrics address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl Scenario {
    /// Runs a prepared command (stdin, stdout and stderr are piped here), e.g. a copy of the
    /// `scenario` binary under a name that is not UTF-8.
    pub fn from_command(mut cmd: Command, name: String) -> Scenario {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A freshly copied executable can be "busy" for a moment: a process another test thread
        // forked while the copy was open for writing holds that descriptor until it execs.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("spawn {name}: {e}"),
            }
        };
        let stderr = Captured::default();
        stderr.collect(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Scenario {
            proc: Guarded {
                name,
                child,
                stderr,
            },
            lines: rx,
            seen: Vec::new(),
            stdin,
        }
    }
}

/// CLOSE_WAIT sockets with local port `port` as `ss -tanp` shows them: the count per holding
/// pid, the number held by no process (accept backlog), and ss's lines.
pub fn ss_close_wait(port: u16) -> (std::collections::BTreeMap<u32, u64>, u64, String) {
    let text = run(
        "ss",
        &[
            "-tanpH",
            "state",
            "close-wait",
            &format!("( sport = :{port} )"),
        ],
    );
    let mut by_pid = std::collections::BTreeMap::new();
    let mut unheld = 0;
    for line in text.lines() {
        let mut pids: Vec<u32> = line
            .split("pid=")
            .skip(1)
            .filter_map(|s| s.split(',').next()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            unheld += 1;
        }
        for p in pids {
            *by_pid.entry(p).or_default() += 1;
        }
    }
    (by_pid, unheld, text)
}

/// `scenario leak-server` on an ephemeral loopback port: accepts `count` connections and
/// never closes them.
pub fn leak_server(scenario_bin: &str, count: usize) -> Scenario {
    Scenario::spawn(
        scenario_bin,
        &[],
        &[
            "leak-server",
            "--addr",
            "127.0.0.1:0",
            "--count",
            &count.to_string(),
        ],
    )
}

/// Number of sockets `ss -tanH state <state> <filter>` shows (e.g. filter `dport = :8080`),
/// and the lines.
pub fn ss_filter_count(state: &str, filter: &str) -> (usize, String) {
    let text = run("ss", &["-tanH", "state", state, filter]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    (lines.len(), lines.join("\n"))
}

/// A temporary directory (mode 0755: user nobody may run what it holds), removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tctest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }

    /// Copies `from` into the directory as `name` (any bytes but '/' and NUL), mode 0755.
    pub fn copy_exe(&self, from: &std::path::Path, name: &std::ffi::OsStr) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let to = self.0.join(name);
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy to {to:?}: {e}"));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A child another test thread forked while the copy was open for writing holds that
        // descriptor until it execs: running the copy before then fails with ETXTBSY (callers
        // that exec it through another program, such as setpriv, cannot retry).
        thread::sleep(Duration::from_millis(100));
        to
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `setpriv` running `program` as user nobody, with no groups and no capabilities.
pub fn as_nobody(program: &std::path::Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(program);
    cmd
}

/// `tcptrace <sub> --socket <socket> --json` (status, report), parsed.
pub fn daemon_json(sub: &str, socket: &std::path::Path) -> Result<Value, String> {
    let out = Command::new(tcptrace_bin())
        .arg(sub)
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .output()
        .map_err(|e| format!("run tcptrace {sub}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tcptrace {sub}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("tcptrace {sub} output: {e}"))
}

/// One HTTP/1.0 GET of `path` from `addr` with these extra header lines (each ended by CRLF):
/// (status line, head, body).
pub fn http_request(
    addr: &str,
    path: &str,
    headers: &str,
) -> Result<(String, String, String), String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end: {resp}"))?;
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, head.to_string(), body.to_string()))
}

/// `s` percent-encoded for a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "ts": 1700000000, "dropped_events": 0,
            "host": {"established": 3, "time_wait": 1, "close_wait": 5, "listen": 2, "total": 11},
            "processes": [
                {"pid": 10, "comm": "a", "close_wait": {"count": 5, "leaked": 2, "oldest_secs": 2.5},
                 "connects": {"ok": 2, "failed": {"EADDRNOTAVAIL": 3}},
                 "destinations": [{"remote": "127.0.0.1:5555", "ports_in_use": 2,
                                   "connects": {"ok": 2, "failed": {"EADDRNOTAVAIL": 3}}}]},
                {"pid": 11, "comm": "b", "connects": {"ok": 0, "failed": {}}}
            ]
        })
    }

    #[test]
    fn finds_processes_and_fields() {
        let s = sample();
        assert_eq!(pids(&s), vec![10, 11]);
        let p = process(&s, 10).unwrap();
        assert_eq!(u64_at(p, "close_wait.count"), Some(5));
        assert_eq!(f64_at(p, "close_wait.oldest_secs"), Some(2.5));
        assert_eq!(u64_at(p, "close_wait.nope"), None);
        assert!(process(&s, 12).is_none());
        assert!(describe_pid(&s, 12).contains("absent; pids present: [10, 11]"));
    }

    #[test]
    fn failed_counts_default_to_zero_only_inside_a_map() {
        let s = sample();
        let p = process(&s, 10).unwrap();
        assert_eq!(failed(p, "connects.failed", "EADDRNOTAVAIL"), Some(3));
        assert_eq!(failed(p, "connects.failed", "ECONNREFUSED"), Some(0));
        assert_eq!(
            failed(process(&s, 11).unwrap(), "connects.failed", "EADDRNOTAVAIL"),
            Some(0)
        );
        assert_eq!(failed(p, "nothing.failed", "EADDRNOTAVAIL"), None);
        let d = destination(p, "127.0.0.1:5555").unwrap();
        assert_eq!(u64_at(d, "ports_in_use"), Some(2));
        assert_eq!(failed(d, "connects.failed", "EADDRNOTAVAIL"), Some(3));
        assert!(destination(p, "127.0.0.1:1").is_none());
    }

    #[test]
    fn closed_port_refuses() {
        let c = ClosedPort::bind();
        assert_ne!(c.port, 0);
        let e = std::net::TcpStream::connect(c.addr()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    }
}
