//! The interactive screen of `tcptrace watch`, driven under tmux like a person would: the
//! screen shows a CLOSE_WAIT leak made by the test, the `/` filter and Enter open the detail
//! pane with its sockets (the remote addresses `ss` reports), `q` exits within a second and
//! leaves the terminal as it was; SIGTERM restores it too; `NO_COLOR` turns colours off.
//!
//! They need root (and tmux, installed by `cargo xtask setup`); without root each one prints
//! SKIP and passes.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tcptrace_tests::{DEADLINE, Scenario, require_root, run, tcptrace_bin};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

/// A tmux server of its own (`-L`), so nothing else's sessions are touched; killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A detached 120x40 session running a plain shell.
    fn start(tag: &str) -> Tmux {
        let t = Tmux {
            socket: format!("tcptrace-screen-{tag}-{}", std::process::id()),
        };
        t.cmd(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "120",
            "-y",
            "40",
            "bash",
            "--norc",
            "--noprofile",
        ]);
        t
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .unwrap_or_else(|e| panic!("tmux {args:?}: {e} (install it: cargo xtask setup)"));
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` into the pane (literally), then the named keys.
    fn type_line(&self, text: &str) {
        self.cmd(&["send-keys", "-t", "t", "-l", text]);
        self.cmd(&["send-keys", "-t", "t", "Enter"]);
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "t"])
    }

    /// The screen with its colours and attributes as escape sequences.
    fn screen_escapes(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-e", "-t", "t"])
    }

    fn show(&self, what: &str) -> String {
        self.cmd(&["display", "-p", "-t", "t", what])
            .trim()
            .to_string()
    }

    /// Polls the screen until `pred` holds; panics with the screen after `within`.
    fn wait(&self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + within;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "waiting for {what}; the screen shows:\n{s}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until tcptrace is gone: the shell runs in the pane again, out of the alternate
    /// screen. Returns how long that took.
    fn wait_back_to_shell(&self, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let cmd = self.show("#{pane_current_command}");
            let alt = self.show("#{alternate_on}");
            if cmd == "bash" && alt == "0" {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "tcptrace still running after {within:?} (command {cmd}, alternate screen {alt}):\n{}",
                self.screen()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The shell works as before (echo, line editing) and tcptrace's exit status was 0.
    fn check_shell_restored(&self) {
        self.type_line("echo exit=$? sum=$((6*7))");
        self.wait("the shell to answer", DEADLINE, |s| {
            s.contains("exit=0 sum=42")
        });
        let s = self.screen();
        assert!(
            !s.contains("PID COMM"),
            "the table is still on the screen after exit:\n{s}"
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// A server that leaks `n` CLOSE_WAIT sockets; returns it and the remotes of its sockets as
/// `ss` shows them.
fn leak(n: usize) -> (Scenario, Scenario, Vec<String>) {
    let count = n.to_string();
    let mut server = Scenario::spawn(
        SCENARIO,
        &[],
        &["leak-server", "--addr", "127.0.0.1:0", "--count", &count],
    );
    let port = server.ready_port();
    let to = format!("127.0.0.1:{port}");
    let mut clients = Scenario::spawn(
        SCENARIO,
        &[],
        &["clients", "--to", &to, "--count", &count, "--wait-stdin"],
    );
    clients.expect("CONNECTED");
    server.expect("ACCEPTED");
    clients.send_line();
    clients.expect("DONE");
    let end = Instant::now() + DEADLINE;
    loop {
        let out = run(
            "ss",
            &[
                "-Htn",
                "state",
                "close-wait",
                "sport",
                "=",
                &format!(":{port}"),
            ],
        );
        // Recv-Q Send-Q Local:Port Peer:Port
        let peers: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .collect();
        if peers.len() == n {
            return (server, clients, peers);
        }
        assert!(
            Instant::now() < end,
            "ss oracle: {} CLOSE_WAIT sockets on port {port}, expected {n}:\n{out}",
            peers.len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The SGR parameters of every `ESC [ ... m` in `s`.
fn sgr_params(s: &str) -> Vec<u32> {
    s.split("\x1b[")
        .skip(1)
        .filter_map(|seq| {
            let end = seq.find(|c: char| !(c.is_ascii_digit() || c == ';'))?;
            (seq[end..].starts_with('m')).then(|| &seq[..end])
        })
        .flat_map(|p| {
            p.split(';')
                .filter_map(|x| x.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The foreground colours (as 256-colour indexes: red is 1) among SGR parameters: `3x`,
/// `9x` (bright) and `38;5;n`, however the terminal writes them.
fn foregrounds(params: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < params.len() {
        match params[i] {
            p @ 30..=37 => out.push(p - 30),
            p @ 90..=97 => out.push(p - 90 + 8),
            38 if params.get(i + 1) == Some(&5) => {
                out.extend(params.get(i + 2));
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// A foreground or background colour among SGR parameters (30-38, 40-48, 90-107).
fn has_colour(params: &[u32]) -> bool {
    params
        .iter()
        .any(|&p| (30..=38).contains(&p) || (40..=48).contains(&p) || (90..=107).contains(&p))
}

#[test]
fn screen_shows_a_leak_its_sockets_and_quits_cleanly() {
    require_root!("screen_shows_a_leak_its_sockets_and_quits_cleanly");
    let (server, _clients, peers) = leak(3);
    let spid = server.pid().to_string();
    let tmux = Tmux::start("leak");
    let bin = tcptrace_bin();
    tmux.type_line(&format!("{} watch --leak-after 1", bin.display()));
    tmux.wait("the screen", DEADLINE, |s| s.contains("PID COMM"));
    assert_eq!(
        tmux.show("#{alternate_on}"),
        "1",
        "watch draws on the alternate screen"
    );
    // Other processes on this machine may fill the table: filter on the pid.
    tmux.keys(&["/"]);
    tmux.cmd(&["send-keys", "-t", "t", "-l", &spid]);
    tmux.keys(&["Enter"]);
    let row = |s: &str| {
        s.lines()
            .find(|l| l.split_whitespace().next() == Some(spid.as_str()))
            .map(str::to_string)
    };
    // PID COMM CLWAIT LEAKED ...
    let s = tmux.wait("the leaking pid with 3 leaked", DEADLINE, |s| {
        row(s).is_some_and(|r| {
            let f: Vec<&str> = r.split_whitespace().collect();
            f.get(2) == Some(&"3") && f.get(3) == Some(&"3")
        })
    });
    assert!(
        s.contains("processes: 1"),
        "the filter leaves one row:\n{s}"
    );
    // Colours on by default: the leaking row is red.
    let colours = sgr_params(&tmux.screen_escapes());
    assert!(
        foregrounds(&colours).contains(&1),
        "no red on the screen: {colours:?}"
    );
    tmux.keys(&["Enter"]);
    let s = tmux.wait("the detail pane with every remote", DEADLINE, |s| {
        s.contains(&format!("pid {spid} ")) && peers.iter().all(|p| s.contains(p.as_str()))
    });
    assert!(
        s.contains("close_wait_leak"),
        "findings in the detail pane:\n{s}"
    );
    assert!(s.contains("CLOSE_WAIT 3 (leaked 3"), "detail summary:\n{s}");
    // Every socket line names the server as its holder.
    for p in &peers {
        // LOCAL REMOTE AGE HOLDERS
        let line = s
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
            .unwrap_or_else(|| panic!("no socket line with remote {p}:\n{s}"));
        assert!(line.contains(&format!("{spid}/")), "holder of {p}: {line}");
    }
    tmux.keys(&["q"]);
    let took = tmux.wait_back_to_shell(Duration::from_secs(3));
    println!("q: back to the shell in {took:?}");
    assert!(took < Duration::from_secs(1), "q took {took:?} to exit");
    tmux.check_shell_restored();
}

#[test]
fn sigterm_restores_the_terminal_and_no_color_is_respected() {
    require_root!("sigterm_restores_the_terminal_and_no_color_is_respected");
    let (_server, _clients, _) = leak(2);
    let tmux = Tmux::start("term");
    let bin = tcptrace_bin();
    tmux.type_line(&format!(
        "NO_COLOR=1 {} watch --leak-after 1",
        bin.display()
    ));
    tmux.wait("a leaked socket on the screen", DEADLINE, |s| {
        s.contains("leaked CLOSE_WAIT") && !s.contains("leaked CLOSE_WAIT 0 ")
    });
    let colours = sgr_params(&tmux.screen_escapes());
    assert!(!has_colour(&colours), "colours with NO_COLOR: {colours:?}");
    let shell = tmux.show("#{pane_pid}");
    let pid = run("pgrep", &["-P", &shell]).trim().to_string();
    assert!(!pid.is_empty(), "no tcptrace under the shell");
    run("kill", &["-TERM", &pid]);
    tmux.wait_back_to_shell(Duration::from_secs(3));
    tmux.check_shell_restored();
}
