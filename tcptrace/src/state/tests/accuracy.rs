//! FIN_WAIT2 apart from TIME_WAIT, and the reconcile with the kernel's socket list.

use super::*;

const SRV: &str = "127.0.0.1:47100";

/// Client pid 20 connects from `cli` to the server (pid 10), the server accepts and never
/// closes; the client closes: FIN_WAIT1 -> FIN_WAIT2 -> CLOSE (an orphan's mini-socket).
fn client_closes_first(t: &mut Table, sk: u64, ts: u64, cli: &str) {
    let c = owner(20, OwnerSource::Current);
    let r = owner(20, OwnerSource::Recorded);
    t.apply(&st(ts, sk, Close, SynSent, "127.0.0.1:0", SRV, c));
    t.apply(&st(ts, sk, SynSent, Established, cli, SRV, r));
    accepted_then_peer_closes(t, sk + 1, ts, SRV, cli);
    t.apply(&st(ts, sk, Established, FinWait1, cli, SRV, c));
    t.apply(&st(ts, sk, FinWait1, FinWait2, cli, SRV, r));
    t.apply(&st(ts, sk, FinWait2, Close, cli, SRV, r));
}

/// Client pid 20's socket `sk` connects from `local` to `remote`, then goes through `closing`
/// (e.g. FIN_WAIT1, FIN_WAIT2, CLOSE: an active close).
fn client_walk(t: &mut Table, sk: u64, ts: u64, local: &str, remote: &str, closing: &[TcpState]) {
    let c = owner(20, OwnerSource::Current);
    let r = owner(20, OwnerSource::Recorded);
    let unbound = format!("{}:0", a(local).ip());
    t.apply(&st(ts, sk, Close, SynSent, &unbound, remote, c));
    t.apply(&st(ts, sk, SynSent, Established, local, remote, r));
    let mut old = Established;
    for &new in closing {
        t.apply(&st(
            ts,
            sk,
            old,
            new,
            local,
            remote,
            if new == FinWait1 { c } else { r },
        ));
        old = new;
    }
}

const ACTIVE_CLOSE: [TcpState; 3] = [FinWait1, FinWait2, Close];

fn procs() -> FakeProcs {
    let p = FakeProcs::default();
    p.set(10, 1, "server");
    p.set(20, 1, "client");
    p
}

/// Our network namespace's inode in these tests; pid 30 lives in another one.
const NETNS: u64 = 4026531840;

/// [`FakeProcs`] with network namespaces.
struct NsProcs(FakeProcs);

impl ProcSource for NsProcs {
    fn start_time(&mut self, pid: u32) -> Option<u64> {
        self.0.start_time(pid)
    }
    fn meta(&mut self, pid: u32) -> Option<ProcMeta> {
        self.0.meta(pid)
    }
    fn netns(&mut self, pid: u32) -> Option<u64> {
        Some(if pid == 30 { NETNS + 1 } else { NETNS })
    }
}

fn ns_table(p: &FakeProcs) -> Table {
    Table::new(
        TableConfig {
            leak_after_ns: 5 * S,
            ..Default::default()
        },
        Box::new(NsProcs(p.clone())),
    )
}

/// Host (close_wait, fin_wait2, time_wait) and the client's (fin_wait2, time_wait,
/// time_wait_total).
fn counts(s: &Snapshot, host: (u64, u64, u64), client: (u64, u64, u64)) {
    let h = &s.host;
    assert_eq!((h.close_wait, h.fin_wait2, h.time_wait), host, "host");
    let c = &proc_view(s, 20).churn;
    assert_eq!(
        (c.fin_wait2, c.time_wait, c.time_wait_total),
        client,
        "client"
    );
}

#[test]
fn fin_wait2_while_the_local_peer_sits_in_close_wait() {
    let p = procs();
    let mut t = table(&p);
    for i in 0..5u64 {
        client_closes_first(&mut t, 100 + 2 * i, S, &format!("127.0.0.1:{}", 50000 + i));
    }
    let s = snap(&t, 2 * S);
    counts(&s, (5, 5, 0), (5, 0, 0));
    assert_eq!(
        proc_view(&s, 20).destinations[0].ports_in_use,
        5,
        "FIN_WAIT2 holds the port"
    );

    // The server closes two (its FIN: TIME_WAIT for 60 s from now) and aborts one (RST: gone).
    let rec = owner(10, OwnerSource::Current);
    t.apply(&st(
        10 * S,
        101,
        CloseWait,
        LastAck,
        SRV,
        "127.0.0.1:50000",
        rec,
    ));
    t.apply(&st(
        10 * S,
        101,
        LastAck,
        Close,
        SRV,
        "127.0.0.1:50000",
        None,
    ));
    t.apply(&st(
        10 * S,
        103,
        CloseWait,
        LastAck,
        SRV,
        "127.0.0.1:50001",
        rec,
    ));
    t.apply(&st(
        10 * S,
        105,
        CloseWait,
        Close,
        SRV,
        "127.0.0.1:50002",
        rec,
    ));
    let s = snap(&t, 11 * S);
    counts(&s, (2, 2, 2), (2, 2, 2));

    // tcp_fin_timeout (60 s) ends the FIN_WAIT2 ones at 61 s; TIME_WAIT lasts until 70 s.
    t.tick(62 * S);
    let s = snap(&t, 62 * S);
    assert_eq!((s.host.fin_wait2, s.host.time_wait), (0, 2));
    t.tick(71 * S);
    assert_eq!(snap(&t, 71 * S).host.time_wait, 0);
}

#[test]
fn fin_wait2_lasts_tcp_fin_timeout() {
    let p = procs();
    let mut t = table(&p);
    t.set_fin_timeout(20);
    client_closes_first(&mut t, 100, S, "127.0.0.1:50000");
    t.tick(20 * S);
    assert_eq!(snap(&t, 20 * S).host.fin_wait2, 1);
    t.tick(22 * S);
    assert_eq!(snap(&t, 22 * S).host.fin_wait2, 0);
}

#[test]
fn peer_fin_before_our_close_is_time_wait_and_remote_peers_default_to_time_wait() {
    let p = procs();
    let mut t = table(&p);
    let c = owner(20, OwnerSource::Current);
    let r = owner(20, OwnerSource::Recorded);
    let cli = "127.0.0.1:50000";
    t.apply(&st(S, 1, Close, SynSent, "127.0.0.1:0", SRV, c));
    t.apply(&st(S, 1, SynSent, Established, cli, SRV, r));
    accepted_then_peer_closes(&mut t, 2, S, SRV, cli);
    t.apply(&st(S, 1, Established, FinWait1, cli, SRV, c));
    // The server closes at once: its FIN comes with the ACK of ours.
    t.apply(&st(
        S,
        2,
        CloseWait,
        LastAck,
        SRV,
        cli,
        owner(10, OwnerSource::Current),
    ));
    t.apply(&st(S, 1, FinWait1, FinWait2, cli, SRV, r));
    t.apply(&st(S, 1, FinWait2, Close, cli, SRV, r));
    // A peer on another host: nothing tells, TIME_WAIT.
    client_walk(&mut t, 3, S, "10.0.0.1:40000", "10.0.0.2:80", &ACTIVE_CLOSE);
    let s = snap(&t, 2 * S);
    assert_eq!((s.host.fin_wait2, s.host.time_wait), (0, 2));
    // A socket shut down for writing stays a full socket in FIN_WAIT2.
    client_walk(
        &mut t,
        4,
        S,
        "10.0.0.1:40001",
        "10.0.0.2:80",
        &[FinWait1, FinWait2],
    );
    let s = snap(&t, 2 * S);
    assert_eq!(
        (s.host.fin_wait2, proc_view(&s, 20).churn.fin_wait2),
        (1, 1)
    );
}

fn ks(local: &str, remote: &str, state: TcpState, timewait: bool) -> KernelSocket {
    KernelSocket {
        local: a(local),
        remote: a(remote),
        state,
        timewait,
    }
}

#[test]
fn reconcile_removes_adds_and_fixes_what_the_kernel_says() {
    let p = procs();
    p.set(30, 1, "elsewhere");
    let mut t = ns_table(&p);
    // Four CLOSE_WAIT sockets of the server; their closes were lost.
    for i in 0..4u64 {
        accepted_then_peer_closes(&mut t, 100 + i, S, SRV, &format!("127.0.0.1:{}", 51000 + i));
    }
    // One of a process in another network namespace, one without a known owner.
    let o30 = owner(30, OwnerSource::Recorded);
    t.apply(&st(
        S,
        200,
        Established,
        CloseWait,
        "10.1.0.2:80",
        "10.1.0.3:5000",
        o30,
    ));
    // Unowned, and its close lost: the kernel has the pair in CLOSE_WAIT.
    t.apply(&st(
        S,
        202,
        SynRecv,
        Established,
        SRV,
        "127.0.0.1:51010",
        None,
    ));
    t.apply(&st(
        S,
        201,
        Established,
        CloseWait,
        "10.1.0.2:80",
        "10.1.0.3:5001",
        None,
    ));
    // One changed after the kernel's list was read (its event came later).
    accepted_then_peer_closes(&mut t, 300, 5 * S, SRV, "127.0.0.1:52000");
    assert_eq!(
        snap(&t, 5 * S).host.close_wait,
        7,
        "51010 is ESTABLISHED here"
    );

    let kernel = [
        // 51000 is still there; 51001 moved to LAST_ACK unseen; 51002, 51003 are gone.
        ks(SRV, "127.0.0.1:51000", CloseWait, false),
        ks(SRV, "127.0.0.1:51001", LastAck, false),
        ks(SRV, "127.0.0.1:51010", CloseWait, false),
        // Missed entirely: a CLOSE_WAIT socket and a TIME_WAIT one.
        ks(SRV, "127.0.0.1:53000", CloseWait, false),
        ks("127.0.0.1:53001", SRV, TimeWait, true),
        // Connection requests are not compared.
        ks(SRV, "127.0.0.1:53002", SynRecv, false),
    ];
    let closed_before = proc_view(&snap(&t, 5 * S), 10).churn.closed_total;
    let r = t.reconcile(&kernel, NETNS, 4 * S, 6 * S);
    assert_eq!(
        r,
        Reconciled {
            removed: 2,
            added: 1,
            fixed: 2
        }
    );
    // The two that closed unseen count as closed for their owner, as their records would have.
    assert_eq!(
        proc_view(&snap(&t, 6 * S), 10).churn.closed_total,
        closed_before + 2
    );
    assert_eq!(t.stats().reconciled, r);
    let s = snap(&t, 6 * S);
    // 51000, 51010, 53000, the other namespace's, the unowned one, the late one.
    assert_eq!(s.host.close_wait, 6);
    // TIME_WAIT entries are neither compared nor added: they leave by themselves.
    assert_eq!(s.host.time_wait, 0);
    assert_eq!(proc_view(&s, 10).close_wait.count, 2);

    // The same list again changes nothing more.
    let r = t.reconcile(&kernel, NETNS, 4 * S, 6 * S);
    assert_eq!(r.total(), 0);
    assert_eq!(
        proc_view(&snap(&t, 6 * S), 10).churn.closed_total,
        closed_before + 2
    );

    // The added socket is adopted by its first event, not counted twice.
    t.apply(&st(
        7 * S,
        400,
        CloseWait,
        LastAck,
        SRV,
        "127.0.0.1:53000",
        owner(10, OwnerSource::Current),
    ));
    assert_eq!(snap(&t, 7 * S).host.close_wait, 5);
}

#[test]
fn reconcile_turns_fin_wait2_into_time_wait_and_leaves_time_wait_alone() {
    let p = procs();
    let mut t = ns_table(&p);
    // A FIN_WAIT2 mini-socket whose peer's FIN the table could not see, and a TIME_WAIT entry
    // that is in fact FIN_WAIT2 (a peer on another host that never closed): TIME_WAIT entries
    // are not compared (they are most of a churning host's lists and leave by themselves).
    client_closes_first(&mut t, 100, S, "127.0.0.1:50000");
    client_walk(&mut t, 3, S, "10.0.0.1:40000", "10.0.0.2:80", &ACTIVE_CLOSE);
    let s = snap(&t, 2 * S);
    assert_eq!((s.host.fin_wait2, s.host.time_wait), (1, 1));
    let kernel = [
        ks(SRV, "127.0.0.1:50000", CloseWait, false),
        ks("127.0.0.1:50000", SRV, TimeWait, true),
        ks("10.0.0.1:40000", "10.0.0.2:80", FinWait2, true),
    ];
    let r = t.reconcile(&kernel, NETNS, 2 * S, 2 * S);
    assert_eq!((r.fixed, r.removed, r.added), (1, 0, 0));
    let s = snap(&t, 2 * S);
    assert_eq!((s.host.fin_wait2, s.host.time_wait), (0, 2));
    let c = proc_view(&s, 20);
    assert_eq!((c.churn.fin_wait2, c.churn.time_wait), (0, 2));
    let r = t.reconcile(&kernel, NETNS, 3 * S, 3 * S);
    assert_eq!(r.total(), 0);
}
