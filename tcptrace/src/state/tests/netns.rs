//! The same addresses in two network namespaces are two sockets: listeners, destinations,
//! ports in use and TIME_WAIT entries are kept per namespace.

use super::*;

const A: u64 = 4026531840;
const B: u64 = 4026532000;

pub(super) fn in_ns(netns: u64, ev: TcpEvent) -> TcpEvent {
    match ev {
        TcpEvent::State {
            ts_ns,
            sk,
            old,
            new,
            local,
            remote,
            owner,
            ..
        } => TcpEvent::State {
            ts_ns,
            sk,
            old,
            new,
            local,
            remote,
            owner,
            netns,
        },
        other => other,
    }
}

#[test]
fn the_same_addresses_in_two_namespaces_do_not_collide() {
    let procs = FakeProcs::default();
    procs.set(10, 1, "server-a");
    procs.set(11, 1, "server-b");
    procs.set(20, 1, "client-a");
    procs.set(21, 1, "client-b");
    let mut t = table(&procs);
    let (srv, cli) = ("127.0.0.1:5432", "127.0.0.1:40000");
    for (ns, server, client, base) in [(A, 10, 20, 100), (B, 11, 21, 200)] {
        let cur = |pid| owner(pid, OwnerSource::Current);
        let rec = |pid| owner(pid, OwnerSource::Recorded);
        let mut go = |sk, old, new, l, r, o| t.apply(&in_ns(ns, st(S, sk, old, new, l, r, o)));
        go(base, Close, Listen, srv, "0.0.0.0:0", cur(server));
        go(base + 1, Close, SynSent, "127.0.0.1:0", srv, cur(client));
        go(base + 1, SynSent, Established, cli, srv, rec(client));
        // The accepted end: no owner in the record, the listener of its namespace owns it.
        go(base + 2, Listen, SynRecv, srv, cli, None);
        go(base + 2, SynRecv, Established, srv, cli, None);
        // The client closes actively, the server answers: TIME_WAIT on the client's side.
        go(base + 1, Established, FinWait1, cli, srv, cur(client));
        go(base + 2, Established, CloseWait, srv, cli, None);
        go(base + 2, CloseWait, LastAck, srv, cli, cur(server));
        go(base + 1, FinWait1, FinWait2, cli, srv, rec(client));
        go(base + 1, FinWait2, Close, cli, srv, rec(client));
        go(base + 2, LastAck, Close, srv, cli, rec(server));
    }
    let s = snap(&t, 2 * S);
    assert_eq!(s.host.time_wait, 2, "one TIME_WAIT entry per namespace");
    let dests: Vec<(u64, u64)> = s
        .destinations
        .iter()
        .filter(|d| d.remote == srv)
        .map(|d| (d.netns, d.ports_in_use))
        .collect();
    assert_eq!(dests.len(), 2, "{:?}", s.destinations);
    assert!(
        dests.contains(&(A, 1)) && dests.contains(&(B, 1)),
        "{dests:?}"
    );
    for (pid, ns) in [(20, A), (21, B)] {
        let p = proc_view(&s, pid);
        assert_eq!(p.churn.time_wait, 1, "{p:?}");
        assert_eq!(p.destinations.len(), 1);
        assert_eq!(p.destinations[0].netns, ns);
    }
    // Each server closed one accepted connection: its own listener's, not the other's.
    for pid in [10, 11] {
        assert_eq!(proc_view(&s, pid).churn.closed_total, 1, "pid {pid}");
    }
}
