//! `--stacks`: the call stack each leaked socket was opened with. A C program built with frame
//! pointers leaks CLOSE_WAIT sockets from functions with distinctive names through two call
//! paths (3 sockets through `path_alpha`, 2 through `path_beta`), opened by connect() in one
//! run and by accept() in another; tcptrace must group them into those two stacks with those
//! counts, in watch, in the daemon's report (text and JSON), and only when asked.

use std::{fs, path::PathBuf, process::Command};

use serde_json::Value;
use tcptrace_tests::{
    Scenario, Tcptrace, TempDir, daemon_json, poll, process, require_root, ss_count, u64_at,
};

/// Compiles tests/scripts/leakstacks.c (frame pointers, symbols and line numbers kept).
fn build_leakstacks(dir: &TempDir) -> PathBuf {
    build_leakstacks_as(dir, "leakstacks", &["-O0", "-g", "-fno-omit-frame-pointer"])
}

/// Compiles tests/scripts/leakstacks.c as `name` with these compiler flags.
fn build_leakstacks_as(dir: &TempDir, name: &str, flags: &[&str]) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/leakstacks.c");
    let out = dir.0.join(name);
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run gcc (cargo xtask setup installs it)");
    assert!(status.success(), "gcc failed on {}", src.display());
    out
}

fn leak(bin: &PathBuf, mode: &str) -> Scenario {
    let mut cmd = Command::new(bin);
    cmd.arg(mode);
    let mut s = Scenario::from_command(cmd, format!("leakstacks {mode}"));
    s.ready_port();
    s
}

/// The (function names, count) of each leak stack of a process entry, most sockets first.
fn groups(p: &Value) -> Vec<(Vec<String>, u64, String)> {
    p["leak_stacks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            let names = g["stack"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|f| f.split(" (").next().unwrap_or(f).to_string())
                .collect();
            (
                names,
                g["sockets"].as_u64().unwrap_or(0),
                g["opened"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Two stacks, 3 sockets through path_alpha and 2 through path_beta, both through `func`
/// called from that path (the frame right above the libc wrapper), opened by `opened`.
fn assert_two_paths(p: &Value, func: &str, opened: &str) {
    let g = groups(p);
    let shown = serde_json::to_string_pretty(&p["leak_stacks"]).unwrap();
    assert_eq!(g.len(), 2, "two stacks expected:\n{shown}");
    for ((names, count, how), (path, want)) in g.iter().zip([("path_alpha", 3), ("path_beta", 2)]) {
        assert_eq!(*count, want, "{path}:\n{shown}");
        assert_eq!(how, opened, "{shown}");
        let at = names
            .iter()
            .position(|n| n == func)
            .unwrap_or_else(|| panic!("{func} missing from a stack:\n{shown}"));
        assert_eq!(
            names.get(at + 1).map(String::as_str),
            Some(path),
            "{func} called from {path}:\n{shown}"
        );
        assert!(names.iter().any(|n| n == "main"), "{shown}");
    }
    assert!(
        p["leak_stacks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g.get("problem").is_none()),
        "a frame-pointer build needs no note:\n{shown}"
    );
    // Every socket of the process carries its stack.
    for s in p["close_wait"]["sockets"].as_array().unwrap() {
        let names: Vec<&str> = s["stack"]
            .as_array()
            .unwrap_or_else(|| panic!("socket without stack: {s}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(names.iter().any(|n| n.starts_with(func)), "{s}");
    }
}

#[test]
fn watch_groups_leaked_sockets_by_the_stack_that_opened_them() {
    require_root!("watch_groups_leaked_sockets_by_the_stack_that_opened_them");
    let dir = TempDir::new("stacks-watch");
    let bin = build_leakstacks(&dir);
    let (mut w, _) = Tcptrace::watch(&["--stacks", "--leak-after", "1"]);
    let from = w.count();
    let conn = leak(&bin, "connect");
    let acc = leak(&bin, "accept");
    for (s, func, opened) in [
        (&conn, "tcptrace_test_leaky_connect", "connect"),
        (&acc, "tcptrace_test_leaky_accept", "accept"),
    ] {
        let pid = s.pid();
        let p = w.wait_proc(from, pid, "two leak stacks with 5 sockets", |p| {
            groups(p).iter().map(|g| g.1).sum::<u64>() == 5
        });
        assert_two_paths(&p, func, opened);
        assert_eq!(u64_at(&p, "close_wait.count"), Some(5));
        assert_eq!(ss_count("close-wait", pid).0, 5, "ss agrees");
    }
}

#[test]
fn without_stacks_nothing_is_recorded() {
    require_root!("without_stacks_nothing_is_recorded");
    let dir = TempDir::new("stacks-off");
    let bin = build_leakstacks(&dir);
    let (mut w, _) = Tcptrace::watch(&["--leak-after", "1"]);
    let from = w.count();
    let conn = leak(&bin, "connect");
    let p = w.wait_proc(from, conn.pid(), "5 leaked", |p| {
        u64_at(p, "close_wait.leaked") == Some(5)
    });
    assert!(p.get("leak_stacks").is_none(), "{p}");
    for s in p["close_wait"]["sockets"].as_array().unwrap() {
        assert!(s.get("stack").is_none(), "{s}");
    }
}

/// The daemon: off by default, switched on by `stacks = true` and SIGHUP; the report groups the
/// sockets in text and JSON.
#[test]
fn daemon_switches_stacks_on_at_reload_and_reports_them() {
    require_root!("daemon_switches_stacks_on_at_reload_and_reports_them");
    let dir = TempDir::new("stacks-daemon");
    let bin = build_leakstacks(&dir);
    let socket = dir.0.join("d.sock");
    let cfg = dir.0.join("d.toml");
    let write_cfg = |stacks: bool| {
        fs::write(
            &cfg,
            format!(
                "socket = \"{}\"\nmetrics_addr = \"off\"\nleak_after_secs = 1.0\nstacks = {stacks}\n",
                socket.display()
            ),
        )
        .unwrap()
    };
    write_cfg(false);
    let d = Tcptrace::start(&["daemon", "--config", cfg.to_str().unwrap()]);
    let status = poll(20, || daemon_json("status", &socket))
        .unwrap_or_else(|e| panic!("daemon not ready: {e}\n{}", d.proc.stderr.tail(4000)));
    assert_eq!(status["stacks"], Value::Bool(false), "{status}");

    write_cfg(true);
    // SAFETY: plain syscall on a pid we started.
    unsafe { libc::kill(d.proc.pid() as libc::pid_t, libc::SIGHUP) };
    poll(10, || {
        let s = daemon_json("status", &socket)?;
        match s["stacks"].as_bool() {
            Some(true) => Ok(()),
            _ => Err(format!("stacks not on yet: {s}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.stderr.tail(4000)));

    let conn = leak(&bin, "connect");
    let pid = conn.pid();
    let report = poll(15, || {
        let r = daemon_json("report", &socket)?;
        let p = process(&r, pid)
            .ok_or_else(|| format!("pid {pid} not in the report"))?
            .clone();
        match groups(&p).iter().map(|g| g.1).sum::<u64>() {
            5 => Ok(p),
            n => Err(format!("{n} sockets with stacks: {}", p["close_wait"])),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.stderr.tail(4000)));
    assert_two_paths(&report, "tcptrace_test_leaky_connect", "connect");

    let text = Command::new(tcptrace_tests::tcptrace_bin())
        .arg("report")
        .arg("--socket")
        .arg(&socket)
        .output()
        .expect("tcptrace report");
    let text = String::from_utf8_lossy(&text.stdout);
    for line in [
        "3 sockets opened by connect from main -> path_alpha -> tcptrace_test_leaky_connect -> ",
        "2 sockets opened by connect from main -> path_beta -> tcptrace_test_leaky_connect -> ",
    ] {
        assert!(
            text.contains(line),
            "{line:?} missing from the report:\n{text}"
        );
    }
}

/// A socket accepted by one process and handed to another by SCM_RIGHTS (the acceptor closes
/// its copy): the stack is found by socket, shown on the holder, named in the acceptor's
/// address space (the holder is another program image, exec'd).
#[test]
fn stacks_follow_a_socket_handed_to_another_process() {
    require_root!("stacks_follow_a_socket_handed_to_another_process");
    let dir = TempDir::new("stacks-handoff");
    let bin = build_leakstacks(&dir);
    let (mut w, _) = Tcptrace::watch(&["--stacks", "--leak-after", "1"]);
    let from = w.count();
    let mut cmd = Command::new(&bin);
    cmd.arg("handoff");
    let mut acceptor = Scenario::from_command(cmd, "leakstacks handoff".into());
    let ready = acceptor.expect("READY");
    let holder: u32 = ready
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("READY {ready:?}: no holder pid"));
    let p = w.wait_proc(from, holder, "two leak stacks with 5 sockets", |p| {
        groups(p).iter().map(|g| g.1).sum::<u64>() == 5
    });
    assert_two_paths(&p, "tcptrace_test_handed_off_accept", "accept");
    assert_eq!(u64_at(&p, "close_wait.count"), Some(5));
    assert_eq!(ss_count("close-wait", holder).0, 5, "ss agrees");
    let acceptor_entry = process(&w.values().pop().unwrap(), acceptor.pid()).cloned();
    assert!(
        acceptor_entry
            .as_ref()
            .is_none_or(|a| u64_at(a, "close_wait.count") == Some(0)),
        "the acceptor holds none: {acceptor_entry:?}"
    );
}
