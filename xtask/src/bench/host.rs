//! What /proc and libc say about processes and this host: CPU ticks, peak RSS, limits.

use super::procs::SPAWNED;

/// Fields of /proc/PID/stat after the command name: [0] is the state (field 3).
pub(super) fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU ticks used so far by every user-space process but this one and those we started
/// (children that already exited count through their parent's cutime/cstime). Kernel threads
/// are left out: ksoftirqd does the workload's own network work.
pub(super) fn background_ticks() -> u64 {
    let me = std::process::id();
    let ours = SPAWNED.lock().unwrap().clone();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid != 2 && !ours.contains(&pid))
        .filter_map(proc_stat_fields)
        // [1] is the parent: kthreadd (2) parents every kernel thread.
        .filter(|f| f.get(1).map(String::as_str) != Some("2"))
        .map(|f| {
            // utime, stime, cutime, cstime: fields 14 to 17.
            f.iter()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Name (comm) of tcptrace's ring-buffer reader thread.
pub(super) const READER_THREAD: &str = "tcptrace-reader";

/// utime + stime of the threads of `pid` whose name starts with `name`, in clock ticks; None
/// when there is none.
pub(super) fn thread_ticks(pid: u32, name: &str) -> Option<u64> {
    let mut total = None;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        *total.get_or_insert(0) += t;
    }
    total
}

/// utime + stime of a process (all threads), in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = proc_stat_fields(pid)?;
    // Fields 14 and 15 of /proc/PID/stat.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub(super) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Peak resident set size (VmHWM) in KiB.
pub(super) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

pub(super) fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}
