//! Reading what churngen and tcptrace print, and asking the daemon on its control socket.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::DAEMON_SOCKET;

/// `a=1 b=2` -> {a: 1, b: 2}
pub(super) fn key_values(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

pub(super) fn parse_json(line: &str) -> Result<Value> {
    serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))
}

/// The `processes` entry of `pid` in a snapshot.
pub(super) fn process_entry(snap: &Value, pid: u32) -> Option<&Value> {
    snap["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid as u64))
}

/// `tcptrace <args> --json --socket DAEMON_SOCKET`, parsed, when the daemon answers.
fn daemon_json(bin: &Path, args: &[&str]) -> Option<Value> {
    let o = Command::new(bin)
        .args(args)
        .args(["--json", "--socket", DAEMON_SOCKET])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// `tcptrace status`, when the daemon answers.
pub(super) fn daemon_status(bin: &Path) -> Option<Value> {
    daemon_json(bin, &["status"])
}

/// `tcptrace report --pid PID` from the daemon, when it answers.
pub(super) fn daemon_report(bin: &Path, pid: u32) -> Option<Value> {
    daemon_json(bin, &["report", "--pid", &pid.to_string()])
}

/// Leaked CLOSE_WAIT sockets of `pid` in a snapshot or report.
pub(super) fn leaked_of(snap: &Value, pid: u32) -> u64 {
    process_entry(snap, pid)
        .and_then(|p| p["close_wait"]["leaked"].as_u64())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churngen_result_line() {
        let kv = key_values("connections=10 failed=0 secs=1.000 cps=10.0");
        assert_eq!(kv["connections"], "10");
        assert_eq!(kv["cps"], "10.0");
    }
}
