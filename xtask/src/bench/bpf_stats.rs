//! Kernel-side facts: attached programs, their run-time statistics, and the final check that
//! nothing of ours is left.

use std::{
    collections::{BTreeMap, HashSet},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{NETNS_PREFIX, host::proc_stat_fields, netns::netns_names, procs::SPAWNED};

/// Per program: (runs, run time ns).
pub(super) type ProgStats = BTreeMap<String, (u64, u64)>;

/// `bpftool perf list`: (owner pid, tracepoint, program id) of every perf-event link.
pub(super) fn perf_links() -> Vec<(u32, String, u64)> {
    let Ok(o) = Command::new("bpftool")
        .args(["-j", "perf", "list"])
        .output()
    else {
        return Vec::new();
    };
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&o.stdout) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| {
            Some((
                i["pid"].as_u64()? as u32,
                i["tracepoint"].as_str().unwrap_or("").to_string(),
                i["prog_id"].as_u64()?,
            ))
        })
        .collect()
}

/// Ids of the BPF programs `pid` holds a descriptor of (aya keeps its tracepoints as bpf_link
/// descriptors, which `bpftool perf list` does not show; every loader holds the program's).
fn prog_ids(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog")
        })
        .filter_map(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Programs our tracers loaded, for the final check that none is left.
static TRACER_PROGS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Notes the programs of a tracer that is up.
pub(super) fn remember_progs(pid: u32) {
    TRACER_PROGS.lock().unwrap().extend(prog_ids(pid));
}

/// Run count and run time of every program `pid` holds, by program name.
pub(super) fn prog_stats(pid: u32) -> Result<ProgStats> {
    let mut out = ProgStats::new();
    for id in prog_ids(pid) {
        let o = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .context("running bpftool")?;
        let v: Value = serde_json::from_slice(&o.stdout).context("bpftool prog show output")?;
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let e = out.entry(name).or_default();
        e.0 += v["run_cnt"].as_u64().unwrap_or(0);
        e.1 += v["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(out)
}

/// Ids of every BPF program loaded in the kernel (`bpftool prog list`).
fn loaded_prog_ids() -> Result<HashSet<u64>> {
    let o = Command::new("bpftool")
        .args(["-j", "prog", "list"])
        .output()
        .context("running bpftool prog list")?;
    let v: Value = serde_json::from_slice(&o.stdout).context("bpftool prog list output")?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

/// Whether BPF run-time statistics are on for every program (`kernel.bpf_stats_enabled`, left
/// on by someone): each run then pays for two clock reads, which the overhead figures must not
/// include.
pub(super) fn stats_sysctl_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// BPF run-time statistics, on while this lives (BPF_ENABLE_STATS: the kernel switches them
/// off when the descriptor closes, even if we die).
pub(super) struct BpfStats {
    _fd: std::os::fd::OwnedFd,
}

impl BpfStats {
    pub(super) fn enable() -> Result<Self> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }, type 0 = BPF_STATS_RUN_TIME.
        let attr = [0u64; 1];
        // SAFETY: a zeroed attribute of the size we pass.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                size_of_val(&attr) as libc::c_uint,
            )
        };
        if fd < 0 {
            bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd as _;
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Self {
            _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Fails when a process we started is still alive, a program one of our tracers loaded is
/// still loaded (`bpftool prog list`), or a namespace of ours still exists.
pub(super) fn check_clean() -> Result<()> {
    let me = std::process::id();
    let spawned = SPAWNED.lock().unwrap().clone();
    let mut problems = Vec::new();
    // Our children are reaped by their guards: any process whose parent is us is a stray.
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(stat) = proc_stat_fields(pid)
                && stat.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me)
            {
                problems.push(format!("process {pid} still running"));
            }
        }
    }
    for (pid, tp, id) in perf_links() {
        if spawned.contains(&pid) {
            problems.push(format!("program {id} on {tp} still attached by pid {pid}"));
        }
    }
    let ours = TRACER_PROGS.lock().unwrap().clone();
    let loaded = loaded_prog_ids()?;
    for id in ours.iter().filter(|id| loaded.contains(id)) {
        problems.push(format!("program {id} still loaded"));
    }
    let mine = [
        format!("{NETNS_PREFIX}{me}"),
        format!("{NETNS_PREFIX}{me}-s"),
    ];
    for name in netns_names() {
        if mine.contains(&name) {
            problems.push(format!("network namespace {name} left"));
        }
    }
    if !problems.is_empty() {
        bail!("the bench left things behind: {}", problems.join("; "));
    }
    Ok(())
}
