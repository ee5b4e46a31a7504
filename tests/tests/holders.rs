//! Who holds a CLOSE_WAIT socket, in the server architectures where leaks happen: prefork
//! workers, hand-offs to children (fork, fork+exec, SCM_RIGHTS), shared descriptors, the accept
//! backlog, and a real prefork server (gunicorn). `ss -tanp` is the oracle: the count tcptrace
//! gives each process must equal the sockets ss shows that pid holding.
//!
//! They need root; without it each prints SKIP and passes. Run with `cargo xtask test`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcptrace_tests::{
    Captured, DEADLINE, Guarded, Scenario, Tcptrace, at, describe_pid, process, require_root, run,
    ss_close_wait, u64_at,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

fn servers_py() -> String {
    format!("{}/scripts/servers.py", env!("CARGO_MANIFEST_DIR"))
}

/// `python3 servers.py <args>` (see the script for the modes).
fn server(args: &[&str]) -> Scenario {
    let script = servers_py();
    let mut all = vec![script.as_str()];
    all.extend_from_slice(args);
    Scenario::spawn("python3", &[], &all)
}

/// `k` clients connected to 127.0.0.1:`port`, closing when told (`close`).
struct Clients(Scenario);

impl Clients {
    fn connect(port: u16, k: usize) -> Clients {
        let to = format!("127.0.0.1:{port}");
        let ks = k.to_string();
        let mut c = Scenario::spawn(
            SCENARIO,
            &[],
            &["clients", "--to", &to, "--count", &ks, "--wait-stdin"],
        );
        c.expect("CONNECTED");
        Clients(c)
    }

    fn close(&mut self) {
        self.0.send_line();
        self.0.expect("DONE");
    }
}

/// Waits until ss shows exactly `want` (per pid) and `unheld` unheld CLOSE_WAIT sockets.
fn wait_ss(port: u16, want: &BTreeMap<u32, u64>, unheld: u64) {
    let end = Instant::now() + DEADLINE;
    loop {
        let (got, free, text) = ss_close_wait(port);
        if &got == want && free == unheld {
            return;
        }
        assert!(
            Instant::now() < end,
            "ss oracle: want {want:?} held and {unheld} unheld on port {port}, ss shows {got:?} and {free}:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `close_wait.count` of `pid` in a snapshot (0 when absent).
fn count(snap: &Value, pid: u32) -> u64 {
    process(snap, pid)
        .and_then(|p| u64_at(p, "close_wait.count"))
        .unwrap_or(0)
}

/// Waits for a snapshot where every pid of `want` has exactly its count, leaked as well, and
/// then checks that the ss oracle still agrees; returns the snapshot.
fn wait_counts(tt: &mut Tcptrace, port: u16, want: &BTreeMap<u32, u64>) -> Value {
    let w = want.clone();
    let snap = tt.wait_line_from(
        0,
        &format!("close_wait.count and leaked per pid == {want:?}"),
        move |v| {
            w.iter().all(|(&pid, &n)| {
                count(v, pid) == n
                    && process(v, pid)
                        .and_then(|p| u64_at(p, "close_wait.leaked"))
                        .unwrap_or(0)
                        == n
            })
        },
        |v| {
            want.keys()
                .map(|&p| describe_pid(v, p))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    let (now, _, text) = ss_close_wait(port);
    assert_eq!(&now, want, "ss changed meanwhile:\n{text}");
    snap
}

/// The holders tcptrace lists for `pid`'s CLOSE_WAIT sockets: (holder pid, fd) per socket.
fn holders(snap: &Value, pid: u32) -> Vec<Vec<(u64, u64)>> {
    let socks = process(snap, pid)
        .and_then(|p| at(p, "close_wait.sockets"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    socks
        .iter()
        .map(|s| {
            s["holders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| (h["pid"].as_u64().unwrap(), h["fd"].as_u64().unwrap()))
                .collect()
        })
        .collect()
}

fn comm(snap: &Value, pid: u32) -> String {
    process(snap, pid)
        .and_then(|p| p["comm"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn prefork_workers_are_named_not_their_parent() {
    require_root!("prefork_workers_are_named_not_their_parent");
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let mut srv = server(&["prefork", "3", "2"]);
    let port = srv.ready_port();
    let parent = srv.pid();
    let mut clients = Clients::connect(port, 6);
    let workers: Vec<u32> = (0..3)
        .map(|_| srv.expect("HELD").parse().unwrap())
        .collect();
    clients.close();
    let want: BTreeMap<u32, u64> = workers.iter().map(|&w| (w, 2)).collect();
    wait_ss(port, &want, 0);
    let snap = wait_counts(&mut tt, port, &want);
    assert_eq!(count(&snap, parent), 0, "{}", describe_pid(&snap, parent));
    for &w in &workers {
        let hs = holders(&snap, w);
        assert_eq!(hs.len(), 2, "{}", describe_pid(&snap, w));
        assert!(
            hs.iter().all(|h| h.len() == 1 && h[0].0 == w as u64),
            "each socket held by worker {w} alone: {hs:?}"
        );
    }
}

/// A process accepts `k` connections and hands each to a child (`mode` fork or exec), closing
/// its own copy: each child is blamed for exactly one socket, under `child_comm`.
fn hand_off_to_children(mode: &str, child_comm: &str) {
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let mut srv = server(&[mode, "2"]);
    let port = srv.ready_port();
    let parent = srv.pid();
    let mut clients = Clients::connect(port, 2);
    let kids: Vec<u32> = (0..2)
        .map(|_| srv.expect("CHILD").parse().unwrap())
        .collect();
    srv.expect("HANDED");
    clients.close();
    let want: BTreeMap<u32, u64> = kids.iter().map(|&k| (k, 1)).collect();
    wait_ss(port, &want, 0);
    let snap = wait_counts(&mut tt, port, &want);
    assert_eq!(count(&snap, parent), 0, "{}", describe_pid(&snap, parent));
    for &k in &kids {
        assert_eq!(comm(&snap, k), child_comm, "{}", describe_pid(&snap, k));
    }
}

#[test]
fn fork_hand_off_blames_the_child() {
    require_root!("fork_hand_off_blames_the_child");
    hand_off_to_children("fork", "python3");
}

#[test]
fn fork_exec_hand_off_blames_the_new_program() {
    require_root!("fork_exec_hand_off_blames_the_new_program");
    hand_off_to_children("exec", "sleep");
}

/// Processes killed when dropped (children that outlive their parent).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

/// The parent that accepted and handed the sockets to its children exits: the children still
/// hold the leak, and are still blamed for it.
#[test]
fn a_parent_that_exits_does_not_take_its_childrens_leak_along() {
    require_root!("a_parent_that_exits_does_not_take_its_childrens_leak_along");
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let mut srv = server(&["orphan", "2"]);
    let port = srv.ready_port();
    let mut clients = Clients::connect(port, 2);
    let kids: Vec<u32> = (0..2)
        .map(|_| srv.expect("CHILD").parse().unwrap())
        .collect();
    let _reap = KillOnDrop(kids.clone());
    srv.expect("HANDED");
    clients.close();
    let want: BTreeMap<u32, u64> = kids.iter().map(|&k| (k, 1)).collect();
    wait_ss(port, &want, 0);
    wait_counts(&mut tt, port, &want);
    let parent = srv.pid();
    srv.proc.stop(Duration::from_secs(2));
    // Well after the parent is gone (it is marked exited within a second): still theirs.
    let n = tt.count();
    tt.wait_line_from(
        n + 3,
        "three snapshots after the parent exited",
        |_| true,
        |v| v.to_string(),
    );
    wait_ss(port, &want, 0);
    let snap = wait_counts(&mut tt, port, &want);
    assert_eq!(count(&snap, parent), 0, "{}", describe_pid(&snap, parent));
}

#[test]
fn scm_rights_hand_off_blames_the_receiver() {
    require_root!("scm_rights_hand_off_blames_the_receiver");
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let dir = tempdir("scm");
    let path = dir.0.join("fds.sock");
    let path_s = path.to_str().unwrap();
    let mut rcv = server(&["receiver", path_s]);
    rcv.expect("READY");
    let mut srv = server(&["scm", "3", path_s]);
    let port = srv.ready_port();
    let mut clients = Clients::connect(port, 3);
    srv.expect("HANDED");
    rcv.expect("GOT 3");
    clients.close();
    let want = BTreeMap::from([(rcv.pid(), 3)]);
    wait_ss(port, &want, 0);
    let snap = wait_counts(&mut tt, port, &want);
    assert_eq!(
        count(&snap, srv.pid()),
        0,
        "{}",
        describe_pid(&snap, srv.pid())
    );
}

#[test]
fn a_shared_socket_lists_both_holders() {
    require_root!("a_shared_socket_lists_both_holders");
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let mut srv = server(&["shared"]);
    let port = srv.ready_port();
    let parent = srv.pid();
    let mut clients = Clients::connect(port, 1);
    let child: u32 = srv.expect("CHILD").parse().unwrap();
    clients.close();
    let want = BTreeMap::from([(parent, 1), (child, 1)]);
    wait_ss(port, &want, 0);
    let snap = wait_counts(&mut tt, port, &want);
    for pid in [parent, child] {
        let hs = holders(&snap, pid);
        let pids: Vec<u64> = hs.iter().flatten().map(|h| h.0).collect();
        assert_eq!(hs.len(), 1, "{}", describe_pid(&snap, pid));
        assert_eq!(
            pids,
            vec![parent.min(child) as u64, parent.max(child) as u64],
            "both processes listed as holders of the one socket"
        );
        // The same descriptor number in both (inherited by fork).
        assert_eq!(hs[0][0].1, hs[0][1].1, "{hs:?}");
    }
}

#[test]
fn unaccepted_sockets_are_accept_backlog() {
    require_root!("unaccepted_sockets_are_accept_backlog");
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let srv = {
        let mut s = server(&["backlog"]);
        let port = s.ready_port();
        (s, port)
    };
    let (srv, port) = srv;
    let pid = srv.pid();
    let mut clients = Clients::connect(port, 3);
    clients.close();
    wait_ss(port, &BTreeMap::new(), 3);
    let snap = tt.wait_line("unaccepted == 3", |v| {
        process(v, pid).is_some_and(|p| u64_at(p, "close_wait.unaccepted") == Some(3))
    });
    let p = process(&snap, pid).unwrap();
    assert_eq!(u64_at(p, "close_wait.count"), Some(0), "{p}");
    assert_eq!(u64_at(p, "close_wait.leaked"), Some(0), "{p}");
    let socks = at(p, "close_wait.sockets")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(socks.len(), 3, "{p}");
    assert!(socks.iter().all(|s| s["unaccepted"] == true), "{p}");
}

/// gunicorn, a real prefork server: 3 sync workers, a handler slower than its clients. Each
/// worker holds the one connection it accepted; the rest wait in the listen queue. Every pid's
/// count equals ss's, the master holds none and owns the unaccepted ones.
#[test]
fn gunicorn_prefork_matches_ss() {
    require_root!("gunicorn_prefork_matches_ss");
    let dir = tempdir("gunicorn");
    std::fs::write(
        dir.0.join("slowapp.py"),
        "import time\n\ndef app(environ, start_response):\n    time.sleep(600)\n    \
         start_response('200 OK', [])\n    return [b'late']\n",
    )
    .unwrap();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let mut child = Command::new("python3")
        .args([
            "-m",
            "gunicorn",
            "--workers",
            "3",
            "--timeout",
            "300",
            "--bind",
            &bind,
            "--chdir",
            dir.0.to_str().unwrap(),
            "slowapp:app",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gunicorn (cargo xtask setup installs it)");
    let stderr = Captured::default();
    stderr.collect(child.stderr.take().unwrap());
    let gunicorn = WithChildren(Guarded {
        name: "gunicorn".into(),
        child,
        stderr,
    });
    let gunicorn = &gunicorn.0;
    let master = gunicorn.pid();
    // Ready once 3 workers were booted.
    let end = Instant::now() + DEADLINE;
    while gunicorn.stderr.text().matches("Booting worker").count() < 3 {
        assert!(
            Instant::now() < end,
            "gunicorn did not boot 3 workers:\n{}",
            gunicorn.stderr.tail(3000)
        );
        thread::sleep(Duration::from_millis(50));
    }
    // 5 requests whose clients give up: 3 are taken by the workers, 2 stay queued.
    let mut conns = Vec::new();
    for _ in 0..5 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&bind).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        conns.push(s);
    }
    let end = Instant::now() + DEADLINE;
    // Every worker has taken one (ss shows 3 established sockets held by 3 pids).
    loop {
        let text = run(
            "ss",
            &[
                "-tanpH",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ],
        );
        if text.lines().filter(|l| l.contains("pid=")).count() == 3 {
            break;
        }
        assert!(Instant::now() < end, "workers did not accept:\n{text}");
        thread::sleep(Duration::from_millis(50));
    }
    drop(conns);
    let end = Instant::now() + DEADLINE;
    let (want, unheld) = loop {
        let (by_pid, unheld, text) = ss_close_wait(port);
        if by_pid.values().sum::<u64>() == 3 && unheld == 2 {
            break (by_pid, unheld);
        }
        assert!(Instant::now() < end, "ss: not 3 held + 2 queued:\n{text}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(want.len(), 3, "one socket per worker: {want:?}");
    assert!(!want.contains_key(&master), "the master accepts nothing");
    let snap = wait_counts(&mut tt, port, &want);
    assert_eq!(count(&snap, master), 0, "{}", describe_pid(&snap, master));
    let snap = tt.wait_line("the master's 2 unaccepted", |v| {
        process(v, master).is_some_and(|p| u64_at(p, "close_wait.unaccepted") == Some(unheld))
    });
    let _ = snap;
}

/// A process whose children are killed before it (gunicorn's workers would otherwise finish
/// their slow request first).
struct WithChildren(Guarded);

impl Drop for WithChildren {
    fn drop(&mut self) {
        let pid = self.0.pid();
        if let Ok(kids) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for k in kids
                .split_ascii_whitespace()
                .filter_map(|k| k.parse::<i32>().ok())
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(k, libc::SIGKILL) };
            }
        }
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    let p = std::env::temp_dir().join(format!("tcptrace-holders-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
