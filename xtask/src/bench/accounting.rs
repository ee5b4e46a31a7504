//! Ring accounting: with a deliberately small ring, tcptrace still accounts for every transition
//! the kernel made. The kernel counts the tracepoint's hits itself (a perf counter on
//! `sock:inet_sock_set_state`, on every CPU: no BPF involved, nothing tcptrace could get wrong),
//! and the daemon says what became of them: transition records seen, dropped because the ring
//! was full, missed (runs the kernel skipped), not sent by design (LISTEN -> SYN_RECV). The two
//! must be equal. (Connect and error records are counted apart by the daemon.)
//!
//! Both sides count host-wide, so other TCP traffic during the load does not matter; the
//! counters are read at moments when neither moves (the ring drained, no transition in flight).

use std::{
    fs::File,
    io::Read as _,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Bench, DAEMON_SOCKET,
    configs::Workload,
    parse::daemon_status,
    procs::{Proc, check_interrupted, wait_until},
};

/// The ring the check runs with, in KiB (the daemon splits it between one ring per CPU, at
/// least a page each): small enough that the churn overflows it.
pub(super) const SMALL_RING_KIB: u32 = 8;

/// What the daemon says became of the transitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Accounted {
    pub(super) seen: u64,
    pub(super) dropped: u64,
    pub(super) missed: u64,
    pub(super) not_sent: u64,
}

impl Accounted {
    fn total(&self) -> u64 {
        self.seen + self.dropped + self.missed + self.not_sent
    }

    fn minus(&self, o: &Accounted) -> Accounted {
        Accounted {
            seen: self.seen - o.seen,
            dropped: self.dropped - o.dropped,
            missed: self.missed - o.missed,
            not_sent: self.not_sent - o.not_sent,
        }
    }
}

/// The check's figures, over the load.
#[derive(Clone, Debug)]
pub(super) struct Accounting {
    pub(super) ring_kib: u32,
    pub(super) connections: u64,
    /// Connects that failed (their connect and error records are not transitions and are
    /// counted apart).
    pub(super) failed: u64,
    /// Tracepoint hits, from the kernel's perf counter.
    pub(super) transitions: u64,
    pub(super) tcptrace: Accounted,
}

impl Accounting {
    /// Whether every transition is accounted for, exactly.
    pub(super) fn exact(&self) -> bool {
        self.tcptrace.total() == self.transitions
    }

    pub(super) fn render(&self) -> String {
        let a = &self.tcptrace;
        let verdict = if self.exact() {
            "every transition accounted for".to_string()
        } else {
            format!(
                "MISMATCH: {} accounted for, {} made",
                a.total(),
                self.transitions
            )
        };
        format!(
            "\n## Ring accounting with a deliberately small ring\n\n\
             `tcptrace daemon` with `ring_buffer_kib = {}` under RST churn ({} connections, {} failed). \
             Transitions made: the kernel's own perf counter on `sock:inet_sock_set_state`, every \
             CPU (no BPF). The daemon's figures for transition records over the same window: seen + dropped \
             (ring full) + missed (runs the kernel skipped) + not sent by design (LISTEN -> \
             SYN_RECV) must equal it.\n\n\
             | transitions made | seen | dropped | missed | not sent | seen + dropped + missed + not sent | result |\n\
             |---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} | {} | {} | {} |\n",
            self.ring_kib,
            self.connections,
            self.failed,
            self.transitions,
            a.seen,
            a.dropped,
            a.missed,
            a.not_sent,
            a.total(),
            verdict,
        )
    }
}

impl Bench {
    /// The daemon with a small ring under RST churn; transitions counted by the kernel against
    /// what the daemon accounts for.
    pub(super) fn ring_accounting(&self) -> Result<Accounting> {
        // The daemon takes its ring size from its config file (the bench's scratch folder,
        // where the binary was copied).
        let config = self
            .bin
            .parent()
            .context("the binary's folder")?
            .join("small-ring.toml");
        std::fs::write(&config, format!("ring_buffer_kib = {SMALL_RING_KIB}\n"))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut daemon = Proc::spawn(
            "tcptrace daemon (small ring)",
            Command::new(&self.bin)
                .args(["daemon", "--socket", DAEMON_SOCKET])
                .args(["--metrics-addr", "127.0.0.1:0"])
                .arg("--config")
                .arg(&config),
            false,
        )?;
        wait_until(
            Duration::from_secs(30),
            "the daemon's control socket",
            || daemon_status(&self.bin).is_some(),
        )?;
        let hits = TracepointCounter::open("sock", "inet_sock_set_state")?;
        let (t0, a0) = settled(&self.bin, &hits)?;
        let churn = self.churn(Workload::Rst, None, self.plan.secs)?;
        let (t1, a1) = settled(&self.bin, &hits)?;
        daemon.stop(libc::SIGTERM)?;
        let acc = Accounting {
            ring_kib: SMALL_RING_KIB,
            connections: churn.connections,
            failed: churn.failed,
            transitions: t1 - t0,
            tcptrace: a1.minus(&a0),
        };
        println!(
            "bench: ring accounting ({} KiB): {} transitions made; seen {} + dropped {} + missed {} + not sent {} = {}{}",
            SMALL_RING_KIB,
            acc.transitions,
            acc.tcptrace.seen,
            acc.tcptrace.dropped,
            acc.tcptrace.missed,
            acc.tcptrace.not_sent,
            acc.tcptrace.total(),
            if acc.exact() { "" } else { "  MISMATCH" }
        );
        Ok(acc)
    }
}

/// The tracepoint count and the daemon's figures at a moment when neither moves: read, wait,
/// read again until two readings agree (the ring drained, no transition in flight). The daemon
/// refreshes its kernel counters once a second, so the readings are further apart than that.
fn settled(bin: &Path, hits: &TracepointCounter) -> Result<(u64, Accounted)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = || -> Result<(u64, Accounted)> {
        let st = daemon_status(bin).context("the daemon stopped answering")?;
        let n = |k: &str| st[k].as_u64().with_context(|| format!("status has no {k}"));
        Ok((
            hits.read()?,
            Accounted {
                seen: n("transitions_seen")?,
                dropped: n("transitions_dropped")?,
                missed: n("transitions_missed")?,
                not_sent: n("transitions_not_sent")?,
            },
        ))
    };
    let mut last = read()?;
    loop {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(1500));
        let now = read()?;
        if now == last {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!(
                "ring accounting: the host kept making TCP transitions for 30 s; no quiet moment \
                 to read the counters at (run the bench on a quieter host)"
            );
        }
        last = now;
    }
}

/// A perf counter of one tracepoint's hits on every online CPU (system-wide, all processes).
struct TracepointCounter(Vec<File>);

impl TracepointCounter {
    fn open(system: &str, event: &str) -> Result<Self> {
        let id_file = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(|root| format!("{root}/events/{system}/{event}/id"))
            .find(|p| Path::new(p).exists())
            .with_context(|| format!("tracefs has no {system}:{event} (is tracefs mounted?)"))?;
        let id: u64 = std::fs::read_to_string(&id_file)
            .with_context(|| format!("reading {id_file}"))?
            .trim()
            .parse()
            .with_context(|| format!("{id_file} is not a number"))?;
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .context("reading /sys/devices/system/cpu/online")?;
        let cpus = cpu_list(&online)
            .with_context(|| format!("/sys/devices/system/cpu/online: {online:?}"))?;
        let mut files = Vec::new();
        for cpu in cpus {
            files.push(perf_tracepoint(id, cpu).with_context(|| {
                format!("perf_event_open on {system}:{event}, CPU {cpu} (needs root)")
            })?);
        }
        Ok(Self(files))
    }

    /// Hits so far, summed over CPUs.
    fn read(&self) -> Result<u64> {
        let mut sum = 0;
        for mut f in &self.0 {
            let mut buf = [0u8; 8];
            f.read_exact(&mut buf).context("reading a perf counter")?;
            sum += u64::from_ne_bytes(buf);
        }
        Ok(sum)
    }
}

/// `perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, which every kernel accepts).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// A counting (not sampling) perf event on tracepoint `id`, on `cpu`, for every process.
fn perf_tracepoint(id: u64, cpu: u32) -> std::io::Result<File> {
    const PERF_TYPE_TRACEPOINT: u32 = 2;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttr>() as u32,
        config: id,
        ..Default::default()
    };
    // SAFETY: the attribute is a valid perf_event_attr of the size it says; pid -1 with a cpu
    // counts every process on that CPU.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// "0-3,5,7-8" -> [0, 1, 2, 3, 5, 7, 8].
fn cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_cpu_lists() {
        assert_eq!(cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(cpu_list("0-3,5,7-8"), Some(vec![0, 1, 2, 3, 5, 7, 8]));
        assert_eq!(cpu_list("0"), Some(vec![0]));
        assert_eq!(cpu_list(""), None);
        assert_eq!(cpu_list("x"), None);
    }

    #[test]
    fn perf_attr_is_the_first_published_size() {
        assert_eq!(size_of::<PerfEventAttr>(), 64);
    }

    #[test]
    fn accounting_is_exact_only_when_every_transition_is_accounted_for() {
        let mut a = Accounting {
            ring_kib: 8,
            connections: 10,
            failed: 0,
            transitions: 60,
            tcptrace: Accounted {
                seen: 40,
                dropped: 8,
                missed: 2,
                not_sent: 10,
            },
        };
        assert!(a.exact());
        assert!(
            a.render()
                .contains("| 60 | 40 | 8 | 2 | 10 | 60 | every transition")
        );
        a.tcptrace.dropped = 7;
        assert!(!a.exact());
        assert!(a.render().contains("MISMATCH: 59 accounted for, 60 made"));
    }
}
