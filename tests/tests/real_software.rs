//! Real software from Debian, not helpers of ours: each scenario makes its sockets the way the
//! software does, and tcptrace's counts per process equal what `ss` shows.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tcptrace_tests::{
    Scenario, Tcptrace, TempDir, describe_pid, free_port, poll, require_root, ss_count,
    ss_filter_count, u64_at,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

/// Debian's interpreter: python3-redis is installed for it (another python3 may come first in
/// PATH).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// A client holding `n` pooled redis-py connections: it takes them all at once (each connects
/// and answers a PING), gives them back to the pool, prints READY and waits for a line on stdin.
const POOL_CLIENT: &str = r#"
import sys, redis
port, n = int(sys.argv[1]), int(sys.argv[2])
pool = redis.ConnectionPool(host="127.0.0.1", port=port)
conns = [pool.get_connection("PING") for _ in range(n)]
for c in conns:
    c.send_command("PING")
    c.read_response()
for c in conns:
    pool.release(c)
print("READY", flush=True)
sys.stdin.readline()
"#;

/// The classic CLOSE_WAIT leak of pooled database clients: redis-server closes clients idle
/// for `timeout` seconds, and redis-py's pool notices only when a connection is reused, so every
/// pooled connection waits in CLOSE_WAIT, held by the client, while the server's ends wait in
/// FIN_WAIT2. tcptrace names the client with exactly ss's count, the server's FIN_WAIT2 count
/// equals ss's, and when the client exits its CLOSE_WAIT sockets are gone.
#[test]
fn redis_pool_holds_close_wait_after_the_server_times_out_idle_clients() {
    require_root!("redis_pool_holds_close_wait_after_the_server_times_out_idle_clients");
    const N: usize = 12;
    let dir = TempDir::new("redis");
    let port = free_port().to_string();
    let (mut w, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &port, "--timeout", "1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&dir.0);
    let server = Scenario::from_command(cmd, "redis-server".into());
    poll(20, || {
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()))
            .map_err(|e| format!("redis-server not listening: {e}"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", server.proc.stderr.tail(2000)));
    let mut cmd = Command::new(DEBIAN_PYTHON);
    cmd.args(["-c", POOL_CLIENT, &port, &N.to_string()]);
    let mut client = Scenario::from_command(cmd, "redis-py pool".into());
    client.expect("READY");
    let (redis, pool) = (server.pid(), client.pid());
    let from = w.count();

    // ss first: the server has timed out every pooled connection.
    let end = Instant::now() + Duration::from_secs(20);
    let (held, lines) = loop {
        let (held, lines) = ss_count("close-wait", pool);
        if held == N {
            break (held, lines);
        }
        assert!(
            Instant::now() < end,
            "ss: {held} CLOSE-WAIT sockets of the pool, want {N}:\n{lines}\nredis:\n{}",
            server.proc.stderr.tail(2000)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = lines;
    // The server's ends: FIN_WAIT2 once the client's kernel acknowledged each FIN.
    let end = Instant::now() + Duration::from_secs(10);
    let fw2 = loop {
        let (fw2, fw2_lines) = ss_filter_count("fin-wait-2", &format!("( sport = :{port} )"));
        if fw2 == N {
            break fw2;
        }
        assert!(
            Instant::now() < end,
            "the server's ends, want {N}:\n{fw2_lines}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    let p = w.wait_proc(from, pool, &format!("close_wait.count == {held}"), |p| {
        u64_at(p, "close_wait.count") == Some(held as u64)
            && u64_at(p, "close_wait.leaked") == Some(held as u64)
    });
    let remotes = p["close_wait"]["remotes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(remotes.len(), 1, "one remote, the server: {p}");
    assert_eq!(
        remotes[0]["remote"],
        format!("127.0.0.1:{port}").as_str(),
        "{p}"
    );
    assert_eq!(u64_at(&remotes[0], "count"), Some(N as u64), "{p}");
    let r = w.wait_proc(from, redis, &format!("churn.fin_wait2 == {fw2}"), |p| {
        u64_at(p, "churn.fin_wait2") == Some(fw2 as u64)
    });
    assert_eq!(u64_at(&r, "close_wait.count"), Some(0), "{r}");

    // The client exits: its sockets close, none is left in CLOSE_WAIT.
    client.send_line();
    let end = Instant::now() + Duration::from_secs(10);
    while client.proc.exited().is_none() {
        assert!(Instant::now() < end, "the pool client did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let from = w.count();
    w.wait_line_from(
        from,
        "the pool's CLOSE_WAIT sockets gone",
        |v| {
            tcptrace_tests::process(v, pool)
                .is_none_or(|p| u64_at(p, "close_wait.count") == Some(0))
        },
        |v| describe_pid(v, pool),
    );
    assert_eq!(ss_count("close-wait", pool).0, 0);
    drop(server);
}

/// nginx's master and workers: SIGTERM to the master when the test ends (its workers go with
/// it), SIGKILL to whatever is left after 5 s.
struct Nginx {
    master: std::process::Child,
}

impl Nginx {
    fn workers(&self) -> Vec<u32> {
        let pid = self.master.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_ascii_whitespace()
            .filter_map(|k| k.parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let workers = self.workers();
        // SAFETY: signals to processes we started.
        unsafe { libc::kill(self.master.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.master.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
        for w in workers {
            // SAFETY: as above (a worker the master did not take along).
            unsafe { libc::kill(w as i32, libc::SIGKILL) };
        }
    }
}

/// nginx as a reverse proxy in front of an upstream that never answers, with
/// `proxy_ignore_client_abort on`: clients that give up leave their connections in CLOSE_WAIT
/// in whichever of the 2 workers accepted them, until the upstream answers. Each worker's count
/// equals ss's, the master holds none, and the upstream connections belong to the workers.
#[test]
fn nginx_workers_hold_close_wait_of_clients_that_gave_up() {
    require_root!("nginx_workers_hold_close_wait_of_clients_that_gave_up");
    const N: usize = 10;
    let dir = TempDir::new("nginx");
    let mut upstream = tcptrace_tests::leak_server(SCENARIO, N);
    let up = upstream.ready_port();
    let port = free_port();
    let d = dir.0.display();
    let conf = format!(
        "worker_processes 2;\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             location / {{\n\
               proxy_pass http://127.0.0.1:{up};\n\
               proxy_ignore_client_abort on;\n\
               proxy_read_timeout 300s;\n\
             }}\n\
           }}\n\
         }}\n"
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let (mut w, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let master = Command::new("nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.0.join("error.log"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn nginx (cargo xtask setup installs nginx-light)");
    let nginx = Nginx { master };
    let master = nginx.master.id();
    poll(20, || {
        let n = nginx.workers().len();
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if n == 2 && up {
            Ok(())
        } else {
            Err(format!("{n} workers, listening: {up}"))
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "nginx not up: {e}\n{}",
            std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default()
        )
    });
    // The readiness probe above was one connection: the upstream saw nothing of it (no
    // request), and its CLOSE_WAIT is gone once nginx closed it.
    for _ in 0..N {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        drop(s);
    }
    upstream.expect("ACCEPTED");
    let end = Instant::now() + Duration::from_secs(20);
    let want = loop {
        let (by_pid, _, text) = tcptrace_tests::ss_close_wait(port);
        if by_pid.values().sum::<u64>() == N as u64 {
            break by_pid;
        }
        assert!(
            Instant::now() < end,
            "ss: want {N} CLOSE-WAIT held by nginx workers:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let workers = nginx.workers();
    assert!(
        want.keys().all(|p| workers.contains(p)),
        "held by workers {workers:?}: {want:?}"
    );
    let wanted = want.clone();
    let snap = w.wait_line_from(
        0,
        &format!("CLOSE_WAIT count and leaked per worker == {want:?}"),
        move |v| {
            wanted.iter().all(|(&pid, &n)| {
                tcptrace_tests::process(v, pid).is_some_and(|p| {
                    u64_at(p, "close_wait.count") == Some(n)
                        && u64_at(p, "close_wait.leaked") == Some(n)
                })
            })
        },
        |v| {
            want.keys()
                .map(|&p| describe_pid(v, p))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    let (now, _, text) = tcptrace_tests::ss_close_wait(port);
    assert_eq!(now, want, "ss changed meanwhile:\n{text}");
    assert_eq!(
        tcptrace_tests::process(&snap, master)
            .and_then(|p| u64_at(p, "close_wait.count"))
            .unwrap_or(0),
        0,
        "{}",
        describe_pid(&snap, master)
    );
    // The upstream connections: one per request, each made by the worker that took the
    // request; per worker, tcptrace's connects to the upstream and its ports in use there equal
    // ss's count of that worker's connections to it.
    let remote = format!("127.0.0.1:{up}");
    let mut total = 0;
    for &pid in &workers {
        let (_, lines) = ss_count("established", pid);
        let to_up = lines
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(remote.as_str()))
            .count() as u64;
        total += to_up;
        let r = remote.clone();
        let snap = w.wait_line_from(
            0,
            &format!("pid {pid}: {to_up} connects to {remote}"),
            move |v| {
                let d = tcptrace_tests::process(v, pid)
                    .and_then(|p| tcptrace_tests::destination(p, &r).cloned());
                match d {
                    Some(d) => {
                        u64_at(&d, "connects.ok") == Some(to_up)
                            && u64_at(&d, "ports_in_use") == Some(to_up)
                    }
                    // A worker that took no request made no connection.
                    None => to_up == 0,
                }
            },
            move |v| describe_pid(v, pid),
        );
        let _ = snap;
    }
    assert_eq!(total, N as u64, "every request went upstream");
    drop(nginx);
    drop(upstream);
}
