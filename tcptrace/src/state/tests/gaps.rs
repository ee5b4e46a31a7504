//! Transitions that never arrived, found from the next one of their socket: the table does
//! what they must have done (see `Table::fill_gap`), counts them, and leaves sockets whose
//! state came from a socket list alone.

use super::*;

pub(super) const SRV: &str = "127.0.0.1:5000";

/// Client pid 1 and server pid 2 (listening on :5000) on loopback.
pub(super) fn pair() -> Table {
    let procs = FakeProcs::default();
    procs.set(1, 1, "client");
    procs.set(2, 2, "server");
    let mut t = table(&procs);
    t.apply(&st(
        0,
        9,
        Close,
        Listen,
        SRV,
        "0.0.0.0:0",
        owner(2, OwnerSource::Current),
    ));
    t
}

/// Client socket `c` connects from `cli`, server socket `s` accepts; the client closes first
/// (ESTABLISHED -> FIN_WAIT1) and the server sees the FIN (CLOSE_WAIT).
fn connect_and_client_closes(t: &mut Table, ts: u64, c: u64, s: u64, cli: &str) {
    let o = owner(1, OwnerSource::Current);
    t.apply(&st(ts, c, Close, SynSent, "127.0.0.1:0", SRV, o));
    t.apply(&st(ts, s, SynRecv, Established, SRV, cli, None));
    t.apply(&st(ts, c, SynSent, Established, cli, SRV, None));
    t.apply(&st(ts, c, Established, FinWait1, cli, SRV, o));
    t.apply(&st(ts, s, Established, CloseWait, SRV, cli, None));
}

/// Client 100 closes first; its mini-socket waits in FIN_WAIT2 (server 200 is in CLOSE_WAIT).
fn client_waits_in_fin_wait2(t: &mut Table) {
    connect_and_client_closes(t, S, 100, 200, "127.0.0.1:40000");
    client_end(t, S, 100, "127.0.0.1:40000");
}

/// Client socket `c` (from `cli`) is acked and its mini-socket made: FIN_WAIT1 -> FIN_WAIT2
/// -> CLOSE.
fn client_end(t: &mut Table, ts: u64, c: u64, cli: &str) {
    for (old, new) in [(FinWait1, FinWait2), (FinWait2, Close)] {
        t.apply(&st(ts, c, old, new, cli, SRV, None));
    }
}

/// Server socket `s` closes its end of the connection from `cli`: CLOSE_WAIT -> LAST_ACK ->
/// CLOSE.
fn server_end(t: &mut Table, ts: u64, s: u64, cli: &str) {
    let srv = owner(2, OwnerSource::Current);
    t.apply(&st(ts, s, CloseWait, LastAck, SRV, cli, srv));
    t.apply(&st(ts, s, LastAck, Close, SRV, cli, None));
}

/// The first connection (client 100 from :40000, server 200) is closing when the next client to
/// the server gets socket 100's address: CLOSE -> SYN_SENT, its local port not chosen yet.
fn next_client_takes_the_address(t: &mut Table) {
    connect_and_client_closes(t, S, 100, 200, "127.0.0.1:40000");
    let o = owner(1, OwnerSource::Current);
    t.apply(&st(S, 100, Close, SynSent, "127.0.0.1:0", SRV, o));
}

/// The next client (socket 100) is connected, from :40001.
fn next_client_established(t: &mut Table) {
    let cli = "127.0.0.1:40001";
    t.apply(&st(S, 100, SynSent, Established, cli, SRV, None));
}

/// Server socket `s` accepts the connection from `cli`.
fn accepted(t: &mut Table, ts: u64, s: u64, cli: &str) {
    t.apply(&st(ts, s, SynRecv, Established, SRV, cli, None));
}

#[test]
fn a_client_whose_end_never_arrived_is_closed_into_time_wait_when_its_address_is_reused() {
    let mut t = pair();
    // The client's FIN_WAIT1 -> FIN_WAIT2 -> CLOSE never arrive; the server closes, then a new
    // connection's socket gets the client's old address.
    connect_and_client_closes(&mut t, S, 100, 200, "127.0.0.1:40000");
    server_end(&mut t, S, 200, "127.0.0.1:40000");
    let o = owner(1, OwnerSource::Current);
    t.apply(&st(2 * S, 100, Close, SynSent, "127.0.0.1:0", SRV, o));
    let s = snap(&t, 3 * S);
    let c = proc_view(&s, 1);
    assert_eq!((c.churn.closed_total, c.churn.time_wait_total), (1, 1));
    assert_eq!(s.host.time_wait, 1);
    assert_eq!(proc_view(&s, 2).churn.closed_total, 1);
    assert_eq!(t.stats().gaps, 1);
    assert_eq!(t.stats().unknown_socket_events, 0);
    // The new connection is tracked from its own start: listener, it and the TIME_WAIT entry.
    assert_eq!(t.stats().sockets, 3);
}

#[test]
fn a_server_whose_fin_never_arrived_still_turns_its_peers_fin_wait2_into_time_wait() {
    let mut t = pair();
    client_waits_in_fin_wait2(&mut t);
    assert_eq!(snap(&t, S).host.fin_wait2, 1);
    // The server's CLOSE_WAIT -> LAST_ACK (its FIN) never arrives; LAST_ACK -> CLOSE does.
    t.apply(&st(
        2 * S,
        200,
        LastAck,
        Close,
        SRV,
        "127.0.0.1:40000",
        None,
    ));
    let s = snap(&t, 3 * S);
    assert_eq!(
        (s.host.fin_wait2, s.host.time_wait, s.host.close_wait),
        (0, 1, 0)
    );
    assert_eq!(proc_view(&s, 1).churn.time_wait_total, 1);
    assert_eq!(proc_view(&s, 2).churn.closed_total, 1);
    assert_eq!(t.stats().gaps, 1);
}

#[test]
fn an_accepted_socket_at_the_address_of_a_server_socket_left_in_close_wait_ends_it() {
    let mut t = pair();
    client_waits_in_fin_wait2(&mut t);
    // Neither of the server socket's last two transitions arrives; a new accepted socket
    // takes its address.
    t.apply(&st(
        2 * S,
        200,
        SynRecv,
        Established,
        SRV,
        "127.0.0.1:40001",
        None,
    ));
    let s = snap(&t, 3 * S);
    let srv = proc_view(&s, 2);
    assert_eq!((srv.close_wait.count, srv.churn.closed_total), (0, 1));
    assert_eq!(proc_view(&s, 1).churn.time_wait_total, 1);
    assert_eq!((s.host.established, s.host.time_wait), (1, 1));
    assert_eq!(t.stats().gaps, 1);
}

#[test]
fn a_socket_from_the_start_up_list_is_not_a_gap_and_consistent_streams_have_none() {
    let procs = FakeProcs::default();
    procs.set(1, 1, "client");
    let mut t = table(&procs);
    t.load_existing(
        &[ExistingSocket {
            netns: 0,
            local: a("127.0.0.1:40000"),
            remote: a(SRV),
            state: Established,
            pid: Some(1),
            age_ns: None,
        }],
        0,
    );
    // Listed ESTABLISHED, it had closed meanwhile: its first event is from FIN_WAIT1.
    client_end(&mut t, S, 100, "127.0.0.1:40000");
    let mut t2 = pair();
    connect_and_client_closes(&mut t2, S, 100, 200, "127.0.0.1:40000");
    assert_eq!((t.stats().gaps, t2.stats().gaps), (0, 0));
}

#[test]
fn late_records_of_the_socket_before_are_dropped_once_the_next_one_has_the_address() {
    let mut t = pair();
    let o = owner(1, OwnerSource::Current);
    let srv = owner(2, OwnerSource::Current);
    // The client's end comes after the first records of the next client at its address (the
    // records of two CPUs, ordered by their stamps).
    next_client_takes_the_address(&mut t);
    next_client_established(&mut t);
    client_end(&mut t, S, 100, "127.0.0.1:40000");
    server_end(&mut t, S, 200, "127.0.0.1:40000");
    // The second connection, accepted by server socket 201, ends as the first should have.
    accepted(&mut t, S, 201, "127.0.0.1:40001");
    t.apply(&st(
        2 * S,
        100,
        Established,
        FinWait1,
        "127.0.0.1:40001",
        SRV,
        o,
    ));
    t.apply(&st(
        2 * S,
        201,
        Established,
        CloseWait,
        SRV,
        "127.0.0.1:40001",
        None,
    ));
    client_end(&mut t, 2 * S, 100, "127.0.0.1:40001");
    t.apply(&st(
        2 * S,
        201,
        CloseWait,
        LastAck,
        SRV,
        "127.0.0.1:40001",
        srv,
    ));
    t.apply(&st(
        2 * S,
        201,
        LastAck,
        Close,
        SRV,
        "127.0.0.1:40001",
        None,
    ));
    let s = snap(&t, 3 * S);
    let c = proc_view(&s, 1);
    assert_eq!((c.churn.closed_total, c.churn.time_wait_total), (2, 2));
    assert_eq!(proc_view(&s, 2).churn.closed_total, 2);
    assert_eq!(
        (s.host.time_wait, s.host.fin_wait2, s.host.established),
        (2, 0, 0)
    );
    let stats = t.stats();
    assert_eq!(
        (stats.gaps, stats.stale, stats.unknown_socket_events),
        (1, 2, 0)
    );
}

/// connect() of socket 100 to the server returning `ret`.
fn connect_exit(ts_ns: u64, ret: i32, o: Option<Owner>) -> TcpEvent {
    TcpEvent::Connect {
        ts_ns,
        sk: 100,
        remote: a(SRV),
        ret,
        owner: o.expect("an owner"),
        netns: 0,
    }
}

#[test]
fn a_connect_whose_outcome_never_arrived_waits_for_no_errno_once_its_address_is_reused() {
    let mut t = pair();
    let o = owner(1, OwnerSource::Current);
    // connect() returned 0, but SYN_SENT -> ESTABLISHED (and all that followed) never arrived;
    // then a new socket takes the address.
    t.apply(&st(S, 100, Close, SynSent, "127.0.0.1:0", SRV, o));
    t.apply(&connect_exit(S, 0, o));
    t.apply(&st(2 * S, 100, Close, SynSent, "127.0.0.1:0", SRV, o));
    assert_eq!(t.stats().gaps, 1);
    assert!(
        t.closed_connects.is_empty(),
        "a made-up close waits for an errno"
    );
    // The new connect fails on its own: one failure, its own.
    t.apply(&connect_exit(2 * S, -115, o));
    t.apply(&st(
        2 * S,
        100,
        SynSent,
        Close,
        "127.0.0.1:40001",
        SRV,
        None,
    ));
    t.apply(&TcpEvent::Error {
        ts_ns: 2 * S,
        local: a("127.0.0.1:40001"),
        remote: a(SRV),
        errno: 111,
    });
    let s = snap(&t, 3 * S);
    let c = proc_view(&s, 1);
    assert_eq!(c.connects.ok, 0);
    assert_eq!(c.connects.failed.get("ECONNREFUSED"), Some(&1));
    assert_eq!(c.connects.failed.len(), 1);
    assert_eq!(c.churn.closed_total, 0);
}

#[test]
fn late_records_of_the_socket_before_are_dropped_while_the_next_one_still_connects() {
    let mut t = pair();
    // The end of the first client arrives while the next one is still in SYN_SENT, its local
    // port not known yet.
    next_client_takes_the_address(&mut t);
    client_end(&mut t, S, 100, "127.0.0.1:40000");
    assert_eq!(t.stats().stale, 2, "both late records dropped");
    server_end(&mut t, S, 200, "127.0.0.1:40000");
    // The new connection goes on as its own.
    accepted(&mut t, S, 201, "127.0.0.1:40001");
    next_client_established(&mut t);
    let s = snap(&t, 2 * S);
    let c = proc_view(&s, 1);
    // The first connection's close (made up into TIME_WAIT at the new one's birth), once.
    assert_eq!((c.churn.closed_total, c.churn.time_wait_total), (1, 1));
    assert_eq!((s.host.established, s.host.time_wait), (2, 1));
    assert_eq!(t.stats().gaps, 1);
}
