//! Containers and pods: a process in a Kubernetes-shaped cgroup (made by the test in the host's
//! cgroup v2 hierarchy) is shown with its full container id, its pod uid, and the pod's names
//! from kubelet-style log links; `--container` selects it.
//!
//! They need root; without it each prints SKIP and passes. Run with `cargo xtask test`.

use std::path::PathBuf;

use serde_json::Value;
use tcptrace_tests::{Scenario, Tcptrace, TempDir, process, require_root, u64_at};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");
const ID: &str = "c0ffee00112233445566778899aabbccddeeff00112233445566778899aabbcc";
const POD_UID: &str = "7e3f1c2a-4b5d-4e6f-8a9b-0c1d2e3f4a5b";

/// Where cgroup v2 is mounted (the unified hierarchy of a hybrid host, or the root).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// The cgroup directories of a pod's container, removed (innermost first) when dropped; the
/// processes in it must be gone by then.
struct PodCgroup(Vec<PathBuf>);

impl PodCgroup {
    fn create() -> PodCgroup {
        let root = cgroup2_root();
        let uid = POD_UID.replace('-', "_");
        let dirs = [
            "tctest-kubepods.slice".to_string(),
            format!("tctest-kubepods.slice/kubepods-besteffort-pod{uid}.slice"),
            format!(
                "tctest-kubepods.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{ID}.scope"
            ),
        ];
        let mut made = Vec::new();
        for d in dirs {
            let p = root.join(d);
            std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            made.push(p);
        }
        PodCgroup(made)
    }

    fn enter(&self, pid: u32) {
        let procs = self.0.last().unwrap().join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(p).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn leak_server(k: usize) -> Scenario {
    let mut s = Scenario::spawn(
        SCENARIO,
        &[],
        &[
            "leak-server",
            "--addr",
            "127.0.0.1:0",
            "--count",
            &k.to_string(),
        ],
    );
    let port = s.ready_port();
    let mut c = Scenario::spawn(
        SCENARIO,
        &[],
        &[
            "clients",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--count",
            &k.to_string(),
            "--wait-stdin",
        ],
    );
    c.expect("CONNECTED");
    s.expect("ACCEPTED");
    c.send_line();
    c.expect("DONE");
    s
}

#[test]
fn a_pod_container_is_named_and_selected() {
    require_root!("a_pod_container_is_named_and_selected");
    let logs = TempDir::new("podlogs");
    std::fs::write(logs.0.join(format!("checkout-5d8f_shop_api-{ID}.log")), b"").unwrap();
    let cg = PodCgroup::create();
    let inside = leak_server(2);
    cg.enter(inside.pid());
    let outside = leak_server(1);
    let logs_dir = logs.0.to_str().unwrap().to_string();
    let env = [("TCPTRACE_POD_LOGS", logs_dir.as_str())];

    let mut tt = Tcptrace::start_env(&["watch", "--json", "--interval", "1"], &env);
    let pid = inside.pid();
    let snap = tt.wait_line("the pod's process with its container and pod", |v| {
        process(v, pid).is_some_and(|p| u64_at(p, "close_wait.count") == Some(2))
    });
    let p = process(&snap, pid).unwrap();
    assert_eq!(p["container_id"], ID, "{p}");
    assert_eq!(p["container"], &ID[..12], "{p}");
    assert_eq!(p["pod_uid"], POD_UID, "{p}");
    assert_eq!(
        p["pod"],
        serde_json::json!({"namespace": "shop", "name": "checkout-5d8f", "container": "api"}),
        "{p}"
    );
    let out = process(&snap, outside.pid()).expect("the process outside any container");
    assert_eq!(out["container_id"], Value::Null, "{out}");
    assert_eq!(out["pod_uid"], Value::Null, "{out}");
    drop(tt);

    // --container by id prefix, and by pod name: the pod's process only.
    for sel in [&ID[..8], "checkout-5d8f"] {
        let mut tt = Tcptrace::start_env(
            &["watch", "--json", "--interval", "1", "--container", sel],
            &env,
        );
        let snap = tt.wait_line(&format!("--container {sel} shows pid {pid}"), |v| {
            process(v, pid).is_some()
        });
        let pids: Vec<u64> = snap["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect();
        assert_eq!(pids, vec![pid as u64], "--container {sel}: {snap}");
    }
    drop(inside);
    drop(outside);
}
