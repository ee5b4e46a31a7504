//! Real-kernel scenarios: each test makes real sockets (loopback, or a network namespace it
//! creates), runs the real tcptrace next to them, and expects exact numbers for the pid it spawned.
//! `ss` is the independent oracle wherever a socket state is claimed.
//!
//! They need root; without it each one prints SKIP and passes. Run them with `cargo xtask test`
//! (or `TCPTRACE_BIN=... cargo test --release -p tcptrace-tests -- --nocapture` as root).

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tcptrace_tests::{
    Captured, ClosedPort, DEADLINE, Guarded, Netns, Scenario, Tcptrace, at, describe_pid,
    destination, f64_at, failed, pids, process, require_root, ss_count, tcptrace_bin, u64_at,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls `ss` until `pid` owns exactly `n` sockets in `state`.
fn wait_ss(state: &str, pid: u32, n: usize) {
    let end = Instant::now() + DEADLINE;
    loop {
        let (got, lines) = ss_count(state, pid);
        if got == n {
            return;
        }
        assert!(
            Instant::now() < end,
            "ss oracle: pid {pid} owns {got} sockets in {state}, expected {n}:\n{lines}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until tcptrace has printed two more snapshots, and returns the newest one: numbers that
/// were reached must still be exact there (nothing counted twice, late or in excess).
fn later_snapshot(tt: &mut Tcptrace) -> Value {
    let n = tt.count();
    tt.wait_line_from(n + 1, "two more snapshots", |_| true, |v| v.to_string())
}

/// Panics with the JSON entry for `pid` and tcptrace's stderr unless `ok`.
fn check(tt: &mut Tcptrace, ok: bool, what: &str, snap: &Value, pid: u32) {
    if !ok {
        panic!(
            "expected {what}\ngot: {}\n{}",
            describe_pid(snap, pid),
            tt.context()
        );
    }
}

/// Every snapshot so far must list `pid` at most once and keep its `path` at or below `max`.
fn never_above(tt: &mut Tcptrace, pid: u32, path: &str, max: u64) {
    for v in tt.values() {
        let entries = pids(&v).iter().filter(|&&p| p == pid as u64).count();
        if entries > 1 {
            panic!(
                "pid {pid} is listed {entries} times in one snapshot:\n{v}\n{}",
                tt.context()
            );
        }
        if let Some(n) = process(&v, pid).and_then(|p| u64_at(p, path)) {
            check(tt, n <= max, &format!("{path} never above {max}"), &v, pid);
        }
    }
}

fn comm_is_scenario(tt: &mut Tcptrace, snap: &Value, pid: u32) {
    let comm = process(snap, pid)
        .and_then(|p| p.get("comm"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    check(
        tt,
        comm.as_deref() == Some("scenario"),
        "comm \"scenario\"",
        snap,
        pid,
    );
}

/// A CLOSE_WAIT leak made while tcptrace watches: `k` accepted sockets never closed by the
/// server after the clients closed theirs.
fn leak(listen: &str, loopback: &str, k: usize, also_check_pid_filter: bool) {
    let ks = k.to_string();
    let k64 = k as u64;
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "2"]);

    let mut server = Scenario::spawn(
        SCENARIO,
        &[],
        &["leak-server", "--addr", listen, "--count", &ks],
    );
    let port = server.ready_port();
    let spid = server.pid();
    let to = format!("{loopback}:{port}");
    let mut clients = Scenario::spawn(
        SCENARIO,
        &[],
        &["clients", "--to", &to, "--count", &ks, "--wait-stdin"],
    );
    let cpid = clients.pid();
    clients.expect("CONNECTED");
    server.expect("ACCEPTED");
    let closed_at = unix_now();
    clients.send_line();
    clients.expect("DONE");
    wait_ss("close-wait", spid, k);

    tt.wait_proc(0, spid, &format!("close_wait.count == {k}"), |p| {
        u64_at(p, "close_wait.count") == Some(k64)
    });
    let p = tt.wait_proc(
        0,
        spid,
        &format!("close_wait.count == {k} and leaked == {k}"),
        |p| {
            u64_at(p, "close_wait.count") == Some(k64)
                && u64_at(p, "close_wait.leaked") == Some(k64)
        },
    );
    let elapsed = unix_now() - closed_at;
    let snap = tt
        .values()
        .into_iter()
        .rev()
        .find(|v| process(v, spid) == Some(&p))
        .unwrap();
    let oldest = f64_at(&p, "close_wait.oldest_secs");
    check(
        &mut tt,
        oldest.is_some_and(|o| o >= 2.0 && o <= elapsed + 1.0),
        &format!(
            "close_wait.oldest_secs >= 2 and <= {elapsed:.1} (+1) seconds since the clients closed"
        ),
        &snap,
        spid,
    );
    comm_is_scenario(&mut tt, &snap, spid);

    // Not leaked too early: a snapshot stamped less than 1 s after the close cannot count a leak
    // older than 2 s.
    for v in tt.values() {
        let ts = v.get("ts").and_then(Value::as_f64).unwrap_or(f64::MAX);
        if let Some(p) = process(&v, spid).filter(|_| ts < closed_at + 1.0) {
            let leaked = u64_at(p, "close_wait.leaked");
            check(
                &mut tt,
                leaked == Some(0),
                "leaked == 0 less than 2 s after the close",
                &v,
                spid,
            );
        }
    }
    never_above(&mut tt, spid, "close_wait.count", k64);
    never_above(&mut tt, spid, "close_wait.leaked", k64);

    let last = later_snapshot(&mut tt);
    let p = process(&last, spid);
    check(
        &mut tt,
        p.is_some_and(|p| {
            u64_at(p, "close_wait.count") == Some(k64)
                && u64_at(p, "close_wait.leaked") == Some(k64)
        }),
        &format!("still close_wait.count == {k} and leaked == {k}"),
        &last,
        spid,
    );
    let (n, lines) = ss_count("close-wait", spid);
    assert_eq!(
        n, k,
        "ss oracle after the run: pid {spid} CLOSE_WAIT sockets:\n{lines}"
    );

    if !also_check_pid_filter {
        return;
    }
    // The unfiltered view also shows the clients (k successful connects)...
    tt.wait_proc(0, cpid, &format!("clients: connects.ok == {k}"), |p| {
        u64_at(p, "connects.ok") == Some(k64)
    });
    // ...and --pid keeps only the server.
    let (mut only, _) = Tcptrace::watch(&["--leak-after", "2", "--pid", &spid.to_string()]);
    only.wait_proc(
        0,
        spid,
        &format!("--pid {spid}: close_wait.count == {k}"),
        |p| u64_at(p, "close_wait.count") == Some(k64),
    );
    let last = later_snapshot(&mut only);
    for v in only.values() {
        let ps = pids(&v);
        if ps.iter().any(|&p| p != spid as u64) {
            panic!(
                "--pid {spid}: a snapshot lists other pids {ps:?} (clients pid {cpid})\nJSON: {v}\n{}",
                only.context()
            );
        }
    }
    check(
        &mut only,
        process(&last, spid).is_some_and(|p| u64_at(p, "close_wait.leaked") == Some(k64)),
        &format!("--pid {spid}: leaked == {k}"),
        &last,
        spid,
    );
}

#[test]
fn leak_close_wait_ipv4() {
    require_root!("leak_close_wait_ipv4");
    leak("127.0.0.1:0", "127.0.0.1", 5, true);
}

#[test]
fn leak_close_wait_ipv6() {
    require_root!("leak_close_wait_ipv6");
    leak("[::1]:0", "[::1]", 3, false);
}

#[test]
fn leak_present_before_start() {
    require_root!("leak_present_before_start");
    let mut server = Scenario::spawn(
        SCENARIO,
        &[],
        &["leak-server", "--addr", "127.0.0.1:0", "--count", "4"],
    );
    let port = server.ready_port();
    let spid = server.pid();
    let to = format!("127.0.0.1:{port}");
    let mut clients = Scenario::spawn(
        SCENARIO,
        &[],
        &["clients", "--to", &to, "--count", "4", "--wait-stdin"],
    );
    clients.expect("CONNECTED");
    server.expect("ACCEPTED");
    clients.send_line();
    clients.expect("DONE");
    wait_ss("close-wait", spid, 4);

    let (mut tt, first) = Tcptrace::watch(&["--leak-after", "1"]);
    check(
        &mut tt,
        process(&first, spid).is_some_and(|p| u64_at(p, "close_wait.count") == Some(4)),
        "the FIRST snapshot to show the existing leak: close_wait.count == 4",
        &first,
        spid,
    );
    comm_is_scenario(&mut tt, &first, spid);
    tt.wait_proc(0, spid, "close_wait.count == 4 and leaked == 4", |p| {
        u64_at(p, "close_wait.count") == Some(4) && u64_at(p, "close_wait.leaked") == Some(4)
    });
    never_above(&mut tt, spid, "close_wait.count", 4);
    never_above(&mut tt, spid, "close_wait.leaked", 4);
    let (n, lines) = ss_count("close-wait", spid);
    assert_eq!(
        n, 4,
        "ss oracle after the run: pid {spid} CLOSE_WAIT sockets:\n{lines}"
    );
}

/// 50 sequential connect + close from one process; with `rst`, abortive closes.
fn churn(rst: bool) {
    let (mut tt, _) = Tcptrace::watch(&[]);
    let mut serve = Scenario::spawn(SCENARIO, &[], &["serve", "--addr", "127.0.0.1:0"]);
    let to = format!("127.0.0.1:{}", serve.ready_port());
    let mut args = vec!["churn", "--to", &to, "--count", "50"];
    if rst {
        args.push("--rst");
    }
    let mut client = Scenario::spawn(SCENARIO, &[], &args);
    let cpid = client.pid();
    client.expect("DONE");
    let tw = if rst { 0 } else { 50 };

    tt.wait_proc(
        0,
        cpid,
        "connects.ok == 50 and churn.closed_total == 50",
        |p| u64_at(p, "connects.ok") == Some(50) && u64_at(p, "churn.closed_total") == Some(50),
    );
    let last = later_snapshot(&mut tt);
    let p = process(&last, cpid).cloned();
    let exact = p.as_ref().is_some_and(|p| {
        u64_at(p, "connects.ok") == Some(50)
            && u64_at(p, "churn.closed_total") == Some(50)
            && at(p, "connects.failed")
                .and_then(Value::as_object)
                .is_some_and(|m| m.is_empty())
    });
    check(
        &mut tt,
        exact,
        "for the churn client (its own 50 client-side sockets): connects.ok == 50, no failed connects, \
         churn.closed_total == 50",
        &last,
        cpid,
    );
    let got_tw = p.as_ref().and_then(|p| u64_at(p, "churn.time_wait_total"));
    check(
        &mut tt,
        got_tw == Some(tw),
        &format!(
            "churn.time_wait_total == {tw} ({})",
            if rst {
                "SO_LINGER {1,0}: RST, no TIME_WAIT"
            } else {
                "the client closes first, so its side enters TIME_WAIT"
            }
        ),
        &last,
        cpid,
    );
    comm_is_scenario(&mut tt, &last, cpid);
    never_above(&mut tt, cpid, "connects.ok", 50);
    never_above(&mut tt, cpid, "churn.closed_total", 50);
    never_above(&mut tt, cpid, "churn.time_wait_total", tw);
}

#[test]
fn churn_fin() {
    require_root!("churn_fin");
    churn(false);
}

#[test]
fn churn_rst() {
    require_root!("churn_rst");
    churn(true);
}

#[test]
fn port_exhaustion_in_netns() {
    require_root!("port_exhaustion_in_netns");
    let ns = Netns::create();
    ns.sysctl("net.ipv4.ip_local_port_range=40000 40001");
    let (mut tt, _) = Tcptrace::watch(&[]);
    let mut ex = Scenario::spawn(
        SCENARIO,
        &["ip", "netns", "exec", &ns.name],
        &["exhaust", "--count", "3"],
    );
    let epid = ex.pid();
    ex.expect("DONE");

    let exact = |p: &Value| {
        let d = destination(p, "127.0.0.1:5555");
        failed(p, "connects.failed", "EADDRNOTAVAIL") == Some(3)
            && u64_at(p, "connects.ok") == Some(2)
            && d.is_some_and(|d| {
                failed(d, "connects.failed", "EADDRNOTAVAIL") == Some(3)
                    && u64_at(d, "ports_in_use") == Some(2)
            })
    };
    let what = "connects.ok == 2, connects.failed.EADDRNOTAVAIL == 3, and destination 127.0.0.1:5555 with \
                connects.failed.EADDRNOTAVAIL == 3 and ports_in_use == 2";
    tt.wait_proc(0, epid, what, exact);
    let last = later_snapshot(&mut tt);
    let ok = process(&last, epid).is_some_and(exact);
    check(&mut tt, ok, &format!("still {what}"), &last, epid);
    comm_is_scenario(&mut tt, &last, epid);
    never_above(&mut tt, epid, "connects.ok", 2);
    drop(ex);
    drop(ns);
}

/// Starts `tcptrace watch --events --json` and returns once it demonstrably reports: the test
/// process connects to a listener of its own until an event for that listener's port shows up.
fn events_tracer() -> Tcptrace {
    let mut tt = Tcptrace::start(&["watch", "--events", "--json"]);
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = probe.local_addr().unwrap().to_string();
    let end = Instant::now() + DEADLINE;
    loop {
        let c = TcpStream::connect(&target).unwrap();
        let a = probe.accept().unwrap();
        drop((c, a));
        thread::sleep(Duration::from_millis(200));
        let seen = tt.values().iter().any(|e| {
            ["local", "remote"]
                .iter()
                .any(|k| e.get(*k).and_then(Value::as_str) == Some(target.as_str()))
        });
        if seen {
            return tt;
        }
        if Instant::now() >= end || tt.proc.exited().is_some() {
            panic!(
                "events mode never reported the probe connections to {target}\n{}",
                tt.context()
            );
        }
    }
}

fn refused(nonblocking: bool) {
    let closed = ClosedPort::bind();
    let remote = closed.addr().to_string();
    let (mut tt, _) = Tcptrace::watch(&[]);
    let mut events = events_tracer();
    let mut args = vec!["refused", "--to", &remote, "--count", "3"];
    if nonblocking {
        args.push("--nonblocking");
    }
    let mut r = Scenario::spawn(SCENARIO, &[], &args);
    let rpid = r.pid();
    r.expect("DONE");

    let exact = |p: &Value| {
        failed(p, "connects.failed", "ECONNREFUSED") == Some(3)
            && u64_at(p, "connects.ok") == Some(0)
            && at(p, "connects.failed")
                .and_then(Value::as_object)
                .is_some_and(|m| m.len() == 1)
    };
    let what = "connects.failed == {ECONNREFUSED: 3} only, connects.ok == 0";
    tt.wait_proc(0, rpid, what, exact);
    let last = later_snapshot(&mut tt);
    let ok = process(&last, rpid).is_some_and(exact);
    check(&mut tt, ok, &format!("still {what}"), &last, rpid);
    comm_is_scenario(&mut tt, &last, rpid);

    // Events: exactly three connect_failed for this pid, all ECONNREFUSED to the closed port.
    let mine = |events: &Tcptrace| -> Vec<Value> {
        events
            .values()
            .into_iter()
            .filter(|e| {
                e.get("type").and_then(Value::as_str) == Some("connect_failed")
                    && e.get("pid").and_then(Value::as_u64) == Some(rpid as u64)
            })
            .collect()
    };
    let end = Instant::now() + DEADLINE;
    while mine(&events).len() < 3 && Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
    }
    // Give late or duplicate events time to show up before counting exactly.
    later_snapshot(&mut tt);
    let got = mine(&events);
    let good = got.len() == 3
        && got.iter().all(|e| {
            e.get("errno").and_then(Value::as_str) == Some("ECONNREFUSED")
                && e.get("remote").and_then(Value::as_str) == Some(remote.as_str())
                && e.get("comm").and_then(Value::as_str) == Some("scenario")
        });
    if !good {
        let all: Vec<String> = got.iter().map(Value::to_string).collect();
        panic!(
            "expected exactly 3 connect_failed events for pid {rpid}, errno ECONNREFUSED, remote {remote}, \
             comm scenario; got {}:\n{}\n{}",
            got.len(),
            all.join("\n"),
            events.context()
        );
    }
}

#[test]
fn connect_refused_blocking() {
    require_root!("connect_refused_blocking");
    refused(false);
}

#[test]
fn connect_refused_nonblocking() {
    require_root!("connect_refused_nonblocking");
    refused(true);
}

/// A private copy of the binary that user nobody can run, removed when dropped.
struct NobodyCopy(PathBuf);

impl Drop for NobodyCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn not_root_is_refused_clearly() {
    require_root!("not_root_is_refused_clearly");
    let dir = std::env::temp_dir().join(format!("tctest-nobody-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let copy = NobodyCopy(dir.clone());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("tcptrace");
    std::fs::copy(tcptrace_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut child = tcptrace_tests::as_nobody(&bin)
        .args(["watch", "--json", "--duration", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv");
    let (out, err) = (Captured::default(), Captured::default());
    out.collect(child.stdout.take().unwrap());
    err.collect(child.stderr.take().unwrap());
    let mut g = Guarded {
        name: "setpriv nobody tcptrace".into(),
        child,
        stderr: err.clone(),
    };
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = g.exited() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "tcptrace as nobody did not exit within {DEADLINE:?}; stderr: {}",
            err.text()
        );
        thread::sleep(Duration::from_millis(50));
    };
    thread::sleep(Duration::from_millis(100)); // let the pipes drain
    let (stdout, stderr) = (out.text(), err.text());
    let msg = format!("status {status}\nstdout: {stdout:?}\nstderr: {stderr:?}");
    assert_eq!(
        status.code(),
        Some(1),
        "tcptrace as nobody must exit 1: {msg}"
    );
    assert!(
        stdout.is_empty(),
        "tcptrace as nobody must print nothing on stdout: {msg}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].contains("needs root") && lines[0].contains("sudo"),
        "tcptrace as nobody must print exactly one stderr line with \"needs root\" and \"sudo\": {msg}"
    );
    drop(g);
    drop(copy);
}

/// `watch --events --state close-wait`: only transitions from or to CLOSE_WAIT, every one of a
/// leak's; `-T` marks the text stream's clock with local time's offset (TZ set for the test).
#[test]
fn events_filtered_by_state_and_local_time() {
    require_root!("events_filtered_by_state_and_local_time");
    const N: usize = 3;
    let tt = Tcptrace::start(&["watch", "--events", "--json", "--state", "close-wait"]);
    // Let it attach: the text stream below shows when it is (its header comes first).
    let mut text = Tcptrace::start_env(
        &["watch", "-e", "-T", "--state", "CLOSE_WAIT,last-ack"],
        &[("TZ", "XST-5:30")],
    );
    let end = Instant::now() + DEADLINE;
    while text.text_lines().is_empty() {
        assert!(
            Instant::now() < end,
            "no header from watch -e -T\n{}",
            text.context()
        );
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    let mut server = Scenario::spawn(
        SCENARIO,
        &[],
        &[
            "leak-server",
            "--addr",
            "127.0.0.1:0",
            "--count",
            &N.to_string(),
        ],
    );
    let port = server.ready_port();
    let to = format!("127.0.0.1:{port}");
    let mut clients = Scenario::spawn(
        SCENARIO,
        &[],
        &["clients", "--to", &to, "--count", &N.to_string()],
    );
    clients.expect("DONE");
    server.expect("ACCEPTED");
    let server_side = |e: &Value| e["local"].as_str() == Some(to.as_str());
    let end = Instant::now() + DEADLINE;
    loop {
        let seen = tt.values().iter().filter(|e| server_side(e)).count();
        if seen >= N || Instant::now() >= end {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(300));
    let states: Vec<Value> = tt
        .values()
        .into_iter()
        .filter(|e| e["type"] == "state")
        .collect();
    assert!(
        states
            .iter()
            .all(|e| e["old"] == "CLOSE_WAIT" || e["new"] == "CLOSE_WAIT"),
        "a transition not from or to CLOSE_WAIT: {states:?}"
    );
    let mine: Vec<&Value> = states.iter().filter(|e| server_side(e)).collect();
    assert_eq!(mine.len(), N, "the leak's transitions: {mine:?}");
    assert!(mine.iter().all(|e| e["old"] == "ESTABLISHED"), "{mine:?}");

    let out = text.text_lines();
    let header = out.first().map_or("", String::as_str);
    assert!(header.starts_with("TIME (+05:30)"), "header: {header:?}");
    // The leak's CLOSE_WAIT entries, stamped in the test's zone (UTC + 5:30).
    let leak_lines: Vec<&String> = out.iter().filter(|l| l.contains(&to)).collect();
    assert_eq!(leak_lines.len(), N, "text stream:\n{}", out.join("\n"));
    let expect = (unix_now() + 5.5 * 3600.0) as u64 % 86400;
    let stamp = &leak_lines[0][..8];
    let secs: Vec<u64> = stamp.split(':').filter_map(|x| x.parse().ok()).collect();
    let got = secs[0] * 3600 + secs[1] * 60 + secs[2];
    let diff = (expect + 86400 - got) % 86400;
    assert!(diff < 60, "stamp {stamp} is not local time (UTC+05:30) now");
}

/// `-4` / `-6` keep the processes with sockets of that family; `-L` / `-D` those with a socket
/// on a local / remote port: under each watch (one at a time), a server on [::1] and one on
/// 127.0.0.1 leaking their clients' connections, each process seen only where its filters pass.
#[test]
fn family_and_local_remote_port_filters() {
    require_root!("family_and_local_remote_port_filters");
    const N: &str = "2";
    for name in ["-6", "-4", "-L", "-D"] {
        let mut v6 = Scenario::spawn(
            SCENARIO,
            &[],
            &["leak-server", "--addr", "[::1]:0", "--count", N],
        );
        let p6 = v6.ready_port();
        let mut v4 = Scenario::spawn(
            SCENARIO,
            &[],
            &["leak-server", "--addr", "127.0.0.1:0", "--count", N],
        );
        let p4 = v4.ready_port();
        let arg = match name {
            "-L" => format!("-L{p6}"),
            "-D" => format!("-D{p6}"),
            other => other.to_string(),
        };
        let (mut w, _) = Tcptrace::watch(&[&arg]);
        let from = w.count();
        // The clients close: the servers keep CLOSE_WAIT sockets, the clients have connected.
        let mut c6 = Scenario::spawn(
            SCENARIO,
            &[],
            &["clients", "--to", &format!("[::1]:{p6}"), "--count", N],
        );
        let mut c4 = Scenario::spawn(
            SCENARIO,
            &[],
            &["clients", "--to", &format!("127.0.0.1:{p4}"), "--count", N],
        );
        c6.expect("DONE");
        c4.expect("DONE");
        v6.expect("ACCEPTED");
        v4.expect("ACCEPTED");
        let (s6, s4, k6, k4) = (
            v6.pid() as u64,
            v4.pid() as u64,
            c6.pid() as u64,
            c4.pid() as u64,
        );
        let (want, not) = match name {
            "-6" => (vec![s6, k6], vec![s4, k4]),
            "-4" => (vec![s4, k4], vec![s6, k6]),
            "-L" => (vec![s6], vec![k6, s4, k4]),
            _ => (vec![k6], vec![s6, s4, k4]),
        };
        let snap = w.wait_line_from(
            from,
            &format!("watch {arg}: pids {want:?}"),
            |v| {
                let shown = pids(v);
                want.iter().all(|p| shown.contains(p))
            },
            |v| format!("{:?}", pids(v)),
        );
        let shown = pids(&snap);
        assert!(
            not.iter().all(|p| !shown.contains(p)),
            "watch {arg} shows {shown:?}, none of {not:?} expected"
        );
    }
}
