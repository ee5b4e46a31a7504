//! Mini-sockets against net.ipv4.tcp_max_tw_buckets: only live entries count, per network
//! namespace, and beyond the limit no entry is made (the kernel makes no mini-socket), so a full
//! TIME_WAIT count never pushes out the FIN_WAIT2 entries a process holds.

use super::{netns::in_ns, *};

/// A table with room for `max_time_wait` mini-sockets per namespace; pids 1 to 3 run.
fn cap(max_time_wait: usize) -> Table {
    let procs = FakeProcs::default();
    for pid in 1..=3 {
        procs.set(pid, pid as u64, "p");
    }
    Table::new(
        TableConfig {
            max_time_wait,
            ..Default::default()
        },
        Box::new(procs),
    )
}

/// Client `sk` of pid 1 connects from `local` to `dst` and closes first: TIME_WAIT.
fn client_time_wait(t: &mut Table, ts: u64, sk: u64, local: &str, dst: &str, netns: u64) {
    let o = owner(1, OwnerSource::Current);
    for (old, new, l) in [
        (Close, SynSent, "127.0.0.1:0"),
        (SynSent, Established, local),
        (Established, FinWait1, local),
        (FinWait1, FinWait2, local),
        (FinWait2, Close, local),
    ] {
        t.apply(&in_ns(netns, st(ts, sk, old, new, l, dst, o)));
    }
}

/// Server pid 2 (listening on :6379) closes `n` idle clients of pid 3 that never close theirs:
/// the clients wait in CLOSE_WAIT, the server's ends in FIN_WAIT2.
fn server_times_out_clients(t: &mut Table, ts: u64, first_sk: u64, n: u64) {
    let srv = owner(2, OwnerSource::Current);
    let cli = owner(3, OwnerSource::Current);
    t.apply(&st(
        ts,
        900,
        Close,
        Listen,
        "127.0.0.1:6379",
        "0.0.0.0:0",
        srv,
    ));
    for i in 0..n {
        let (c, s) = (first_sk + 2 * i, first_sk + 2 * i + 1);
        let cl = format!("127.0.0.1:{}", 41000 + i);
        let (cl, sv) = (cl.as_str(), "127.0.0.1:6379");
        t.apply(&st(ts, c, Close, SynSent, "127.0.0.1:0", sv, cli));
        t.apply(&st(
            ts,
            s,
            Listen,
            SynRecv,
            sv,
            cl,
            owner(2, OwnerSource::Inherited),
        ));
        t.apply(&st(ts, s, SynRecv, Established, sv, cl, None));
        t.apply(&st(ts, c, SynSent, Established, cl, sv, None));
        t.apply(&st(ts, s, Established, FinWait1, sv, cl, srv));
        t.apply(&st(ts, c, Established, CloseWait, cl, sv, None));
        t.apply(&st(ts, s, FinWait1, FinWait2, sv, cl, None));
        t.apply(&st(ts, s, FinWait2, Close, sv, cl, None));
    }
}

#[test]
fn a_reused_pair_leaves_no_dead_entry_counted_against_the_limit() {
    // Room for 13: the live TIME_WAIT entry and the 12 FIN_WAIT2 ones.
    let mut t = cap(13);
    // The same pair 50 times: each new connection ends the previous TIME_WAIT (tw reuse), so
    // one is live at a time although the table's queue holds 50 entries.
    for i in 0..50u64 {
        client_time_wait(&mut t, S + i, 100 + i, "127.0.0.1:30000", "127.0.0.1:80", 0);
    }
    // 12 clients timed out by the server: all 12 FIN_WAIT2 entries are made.
    server_times_out_clients(&mut t, 2 * S, 1000, 12);
    let s = snap(&t, 3 * S);
    assert_eq!(s.host.time_wait, 1);
    assert_eq!(s.host.fin_wait2, 12);
    assert_eq!(proc_view(&s, 2).churn.fin_wait2, 12);
    assert_eq!(proc_view(&s, 2).churn.closed_total, 12);
    assert_eq!(proc_view(&s, 3).close_wait.count, 12);
}

#[test]
fn beyond_the_limit_no_entry_is_made_and_none_is_pushed_out() {
    let mut t = cap(10);
    server_times_out_clients(&mut t, S, 1000, 4);
    for i in 0..20u64 {
        let local = format!("127.0.0.1:{}", 30000 + i);
        client_time_wait(&mut t, 2 * S, 100 + i, &local, "127.0.0.1:80", 0);
    }
    let s = snap(&t, 3 * S);
    // 4 FIN_WAIT2 entries first, then room for 6 TIME_WAIT: 10 in all, as the kernel.
    assert_eq!((s.host.fin_wait2, s.host.time_wait), (4, 6));
    assert_eq!(proc_view(&s, 2).churn.fin_wait2, 4);
    // Every TIME_WAIT entered still counts for the process (the kernel counts the overflow).
    assert_eq!(proc_view(&s, 1).churn.time_wait_total, 20);
    assert_eq!(
        t.stats().evicted_sockets,
        0,
        "the kernel's limit, not an eviction"
    );
    // Once TIME_WAIT entries expire, there is room again.
    t.tick(2 * S + TIME_WAIT_NS);
    client_time_wait(
        &mut t,
        2 * S + TIME_WAIT_NS,
        500,
        "127.0.0.1:39999",
        "127.0.0.1:80",
        0,
    );
    let s = snap(&t, 2 * S + TIME_WAIT_NS);
    assert_eq!(s.host.time_wait, 1);
}

#[test]
fn a_namespace_whose_own_limit_is_higher_than_the_hosts_gets_every_entry() {
    // The host allows 5; the second namespace's own tcp_max_tw_buckets allows 10.
    let mut t = cap(5);
    t.set_time_wait_limits([(4026532000u64, 10usize)].into_iter().collect());
    for ns in [4026531840u64, 4026532000] {
        for i in 0..8 {
            let local = format!("10.0.0.1:{}", 30000 + i);
            client_time_wait(&mut t, S, ns + i, &local, "10.0.0.2:80", ns);
        }
    }
    let s = snap(&t, 2 * S);
    // 5 in the first namespace (the host's limit), all 8 in the second.
    assert_eq!(s.host.time_wait, 13);
    // Its processes gone (the upkeep reads no limit there any more), the namespace keeps its
    // own limit while it holds mini-sockets: 2 more entries are made there.
    t.set_time_wait_limits(Default::default());
    for i in 8..10 {
        let local = format!("10.0.0.1:{}", 30000 + i);
        client_time_wait(&mut t, S, 4026532000 + i, &local, "10.0.0.2:80", 4026532000);
    }
    assert_eq!(snap(&t, 2 * S).host.time_wait, 15);
}

#[test]
fn each_network_namespace_has_its_own_limit() {
    let mut t = cap(5);
    for (n, ns) in [(8u64, 4026531840u64), (3, 4026532000)] {
        for i in 0..n {
            let local = format!("10.0.0.1:{}", 30000 + i);
            client_time_wait(&mut t, S, ns + i, &local, "10.0.0.2:80", ns);
        }
    }
    let s = snap(&t, 2 * S);
    // 5 (the limit) in the first namespace, all 3 in the second.
    assert_eq!(s.host.time_wait, 8);
}

/// Client `c` of pid 1 (from `cli`) to server socket `s` of pid 2 (listening on :80): the client
/// closes first and waits in FIN_WAIT2 (a mini-socket) until the server closes too.
fn connect_and_client_closes(t: &mut Table, ts: u64, c: u64, s: u64, cli: &str) {
    let o = owner(1, OwnerSource::Current);
    let srv = "127.0.0.1:80";
    t.apply(&st(ts, c, Close, SynSent, "127.0.0.1:0", srv, o));
    t.apply(&st(ts, s, SynRecv, Established, srv, cli, None));
    t.apply(&st(ts, c, SynSent, Established, cli, srv, None));
    t.apply(&st(ts, c, Established, FinWait1, cli, srv, o));
    t.apply(&st(ts, s, Established, CloseWait, srv, cli, None));
    t.apply(&st(ts, c, FinWait1, FinWait2, cli, srv, None));
    t.apply(&st(ts, c, FinWait2, Close, cli, srv, None));
}

/// Server socket `s` (pid 2) of client `cli` closes after its client: the client's FIN_WAIT2
/// mini-socket becomes TIME_WAIT.
fn server_closes(t: &mut Table, ts: u64, s: u64, cli: &str) {
    let o = owner(2, OwnerSource::Current);
    let srv = "127.0.0.1:80";
    t.apply(&st(ts, s, CloseWait, LastAck, srv, cli, o));
    t.apply(&st(ts, s, LastAck, Close, srv, cli, None));
}

#[test]
fn dead_entries_of_reused_pairs_never_push_out_live_ones_and_the_queue_is_compacted() {
    let mut t = Table::new(
        TableConfig {
            max_sockets: 100,
            ..Default::default()
        },
        Box::new({
            let procs = FakeProcs::default();
            procs.set(1, 1, "client");
            procs.set(2, 2, "server");
            procs
        }),
    );
    t.apply(&st(
        0,
        9,
        Close,
        Listen,
        "127.0.0.1:80",
        "0.0.0.0:0",
        owner(2, OwnerSource::Current),
    ));
    // Churn on 5 client ports reused at once (tcp_tw_reuse) to another host: 20,000 TIME_WAIT
    // entries made, 5 live at any time.
    for i in 0..20_000u64 {
        let cli = format!("127.0.0.1:{}", 30000 + i % 5);
        client_time_wait(&mut t, S + i, 1000 + i, &cli, "127.0.0.2:81", 0);
    }
    // Then 30 local connections whose clients close first, while the churn goes on: 30 server
    // sockets and 30 FIN_WAIT2 mini-sockets wait, 66 live entries under the cap of 100.
    let sk = 100_000;
    for i in 0..30u64 {
        let cli = format!("127.0.0.1:{}", 40000 + i);
        connect_and_client_closes(&mut t, 2 * S + i, sk + 2 * i, sk + 2 * i + 1, &cli);
        let reused = format!("127.0.0.1:{}", 30000 + i % 5);
        client_time_wait(&mut t, 2 * S + i, 50_000 + i, &reused, "127.0.0.2:81", 0);
    }
    for i in 0..30u64 {
        let cli = format!("127.0.0.1:{}", 40000 + i);
        server_closes(&mut t, 3 * S, sk + 2 * i + 1, &cli);
    }
    let s = snap(&t, 4 * S);
    // Every client's FIN_WAIT2 became TIME_WAIT: none was pushed out for dead entries.
    assert_eq!(proc_view(&s, 1).churn.time_wait_total, 20_060);
    assert_eq!(proc_view(&s, 1).churn.closed_total, 20_060);
    assert_eq!(proc_view(&s, 2).churn.closed_total, 30);
    assert_eq!((s.host.time_wait, s.host.fin_wait2), (35, 0));
    assert_eq!(t.stats().evicted_sockets, 0);
    assert_eq!(t.stats().sockets, 35 + 1);
    assert!(
        t.time_wait.len() <= 2 * 35 + 4096 + 1,
        "queue of {} for 35 live entries",
        t.time_wait.len()
    );
}
