//! What a fleet's monitoring relies on: a live metrics page that `promtool check metrics`
//! accepts, with the series of real scenarios; the alert rules under `promtool test rules`.
//!
//! Privileged tests print `SKIP` unless run as root. Run:
//!
//! ```text
//! TCPTRACE_BIN=target/release/tcptrace cargo test --release -p tcptrace-tests --test fleet -- --nocapture
//! ```

use std::{
    ffi::OsStr,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tcptrace_tests::{
    ClosedPort, Scenario, TempDir, free_port, http_request, poll, require_root, tcptrace_bin,
    url_encode,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

/// The body of a 200 answer.
fn get_ok(addr: &str, path: &str, headers: &str) -> Result<String, String> {
    let (status, _, body) = http_request(addr, path, headers)?;
    if !status.contains(" 200 ") {
        return Err(format!("GET {path}: {status}\n{body}"));
    }
    Ok(body)
}

/// The value of the sample named exactly `series` (name and labels) on a metrics page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// A daemon with its own control socket and metrics port.
struct Daemon {
    proc: Scenario,
    metrics: String,
    socket: PathBuf,
}

impl Daemon {
    /// A daemon whose counter series are not capped below what a busy test host needs (other
    /// tests' processes and destinations must not take the places of ours).
    fn start(name: &str, dir: &TempDir) -> Daemon {
        let config = dir.0.join("tcptrace.toml");
        std::fs::write(
            &config,
            "[limits]\nmetrics_top_processes = 10000\nmetrics_top_destinations = 10000\n",
        )
        .expect("write config");
        let socket = PathBuf::from(format!(
            "/tmp/tcptrace-fleet-{name}-{}.sock",
            std::process::id()
        ));
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(tcptrace_bin());
        cmd.arg("daemon").arg("--socket").arg(&socket).args([
            "--metrics-addr",
            &metrics,
            "--leak-after",
            "1",
        ]);
        let mut d = Daemon {
            proc: Scenario::from_command(cmd, format!("tcptrace daemon ({name})")),
            metrics,
            socket,
        };
        let ready = poll(30, || {
            if let Some(st) = d.proc.proc.exited() {
                return Ok(Err(format!("exited: {st}")));
            }
            get_ok(&d.metrics, "/readyz", "").map(Ok)
        });
        match ready {
            Ok(Ok(_)) => d,
            Ok(Err(e)) | Err(e) => panic!(
                "daemon not ready: {e}\nstderr: {}",
                d.proc.proc.stderr.tail(4000)
            ),
        }
    }

    /// The metrics page in the text format (no Accept header, as curl sends).
    fn page(&self) -> String {
        get_ok(&self.metrics, "/metrics", "").unwrap_or_else(|e| panic!("scrape: {e}"))
    }

    fn stderr(&self) -> String {
        self.proc.proc.stderr.tail(4000)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.proc.proc.stop(Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Runs `exe` (a copy of the `scenario` helper under a name of our own, so that the series of
/// its command name are ours alone while other tests run).
fn named_scenario(exe: &Path, args: &[&str]) -> Scenario {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    Scenario::from_command(cmd, format!("{} {}", exe.display(), args.join(" ")))
}

/// Real scenarios under a command name of our own (`<tag><pid>`): a server leaking `leaks`
/// CLOSE_WAIT sockets (its clients closed), and `refusals` connects refused by a closed port.
struct Scenarios {
    comm: String,
    server: Scenario,
    _clients: Scenario,
    _refused: Scenario,
    closed: ClosedPort,
}

impl Scenarios {
    fn start(dir: &TempDir, tag: &str, leaks: usize, refusals: usize) -> Scenarios {
        let comm = format!("{tag}{}", std::process::id() % 100_000);
        let exe = dir.copy_exe(Path::new(SCENARIO), OsStr::new(&comm));
        let (leaks, refusals) = (leaks.to_string(), refusals.to_string());
        let mut server = named_scenario(
            &exe,
            &["leak-server", "--addr", "127.0.0.1:0", "--count", &leaks],
        );
        let to = format!("127.0.0.1:{}", server.ready_port());
        let mut clients =
            Scenario::spawn(SCENARIO, &[], &["clients", "--to", &to, "--count", &leaks]);
        clients.expect("DONE");
        server.expect("ACCEPTED");
        let closed = ClosedPort::bind();
        let closed_addr = closed.addr().to_string();
        let mut refused = named_scenario(
            &exe,
            &["refused", "--to", &closed_addr, "--count", &refusals],
        );
        refused.expect("DONE");
        Scenarios {
            comm,
            server,
            _clients: clients,
            _refused: refused,
            closed,
        }
    }
}

/// Runs `promtool` with `args` in `dir`, feeding it `stdin`; (success, stdout + stderr).
fn promtool(dir: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): `cargo xtask setup` installs Debian's prometheus")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The alert rules load, and `promtool test rules` passes their tests, which hold for every
/// alert a case where it fires and one where it does not.
#[test]
fn alert_rules_pass_promtool_test_rules() {
    let dir = repo_file("deploy/prometheus");
    let rules = std::fs::read_to_string(dir.join("tcptrace-rules.yml")).expect("read rules");
    let tests = std::fs::read_to_string(dir.join("tcptrace-rules.test.yml")).expect("read tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 7, "alerts in the rules: {alerts:?}");
    // (alertname, whether the case expects alerts), from `alertname:` then `exp_alerts:`.
    let mut cases = Vec::new();
    let mut current = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some(name);
        } else if let Some(exp) = line.strip_prefix("exp_alerts:") {
            cases.push((
                current.take().expect("exp_alerts after alertname"),
                exp.trim() != "[]",
            ));
        }
    }
    for alert in &alerts {
        for fires in [true, false] {
            assert!(
                cases.contains(&(alert, fires)),
                "{alert}: no test case where it {} ({cases:?})",
                if fires { "fires" } else { "does not fire" }
            );
        }
    }
    let run = |args: &[&str]| {
        let (ok, said) = promtool(&dir, args, "");
        assert!(ok, "promtool {}:\n{said}", args.join(" "));
    };
    run(&["check", "rules", "tcptrace-rules.yml"]);
    run(&["test", "rules", "tcptrace-rules.test.yml"]);
}

/// A live scrape with a real leak and real refused connects passes `promtool check metrics`
/// with nothing to say, and carries their series with exact values; /healthz and /readyz
/// answer; Prometheus (which asks for OpenMetrics) gets OpenMetrics.
#[test]
fn live_scrape_is_clean_for_promtool_and_carries_the_scenarios() {
    require_root!("live_scrape_is_clean_for_promtool_and_carries_the_scenarios");
    let dir = TempDir::new("fleet-promtool");
    let daemon = Daemon::start("promtool", &dir);
    let sc = Scenarios::start(&dir, "flt", 3, 2);
    let (comm, server) = (&sc.comm, &sc.server);
    let closed_addr = sc.closed.addr().to_string();

    let leak = format!(
        "tcptrace_close_wait_leaked_sockets{{pid=\"{}\",comm=\"{comm}\",container_id=\"\"}}",
        server.pid()
    );
    let failures = format!(
        "tcptrace_process_connect_failures_total{{comm=\"{comm}\",container_id=\"\",errno=\"ECONNREFUSED\"}}"
    );
    let dest = format!(
        "tcptrace_destination_connect_failures_total{{remote=\"{closed_addr}\",errno=\"ECONNREFUSED\"}}"
    );
    let page = poll(30, || {
        let page = daemon.page();
        let got = [&leak, &failures, &dest].map(|s| sample(&page, s));
        if got == [Some(3.0), Some(2.0), Some(2.0)] {
            Ok(page)
        } else {
            Err(format!("{leak}, {failures}, {dest}: {got:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\ndaemon stderr: {}", daemon.stderr()));
    assert!(
        sample(
            &page,
            "tcptrace_connect_failures_total{errno=\"ECONNREFUSED\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "host failures:\n{page}"
    );
    for family in [
        "tcptrace_build_info{version=",
        "tcptrace_sockets{state=\"close_wait\"}",
        "tcptrace_capacity{kind=\"socket\"} 1000000",
        "tcptrace_tracked{kind=\"socket\"}",
        "tcptrace_degradations ",
        "tcptrace_connects_total ",
        "tcptrace_connections_closed_total ",
        "tcptrace_time_wait_entered_total ",
        "tcptrace_events_total ",
        "tcptrace_dropped_events_total ",
    ] {
        assert!(page.contains(family), "no {family} in:\n{page}");
    }
    assert!(
        !page.contains("state=\"total\""),
        "a total beside its parts:\n{page}"
    );

    let (ok, said) = promtool(Path::new("/"), &["check", "metrics"], &page);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics:\n{said}\npage:\n{page}"
    );

    let (status, head, body) = http_request(
        &daemon.metrics,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    )
    .unwrap();
    assert!(
        status.contains(" 200 ") && head.contains("application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "OpenMetrics page:\n{body}");
    assert_eq!(get_ok(&daemon.metrics, "/healthz", "").unwrap(), "ok\n");
    let (status, _, _) = http_request(&daemon.metrics, "/nothing", "").unwrap();
    assert!(status.contains(" 404 "), "{status}");
}

/// Every query of the Grafana dashboard, run by a real Prometheus scraping a real daemon while
/// a process leaks CLOSE_WAIT sockets and another has its connects refused, returns series;
/// the leak and the failures show with their exact values.
#[test]
fn dashboard_queries_return_series_from_a_real_prometheus() {
    require_root!("dashboard_queries_return_series_from_a_real_prometheus");
    let prometheus = "/usr/bin/prometheus";
    assert!(
        Path::new(prometheus).exists(),
        "{prometheus} missing: `cargo xtask setup` installs it"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/tcptrace.json"))
            .expect("read dashboard"),
    )
    .expect("dashboard is JSON");
    let mut queries: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().expect("expr").to_string()))
        })
        .collect();
    assert!(queries.len() >= 6, "{queries:?}");
    // The host variable's query (Grafana's label_values) reads this family.
    queries.push(("variable instance".into(), "tcptrace_build_info".into()));

    let dir = TempDir::new("fleet-dashboard");
    let daemon = Daemon::start("dashboard", &dir);
    let sc = Scenarios::start(&dir, "fld", 4, 3);
    let (comm, server) = (&sc.comm, &sc.server);

    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tcptrace\n    static_configs:\n      - targets: ['{}']\n",
            daemon.metrics
        ),
    )
    .expect("write prometheus.yml");
    let web = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"));
    let prom = Scenario::from_command(cmd, "prometheus".into());

    let query = |expr: &str| -> Result<Vec<serde_json::Value>, String> {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        let body = get_ok(
            &web,
            &format!("/api/v1/query?query={}", url_encode(&expr)),
            "",
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        match v["data"]["result"].as_array() {
            Some(r) if !r.is_empty() => Ok(r.clone()),
            _ => Err(format!("{expr}: {body}")),
        }
    };
    for (title, expr) in &queries {
        if let Err(e) = poll(60, || query(expr)) {
            panic!(
                "dashboard panel {title:?}: no series: {e}\nprometheus: {}\ndaemon stderr: {}",
                prom.proc.stderr.tail(2000),
                daemon.stderr()
            );
        }
    }
    // The scenarios themselves, exactly.
    let exact = [
        (
            format!(
                "tcptrace_close_wait_leaked_sockets{{pid=\"{}\"}}",
                server.pid()
            ),
            "4",
        ),
        (
            format!(
                "tcptrace_process_connect_failures_total{{comm=\"{comm}\",errno=\"ECONNREFUSED\"}}"
            ),
            "3",
        ),
    ];
    for (expr, want) in exact {
        let got = poll(30, || {
            let r = query(&expr)?;
            match r[0]["value"][1].as_str() {
                Some(v) if v == want => Ok(()),
                other => Err(format!("{expr} = {other:?}, want {want}")),
            }
        });
        if let Err(e) = got {
            panic!("{e}\ndaemon page:\n{}", daemon.page());
        }
    }
}

/// The DaemonSet probes /healthz and /readyz, mounts no service-account token, and binds the
/// metrics to the node's IP from the downward API rather than to every address (tests/daemon.rs
/// checks it with `kubernetes-validate --strict`).
#[test]
fn daemonset_probes_token_and_metrics_address() {
    let path = repo_file("deploy/kubernetes/daemonset.yaml");
    let yaml = std::fs::read_to_string(&path).expect("read daemonset");
    let lines: Vec<&str> = yaml
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let after = |key: &str| -> Vec<&str> {
        lines
            .windows(3)
            .filter(|w| w[0] == key)
            .map(|w| w[2])
            .collect()
    };
    assert_eq!(after("livenessProbe:"), ["path: /healthz"], "{yaml}");
    assert_eq!(after("readinessProbe:"), ["path: /readyz"], "{yaml}");
    assert!(
        lines.contains(&"automountServiceAccountToken: false"),
        "{yaml}"
    );
    let addr = lines
        .windows(2)
        .find(|w| w[0] == "- --metrics-addr")
        .map(|w| w[1]);
    assert_eq!(addr, Some("- $(NODE_IP):9464"), "{yaml}");
    assert!(
        lines
            .windows(4)
            .any(|w| w[0] == "- name: NODE_IP" && w[3] == "fieldPath: status.hostIP"),
        "NODE_IP from the downward API:\n{yaml}"
    );
    assert!(!yaml.contains("0.0.0.0"), "{yaml}");
    // The seccomp profile tested below.
    assert!(
        lines.windows(3).any(|w| w[0] == "seccompProfile:"
            && w[1] == "type: Localhost"
            && w[2] == "localhostProfile: profiles/tcptrace.json"),
        "the DaemonSet uses deploy/kubernetes/seccomp/tcptrace.json:\n{yaml}"
    );
}

/// deploy/kubernetes/prometheusrule.yaml carries exactly the groups of the rules file that
/// `promtool test rules` checks (indented under `spec:`), and promtool accepts them as they
/// stand there.
#[test]
fn prometheus_rule_is_the_rules_file() {
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/tcptrace-rules.yml"))
        .expect("read the rules file");
    let groups = &rules[rules.find("groups:").expect("groups: in the rules file")..];
    let cr_path = repo_file("deploy/kubernetes/prometheusrule.yaml");
    let cr = std::fs::read_to_string(&cr_path).expect("read the PrometheusRule");
    for line in [
        "apiVersion: monitoring.coreos.com/v1",
        "kind: PrometheusRule",
        "  name: tcptrace",
    ] {
        assert!(
            cr.lines().any(|l| l == line),
            "{line:?} missing from {cr_path:?}"
        );
    }
    let spec = &cr[cr.find("\nspec:\n").expect("spec: in the PrometheusRule") + 7..];
    let unindented: String = spec
        .lines()
        .map(|l| {
            assert!(l.is_empty() || l.starts_with("  "), "not under spec: {l:?}");
            l.strip_prefix("  ").unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        unindented.trim_end(),
        groups.trim_end(),
        "{cr_path:?} differs from the rules file: regenerate it"
    );
    let dir = tcptrace_tests::TempDir::new("prometheusrule");
    let extracted = dir.0.join("rules.yml");
    std::fs::write(&extracted, &unindented).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&extracted)
        .output()
        .expect("promtool (cargo xtask setup installs prometheus)");
    assert!(
        out.status.success(),
        "promtool check rules on the PrometheusRule's spec: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PodMonitor selects the DaemonSet's pods (same namespace, the template's label) and
/// scrapes the container port it names, at /metrics.
#[test]
fn pod_monitor_scrapes_the_daemonset() {
    let ds = std::fs::read_to_string(repo_file("deploy/kubernetes/daemonset.yaml")).unwrap();
    let pm = std::fs::read_to_string(repo_file("deploy/kubernetes/podmonitor.yaml")).unwrap();
    let trimmed = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(String::from)
            .collect()
    };
    let (ds, pm) = (trimmed(&ds), trimmed(&pm));
    assert!(pm.contains(&"kind: PodMonitor".to_string()), "{pm:?}");
    assert!(
        pm.contains(&"namespace: kube-system".to_string())
            && ds.contains(&"namespace: kube-system".to_string()),
        "same namespace"
    );
    let label = pm
        .windows(2)
        .find(|w| w[0] == "matchLabels:")
        .map(|w| w[1].clone())
        .expect("PodMonitor selector");
    let template_labels = ds
        .windows(2)
        .filter(|w| w[0] == "labels:")
        .map(|w| w[1].clone())
        .collect::<Vec<_>>();
    assert!(
        template_labels.contains(&label),
        "the DaemonSet's pods carry {label:?}: {template_labels:?}"
    );
    let port = pm
        .iter()
        .find_map(|l| l.strip_prefix("- port: "))
        .expect("podMetricsEndpoints port");
    assert!(
        ds.windows(2)
            .any(|w| w[0] == format!("- name: {port}") && w[1].starts_with("containerPort: ")),
        "the DaemonSet names a container port {port:?}"
    );
    assert!(pm.contains(&"path: /metrics".to_string()), "{pm:?}");
}

/// System call names in an `strace -f -o` trace.
fn syscalls_in(trace: &str) -> std::collections::BTreeSet<String> {
    trace
        .lines()
        .filter_map(|l| {
            // "PID name(args" or "PID <... name resumed>"; signals and exits start otherwise.
            let rest = l.trim_start().split_once(' ')?.1.trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && rest[name.len()..].starts_with(['(', ' '])).then_some(name)
        })
        .filter(|n| n.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .collect()
}

/// The seccomp profile the DaemonSet gives the daemon (deploy/kubernetes/seccomp/tcptrace.json)
/// allows every system call the daemon makes: run under strace through start-up, a leak with
/// stacks on, reports and status, scrapes, /healthz, a SIGHUP reload and SIGTERM.
#[test]
fn seccomp_profile_allows_every_syscall_the_daemon_makes() {
    require_root!("seccomp_profile_allows_every_syscall_the_daemon_makes");
    seccomp_allows_every_syscall_of(&tcptrace_bin(), "seccomp");
}

/// The same for the image's static binary (musl makes other system calls than glibc: `open`
/// and `stat` where glibc uses `openat` and `statx`).
#[test]
fn seccomp_profile_allows_every_syscall_the_image_binary_makes() {
    require_root!("seccomp_profile_allows_every_syscall_the_image_binary_makes");
    let Some((_, bin)) = image_under_test() else {
        return;
    };
    seccomp_allows_every_syscall_of(&bin, "seccomp-musl");
}

/// The image `cargo xtask image` built and its static binary, from the environment `cargo
/// xtask test` sets; None (with the reason printed) when run otherwise.
fn image_under_test() -> Option<(String, PathBuf)> {
    match (
        std::env::var("TCPTRACE_IMAGE"),
        std::env::var_os("TCPTRACE_IMAGE_BIN"),
    ) {
        (Ok(image), Some(bin)) => Some((image, PathBuf::from(bin))),
        _ => {
            assert!(
                std::env::var_os("TCPTRACE_BIN").is_none(),
                "cargo xtask test sets TCPTRACE_BIN but no TCPTRACE_IMAGE / TCPTRACE_IMAGE_BIN"
            );
            println!(
                "SKIP: no container image to test: run through `cargo xtask test`, which builds it"
            );
            None
        }
    }
}

/// `tag` names the test's own temporary directory.
fn seccomp_allows_every_syscall_of(bin: &Path, tag: &str) {
    let profile: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/kubernetes/seccomp/tcptrace.json"))
            .expect("read the seccomp profile"),
    )
    .expect("the seccomp profile is JSON");
    assert_eq!(
        profile["defaultAction"], "SCMP_ACT_ERRNO",
        "deny by default"
    );
    let allowed: std::collections::BTreeSet<String> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|r| r["names"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(String::from))
        .collect();

    let dir = TempDir::new(tag);
    let trace = dir.0.join("strace.out");
    let config = dir.0.join("tcptrace.toml");
    std::fs::write(&config, "stacks = true\n").unwrap();
    let socket = dir.0.join("d.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(bin)
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics-addr", &metrics, "--leak-after", "1"]);
    let mut d = Scenario::from_command(cmd, "strace tcptrace daemon".into());
    poll(60, || get_ok(&metrics, "/readyz", ""))
        .unwrap_or_else(|e| panic!("daemon not ready: {e}\n{}", d.proc.stderr.tail(4000)));
    let status = tcptrace_tests::daemon_json("status", &socket).expect("status");
    let pid = status["pid"].as_u64().expect("daemon pid") as libc::pid_t;
    let s = Scenarios::start(&dir, "sc", 3, 2);
    let server = s.server.pid();
    poll(30, || {
        let r = tcptrace_tests::daemon_json("report", &socket)?;
        match tcptrace_tests::process(&r, server)
            .and_then(|p| tcptrace_tests::u64_at(p, "close_wait.leaked"))
        {
            Some(3) => Ok(()),
            n => Err(format!("leaked {n:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.stderr.tail(4000)));
    get_ok(&metrics, "/metrics", "").expect("scrape");
    get_ok(&metrics, "/healthz", "").expect("healthz");
    // SAFETY: plain syscalls on the daemon we started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    poll(10, || {
        let e = d.proc.stderr.text();
        if e.contains("config reloaded") {
            Ok(())
        } else {
            Err("no reload logged".to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.stderr.tail(4000)));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let exited = poll(20, || {
        d.proc
            .exited()
            .ok_or_else(|| "strace still running".to_string())
    });
    assert!(exited.is_ok(), "the daemon did not stop under strace");
    drop(s);

    let seen = syscalls_in(&std::fs::read_to_string(&trace).expect("read the trace"));
    assert!(
        seen.contains("bpf") && seen.contains("perf_event_open") && seen.contains("execve"),
        "the trace shows the daemon's start: {seen:?}"
    );
    let missing: Vec<&String> = seen.iter().filter(|n| !allowed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "system calls the daemon made that the seccomp profile denies: {missing:?} (seen: {seen:?})"
    );
}

/// Removes a container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "2", &self.0])
            .output();
    }
}

/// The container image (`cargo xtask image`), run by podman with the privileges the DaemonSet
/// gives it (host PID and network namespaces, its capabilities and nothing else, the seccomp
/// profile, no new privileges, a read-only root, tracefs and /run/tcptrace mounted), reports a
/// CLOSE_WAIT leak made on the host; it is the image the DaemonSet names, and it stops cleanly
/// on SIGTERM, leaving nothing behind.
#[test]
fn image_reports_a_host_leak_with_the_daemonset_privileges() {
    require_root!("image_reports_a_host_leak_with_the_daemonset_privileges");
    let Some((image, _)) = image_under_test() else {
        return;
    };
    let manifest =
        std::fs::read_to_string(repo_file("deploy/kubernetes/daemonset.yaml")).expect("manifest");
    let named = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .expect("the DaemonSet names an image");
    assert_eq!(named, image, "the DaemonSet runs the image xtask builds");
    for needed in [
        "hostPID: true",
        "hostNetwork: true",
        "readOnlyRootFilesystem: true",
    ] {
        assert!(manifest.contains(needed), "the DaemonSet has {needed}");
    }
    let caps: Vec<String> = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .expect("the DaemonSet adds capabilities")
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_string())
        .collect();
    assert!(caps.contains(&"BPF".to_string()), "{caps:?}");

    let dir = TempDir::new("image");
    let run = dir.0.join("run");
    std::fs::create_dir(&run).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let name = format!("tcptrace-image-test-{}", std::process::id());
    let mut cmd = Command::new("podman");
    cmd.arg("run");
    // crun needs cgroup v2 alone; runc (installed by cargo xtask setup) also takes v1 and
    // hybrid hierarchies.
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        cmd.args(["--runtime", "runc"]);
    }
    cmd.args(["--rm", "--name", &name])
        // podman would raise these limits to its defaults, which a root without
        // CAP_SYS_RESOURCE in its bounding set cannot do.
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--pid=host", "--network=host", "--user", "0", "--read-only"])
        .args(["--cap-drop", "ALL", "--cap-add", &caps.join(",")])
        .arg("--security-opt")
        .arg(format!(
            "seccomp={}",
            repo_file("deploy/kubernetes/seccomp/tcptrace.json").display()
        ))
        .args(["--security-opt", "no-new-privileges"])
        .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
        .arg("-v")
        .arg(format!("{}:/run/tcptrace", run.display()))
        .arg(&image)
        .args(["daemon", "--socket", "/run/tcptrace/tcptrace.sock"])
        .args(["--metrics-addr", &metrics, "--leak-after", "1"]);
    let container = Container(name.clone());
    let mut d = Scenario::from_command(cmd, format!("podman run {image}"));
    poll(60, || get_ok(&metrics, "/readyz", "")).unwrap_or_else(|e| {
        panic!(
            "the image's daemon not ready: {e}\n{}",
            d.proc.stderr.tail(4000)
        )
    });
    let socket = run.join("tcptrace.sock");
    let s = Scenarios::start(&dir, "img", 3, 1);
    let server = s.server.pid();
    let report = poll(30, || {
        let r = tcptrace_tests::daemon_json("report", &socket)?;
        let p = tcptrace_tests::process(&r, server).cloned();
        match p.as_ref().map(|p| {
            (
                tcptrace_tests::u64_at(p, "close_wait.count"),
                tcptrace_tests::u64_at(p, "close_wait.leaked"),
            )
        }) {
            Some((Some(3), Some(3))) => Ok(p),
            n => Err(format!("server {server}: (count, leaked) {n:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.stderr.tail(4000)));
    let report = report.unwrap();
    assert_eq!(report["comm"], s.comm.as_str(), "{report}");
    let page = get_ok(&metrics, "/metrics", "").expect("scrape");
    assert!(page.contains("tcptrace_degradations 0"), "{page}");

    let stop = Command::new("podman")
        .args(["stop", "--time", "10", &name])
        .output()
        .expect("podman stop");
    assert!(stop.status.success(), "podman stop: {stop:?}");
    let exited = poll(20, || {
        d.proc
            .exited()
            .ok_or_else(|| "podman run still running".to_string())
    })
    .expect("the container stops");
    assert!(
        exited.success(),
        "the image's daemon exit after SIGTERM: {exited}\n{}",
        d.proc.stderr.tail(4000)
    );
    assert!(
        d.proc.stderr.text().contains("tcptrace daemon stopping"),
        "{}",
        d.proc.stderr.tail(4000)
    );
    assert!(!socket.exists(), "the control socket is left behind");
    drop(container);
    drop(s);
}
