//! The daemon under systemd's notification protocol, with the test as the service manager: a
//! datagram socket named by NOTIFY_SOCKET receives READY with a STATUS line once the programs
//! are attached, WATCHDOG pings at half of WATCHDOG_USEC, RELOADING (with MONOTONIC_USEC) then
//! READY around a SIGHUP reload, and STOPPING at SIGTERM.

use std::{
    os::unix::net::UnixDatagram,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use tcptrace_tests::{Tcptrace, TempDir, poll, require_root};

/// Every datagram received so far, in order.
fn collect(sock: UnixDatagram) -> Arc<Mutex<Vec<String>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    got
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall on a pid we started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

#[test]
fn daemon_speaks_sd_notify_ready_watchdog_reload_and_stop() {
    require_root!("daemon_speaks_sd_notify_ready_watchdog_reload_and_stop");
    let dir = TempDir::new("sd-notify");
    let notify = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind the notify socket");
    let got = collect(sock);
    let config = dir.0.join("tcptrace.toml");
    std::fs::write(&config, "leak_after_secs = 5.0\n").unwrap();
    let socket = dir.0.join("d.sock");
    let mut d = Tcptrace::start_env(
        &[
            "daemon",
            "--config",
            config.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--metrics-addr",
            "off",
        ],
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            // Pings every 0.5 s.
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let messages = |got: &Arc<Mutex<Vec<String>>>| got.lock().unwrap().clone();
    let ready = poll(20, || {
        messages(&got)
            .into_iter()
            .find(|m| m.lines().any(|l| l == "READY=1"))
            .ok_or_else(|| format!("no READY yet: {:?}", messages(&got)))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.stderr.tail(4000)));
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=") && l.contains("sockets")),
        "READY comes with a status line: {ready:?}"
    );
    // Pings while the reader drains: at least 3 in 2.5 s.
    let start = messages(&got).len();
    thread::sleep(Duration::from_millis(2500));
    let pings = messages(&got)[start..]
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 3,
        "{pings} watchdog pings in 2.5 s: {:?}",
        messages(&got)
    );

    let before = messages(&got).len();
    signal(d.proc.pid(), libc::SIGHUP);
    let reload = poll(10, || {
        let after: Vec<String> = messages(&got)[before..].to_vec();
        let r = after
            .iter()
            .position(|m| m.lines().any(|l| l == "RELOADING=1"))
            .ok_or_else(|| "no RELOADING".to_string())?;
        let ready = after[r + 1..]
            .iter()
            .position(|m| m.lines().any(|l| l == "READY=1"))
            .ok_or_else(|| "no READY after RELOADING".to_string())?;
        Ok::<_, String>((after[r].clone(), ready))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", messages(&got)));
    assert!(
        reload.0.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING carries MONOTONIC_USEC (Type=notify-reload): {:?}",
        reload.0
    );

    let before = messages(&got).len();
    let t = Instant::now();
    signal(d.proc.pid(), libc::SIGTERM);
    poll(10, || {
        messages(&got)[before..]
            .iter()
            .find(|m| m.lines().any(|l| l == "STOPPING=1"))
            .cloned()
            .ok_or_else(|| "no STOPPING".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", messages(&got)));
    let status = d.proc.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the daemon exits cleanly after SIGTERM ({:?} after {:?})",
        status,
        t.elapsed()
    );
}

/// Under systemd, stderr is the journal (JOURNAL_STREAM names its device and inode): every
/// line starts with its syslog priority (`<6>` info, `<4>` warn), so that `journalctl -p
/// warning` shows the warnings; the logfmt text follows unchanged.
#[test]
fn journal_lines_carry_syslog_priorities() {
    use std::os::unix::fs::MetadataExt as _;
    require_root!("journal_lines_carry_syslog_priorities");
    let dir = TempDir::new("journal");
    let log = dir.0.join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let config = dir.0.join("tcptrace.toml");
    let socket = dir.0.join("d.sock");
    let write_cfg = |sock: &std::path::Path| {
        std::fs::write(
            &config,
            format!("socket = \"{}\"\nmetrics_addr = \"off\"\n", sock.display()),
        )
        .unwrap()
    };
    write_cfg(&socket);
    let mut child = std::process::Command::new(tcptrace_tests::tcptrace_bin())
        .args(["daemon", "--config", config.to_str().unwrap()])
        .env("JOURNAL_STREAM", &stream)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start the daemon");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = poll(20, || {
        text()
            .lines()
            .find(|l| l.contains("msg=\"tcptrace daemon started\""))
            .map(String::from)
            .ok_or_else(|| format!("not started: {}", text()))
    });
    // A changed socket path takes effect only after a restart: a warning at reload.
    write_cfg(&dir.0.join("other.sock"));
    signal(child.id(), libc::SIGHUP);
    let warned = poll(10, || {
        text()
            .lines()
            .find(|l| l.contains("after a restart"))
            .map(String::from)
            .ok_or_else(|| format!("no warning: {}", text()))
    });
    signal(child.id(), libc::SIGTERM);
    let _ = child.wait();
    let started = started.unwrap();
    let warned = warned.unwrap();
    assert!(started.starts_with("<6>level=info msg="), "{started:?}");
    assert!(warned.starts_with("<4>level=warn msg="), "{warned:?}");
    assert!(
        text().lines().all(|l| l.starts_with('<')),
        "every line has its priority:\n{}",
        text()
    );
}
