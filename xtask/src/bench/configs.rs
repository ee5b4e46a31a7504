//! The configurations of the overhead phase: what is attached (nothing, a tcptrace variant,
//! bpftrace) and the churn workloads they run under.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::DAEMON_SOCKET;

/// The bcc tcpstates equivalent: one formatted line per transition.
const BPFTRACE_PRINT: &str = r#"tracepoint:sock:inet_sock_set_state { printf("%-16llx %-7d %-16s %-15s %-5d %-15s %-5d %d -> %d\n", args->skaddr, pid, comm, ntop(args->saddr), args->sport, ntop(args->daddr), args->dport, args->oldstate, args->newstate); }"#;
/// Counting in the kernel only.
const BPFTRACE_COUNT: &str = "tracepoint:sock:inet_sock_set_state { @[args->newstate] = count(); }";
/// What makes tcptrace attach its programs empty (`EMPTY_PROGRAMS_VAR` in
/// tcptrace/src/kernel/state_hook.rs).
pub(super) const EMPTY_PROGRAMS_VAR: &str = "TCPTRACE_EMPTY_PROGRAMS";

/// `tcptrace daemon` as the bench runs it (the daemon variant and the floor).
pub(super) const DAEMON_ARGS: [&str; 5] = [
    "daemon",
    "--socket",
    DAEMON_SOCKET,
    "--metrics-addr",
    "127.0.0.1:0",
];

/// One way of running tcptrace during the overhead phase. Add new ones in [`tracer_variants`].
#[derive(Clone)]
pub(super) struct TracerVariant {
    pub(super) name: &'static str,
    pub(super) args: Vec<&'static str>,
    /// How the bench tells that it is attached and reading.
    pub(super) ready: Ready,
    /// Another build of tcptrace (`--compare`); None: the one under test.
    pub(super) bin: Option<PathBuf>,
}

impl TracerVariant {
    /// The binary this variant runs: its own, else `default` (the build under test).
    pub(super) fn bin<'a>(&'a self, default: &'a Path) -> &'a Path {
        self.bin.as_deref().unwrap_or(default)
    }

    /// `tcptrace daemon`, named `name` in the report, run from `bin` (None: the build under
    /// test).
    fn daemon(name: &'static str, bin: Option<PathBuf>) -> Self {
        Self {
            name,
            args: DAEMON_ARGS.to_vec(),
            ready: Ready::Status,
            bin,
        }
    }

    /// `tcptrace daemon` of another build, named `name` in the report (`--compare NAME=BIN`).
    pub(super) fn compared(name: &str, bin: PathBuf) -> Self {
        // The bench runs once per process: a few bytes for its whole life.
        Self::daemon(Box::leak(name.to_string().into_boxed_str()), Some(bin))
    }
}

/// Parses one `--compare NAME=BIN`: a configuration name (printable, no `|`: it lands in the
/// report's tables) and an executable file.
pub(super) fn parse_compare(arg: &str) -> Result<(String, PathBuf), String> {
    let Some((name, bin)) = arg.split_once('=') else {
        return Err(format!(
            "--compare {arg:?}: expected NAME=BIN, e.g. --compare 'tcptrace daemon (main)=/tmp/tcptrace-main'"
        ));
    };
    let name = name.trim();
    if name.is_empty() || name.contains('|') || name.chars().any(char::is_control) {
        return Err(format!(
            "--compare {arg:?}: the name must be non-empty, printable and without '|' (it names a row of the report)"
        ));
    }
    let path = PathBuf::from(bin);
    let meta = std::fs::metadata(&path).map_err(|e| {
        format!("--compare {arg:?}: {bin}: {e}; give the path of a tcptrace binary")
    })?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "--compare {arg:?}: {bin} is not an executable file; give the path of a tcptrace binary"
        ));
    }
    Ok((name.to_string(), path))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Ready {
    /// The first `watch --json` line: by then the programs are attached and the table loaded.
    FirstJsonLine,
    /// `tcptrace status --json --socket DAEMON_SOCKET` succeeds.
    Status,
}

/// The tcptrace variants this binary supports: `watch` always, `daemon` once it exists.
pub(super) fn tracer_variants(bin: &Path) -> Vec<TracerVariant> {
    let mut v = vec![TracerVariant {
        name: "tcptrace watch",
        args: vec!["watch", "--json", "--interval", "1"],
        ready: Ready::FirstJsonLine,
        bin: None,
    }];
    let has_daemon = Command::new(bin)
        .args(["daemon", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_daemon {
        v.push(TracerVariant::daemon("tcptrace daemon", None));
    }
    v
}

#[derive(Clone)]
pub(super) enum Tracer {
    None,
    Tcptrace(TracerVariant),
    /// The floor: `tcptrace daemon` with `TCPTRACE_EMPTY_PROGRAMS=1`, its programs attached
    /// the way it attaches them (same tracepoints, same kinds: BTF, raw, classic) but each
    /// returning at once: what attaching costs before any work. Its `events_seen` must stay 0.
    Floor,
    Bpftrace {
        program: &'static str,
        counts: bool,
        /// A classic tracepoint of the program, whose link tells that it is attached.
        attached: &'static str,
    },
}

#[derive(Clone)]
pub(super) struct Config {
    pub(super) name: String,
    pub(super) tracer: Tracer,
}

impl Config {
    /// The configurations of the overhead phase: the scaling phase's, `watch --stacks` (the
    /// cost of recording the stack of every connect and accept), and the printing bpftrace
    /// before the counting one.
    pub(super) fn list(variants: &[TracerVariant]) -> Vec<Config> {
        let mut c = Config::scaling(variants);
        let counting = c.len() - 1;
        c.insert(
            counting,
            Config {
                name: "tcptrace watch --stacks".into(),
                tracer: Tracer::Tcptrace(TracerVariant {
                    name: "tcptrace watch --stacks",
                    args: vec!["watch", "--json", "--interval", "1", "--stacks"],
                    ready: Ready::FirstJsonLine,
                    bin: None,
                }),
            },
        );
        let counting = c.len() - 1;
        c.insert(
            counting,
            Config {
                name: "bpftrace printing (tcpstates)".into(),
                tracer: Tracer::Bpftrace {
                    program: BPFTRACE_PRINT,
                    counts: false,
                    attached: "inet_sock_set_state",
                },
            },
        );
        c
    }

    /// The configurations of the scaling phase: all but the printing bpftrace (too slow to say
    /// anything about many cores).
    pub(super) fn scaling(variants: &[TracerVariant]) -> Vec<Config> {
        let mut c = vec![
            Config {
                name: "baseline (nothing attached)".into(),
                tracer: Tracer::None,
            },
            Config::floor(),
        ];
        c.extend(variants.iter().map(|v| Config {
            name: v.name.into(),
            tracer: Tracer::Tcptrace(v.clone()),
        }));
        c.push(Config::counting());
        c
    }

    fn floor() -> Config {
        Config {
            name: "floor (tcptrace's programs, empty)".into(),
            tracer: Tracer::Floor,
        }
    }

    fn counting() -> Config {
        Config {
            name: "bpftrace counting in kernel".into(),
            tracer: Tracer::Bpftrace {
                program: BPFTRACE_COUNT,
                counts: true,
                attached: "inet_sock_set_state",
            },
        }
    }
}

/// The churn workloads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Workload {
    /// SO_LINGER {1,0} on both ends, root namespace.
    Rst,
    /// Normal close in our namespace (wide port range, tcp_tw_reuse=1).
    Fin,
}

impl Workload {
    pub(super) const ALL: [Workload; 2] = [Workload::Rst, Workload::Fin];

    pub(super) fn name(self) -> &'static str {
        match self {
            Workload::Rst => "RST close",
            Workload::Fin => "FIN close (netns)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_takes_a_name_and_an_executable_and_says_what_is_wrong_otherwise() {
        // /bin/sh: an executable file on every machine these tests run on.
        let (name, bin) = parse_compare("main build=/bin/sh").unwrap();
        assert_eq!(
            (name.as_str(), bin.as_path()),
            ("main build", Path::new("/bin/sh"))
        );
        let no_eq = parse_compare("/bin/sh").unwrap_err();
        assert!(no_eq.contains("expected NAME=BIN"), "{no_eq}");
        let bar = parse_compare("a|b=/bin/sh").unwrap_err();
        assert!(bar.contains("without '|'"), "{bar}");
        let empty = parse_compare(" =/bin/sh").unwrap_err();
        assert!(empty.contains("non-empty"), "{empty}");
        let missing = parse_compare("x=/nonexistent/tcptrace").unwrap_err();
        assert!(missing.contains("No such file"), "{missing}");
        let plain = std::env::temp_dir().join(format!("compare-test-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let not_exec = parse_compare(&format!("x={}", plain.display())).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert!(not_exec.contains("not an executable file"), "{not_exec}");
        let dir = parse_compare("x=/tmp").unwrap_err();
        assert!(dir.contains("not an executable file"), "{dir}");
    }
}
