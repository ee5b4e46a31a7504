//! Network namespaces of ours: created, used, deleted (also those a dead run left).

use std::{path::Path, process::Command};

use anyhow::Result;

use super::{FIN_LISTENERS, FIN_PORT, NETNS_PREFIX};

/// A network namespace of ours with lo up, a wide port range (minus the FIN listeners' ports),
/// TIME_WAIT reuse and room for every TIME_WAIT socket the FIN workload makes; deleted when
/// dropped.
pub(super) struct Netns {
    name: String,
}

impl Netns {
    pub(super) fn create(name: &str) -> Result<Self> {
        crate::sh(Command::new("ip").args(["netns", "add", name]))?;
        // The guard exists from here on: a failure below still deletes the namespace.
        let ns = Self {
            name: name.to_string(),
        };
        crate::sh(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        let reserved = format!(
            "net.ipv4.ip_local_reserved_ports={FIN_PORT}-{}",
            FIN_PORT + FIN_LISTENERS as u16 - 1
        );
        crate::sh(ns.exec(Path::new("sysctl")).args([
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            &reserved,
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.tcp_max_tw_buckets=1000000",
        ]))?;
        Ok(ns)
    }

    /// `ip netns exec NAME program`: `ip` execs the program, so the child's pid is its pid.
    pub(super) fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("bench: could not delete network namespace {}", self.name);
        }
    }
}

pub(super) fn netns_names() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes namespaces left by a bench run that died without cleaning up (its pid is gone).
pub(super) fn remove_stale_netns() {
    for name in netns_names() {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            println!("bench: deleting stale network namespace {name}");
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}
