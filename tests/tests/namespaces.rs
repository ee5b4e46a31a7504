//! Network namespaces: every container and pod has its own, with its own ports and its own
//! `ip_local_port_range`. The same addresses in two namespaces are two sockets of two
//! processes; a namespace's port exhaustion is judged against that namespace's range.
//!
//! They need root; without it each prints SKIP and passes. Run with `cargo xtask test`.

use std::os::unix::fs::MetadataExt as _;

use serde_json::Value;
use tcptrace_tests::{
    Netns, Scenario, Tcptrace, at, destination, failed, process, require_root, u64_at,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

/// The namespace number (nsfs inode) of a named namespace, as /proc/PID/ns/net shows it.
fn netns_inode(ns: &Netns) -> u64 {
    std::fs::metadata(format!("/run/netns/{}", ns.name))
        .expect("the namespace's bind mount")
        .ino()
}

fn own_netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

/// A leak server holding `k` CLOSE_WAIT sockets on 127.0.0.1:`port` (0: any), in `wrapper`'s
/// namespace.
fn leak(wrapper: &[&str], port: u16, k: usize) -> Scenario {
    let ks = k.to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Scenario::spawn(
        SCENARIO,
        wrapper,
        &["leak-server", "--addr", &listen, "--count", &ks],
    );
    let to = format!("127.0.0.1:{}", server.ready_port());
    let mut clients = Scenario::spawn(
        SCENARIO,
        wrapper,
        &["clients", "--to", &to, "--count", &ks, "--wait-stdin"],
    );
    clients.expect("CONNECTED");
    server.expect("ACCEPTED");
    clients.send_line();
    clients.expect("DONE");
    server
}

/// The same leak (same listening address and port) in our namespace and in one the test
/// creates: two processes, each with exactly its own sockets, each in its own namespace.
#[test]
fn the_same_leak_in_two_namespaces_is_two_leaks() {
    require_root!("the_same_leak_in_two_namespaces_is_two_leaks");
    let ns = Netns::create();
    let (mut tt, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let port = 47_311;
    let here = leak(&[], port, 3);
    let there = leak(&["ip", "netns", "exec", &ns.name], port, 2);
    let (a, b) = (here.pid(), there.pid());
    let (na, nb) = (own_netns_inode(), netns_inode(&ns));
    assert_ne!(na, nb);
    let ok = |v: &Value| {
        let counts = |pid| {
            process(v, pid).map(|p| {
                (
                    u64_at(p, "close_wait.count"),
                    u64_at(p, "close_wait.leaked"),
                    u64_at(p, "netns"),
                )
            })
        };
        counts(a) == Some((Some(3), Some(3), Some(na)))
            && counts(b) == Some((Some(2), Some(2), Some(nb)))
    };
    let snap = tt.wait_line(
        &format!("pid {a}: 3 leaked in netns {na}; pid {b}: 2 leaked in netns {nb}"),
        ok,
    );
    for (pid, ns_ino, n) in [(a, na, 3), (b, nb, 2)] {
        let socks = process(&snap, pid)
            .and_then(|p| at(p, "close_wait.sockets"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        assert_eq!(socks.len(), n, "{snap}");
        assert!(
            socks.iter().all(|s| s["netns"].as_u64() == Some(ns_ino)),
            "every socket of {pid} in netns {ns_ino}: {socks:?}"
        );
    }
}

/// Port exhaustion in a namespace whose range holds 100 ports: that destination uses all of
/// that namespace's range, whatever the host's range is.
#[test]
fn exhaustion_is_judged_against_the_namespace_range() {
    require_root!("exhaustion_is_judged_against_the_namespace_range");
    let ns = Netns::create();
    ns.sysctl("net.ipv4.ip_local_port_range=40000 40099");
    let (mut tt, _) = Tcptrace::watch(&[]);
    let mut ex = Scenario::spawn(
        SCENARIO,
        &["ip", "netns", "exec", &ns.name],
        &["exhaust", "--hold", "100", "--count", "3"],
    );
    let pid = ex.pid();
    ex.expect("DONE");
    let nsi = netns_inode(&ns);
    let ok = |v: &Value| {
        process(v, pid).is_some_and(|p| {
            failed(p, "connects.failed", "EADDRNOTAVAIL") == Some(3)
                && destination(p, "127.0.0.1:5555").is_some_and(|d| {
                    u64_at(d, "ports_in_use") == Some(100)
                        && d["port_range"] == serde_json::json!([40000, 40099])
                        && d["port_share"].as_f64() == Some(1.0)
                        && u64_at(d, "netns") == Some(nsi)
                })
        }) && v["destinations"].as_array().is_some_and(|ds| {
            ds.iter().any(|d| {
                d["remote"] == "127.0.0.1:5555"
                    && u64_at(d, "netns") == Some(nsi)
                    && u64_at(d, "ports_in_use") == Some(100)
                    && d["port_range"] == serde_json::json!([40000, 40099])
                    && d["port_share"].as_f64() == Some(1.0)
            })
        })
    };
    tt.wait_line(
        "127.0.0.1:5555 in the namespace: 100 ports in use of [40000, 40099], share 1.0",
        ok,
    );
}

/// A leak made 8 s before tcptrace starts: its age is estimated from the kernel's tcp_info (the
/// peer's FIN came with the last ACK received), not counted from tcptrace's start.
#[test]
fn a_leak_older_than_tcptrace_has_an_estimated_age() {
    require_root!("a_leak_older_than_tcptrace_has_an_estimated_age");
    let server = leak(&[], 0, 2);
    let pid = server.pid();
    std::thread::sleep(std::time::Duration::from_secs(8));
    let (mut tt, first) = Tcptrace::watch(&["--leak-after", "1"]);
    let p =
        process(&first, pid).unwrap_or_else(|| panic!("pid {pid} in the first snapshot: {first}"));
    let oldest = p["close_wait"]["oldest_secs"].as_f64().unwrap_or(0.0);
    assert!(oldest >= 7.0, "oldest_secs {oldest} >= 7: {p}");
    let socks = at(p, "close_wait.sockets")
        .and_then(Value::as_array)
        .unwrap();
    assert!(!socks.is_empty(), "{p}");
    assert!(
        socks.iter().all(|s| s["age_estimated"] == true
            && s["age_secs"].as_f64().is_some_and(|a| a >= 7.0)),
        "{p}"
    );
    // Both sockets, aged from before tcptrace started.
    tt.wait_proc(0, pid, "2 CLOSE_WAIT sockets, both older than 7 s", |p| {
        at(p, "close_wait.sockets")
            .and_then(Value::as_array)
            .is_some_and(|socks| {
                socks.len() == 2
                    && socks
                        .iter()
                        .all(|s| s["age_secs"].as_f64().is_some_and(|a| a >= 7.0))
            })
    });
    tt.proc.stop(std::time::Duration::from_secs(2));
}
