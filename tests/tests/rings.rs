//! Real-kernel tests of delivery through one ring buffer per CPU: one socket's transitions made
//! on two CPUs come out of `tcptrace watch --events` (and into the table) in the order they
//! happened.
//!
//! ```text
//! TCPTRACE_BIN=target/release/tcptrace cargo test --release -p tcptrace-tests --test rings -- --nocapture
//! ```

use std::{
    collections::HashMap,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcptrace_tests::{DEADLINE, Tcptrace, require_root};

const CROSS_CPU: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cross_cpu.py");

fn transition(e: &Value) -> Option<(String, String, String)> {
    (e.get("type")?.as_str()? == "state").then(|| {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        (
            s("local"),
            s("remote"),
            format!("{}>{}", s("old"), s("new")),
        )
    })
}

#[test]
fn one_sockets_transitions_on_two_cpus_come_out_in_order() {
    require_root!("one_sockets_transitions_on_two_cpus_come_out_in_order");
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        println!(
            "SKIP one_sockets_transitions_on_two_cpus_come_out_in_order: needs 2 CPUs, this machine has {cpus}"
        );
        return;
    }
    const N: usize = 300;
    let mut tt = Tcptrace::start(&["watch", "--events", "--json"]);
    // The first line comes once the programs are attached: wait for any traffic of our own.
    let warm = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let warm_at = warm.local_addr().unwrap().to_string();
    let end = Instant::now() + DEADLINE;
    while !tt
        .values()
        .iter()
        .filter_map(transition)
        .any(|(l, _, _)| l == warm_at)
    {
        let c = std::net::TcpStream::connect(&warm_at).unwrap();
        drop((c, warm.accept().unwrap()));
        thread::sleep(Duration::from_millis(100));
        assert!(
            Instant::now() < end,
            "no event for {warm_at}\n{}",
            tt.context()
        );
    }

    let out = Command::new("python3")
        .args([CROSS_CPU, &N.to_string()])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "cross_cpu.py: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let server = format!("127.0.0.1:{}", lines.next().unwrap());
    let clients: Vec<String> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    assert_eq!(clients.len(), N);

    // Every connection: the client's socket and the server's, each transition once, in order.
    let client_seq = [
        "SYN_SENT>ESTABLISHED",
        "ESTABLISHED>CLOSE_WAIT",
        "CLOSE_WAIT>LAST_ACK",
        "LAST_ACK>CLOSE",
    ];
    let server_seq = [
        "LISTEN>SYN_RECV",
        "SYN_RECV>ESTABLISHED",
        "ESTABLISHED>FIN_WAIT1",
        "FIN_WAIT1>FIN_WAIT2",
        "FIN_WAIT2>CLOSE",
    ];
    let collect = |tt: &Tcptrace| {
        let mut by_socket: HashMap<(String, String), Vec<String>> = HashMap::new();
        for (l, r, t) in tt.values().iter().filter_map(transition) {
            if l == server || r == server {
                by_socket.entry((l, r)).or_default().push(t);
            }
        }
        by_socket
    };
    let end = Instant::now() + DEADLINE;
    loop {
        let got = collect(&tt);
        let done = clients.iter().all(|c| {
            got.get(&(c.clone(), server.clone()))
                .is_some_and(|v| v.len() >= client_seq.len())
                && got
                    .get(&(server.clone(), c.clone()))
                    .is_some_and(|v| v.len() >= server_seq.len())
        });
        if done || Instant::now() >= end {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    // A moment more, for anything late or duplicated.
    thread::sleep(Duration::from_millis(500));
    let got = collect(&tt);
    let mut wrong = Vec::new();
    for c in &clients {
        let cs = got
            .get(&(c.clone(), server.clone()))
            .cloned()
            .unwrap_or_default();
        if cs != client_seq {
            wrong.push(format!("client {c}: {cs:?}"));
        }
        let ss = got
            .get(&(server.clone(), c.clone()))
            .cloned()
            .unwrap_or_default();
        if ss != server_seq {
            wrong.push(format!("server side of {c}: {ss:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} sockets ({N} connections) out of order or incomplete, e.g.:\n{}\n{}",
        wrong.len(),
        2 * N,
        wrong[..wrong.len().min(6)].join("\n"),
        tt.context()
    );
}

/// The nice value of `pid`'s thread named `comm`, from /proc (the 19th field of its stat, after
/// the parenthesised name).
fn thread_nice(pid: u32, comm: &str) -> Option<i64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let dir = task.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim_end() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        // Fields from the 3rd (state) on: the nice value is the 19th overall.
        return after.split(' ').nth(19 - 3)?.parse().ok();
    }
    None
}

#[test]
fn the_ring_reader_runs_raised_and_says_so_when_it_cannot() {
    require_root!("the_ring_reader_runs_raised_and_says_so_when_it_cannot");
    // As root: the reader thread alone at nice -10, the others at the default 0, no warning.
    let (mut tt, _) = Tcptrace::watch(&[]);
    let pid = tt.proc.pid();
    assert_eq!(
        thread_nice(pid, "tcptrace-reader"),
        Some(-10),
        "{}",
        tt.context()
    );
    assert_eq!(
        thread_nice(pid, "tcptrace-upkeep"),
        Some(0),
        "{}",
        tt.context()
    );
    assert_eq!(thread_nice(pid, "tcptrace"), Some(0), "{}", tt.context());
    tt.proc.stop(Duration::from_secs(5));
    let err = tt.proc.stderr.text();
    assert!(!err.contains("normal priority"), "{err}");

    // Without CAP_SYS_NICE (dropped from the bounding set, so not regained at exec): the reader
    // stays at 0 and a start-up warning says why and what it costs; tracing goes on.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-sys_nice", "--"])
        .arg(tcptrace_tests::tcptrace_bin())
        .args(["watch", "--json", "--duration", "1"])
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        err.contains(
            "tcptrace: warning: the ring reader runs at normal priority (setpriority -10:"
        ) && err.contains("CAP_SYS_NICE"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).lines().count() >= 1,
        "{out:?}"
    );
}
