//! The table fed synthetic event sequences: no kernel, no root.

use std::sync::{Arc, Mutex};

use super::*;
use crate::kernel::event::OwnerSource;
use crate::kernel::event::{Owner, TcpEvent, TcpState};
use rustc_hash::FxHashMap as HashMap;
use snapshot::ProcessView;
use std::net::SocketAddr;
use table::NS;

const S: u64 = NS;

/// pid -> (start time, comm); shared so a test can make processes exit or pids be reused.
#[derive(Clone, Default)]
struct FakeProcs(Arc<Mutex<HashMap<u32, (u64, String)>>>);

impl FakeProcs {
    fn set(&self, pid: u32, start: u64, comm: &str) {
        self.0.lock().unwrap().insert(pid, (start, comm.into()));
    }
    fn kill(&self, pid: u32) {
        self.0.lock().unwrap().remove(&pid);
    }
}

impl ProcSource for FakeProcs {
    fn start_time(&mut self, pid: u32) -> Option<u64> {
        self.0.lock().unwrap().get(&pid).map(|p| p.0)
    }
    fn meta(&mut self, pid: u32) -> Option<ProcMeta> {
        self.0.lock().unwrap().get(&pid).map(|p| ProcMeta {
            comm: p.1.clone(),
            cmdline: format!("/usr/bin/{}", p.1),
            ..Default::default()
        })
    }
}

fn table(procs: &FakeProcs) -> Table {
    Table::new(
        TableConfig {
            leak_after_ns: 5 * S,
            ..Default::default()
        },
        Box::new(procs.clone()),
    )
}

fn owner(pid: u32, source: OwnerSource) -> Option<Owner> {
    Some(Owner {
        pid,
        cgroup: 0,
        comm: [0; 16],
        source,
    })
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn st(
    ts: u64,
    sk: u64,
    old: TcpState,
    new: TcpState,
    local: &str,
    remote: &str,
    owner: Option<Owner>,
) -> TcpEvent {
    st_at(ts, (sk, old, new, a(local), a(remote), owner))
}

/// One transition for the tests: socket, both states, local and remote address, owner.
type Transition = (
    u64,
    TcpState,
    TcpState,
    SocketAddr,
    SocketAddr,
    Option<Owner>,
);

/// [`st`] with addresses already parsed.
fn st_at(ts: u64, (sk, old, new, local, remote, owner): Transition) -> TcpEvent {
    TcpEvent::State {
        ts_ns: ts,
        sk,
        old,
        new,
        local,
        remote,
        owner,
        netns: 0,
    }
}

fn snap(t: &Table, now: u64) -> Snapshot {
    t.snapshot(now, &SnapshotOptions::default())
}

fn proc_view(s: &Snapshot, pid: u32) -> &ProcessView {
    s.processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} missing from {s:#?}"))
}

use TcpState::*;

/// A server (pid 10) listening on `srv`, accepting one connection from `cli` that the peer closes.
fn accepted_then_peer_closes(t: &mut Table, sk: u64, ts: u64, srv: &str, cli: &str) {
    let inh = owner(10, OwnerSource::Inherited);
    let rec = owner(10, OwnerSource::Recorded);
    t.apply(&st(ts, sk, Listen, SynRecv, srv, cli, inh));
    t.apply(&st(ts, sk, SynRecv, Established, srv, cli, rec));
    t.apply(&st(ts, sk, Established, CloseWait, srv, cli, rec));
}

#[test]
fn leak_appears_after_threshold_and_disappears_when_the_app_closes() {
    let procs = FakeProcs::default();
    procs.set(10, 111, "server");
    let mut t = table(&procs);
    t.apply(&st(
        0,
        1,
        Close,
        Listen,
        "127.0.0.1:8080",
        "0.0.0.0:0",
        owner(10, OwnerSource::Current),
    ));
    for i in 0..3 {
        let cli = format!("127.0.0.1:{}", 40000 + i);
        accepted_then_peer_closes(&mut t, 100 + i, S, "127.0.0.1:8080", &cli);
    }
    let s = snap(&t, 3 * S);
    assert!(
        s.destinations.is_empty(),
        "clients are not destinations: {:?}",
        s.destinations
    );
    let p = proc_view(&s, 10);
    assert_eq!((p.close_wait.count, p.close_wait.leaked), (3, 0));
    assert_eq!(p.close_wait.oldest_secs, 2.0);
    assert_eq!(s.host.close_wait, 3);
    assert_eq!(s.host.listen, 1);

    let s = snap(&t, 7 * S);
    let p = proc_view(&s, 10);
    assert_eq!((p.close_wait.count, p.close_wait.leaked), (3, 3));
    assert_eq!(p.close_wait.oldest_secs, 6.0);
    assert_eq!(p.close_wait.remotes.len(), 3);

    // The application finally closes two of them.
    let cur = owner(10, OwnerSource::Recorded);
    for sk in [100, 101] {
        let cli = format!("127.0.0.1:{}", 40000 + sk - 100);
        t.apply(&st(
            8 * S,
            sk,
            CloseWait,
            LastAck,
            "127.0.0.1:8080",
            &cli,
            cur,
        ));
        t.apply(&st(8 * S, sk, LastAck, Close, "127.0.0.1:8080", &cli, cur));
    }
    let s = snap(&t, 9 * S);
    let p = proc_view(&s, 10);
    assert_eq!((p.close_wait.count, p.close_wait.leaked), (1, 1));
    assert_eq!(p.churn.closed_total, 2);
    assert_eq!(
        p.churn.time_wait_total, 0,
        "passive close leaves no TIME_WAIT"
    );
    assert_eq!(s.host.close_wait, 1);
}

#[test]
fn accepted_socket_without_kernel_owner_takes_the_listeners_owner() {
    let procs = FakeProcs::default();
    procs.set(10, 111, "server");
    let mut t = table(&procs);
    t.apply(&st(
        0,
        1,
        Close,
        Listen,
        "[::]:9000",
        "[::]:0",
        owner(10, OwnerSource::Current),
    ));
    // The kernel lost the owner (e.g. LRU eviction): no owner on any event.
    t.apply(&st(
        S,
        2,
        Listen,
        SynRecv,
        "[::1]:9000",
        "[::1]:50000",
        None,
    ));
    t.apply(&st(
        S,
        2,
        SynRecv,
        Established,
        "[::1]:9000",
        "[::1]:50000",
        None,
    ));
    t.apply(&st(
        S,
        2,
        Established,
        CloseWait,
        "[::1]:9000",
        "[::1]:50000",
        None,
    ));
    assert_eq!(
        t.close_wait_sockets(),
        vec![(a("[::1]:9000"), a("[::1]:50000"), Some(10))]
    );
}

#[test]
fn ipv6_leak() {
    let procs = FakeProcs::default();
    procs.set(10, 111, "server");
    let mut t = table(&procs);
    for i in 0..2 {
        let cli = format!("[::1]:{}", 50000 + i);
        accepted_then_peer_closes(&mut t, 200 + i, 0, "[::1]:9000", &cli);
    }
    let s = snap(&t, 6 * S);
    let p = proc_view(&s, 10);
    assert_eq!((p.close_wait.count, p.close_wait.leaked), (2, 2));
    assert_eq!(p.close_wait.remotes[0].remote, "[::1]:50000");
    let s = t.snapshot(
        6 * S,
        &SnapshotOptions {
            detail: true,
            ..Default::default()
        },
    );
    let socks = proc_view(&s, 10).close_wait.sockets.clone().unwrap();
    assert_eq!(socks.len(), 2);
    assert_eq!(socks[0].local, "[::1]:9000");
    assert_eq!(socks[0].age_secs, 6.0);
}

#[test]
fn pid_reuse_makes_a_new_process_and_keeps_the_old_totals() {
    let procs = FakeProcs::default();
    procs.set(20, 1000, "old");
    let mut t = table(&procs);
    let o = owner(20, OwnerSource::Current);
    let r = owner(20, OwnerSource::Recorded);
    t.apply(&st(0, 1, Close, SynSent, "127.0.0.1:0", "127.0.0.1:80", o));
    t.apply(&st(
        0,
        1,
        SynSent,
        Established,
        "127.0.0.1:40000",
        "127.0.0.1:80",
        r,
    ));
    t.apply(&st(
        0,
        1,
        Established,
        Close,
        "127.0.0.1:40000",
        "127.0.0.1:80",
        r,
    ));

    // pid 20 exits and is reused by another program.
    procs.set(20, 2000, "new");
    t.tick(S);
    t.apply(&st(
        2 * S,
        2,
        Close,
        SynSent,
        "127.0.0.1:0",
        "127.0.0.1:81",
        o,
    ));
    t.apply(&st(
        2 * S,
        2,
        SynSent,
        Established,
        "127.0.0.1:40001",
        "127.0.0.1:81",
        r,
    ));

    let s = snap(&t, 3 * S);
    let ps: Vec<_> = s.processes.iter().filter(|p| p.pid == 20).collect();
    assert_eq!(ps.len(), 2, "{ps:#?}");
    let old = ps.iter().find(|p| p.start_time == 1000).unwrap();
    let new = ps.iter().find(|p| p.start_time == 2000).unwrap();
    assert!(old.exited && !new.exited);
    assert_eq!(
        (old.comm.as_str(), old.connects.ok, old.churn.closed_total),
        ("old", 1, 1)
    );
    assert_eq!(
        (new.comm.as_str(), new.connects.ok, new.churn.closed_total),
        ("new", 1, 0)
    );

    // A late event of a process that has exited stays with it.
    procs.set(21, 500, "late");
    t.apply(&st(
        3 * S,
        3,
        Close,
        SynSent,
        "127.0.0.1:0",
        "127.0.0.1:82",
        owner(21, OwnerSource::Current),
    ));
    procs.kill(21);
    t.tick(4 * S);
    let r21 = owner(21, OwnerSource::Recorded);
    t.apply(&st(
        4 * S,
        3,
        SynSent,
        Established,
        "127.0.0.1:40002",
        "127.0.0.1:82",
        r21,
    ));
    let s = snap(&t, 4 * S);
    let late: Vec<_> = s.processes.iter().filter(|p| p.pid == 21).collect();
    assert_eq!(late.len(), 1, "{late:#?}");
    assert_eq!((late[0].exited, late[0].connects.ok), (true, 1));

    // After the linger time the exited one leaves the view; its totals stay counted.
    t.tick(40 * S);
    let s = snap(&t, 40 * S);
    assert_eq!(s.processes.iter().filter(|p| p.pid == 20).count(), 1);
    assert_eq!(s.exited.processes, 2);
    assert_eq!(s.exited.connects_ok, 2);
    assert_eq!(s.exited.closed_total, 1);
}

#[test]
fn eaddrnotavail_is_counted_for_the_pid_and_destination() {
    let procs = FakeProcs::default();
    procs.set(30, 1, "client");
    let mut t = table(&procs);
    let o = owner(30, OwnerSource::Current);
    let dst = "127.0.0.1:5555";
    for sk in 1..=3u64 {
        // SYN_SENT -> CLOSE in process context with sport 0, then connect() returns -99.
        t.apply(&st(S, sk, Close, SynSent, "127.0.0.1:0", dst, o));
        t.apply(&st(S, sk, SynSent, Close, "127.0.0.1:0", dst, o));
        t.apply(&TcpEvent::Connect {
            ts_ns: S,
            sk,
            remote: a(dst),
            ret: -99,
            owner: o.unwrap(),
            netns: 0,
        });
    }
    let s = snap(&t, 2 * S);
    let p = proc_view(&s, 30);
    assert_eq!(p.connects.failed.get("EADDRNOTAVAIL"), Some(&3));
    assert_eq!(p.connects.ok, 0);
    assert_eq!(
        p.churn.closed_total, 0,
        "a failed connect is not a closed connection"
    );
    assert_eq!(p.destinations[0].remote, dst);
    assert_eq!(
        p.destinations[0].connects.failed.get("EADDRNOTAVAIL"),
        Some(&3)
    );
    assert_eq!(
        s.destinations[0].connects_failed.get("EADDRNOTAVAIL"),
        Some(&3)
    );
}

#[test]
fn refused_connects_count_once_blocking_and_non_blocking() {
    let procs = FakeProcs::default();
    procs.set(40, 1, "blocking");
    procs.set(41, 1, "nonblock");
    let mut t = table(&procs);
    let dst = "127.0.0.1:1";
    // Blocking: close, error report, then connect() returns -111.
    let o = owner(40, OwnerSource::Current);
    t.apply(&st(S, 1, Close, SynSent, "127.0.0.1:0", dst, o));
    t.apply(&st(S, 1, SynSent, Close, "127.0.0.1:40000", dst, o));
    t.apply(&TcpEvent::Error {
        ts_ns: S,
        local: a("127.0.0.1:40000"),
        remote: a(dst),
        errno: 111,
    });
    t.apply(&TcpEvent::Connect {
        ts_ns: S,
        sk: 1,
        remote: a(dst),
        ret: -111,
        owner: o.unwrap(),
        netns: 0,
    });
    // Non-blocking: connect() returns -115, later close + error report (+ a second report of 0).
    let o = owner(41, OwnerSource::Current);
    t.apply(&st(S, 2, Close, SynSent, "127.0.0.1:0", dst, o));
    t.apply(&TcpEvent::Connect {
        ts_ns: S,
        sk: 2,
        remote: a(dst),
        ret: -115,
        owner: o.unwrap(),
        netns: 0,
    });
    t.apply(&st(S, 2, SynSent, Close, "127.0.0.1:40001", dst, None));
    for errno in [111, 0] {
        t.apply(&TcpEvent::Error {
            ts_ns: S,
            local: a("127.0.0.1:40001"),
            remote: a(dst),
            errno,
        });
    }
    // The application asks again with connect(): not a new failure.
    t.apply(&TcpEvent::Connect {
        ts_ns: S,
        sk: 0,
        remote: a(dst),
        ret: -111,
        owner: o.unwrap(),
        netns: 0,
    });
    let s = snap(&t, 2 * S);
    for pid in [40, 41] {
        let p = proc_view(&s, pid);
        assert_eq!(p.connects.failed.get("ECONNREFUSED"), Some(&1), "pid {pid}");
        assert_eq!(p.connects.failed.len(), 1);
    }
}

#[test]
fn non_blocking_refusal_inside_the_connect_call_counts_once() {
    // On loopback the refusal arrives before connect() returns -EINPROGRESS: close, error
    // report, then the syscall's return.
    let procs = FakeProcs::default();
    procs.set(44, 1, "nb");
    let mut t = table(&procs);
    let dst = "127.0.0.1:9";
    let o = owner(44, OwnerSource::Current);
    for (i, sk) in [(0u16, 11u64), (1, 12), (2, 13)] {
        let local = format!("127.0.0.1:{}", 40000 + i);
        t.apply(&st(S, sk, Close, SynSent, "127.0.0.1:0", dst, o));
        t.apply(&st(S, sk, SynSent, Close, &local, dst, o));
        t.apply(&TcpEvent::Error {
            ts_ns: S,
            local: a(&local),
            remote: a(dst),
            errno: 111,
        });
        t.apply(&TcpEvent::Connect {
            ts_ns: S,
            sk,
            remote: a(dst),
            ret: -115,
            owner: o.unwrap(),
            netns: 0,
        });
    }
    let s = snap(&t, 2 * S);
    let p = proc_view(&s, 44);
    assert_eq!(p.connects.failed.get("ECONNREFUSED"), Some(&3));
    assert_eq!(
        p.destinations[0].connects.failed.get("ECONNREFUSED"),
        Some(&3)
    );
}

#[test]
fn error_report_before_close_matches_a_connect_in_flight() {
    let procs = FakeProcs::default();
    procs.set(42, 1, "nb");
    let mut t = table(&procs);
    let dst = "10.0.0.1:443";
    let o = owner(42, OwnerSource::Current);
    t.apply(&st(S, 7, Close, SynSent, "10.0.0.2:0", dst, o));
    t.apply(&TcpEvent::Connect {
        ts_ns: S,
        sk: 7,
        remote: a(dst),
        ret: -115,
        owner: o.unwrap(),
        netns: 0,
    });
    t.apply(&TcpEvent::Error {
        ts_ns: 2 * S,
        local: a("10.0.0.2:40000"),
        remote: a(dst),
        errno: 110,
    });
    t.apply(&st(2 * S, 7, SynSent, Close, "10.0.0.2:40000", dst, o));
    let s = snap(&t, 3 * S);
    assert_eq!(proc_view(&s, 42).connects.failed.get("ETIMEDOUT"), Some(&1));
}

#[test]
fn early_failure_without_state_change_is_counted() {
    let procs = FakeProcs::default();
    procs.set(43, 1, "c");
    let mut t = table(&procs);
    t.apply(&TcpEvent::Connect {
        ts_ns: S,
        sk: 0,
        remote: a("10.9.9.9:80"),
        ret: -101,
        owner: owner(43, OwnerSource::Current).unwrap(),
        netns: 0,
    });
    let s = snap(&t, 2 * S);
    assert_eq!(
        proc_view(&s, 43).connects.failed.get("ENETUNREACH"),
        Some(&1)
    );
}

#[test]
fn churn_counts_closes_time_wait_and_rate() {
    let procs = FakeProcs::default();
    procs.set(50, 1, "churner");
    let mut t = table(&procs);
    let o = owner(50, OwnerSource::Current);
    let r = owner(50, OwnerSource::Recorded);
    let dst = "127.0.0.1:80";
    // 10 connections per second for 6 seconds; even ones close actively with FIN (TIME_WAIT),
    // odd ones with RST.
    let mut sk = 1000;
    for sec in 0..6u64 {
        for i in 0..10u64 {
            sk += 1;
            let ts = sec * S + i * 1000;
            let local = format!("127.0.0.1:{}", 30000 + sk);
            t.apply(&st(ts, sk, Close, SynSent, "127.0.0.1:0", dst, o));
            t.apply(&st(ts, sk, SynSent, Established, &local, dst, r));
            if sk % 2 == 0 {
                t.apply(&st(ts, sk, Established, FinWait1, &local, dst, o));
                t.apply(&st(ts, sk, FinWait1, FinWait2, &local, dst, r));
                t.apply(&st(ts, sk, FinWait2, Close, &local, dst, r));
            } else {
                t.apply(&st(ts, sk, Established, Close, &local, dst, o));
            }
        }
    }
    // Seconds 1 to 5: 50 closes in the 5-second window.
    let s = snap(&t, 6 * S - 1);
    let p = proc_view(&s, 50);
    assert_eq!(p.connects.ok, 60);
    assert_eq!(p.churn.closed_total, 60);
    assert_eq!(p.churn.time_wait_total, 30);
    assert_eq!(p.churn.time_wait, 30);
    assert_eq!(p.churn.closed_per_sec, 10.0);
    assert_eq!(s.host.time_wait, 30);
    assert_eq!(
        p.destinations[0].ports_in_use, 30,
        "TIME_WAIT holds the port"
    );
    assert_eq!(s.destinations[0].remote, dst);
    assert_eq!(s.destinations[0].ports_in_use, 30);
    assert_eq!(s.destinations[0].connects_ok, 60);

    // A new connection on a pair in TIME_WAIT (tcp_tw_reuse) ends that TIME_WAIT.
    let local = format!("127.0.0.1:{}", 30000 + 1002);
    t.apply(&st(6 * S, 9999, Close, SynSent, "127.0.0.1:0", dst, o));
    t.apply(&st(6 * S, 9999, SynSent, Established, &local, dst, r));
    let s = snap(&t, 6 * S);
    assert_eq!(s.host.time_wait, 29);
    assert_eq!(proc_view(&s, 50).churn.time_wait, 29);
    t.apply(&st(6 * S, 9999, Established, Close, &local, dst, o));

    // TIME_WAIT lasts 60 s.
    t.tick(70 * S);
    let s = snap(&t, 70 * S);
    assert_eq!(s.host.time_wait, 0);
    let p = proc_view(&s, 50);
    assert_eq!((p.churn.time_wait, p.churn.time_wait_total), (0, 30));
    assert_eq!(p.churn.closed_per_sec, 0.0);
}

#[test]
fn existing_sockets_are_reported_at_once_and_adopted_by_address() {
    let procs = FakeProcs::default();
    procs.set(60, 1, "legacy");
    let mut t = table(&procs);
    let existing = vec![
        ExistingSocket {
            age_ns: None,
            netns: 0,
            local: a("127.0.0.1:7000"),
            remote: a("0.0.0.0:0"),
            state: Listen,
            pid: Some(60),
        },
        ExistingSocket {
            age_ns: None,
            netns: 0,
            local: a("127.0.0.1:7000"),
            remote: a("127.0.0.1:45000"),
            state: CloseWait,
            pid: Some(60),
        },
        ExistingSocket {
            age_ns: None,
            netns: 0,
            local: a("127.0.0.1:7000"),
            remote: a("127.0.0.1:45001"),
            state: CloseWait,
            pid: None,
        },
        ExistingSocket {
            age_ns: None,
            netns: 0,
            local: a("127.0.0.1:45002"),
            remote: a("127.0.0.1:7000"),
            state: TimeWait,
            pid: None,
        },
    ];
    t.load_existing(&existing, 10 * S);
    let s = snap(&t, 10 * S);
    assert_eq!(proc_view(&s, 60).close_wait.count, 1);
    assert_eq!(s.host.close_wait, 2);
    assert_eq!(s.host.time_wait, 1);
    assert_eq!(s.host.total, 4);
    assert_eq!(
        t.unowned_close_wait(),
        vec![(a("127.0.0.1:7000"), a("127.0.0.1:45001"))]
    );
    t.assign_owners(&[(a("127.0.0.1:7000"), a("127.0.0.1:45001"), 60)], 10 * S);
    let s = snap(&t, 16 * S);
    let p = proc_view(&s, 60);
    assert_eq!((p.close_wait.count, p.close_wait.leaked), (2, 2));

    // The application closes one: the event carries a kernel address we never saw.
    let cur = owner(60, OwnerSource::Current);
    t.apply(&st(
        17 * S,
        0xabc,
        CloseWait,
        LastAck,
        "127.0.0.1:7000",
        "127.0.0.1:45000",
        cur,
    ));
    let s = snap(&t, 17 * S);
    assert_eq!(proc_view(&s, 60).close_wait.count, 1);
    assert_eq!(s.host.total, 4, "adopted, not duplicated");
    assert_eq!(t.stats().unknown_socket_events, 0);
}

#[test]
fn events_for_unknown_sockets_create_them() {
    let procs = FakeProcs::default();
    procs.set(70, 1, "x");
    let mut t = table(&procs);
    // A socket from another network namespace, missing from the start-up snapshot.
    t.apply(&st(
        S,
        0x77,
        Established,
        CloseWait,
        "10.1.1.1:80",
        "10.1.1.2:5000",
        owner(70, OwnerSource::Recorded),
    ));
    assert_eq!(t.stats().unknown_socket_events, 1);
    let s = snap(&t, 7 * S);
    assert_eq!(proc_view(&s, 70).close_wait.leaked, 1);
    // Unknown and ownerless: counted on the host, not attributed.
    t.apply(&st(
        S,
        0x78,
        FinWait1,
        FinWait2,
        "10.1.1.1:81",
        "10.1.1.2:5001",
        None,
    ));
    t.apply(&st(
        S,
        0x78,
        FinWait2,
        Close,
        "10.1.1.1:81",
        "10.1.1.2:5001",
        None,
    ));
    let s = snap(&t, 7 * S);
    assert_eq!(s.host.time_wait, 1);
    assert_eq!(s.host.close_wait, 1);
}

#[test]
fn filters_select_processes() {
    let procs = FakeProcs::default();
    procs.set(10, 1, "server");
    procs.set(11, 1, "other");
    let mut t = table(&procs);
    accepted_then_peer_closes(&mut t, 1, 0, "127.0.0.1:8080", "127.0.0.1:40000");
    let o = owner(11, OwnerSource::Current);
    t.apply(&st(0, 2, Close, SynSent, "127.0.0.1:0", "127.0.0.1:9", o));
    t.apply(&TcpEvent::Connect {
        ts_ns: 0,
        sk: 2,
        remote: a("127.0.0.1:9"),
        ret: -111,
        owner: o.unwrap(),
        netns: 0,
    });
    let pids = |f: Filter| -> Vec<u32> {
        t.snapshot(
            S,
            &SnapshotOptions {
                filter: f,
                ..Default::default()
            },
        )
        .processes
        .iter()
        .map(|p| p.pid)
        .collect()
    };
    assert_eq!(pids(Filter::default()), vec![11, 10]);
    assert_eq!(
        pids(Filter {
            pids: vec![10],
            ..Default::default()
        }),
        vec![10]
    );
    assert_eq!(
        pids(Filter {
            comms: vec!["other".into()],
            ..Default::default()
        }),
        vec![11]
    );
    assert_eq!(
        pids(Filter {
            ports: vec![8080],
            ..Default::default()
        }),
        vec![10]
    );
    assert_eq!(
        pids(Filter {
            ports: vec![9],
            ..Default::default()
        }),
        vec![11]
    );
    // -L: the server's local port; its peers' port is not local to it.
    assert_eq!(
        pids(Filter {
            local_ports: vec![8080],
            ..Default::default()
        }),
        vec![10]
    );
    assert_eq!(
        pids(Filter {
            local_ports: vec![40000],
            ..Default::default()
        }),
        Vec::<u32>::new()
    );
    // -D: the client's destination (a failed connect counts), the server's peer port.
    assert_eq!(
        pids(Filter {
            remote_ports: vec![9],
            ..Default::default()
        }),
        vec![11]
    );
    assert_eq!(
        pids(Filter {
            remote_ports: vec![40000],
            ..Default::default()
        }),
        vec![10]
    );
    // -4 / -6: every socket here is IPv4.
    assert_eq!(
        pids(Filter {
            family: Some(4),
            ..Default::default()
        }),
        vec![11, 10]
    );
    assert_eq!(
        pids(Filter {
            family: Some(6),
            ..Default::default()
        }),
        Vec::<u32>::new()
    );
}

#[test]
fn socket_filters_combine_family_and_ports() {
    let f = Filter {
        family: Some(6),
        local_ports: vec![443],
        ..Default::default()
    };
    let l6: SocketAddr = "[::1]:443".parse().unwrap();
    let r6: SocketAddr = "[::1]:50000".parse().unwrap();
    let mapped: SocketAddr = "[::ffff:10.0.0.1]:50000".parse().unwrap();
    assert!(f.socket_hit(Some(&l6), &r6));
    assert!(
        !f.socket_hit(Some(&l6), &mapped),
        "IPv4-mapped counts as IPv4"
    );
    assert!(
        !f.socket_hit(None, &r6),
        "no local port known: -L cannot pass"
    );
    let r4: SocketAddr = "10.0.0.1:5432".parse().unwrap();
    let g = Filter {
        family: Some(4),
        remote_ports: vec![5432],
        ..Default::default()
    };
    assert!(g.socket_hit(None, &r4));
    assert!(g.socket_hit(
        None,
        &mapped.to_string().replace("50000", "5432").parse().unwrap()
    ));
    assert!(!g.socket_hit(None, &"10.0.0.1:5433".parse().unwrap()));
}

#[test]
fn time_wait_is_capped_like_the_kernel() {
    let procs = FakeProcs::default();
    procs.set(1, 1, "c");
    let mut t = Table::new(
        TableConfig {
            max_time_wait: 10,
            ..Default::default()
        },
        Box::new(procs.clone()),
    );
    let o = owner(1, OwnerSource::Current);
    for i in 0..25u64 {
        let local = format!("127.0.0.1:{}", 20000 + i);
        t.apply(&st(S, i, Close, SynSent, "127.0.0.1:0", "127.0.0.1:80", o));
        t.apply(&st(S, i, SynSent, Established, &local, "127.0.0.1:80", o));
        t.apply(&st(S, i, Established, FinWait1, &local, "127.0.0.1:80", o));
        t.apply(&st(S, i, FinWait1, FinWait2, &local, "127.0.0.1:80", o));
        t.apply(&st(S, i, FinWait2, Close, &local, "127.0.0.1:80", o));
    }
    let s = snap(&t, 2 * S);
    assert_eq!(s.host.time_wait, 10);
    assert_eq!(proc_view(&s, 1).churn.time_wait_total, 25);
    assert_eq!(
        t.stats().evicted_sockets,
        0,
        "the kernel's own limit, not an eviction"
    );
}

#[test]
fn caps_evict_and_count() {
    let procs = FakeProcs::default();
    let mut t = Table::new(
        TableConfig {
            max_sockets: 100,
            max_processes: 10,
            ..Default::default()
        },
        Box::new(procs.clone()),
    );
    for pid in 1..=30u32 {
        procs.set(pid, 1, "p");
        let o = owner(pid, OwnerSource::Current);
        for i in 0..10u64 {
            let sk = (pid as u64) << 16 | i;
            t.apply(&st(0, sk, Close, SynSent, "127.0.0.1:0", "127.0.0.1:80", o));
        }
    }
    let stats = t.stats();
    assert_eq!(stats.sockets, 100);
    assert_eq!(stats.evicted_sockets, 200);
    assert_eq!(stats.processes, 10);
    assert_eq!(stats.evicted_processes, 20);
    procs.kill(1);
}

/// Applies `conns` connections' transitions (`seq(client socket, server socket, client address,
/// server address)`, one connection every `every_ns`) to a table with a client (pid 1) and a
/// server (pid 2, listening on `gaps::SRV`), and prints the per-event cost. With `reuse`, socket
/// addresses and local ports come round again, as the kernel's slab and `tw_reuse` make them.
fn churn_rate(
    label: &str,
    conns: u64,
    every_ns: u64,
    reuse: bool,
    seq: impl Fn(u64, u64, SocketAddr, SocketAddr) -> Vec<Transition>,
) -> Table {
    let mut t = gaps::pair();
    let sv = a(gaps::SRV);
    let mut evs = Vec::new();
    for i in 0..conns {
        let k = if reuse { i % 4096 } else { i };
        let (csk, ssk) = (0xffff_0000_0000 + k * 2, 0xffff_0000_0001 + k * 2);
        let cl = SocketAddr::from(([127, 0, 0, 1], 1024 + (i % 64_000) as u16));
        let ts_ns = 1_000 + i * every_ns;
        evs.extend(seq(csk, ssk, cl, sv).into_iter().map(|e| st_at(ts_ns, e)));
    }
    let start = std::time::Instant::now();
    for e in &evs {
        t.apply(e);
    }
    let el = start.elapsed();
    println!(
        "{label}: {} events in {el:?}: {:.0} ns/event, {:.2} M events/s",
        evs.len(),
        el.as_nanos() as f64 / evs.len() as f64,
        evs.len() as f64 / el.as_secs_f64() / 1e6
    );
    t
}

/// Per-event cost of the table on RST churn (6 transitions per connection).
/// `cargo test --release -p tcptrace --lib table_apply_rate -- --ignored --nocapture`
#[test]
#[ignore]
fn table_apply_rate() {
    let (c, cr) = (
        owner(1, OwnerSource::Current),
        owner(1, OwnerSource::Recorded),
    );
    let (s, sr) = (
        owner(2, OwnerSource::Inherited),
        owner(2, OwnerSource::Recorded),
    );
    let z = SocketAddr::from(([127, 0, 0, 1], 0));
    churn_rate("table (RST)", 200_000, 30_000, false, |csk, ssk, cl, sv| {
        vec![
            (csk, Close, SynSent, z, sv, c),
            (ssk, Listen, SynRecv, sv, cl, s),
            (csk, SynSent, Established, cl, sv, cr),
            (ssk, SynRecv, Established, sv, cl, sr),
            (csk, Established, Close, cl, sv, c),
            (ssk, Established, Close, sv, cl, sr),
        ]
    });
}

/// Per-event cost of the table on FIN churn as the benchmark makes it (9 records per
/// connection: the client's end into TIME_WAIT, the server's through LAST_ACK).
/// `cargo test --release -p tcptrace --lib table_apply_rate_fin -- --ignored --nocapture`
#[test]
#[ignore]
fn table_apply_rate_fin() {
    let (c, s) = (
        owner(1, OwnerSource::Current),
        owner(2, OwnerSource::Current),
    );
    let z = SocketAddr::from(([127, 0, 0, 1], 0));
    let t = churn_rate("table (FIN)", 300_000, 20_000, true, |csk, ssk, cl, sv| {
        vec![
            (csk, Close, SynSent, z, sv, c),
            (ssk, SynRecv, Established, sv, cl, None),
            (csk, SynSent, Established, cl, sv, None),
            (csk, Established, FinWait1, cl, sv, c),
            (ssk, Established, CloseWait, sv, cl, None),
            (csk, FinWait1, FinWait2, cl, sv, None),
            (csk, FinWait2, Close, cl, sv, None),
            (ssk, CloseWait, LastAck, sv, cl, s),
            (ssk, LastAck, Close, sv, cl, None),
        ]
    });
    let snap = t.snapshot(300_000 * 20_000, &SnapshotOptions::default());
    println!("TIME_WAIT at the end: {}", snap.host.time_wait);
}

#[test]
fn live_views_list_the_ten_oldest_close_wait_sockets() {
    let procs = FakeProcs::default();
    procs.set(10, 111, "server");
    let mut t = table(&procs);
    for i in 0..15u64 {
        let cli = format!("127.0.0.1:{}", 41000 + i);
        accepted_then_peer_closes(&mut t, 300 + i, i * S, "127.0.0.1:8080", &cli);
    }
    let s = snap(&t, 20 * S);
    let socks = proc_view(&s, 10).close_wait.sockets.clone().unwrap();
    assert_eq!(socks.len(), 10);
    assert_eq!(
        (socks[0].remote.as_str(), socks[0].age_secs),
        ("127.0.0.1:41000", 20.0)
    );
    assert_eq!(
        (socks[9].remote.as_str(), socks[9].age_secs),
        ("127.0.0.1:41009", 11.0)
    );
    let all = t.snapshot(
        20 * S,
        &SnapshotOptions {
            detail: true,
            ..Default::default()
        },
    );
    assert_eq!(
        proc_view(&all, 10)
            .close_wait
            .sockets
            .as_ref()
            .unwrap()
            .len(),
        15
    );
}

mod accepted;
mod accuracy;
mod gaps;
mod minis;
mod netns;
