//! Hostile and unlucky input: process names that are not UTF-8 or that hold terminal escape
//! sequences, out-of-range flags, and what `watch --events` prints before it can start.
//!
//! Real programs (copies of the `scenario` helper under hostile names) hold real CLOSE_WAIT
//! sockets on loopback; `ss` is the oracle. Privileged tests print `SKIP` unless run as root.
//!
//! ```text
//! TCPTRACE_BIN=target/release/tcptrace cargo test --release -p tcptrace-tests --test hardening_input -- --nocapture
//! ```

use std::{
    ffi::OsStr,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcptrace_tests::{
    Captured, DEADLINE, Guarded, Scenario, Tcptrace, TempDir, as_nobody, process, require_root,
    ss_count, tcptrace_bin, u64_at,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");
const LEAKS: usize = 5;

/// 9 two-byte letters: the kernel keeps 15 bytes of a name, so the 8th letter is cut in half.
const CUT_NAME: &[u8] = "ééééééééé".as_bytes();
const CUT_COMM: &str = "ééééééé\u{FFFD}";
const FF_NAME: &[u8] = b"leak\xffname";
const FF_COMM: &str = "leak\u{FFFD}name";
/// Clears the screen and retitles the terminal, if printed raw.
const ESC_NAME: &[u8] = b"\x1b[2J\x1b]0;pwned\x07";
const ESC_COMM: &str = "\u{1b}[2J\u{1b}]0;pwned\u{7}";
const ESC_SHOWN: &str = r"\x1b[2J\x1b]0;pwned\x07";
/// Port of that process's listener, for `watch --events --port`.
const ESC_PORT: &str = "47911";

/// A copy of `scenario` named `name`, holding `LEAKS` CLOSE_WAIT sockets (checked with ss).
struct Leaker {
    server: Scenario,
    _clients: Scenario,
}

impl Leaker {
    fn start(dir: &TempDir, name: &[u8], addr: &str) -> Leaker {
        let exe = dir.copy_exe(Path::new(SCENARIO), OsStr::from_bytes(name));
        let n = LEAKS.to_string();
        let mut cmd = Command::new(&exe);
        if std::str::from_utf8(name).is_err() {
            // The helper reads its arguments as UTF-8; the kernel names the process after
            // the file it runs, whatever argv[0] says.
            cmd.arg0("scenario");
        }
        cmd.args(["leak-server", "--addr", addr, "--count", &n]);
        let mut server = Scenario::from_command(cmd, format!("leak-server named {name:?}"));
        let to = format!("127.0.0.1:{}", server.ready_port());
        let mut clients = Scenario::spawn(
            SCENARIO,
            &[],
            &["clients", "--to", &to, "--count", &n, "--wait-stdin"],
        );
        clients.expect("CONNECTED");
        server.expect("ACCEPTED");
        clients.send_line();
        clients.expect("DONE");
        let leaker = Leaker {
            server,
            _clients: clients,
        };
        leaker.wait_ss();
        leaker
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Waits until ss shows exactly `LEAKS` CLOSE_WAIT sockets owned by the server.
    fn wait_ss(&self) {
        let end = Instant::now() + DEADLINE;
        loop {
            let (n, lines) = ss_count("close-wait", self.pid());
            if n == LEAKS {
                return;
            }
            assert!(
                Instant::now() < end,
                "ss: pid {} has {n} CLOSE_WAIT sockets, expected {LEAKS}:\n{lines}",
                self.pid()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A `tcptrace daemon` with its own control socket and no metrics endpoint; stderr (the log)
/// collected.
struct Daemon {
    proc: Guarded,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &TempDir, config: &str) -> Daemon {
        let socket = dir.0.join("control.sock");
        let cfg = dir.0.join("tcptrace.toml");
        std::fs::write(&cfg, config).unwrap();
        let proc = spawn_guarded(
            "tcptrace daemon",
            Command::new(tcptrace_bin())
                .args(["daemon", "--metrics-addr", "off", "--socket"])
                .arg(&socket)
                .arg("--config")
                .arg(&cfg)
                .stdout(Stdio::null()),
        );
        let mut d = Daemon { proc, socket };
        let end = Instant::now() + DEADLINE;
        while !(d.socket.exists() && d.cli(&["status"]).status.success()) {
            assert!(
                d.proc.exited().is_none() && Instant::now() < end,
                "daemon did not start: {:?}\n{}",
                d.proc.exited(),
                d.proc.stderr.tail(4000)
            );
            thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(tcptrace_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run tcptrace client")
    }

    /// `report --json --pid PID`: the entry for `pid`, if any.
    fn report_proc(&self, pid: u32) -> Option<Value> {
        let out = self.cli(&["report", "--json", "--pid", &pid.to_string()]);
        assert!(
            out.status.success(),
            "report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("report --json is JSON");
        assert_eq!(v["source"], "daemon", "{v}");
        process(&v, pid).cloned()
    }
}

/// Starts `cmd` (stdin empty, stderr collected) under a guard that kills it on drop.
fn spawn_guarded(name: &str, cmd: &mut Command) -> Guarded {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let stderr = Captured::default();
    stderr.collect(child.stderr.take().unwrap());
    Guarded {
        name: name.into(),
        child,
        stderr,
    }
}

/// Failed checks, collected so that one run shows every output that went wrong.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    /// No raw ESC or BEL byte in `bytes`.
    fn no_raw_control(&mut self, what: &str, bytes: &[u8]) {
        if let Some(i) = bytes.iter().position(|&b| b == 0x1b || b == 0x07) {
            self.0.push(format!(
                "{what}: raw control byte {:#04x} at offset {i}: {:?}",
                bytes[i],
                String::from_utf8_lossy(bytes)
            ));
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

/// Runs tcptrace with `args` until it exits (it must be given `--duration`).
fn run_tcptrace(args: &[&str]) -> Output {
    let out = Command::new(tcptrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tcptrace");
    assert!(
        out.status.success(),
        "tcptrace {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Item 1: a process whose name is not UTF-8 (cut in the middle of a letter, or with a 0xff
/// byte) stays in `watch` and in the daemon's report, alive, with all its CLOSE_WAIT sockets
/// and its name decoded lossily, over several seconds.
#[test]
fn names_that_are_not_utf8_do_not_hide_a_leak() {
    require_root!("names_that_are_not_utf8_do_not_hide_a_leak");
    let dir = TempDir::new("hi-utf8");
    let daemon = Daemon::start(&dir, "leak_after_secs = 1\n");
    let (mut watch, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let leakers = [
        (Leaker::start(&dir, CUT_NAME, "127.0.0.1:0"), CUT_COMM),
        (Leaker::start(&dir, FF_NAME, "127.0.0.1:0"), FF_COMM),
    ];
    let n = LEAKS as u64;
    let shows = |p: &Value, comm: &str| {
        u64_at(p, "close_wait.count") == Some(n)
            && u64_at(p, "close_wait.leaked") == Some(n)
            && p["comm"] == comm
            && p["exited"] == false
    };
    for (l, comm) in &leakers {
        watch.wait_proc(0, l.pid(), &format!("{LEAKS} leaked, comm {comm:?}"), |p| {
            shows(p, comm)
        });
    }
    // Several seconds later (the table checks liveness every second), in every snapshot.
    let from = watch.count();
    thread::sleep(Duration::from_secs(4));
    watch.wait_line_from(
        from + 3,
        "three more snapshots",
        |_| true,
        |v| v.to_string(),
    );
    for v in &watch.values()[from..] {
        for (l, comm) in &leakers {
            let p = process(v, l.pid());
            assert!(
                p.is_some_and(|p| shows(p, comm)),
                "watch: pid {} (comm {comm:?}) must show {LEAKS} leaked CLOSE_WAIT sockets, \
                 alive: {p:?}\n{}",
                l.pid(),
                watch.context()
            );
        }
    }
    for (l, comm) in &leakers {
        let p = daemon.report_proc(l.pid());
        assert!(
            p.as_ref().is_some_and(|p| shows(p, comm)),
            "daemon report: pid {} (comm {comm:?}) must show {LEAKS} leaked, alive: {p:?}\n\
             daemon log:\n{}",
            l.pid(),
            daemon.proc.stderr.tail(4000)
        );
        let (got, lines) = ss_count("close-wait", l.pid());
        assert_eq!(got, LEAKS, "ss after the run, pid {}:\n{lines}", l.pid());
    }
}

/// Items 4 and 11: a process named with a clear-screen and a set-title sequence. No ESC or
/// BEL byte reaches the text of `watch` (piped, on a terminal, --wide with its COMMAND
/// column), `watch --events`, `report` or the daemon's log; each shows the name escaped.
/// JSON keeps the name as it is (JSON escapes it).
#[test]
fn control_bytes_in_names_never_reach_the_terminal() {
    require_root!("control_bytes_in_names_never_reach_the_terminal");
    let dir = TempDir::new("hi-esc");
    let daemon = Daemon::start(
        &dir,
        "leak_after_secs = 1\n[alerts]\nclose_wait = 2\nclose_wait_sustain_secs = 1\n",
    );
    // The event stream must see the leaker's own transitions (listen, accept, close-wait).
    let events_out = dir.0.join("events.txt");
    let file = std::fs::File::create(&events_out).unwrap();
    let mut events = spawn_guarded(
        "tcptrace watch --events",
        Command::new(tcptrace_bin())
            .args(["watch", "--events", "--port", ESC_PORT])
            .stdout(file),
    );
    // The header line comes once the tracer is attached.
    let end = Instant::now() + DEADLINE;
    while std::fs::metadata(&events_out).map_or(0, |m| m.len()) == 0 {
        assert!(
            events.exited().is_none() && Instant::now() < end,
            "watch --events printed no header: {:?}\n{}",
            events.exited(),
            events.stderr.tail(4000)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let leaker = Leaker::start(&dir, ESC_NAME, &format!("127.0.0.1:{ESC_PORT}"));
    let pid = leaker.pid();
    let pid_s = pid.to_string();
    let exe = dir.0.join(OsStr::from_bytes(ESC_NAME));
    let shown_exe = format!("{}/{ESC_SHOWN}", dir.0.display());

    // JSON keeps the text; the daemon's report (JSON) and its text.
    let end = Instant::now() + DEADLINE;
    let p = loop {
        match daemon.report_proc(pid) {
            Some(p) if u64_at(&p, "close_wait.count") == Some(LEAKS as u64) => break p,
            other => assert!(Instant::now() < end, "daemon report for {pid}: {other:?}"),
        }
        thread::sleep(Duration::from_millis(200));
    };
    let mut problems = Problems::default();
    problems.check(p["comm"] == ESC_COMM, || {
        format!("report --json must keep the name as it is: {p}")
    });
    problems.check(
        p["cmdline"]
            .as_str()
            .is_some_and(|c| c.starts_with(&*exe.to_string_lossy())),
        || format!("report --json cmdline: {p}"),
    );
    let report = daemon.cli(&["report", "--pid", &pid_s]);
    assert!(report.status.success(), "report: {report:?}");
    problems.no_raw_control("report text", &report.stdout);
    let text = String::from_utf8_lossy(&report.stdout);
    problems.check(
        text.contains(&format!("PID {pid} {ESC_SHOWN}"))
            && text.contains(&format!("command: {shown_exe} leak-server")),
        || format!("report text must show the name and command escaped:\n{text}"),
    );

    // The daemon's alert line names the process, escaped.
    let end = Instant::now() + DEADLINE;
    let log = loop {
        let log = daemon.proc.stderr.text();
        if log.lines().any(|l| l.contains(&format!("pid={pid} "))) {
            break log;
        }
        assert!(
            Instant::now() < end,
            "no daemon log line for pid {pid}:\n{log}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    problems.no_raw_control("daemon log", log.as_bytes());
    let line = log
        .lines()
        .find(|l| l.contains(&format!("pid={pid} ")))
        .unwrap();
    problems.check(line.contains(&format!("comm=\"{ESC_SHOWN}\"")), || {
        format!("daemon log line must show comm escaped and quoted: {line}")
    });

    // watch, piped text, --wide: the COMMAND column holds the escaped command line.
    let out = run_tcptrace(&[
        "watch",
        "--wide",
        "--pid",
        &pid_s,
        "--interval",
        "1",
        "--duration",
        "2.5",
    ]);
    problems.no_raw_control("watch --wide text", &out.stdout);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{pid} ")))
        .unwrap_or_else(|| panic!("watch --wide: no row for pid {pid}:\n{text}"));
    problems.check(row.contains(r"\x1b[2J\x1b]0;p"), || {
        format!("watch --wide row must show the name escaped: {row:?}")
    });
    problems.check(
        row.ends_with(&format!(
            " {shown_exe} leak-server --addr 127.0.0.1:{ESC_PORT} --count 5"
        )),
        || format!("watch --wide COMMAND column must show the command line escaped: {row:?}"),
    );

    // watch on a terminal (script gives it one): its own screen control only, no title.
    let script_cmd = format!(
        "{} watch --pid {pid} --interval 1 --duration 2.5",
        tcptrace_bin().display()
    );
    let out = Command::new("script")
        .args(["-qec", &script_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    assert!(out.status.success(), "script: {out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    problems.check(
        !screen.contains("\x1b]0;pwned") && screen.contains(r"\x1b[2J\x1b]0;p"),
        || format!("watch screen must show the name escaped, never as a title: {screen:?}"),
    );

    // The event stream: the leaker's lines show its name escaped; no raw control at all.
    let status = events.stop(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "watch --events: {status:?}\n{}",
        events.stderr.tail(4000)
    );
    let bytes = std::fs::read(&events_out).unwrap();
    problems.no_raw_control("watch --events text", &bytes);
    let text = String::from_utf8_lossy(&bytes);
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(pid_s.as_str()))
        .collect();
    problems.check(
        !mine.is_empty() && mine.iter().all(|l| l.contains(r"\x1b[2J\x1b]0;p")),
        || format!("watch --events: lines of pid {pid} must show its name escaped: {mine:#?}"),
    );
    drop(leaker);
    problems.finish();
}

/// Item 8: out-of-range flags get one clear line and exit 2, no panic, nothing on stdout.
#[test]
fn out_of_range_flags_are_refused_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (&["watch", "--interval", "1e30"], "from 0.1 to 86400"),
        (&["watch", "--interval", "1e-9"], "from 0.1 to 86400"),
        (&["watch", "--interval", "NaN"], "from 0.1 to 86400"),
        (&["watch", "--duration", "1e30"], "from 0.1 to 315360000"),
        (&["watch", "--leak-after", "1e30"], "from 0 to 86400"),
        (&["watch", "--leak-after=-1"], "from 0 to 86400"),
        (
            &["watch", "--ring-buffer-kib", "0"],
            "between 4 and 1048576",
        ),
        (
            &["watch", "--ring-buffer-kib", "2000000"],
            "between 4 and 1048576",
        ),
        (&["daemon", "--leak-after", "1e30"], "from 0 to 86400"),
    ];
    for (args, expect) in cases {
        let out = Command::new(tcptrace_bin())
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .expect("run tcptrace");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("");
        assert!(
            out.status.code() == Some(2)
                && out.stdout.is_empty()
                && first.starts_with("error: invalid value")
                && first.contains(expect)
                && !err.contains("panicked"),
            "tcptrace {args:?}: expected exit 2 and one line saying {expect:?}; got {}:\n{err}",
            out.status
        );
    }
}

/// Item 10: `watch --events` without privileges fails with nothing on stdout (no header).
#[test]
fn events_print_nothing_before_the_tracer_is_attached() {
    require_root!("events_print_nothing_before_the_tracer_is_attached");
    let dir = TempDir::new("hi-nobody");
    let bin = dir.copy_exe(&tcptrace_bin(), OsStr::new("tcptrace"));
    for extra in [&[][..], &["--json"][..]] {
        let out = as_nobody(&bin)
            .args(["watch", "--events", "--duration", "2"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && out.stdout.is_empty() && err.contains("needs root"),
            "watch --events {extra:?} as nobody: expected exit 1, empty stdout; got {}\n\
             stdout: {:?}\nstderr: {err}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
