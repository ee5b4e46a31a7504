//! Processes: one entry per (pid, start time), created when a pid is first seen, described
//! from /proc (through [`ProcSource`]), marked exited when its pid goes away or is reused, kept
//! for a while, then folded into the exited totals.

use std::{collections::VecDeque, net::SocketAddr};

use rustc_hash::FxHashMap as HashMap;

use super::{
    destinations::{DestStats, ErrCounts},
    snapshot::PodView,
    table::{NS, Table},
};
use crate::kernel::event::Owner;

/// Seconds of close history kept per process for the closes-per-second rate.
const RATE_BUCKETS: usize = 64;
/// Window of the closes-per-second rate, in seconds.
const RATE_WINDOW: u64 = 5;
/// Per-process destinations kept; further ones are summed under "other".
const MAX_PROC_DESTS: usize = 64;

/// What the table needs to know about processes, from /proc in production and from a fake in
/// tests. Called when a pid is first seen and once per tick per live process, never per event.
pub trait ProcSource {
    /// Start time of the process `pid` now has, or None when no such process exists (or its
    /// start time cannot be read).
    fn start_time(&mut self, pid: u32) -> Option<u64>;
    /// Whether `pid` is still the process that started at `start`. False only when the pid
    /// is gone or has another start time, never because something could not be read or
    /// parsed: a process must not drop out of the views (and hide its sockets) by having an
    /// odd name.
    fn still_running(&mut self, pid: u32, start: u64) -> bool {
        self.start_time(pid) == Some(start)
    }
    /// Descriptive fields; None when the process is gone.
    fn meta(&mut self, pid: u32) -> Option<ProcMeta>;
    /// The process's network namespace (inode of /proc/PID/ns/net), when known: says whether
    /// its sockets are in this namespace's socket list (see [`Table::reconcile`]).
    fn netns(&mut self, _pid: u32) -> Option<u64> {
        None
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcMeta {
    pub comm: String,
    pub cmdline: String,
    pub cgroup: String,
    /// The container id's first 12 hex digits, and all of it.
    pub container: Option<String>,
    pub container_id: Option<String>,
    /// On Kubernetes: the pod's uid, and its namespace, name and container name where the node
    /// shows them.
    pub pod_uid: Option<String>,
    pub pod: Option<PodView>,
}

pub(super) type ProcId = u64;

#[derive(Clone, Debug)]
pub(super) struct Proc {
    pub(super) pid: u32,
    pub(super) start_time: u64,
    pub(super) meta: ProcMeta,
    pub(super) last_seen_ns: u64,
    pub(super) exited_ns: Option<u64>,
    /// Network namespace when first seen (inode), if known.
    pub(super) netns: Option<u64>,
    pub(super) connects_ok: u64,
    pub(super) failed: ErrCounts,
    pub(super) closed_total: u64,
    pub(super) time_wait_total: u64,
    /// Closes per second for the last RATE_BUCKETS seconds; `bucket_sec` is the newest.
    pub(super) close_buckets: [u32; RATE_BUCKETS],
    pub(super) bucket_sec: u64,
    /// Times (ns) at which sockets of this process entered CLOSE_WAIT, last minute.
    pub(super) cw_entries: VecDeque<u64>,
    pub(super) dests: HashMap<(u64, SocketAddr), DestStats>,
    /// When `meta` was last read (a holder is re-read now and then: exec changes its name).
    pub(super) meta_ns: u64,
}

impl Proc {
    pub(super) fn count_close(&mut self, now_ns: u64) {
        self.roll(now_ns / NS);
        self.closed_total += 1;
        self.close_buckets[(self.bucket_sec % RATE_BUCKETS as u64) as usize] += 1;
    }

    pub(super) fn roll(&mut self, sec: u64) {
        if sec <= self.bucket_sec {
            return;
        }
        let steps = (sec - self.bucket_sec).min(RATE_BUCKETS as u64);
        for i in 1..=steps {
            self.close_buckets[((self.bucket_sec + i) % RATE_BUCKETS as u64) as usize] = 0;
        }
        self.bucket_sec = sec;
    }

    /// Closes per second over the last RATE_WINDOW seconds, the current one included, so that a
    /// burst shows at once.
    pub(super) fn close_rate(&self, now_ns: u64) -> f64 {
        self.closes_in(now_ns, RATE_WINDOW) as f64 / RATE_WINDOW as f64
    }

    /// Closes in the last `secs` seconds (at most RATE_BUCKETS), the current one included.
    pub(super) fn closes_in(&self, now_ns: u64, secs: u64) -> u64 {
        let now_sec = now_ns / NS;
        let mut sum = 0u64;
        for s in (now_sec + 1).saturating_sub(secs)..=now_sec {
            if s <= self.bucket_sec && self.bucket_sec - s < RATE_BUCKETS as u64 {
                sum += self.close_buckets[(s % RATE_BUCKETS as u64) as usize] as u64;
            }
        }
        sum
    }

    pub(super) fn dest(&mut self, netns: u64, remote: SocketAddr) -> &mut DestStats {
        let key = (netns, remote);
        if !self.dests.contains_key(&key) && self.dests.len() >= MAX_PROC_DESTS {
            let other = (netns, SocketAddr::from(([0, 0, 0, 0], 0)));
            return self.dests.entry(other).or_default();
        }
        self.dests.entry(key).or_default()
    }
}

impl Table {
    /// Each network namespace live processes are in, with one of them (the lowest pid).
    pub fn process_namespaces(&self) -> Vec<(u64, u32)> {
        let mut out: HashMap<u64, u32> = HashMap::default();
        for p in self.procs.values().filter(|p| p.exited_ns.is_none()) {
            if let Some(n) = p.netns.filter(|&n| n != 0) {
                let e = out.entry(n).or_insert(p.pid);
                *e = (*e).min(p.pid);
            }
        }
        out.into_iter().collect()
    }

    /// The process entry for `pid`, created (with its start time and description) if new.
    pub(super) fn proc_for_pid(&mut self, pid: u32, comm: Option<&str>, now_ns: u64) -> ProcId {
        if let Some(&id) = self.by_pid.get(&pid)
            && let Some(p) = self.procs.get_mut(&id)
        {
            p.last_seen_ns = now_ns;
            return id;
        }
        let start_time = self.src.start_time(pid);
        // Late events of a process that has exited belong to it, not to a new entry.
        if let Some(&id) = self.exited_by_pid.get(&pid)
            && let Some(p) = self.procs.get(&id)
            && (start_time.is_none() || start_time == Some(p.start_time))
        {
            return id;
        }
        if self.procs.len() >= self.cfg.max_processes {
            self.evict_process();
        }
        let start_time = start_time.unwrap_or(0);
        let mut meta = self.src.meta(pid).unwrap_or_default();
        if meta.comm.is_empty() {
            meta.comm = comm.filter(|c| !c.is_empty()).unwrap_or("?").to_string();
        }
        let id = self.next_proc;
        self.next_proc += 1;
        self.procs.insert(
            id,
            Proc {
                pid,
                start_time,
                meta,
                last_seen_ns: now_ns,
                exited_ns: None,
                netns: self.src.netns(pid),
                connects_ok: 0,
                failed: ErrCounts::default(),
                closed_total: 0,
                time_wait_total: 0,
                close_buckets: [0; RATE_BUCKETS],
                bucket_sec: now_ns / NS,
                cw_entries: VecDeque::new(),
                dests: HashMap::default(),
                meta_ns: now_ns,
            },
        );
        self.by_pid.insert(pid, id);
        id
    }

    pub(super) fn owner_id(&mut self, owner: &Owner, now_ns: u64) -> ProcId {
        // Known: the name is not needed (every record with an owner comes this way).
        if let Some(&id) = self.by_pid.get(&owner.pid)
            && let Some(p) = self.procs.get_mut(&id)
        {
            p.last_seen_ns = now_ns;
            return id;
        }
        // The kernel's name is bytes: decode lossily, as /proc's.
        let end = owner.comm.iter().position(|&b| b == 0);
        let comm = String::from_utf8_lossy(&owner.comm[..end.unwrap_or(owner.comm.len())]);
        self.proc_for_pid(owner.pid, Some(&comm), now_ns)
    }

    /// Drops one process to respect `max_processes`: the exited one that left first, else the
    /// least recently active. Its totals go to the exited totals.
    pub(super) fn evict_process(&mut self) {
        let victim = self
            .procs
            .iter()
            .min_by_key(|(_, p)| (p.exited_ns.is_none(), p.exited_ns.unwrap_or(p.last_seen_ns)))
            .map(|(&id, _)| id);
        if let Some(id) = victim {
            self.remove_process(id);
            self.stats.evicted_processes += 1;
        }
    }

    pub(super) fn remove_process(&mut self, id: ProcId) {
        if let Some(p) = self.procs.remove(&id) {
            if self.by_pid.get(&p.pid) == Some(&id) {
                self.by_pid.remove(&p.pid);
            }
            if self.exited_by_pid.get(&p.pid) == Some(&id) {
                self.exited_by_pid.remove(&p.pid);
            }
            self.exited.processes += 1;
            self.exited.connects_ok += p.connects_ok;
            self.exited.connects_failed += p.failed.total();
            for (errno, n) in p.failed.by_name() {
                *self.exited.failed_by_errno.entry(errno).or_default() += n;
            }
            self.exited.closed_total += p.closed_total;
            self.exited.time_wait_total += p.time_wait_total;
        }
    }

    /// Notices processes that exited (or whose pid was reused), forgets those that left long
    /// enough ago, and ages the per-process windows.
    pub(super) fn tick_processes(&mut self, now_ns: u64) {
        let minute_ago = now_ns.saturating_sub(60 * NS);
        let mut gone = Vec::new();
        let mut exited_now = Vec::new();
        for (&id, p) in &self.procs {
            match p.exited_ns {
                Some(t) if now_ns.saturating_sub(t) >= self.cfg.exited_linger_ns => gone.push(id),
                Some(_) => {}
                None => exited_now.push((id, p.pid, p.start_time)),
            }
        }
        for (id, pid, start) in exited_now {
            if !self.src.still_running(pid, start) {
                if let Some(p) = self.procs.get_mut(&id) {
                    p.exited_ns = Some(now_ns);
                }
                if self.by_pid.get(&pid) == Some(&id) {
                    self.by_pid.remove(&pid);
                }
                self.exited_by_pid.insert(pid, id);
            }
        }
        for id in gone {
            self.remove_process(id);
        }
        for p in self.procs.values_mut() {
            while p.cw_entries.front().is_some_and(|&t| t < minute_ago) {
                p.cw_entries.pop_front();
            }
            p.roll(now_ns / NS);
        }
    }
}
