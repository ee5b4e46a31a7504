//! An accepted socket whose LISTEN -> SYN_RECV the kernel did not send (it sends that one only
//! to the event stream): first seen at SYN_RECV -> ESTABLISHED, it is born from its listener.

use super::*;

#[test]
fn an_accepted_socket_first_seen_established_belongs_to_its_listener() {
    let procs = FakeProcs::default();
    procs.set(10, 111, "server");
    let mut t = table(&procs);
    let srv = owner(10, OwnerSource::Current);
    t.apply(&st(S, 1, Close, Listen, "127.0.0.1:8080", "0.0.0.0:0", srv));
    for i in 0..3u64 {
        let cli = format!("127.0.0.1:{}", 40000 + i);
        t.apply(&st(
            S,
            100 + i,
            SynRecv,
            Established,
            "127.0.0.1:8080",
            &cli,
            None,
        ));
        t.apply(&st(
            S,
            100 + i,
            Established,
            CloseWait,
            "127.0.0.1:8080",
            &cli,
            None,
        ));
    }
    let s = snap(&t, 10 * S);
    let p = proc_view(&s, 10);
    assert_eq!(p.close_wait.count, 3);
    assert_eq!(p.close_wait.leaked, 3);
    assert_eq!(
        t.stats().unknown_socket_events,
        0,
        "a birth, not a lost record"
    );
    // Inbound: the server's sockets use no ephemeral port toward a destination.
    assert!(s.destinations.is_empty(), "{:?}", s.destinations);
}
