//! The one state table: every socket and every process tcptrace knows, changed only by
//! [`Table::apply`], [`Table::load_existing`] and [`Table::tick`]. Views read it through
//! [`Table::snapshot`].
//!
//! Time is CLOCK_MONOTONIC nanoseconds, the clock of `bpf_ktime_get_ns()`.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
};

// Keys are kernel addresses, pids and socket addresses: no untrusted input to defend against, so
// the fast non-cryptographic hasher.
use rustc_hash::FxHashMap as HashMap;

use crate::{
    kernel::errno,
    kernel::event::{Owner, TcpEvent, TcpState},
    state::snapshot::{
        ChurnView, CloseWaitView, ConnectsView, DestView, ExitedTotals, HostCounts, ProcDestView,
        ProcessView, RemoteCount, Snapshot, SocketView,
    },
};

const NS: u64 = 1_000_000_000;
/// TCP_TIMEWAIT_LEN: a socket stays in TIME_WAIT for 60 s (unless its port is reused first).
pub const TIME_WAIT_NS: u64 = 60 * NS;
/// Seconds of close history kept per process for the closes-per-second rate.
const RATE_BUCKETS: usize = 64;
/// Window of the closes-per-second rate, in seconds.
const RATE_WINDOW: u64 = 5;
/// Per-process destinations kept; further ones are summed under "other".
const MAX_PROC_DESTS: usize = 64;
/// Host-wide destinations kept.
const MAX_DESTS: usize = 4096;
/// How long a closed non-blocking connect waits for its error report.
const ASYNC_MATCH_NS: u64 = 2 * NS;

/// Limits and thresholds of the table.
#[derive(Clone, Copy, Debug)]
pub struct TableConfig {
    /// A socket in CLOSE_WAIT longer than this counts as leaked.
    pub leak_after_ns: u64,
    /// Most sockets tracked (live plus TIME_WAIT); beyond it the oldest are evicted.
    pub max_sockets: usize,
    /// Most processes tracked; beyond it exited, then least recently active ones are evicted.
    pub max_processes: usize,
    /// How long an exited process stays in the live view.
    pub exited_linger_ns: u64,
    /// Most TIME_WAIT sockets modelled: the kernel's net.ipv4.tcp_max_tw_buckets.
    pub max_time_wait: usize,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            leak_after_ns: 5 * NS,
            max_sockets: 1_000_000,
            max_processes: 20_000,
            exited_linger_ns: 30 * NS,
            max_time_wait: 262_144,
        }
    }
}

/// What the table needs to know about processes, from /proc in production and from a fake in
/// tests. Called when a pid is first seen and once per tick per live process, never per event.
pub trait ProcSource {
    /// Start time of the process `pid` now has, or None when no such process exists.
    fn start_time(&mut self, pid: u32) -> Option<u64>;
    /// Descriptive fields; None when the process is gone.
    fn meta(&mut self, pid: u32) -> Option<ProcMeta>;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcMeta {
    pub comm: String,
    pub cmdline: String,
    pub cgroup: String,
    pub container: Option<String>,
}

/// A socket that existed before tracing started (from /proc/net/tcp and /proc/PID/fd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub pid: Option<u32>,
}

/// Counts of errors by errno, small and allocation-light.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrCounts(Vec<(i32, u64)>);

impl ErrCounts {
    pub fn add(&mut self, errno: i32, n: u64) {
        match self.0.iter_mut().find(|(e, _)| *e == errno) {
            Some((_, c)) => *c += n,
            None => self.0.push((errno, n)),
        }
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, c)| c).sum()
    }
    fn by_name(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|&(e, c)| (errno::name(e).into_owned(), c))
            .collect()
    }
}

#[derive(Clone, Debug, Default)]
struct DestStats {
    ok: u64,
    failed: ErrCounts,
}

type ProcId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnectPhase {
    /// Not an outbound connect, or one that has completed.
    None,
    /// Inside a connect() syscall (blocking): the syscall's return value tells the outcome.
    Syscall,
    /// connect() returned -EINPROGRESS: an error comes as an error report.
    Async,
}

#[derive(Clone, Debug)]
struct Sock {
    state: TcpState,
    since_ns: u64,
    local: SocketAddr,
    remote: SocketAddr,
    owner: Option<ProcId>,
    connect: ConnectPhase,
    /// Reached a synchronized state: its close counts as a closed connection.
    connected: bool,
    /// Accepted from a listener (its remote is a client, not a destination).
    inbound: bool,
}

#[derive(Clone, Debug)]
struct Proc {
    pid: u32,
    start_time: u64,
    meta: ProcMeta,
    last_seen_ns: u64,
    exited_ns: Option<u64>,
    connects_ok: u64,
    failed: ErrCounts,
    closed_total: u64,
    time_wait_total: u64,
    /// Closes per second for the last RATE_BUCKETS seconds; `bucket_sec` is the newest.
    close_buckets: [u32; RATE_BUCKETS],
    bucket_sec: u64,
    /// Times (ns) at which sockets of this process entered CLOSE_WAIT, last minute.
    cw_entries: VecDeque<u64>,
    dests: HashMap<SocketAddr, DestStats>,
}

impl Proc {
    fn count_close(&mut self, now_ns: u64) {
        self.roll(now_ns / NS);
        self.closed_total += 1;
        self.close_buckets[(self.bucket_sec % RATE_BUCKETS as u64) as usize] += 1;
    }

    fn roll(&mut self, sec: u64) {
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
    fn close_rate(&self, now_ns: u64) -> f64 {
        self.closes_in(now_ns, RATE_WINDOW) as f64 / RATE_WINDOW as f64
    }

    /// Closes in the last `secs` seconds (at most RATE_BUCKETS), the current one included.
    fn closes_in(&self, now_ns: u64, secs: u64) -> u64 {
        let now_sec = now_ns / NS;
        let mut sum = 0u64;
        for s in (now_sec + 1).saturating_sub(secs)..=now_sec {
            if s <= self.bucket_sec && self.bucket_sec - s < RATE_BUCKETS as u64 {
                sum += self.close_buckets[(s % RATE_BUCKETS as u64) as usize] as u64;
            }
        }
        sum
    }

    fn dest(&mut self, remote: SocketAddr) -> &mut DestStats {
        if !self.dests.contains_key(&remote) && self.dests.len() >= MAX_PROC_DESTS {
            let other = SocketAddr::from(([0, 0, 0, 0], 0));
            return self.dests.entry(other).or_default();
        }
        self.dests.entry(remote).or_default()
    }
}

struct TimeWait {
    expiry_ns: u64,
    local: SocketAddr,
    remote: SocketAddr,
    owner: Option<ProcId>,
    inbound: bool,
}

/// A connect whose socket went SYN_SENT -> CLOSE before its outcome was known: either a
/// non-blocking connect (error report still to come) or one whose connect() has not returned
/// yet (on loopback the refusal, the close and the error report all happen inside the call,
/// before it returns -EINPROGRESS or the error).
struct ClosedConnect {
    ts_ns: u64,
    sk: u64,
    local: SocketAddr,
    remote: SocketAddr,
    owner: Option<ProcId>,
    /// connect() returned -EINPROGRESS: the error report decides.
    async_: bool,
    /// An error report that arrived while connect() had not returned yet.
    errno: Option<i32>,
}

/// A connect failure the table has just counted (for the event stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailure {
    pub remote: SocketAddr,
    pub errno: i32,
    pub pid: u32,
    pub comm: String,
}

/// Counters about the table itself (status, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub events: u64,
    pub unknown_socket_events: u64,
    pub evicted_sockets: u64,
    pub evicted_processes: u64,
    pub sockets: u64,
    pub processes: u64,
}

/// Which processes a snapshot shows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub ports: Vec<u16>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.comms.is_empty() && self.ports.is_empty()
    }
    /// Whether an event-stream line with these fields passes.
    pub fn matches_event(&self, pid: u32, comm: &str, ports: [u16; 2]) -> bool {
        (self.pids.is_empty() || self.pids.contains(&pid))
            && (self.comms.is_empty() || self.comms.iter().any(|c| c == comm))
            && (self.ports.is_empty() || ports.iter().any(|p| self.ports.contains(p)))
    }
}

/// Options of [`Table::snapshot`].
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    pub filter: Filter,
    /// Include every CLOSE_WAIT socket and the command line (reports).
    pub detail: bool,
    /// Unix time of `now`, for the `ts` field.
    pub unix_now: f64,
    pub dropped_events: u64,
    pub port_range: (u16, u16),
}

pub struct Table {
    cfg: TableConfig,
    src: Box<dyn ProcSource + Send>,
    sockets: HashMap<u64, Sock>,
    /// Sockets from the start-up snapshot not yet seen in an event, by (local, remote).
    existing: HashMap<(SocketAddr, SocketAddr), u64>,
    next_synthetic: u64,
    time_wait: VecDeque<TimeWait>,
    /// hash of (local, remote) -> expiry of the live TIME_WAIT entry for that pair; an entry of
    /// `time_wait` whose expiry differs was reused by a new connection (tcp_tw_reuse) and is dead.
    tw_index: HashMap<u64, u64>,
    procs: HashMap<ProcId, Proc>,
    by_pid: HashMap<u32, ProcId>,
    /// pid -> the process that last exited with it.
    exited_by_pid: HashMap<u32, ProcId>,
    next_proc: ProcId,
    /// Listening (family-less) local port -> owner, to attribute accepted sockets.
    listeners: HashMap<u16, ProcId>,
    dests: HashMap<SocketAddr, DestStats>,
    closed_connects: VecDeque<ClosedConnect>,
    exited: ExitedTotals,
    stats: TableStats,
    /// Whether to keep the failures counted, for [`Table::take_failures`] (event stream only).
    record_failures: bool,
    failures: Vec<ConnectFailure>,
}

/// Keys of snapshot sockets that have no kernel address yet live above this bit.
const SYNTHETIC: u64 = 1 << 63;

fn is_connected_state(s: TcpState) -> bool {
    !matches!(
        s,
        TcpState::SynSent
            | TcpState::SynRecv
            | TcpState::NewSynRecv
            | TcpState::Listen
            | TcpState::Close
    )
}

impl Table {
    pub fn new(cfg: TableConfig, src: Box<dyn ProcSource + Send>) -> Self {
        Self {
            cfg,
            src,
            sockets: HashMap::default(),
            existing: HashMap::default(),
            next_synthetic: SYNTHETIC,
            time_wait: VecDeque::new(),
            tw_index: HashMap::default(),
            procs: HashMap::default(),
            by_pid: HashMap::default(),
            exited_by_pid: HashMap::default(),
            next_proc: 1,
            listeners: HashMap::default(),
            dests: HashMap::default(),
            closed_connects: VecDeque::new(),
            exited: ExitedTotals::default(),
            stats: TableStats::default(),
            record_failures: false,
            failures: Vec::new(),
        }
    }

    pub fn set_config(&mut self, cfg: TableConfig) {
        self.cfg = cfg;
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            sockets: (self.sockets.len() + self.time_wait.len()) as u64,
            processes: self.procs.len() as u64,
            ..self.stats
        }
    }

    /// The process entry for `pid`, created (with its start time and description) if new.
    fn proc_for_pid(&mut self, pid: u32, comm: Option<&str>, now_ns: u64) -> ProcId {
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
            meta.comm = comm.unwrap_or("?").to_string();
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
                connects_ok: 0,
                failed: ErrCounts::default(),
                closed_total: 0,
                time_wait_total: 0,
                close_buckets: [0; RATE_BUCKETS],
                bucket_sec: now_ns / NS,
                cw_entries: VecDeque::new(),
                dests: HashMap::default(),
            },
        );
        self.by_pid.insert(pid, id);
        id
    }

    fn owner_id(&mut self, owner: &Owner, now_ns: u64) -> ProcId {
        self.proc_for_pid(owner.pid, Some(owner.comm_str()), now_ns)
    }

    /// Drops one process to respect `max_processes`: the exited one that left first, else the
    /// least recently active. Its totals go to the exited totals.
    fn evict_process(&mut self) {
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

    fn remove_process(&mut self, id: ProcId) {
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
            self.exited.closed_total += p.closed_total;
            self.exited.time_wait_total += p.time_wait_total;
        }
    }

    fn host_dest(&mut self, remote: SocketAddr) -> Option<&mut DestStats> {
        if !self.dests.contains_key(&remote) && self.dests.len() >= MAX_DESTS {
            return None;
        }
        Some(self.dests.entry(remote).or_default())
    }

    fn count_connect_ok(&mut self, owner: Option<ProcId>, remote: SocketAddr) {
        if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
            p.connects_ok += 1;
            p.dest(remote).ok += 1;
        }
        if let Some(d) = self.host_dest(remote) {
            d.ok += 1;
        }
    }

    fn count_connect_failed(&mut self, owner: Option<ProcId>, remote: SocketAddr, errno: i32) {
        let mut who = None;
        if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
            p.failed.add(errno, 1);
            p.dest(remote).failed.add(errno, 1);
            who = Some((p.pid, p.meta.comm.clone()));
        }
        if self.record_failures {
            self.failures.push(ConnectFailure {
                remote,
                errno,
                pid: who.as_ref().map_or(0, |w| w.0),
                comm: who.map(|w| w.1).unwrap_or_default(),
            });
        }
        if let Some(d) = self.host_dest(remote) {
            d.failed.add(errno, 1);
        }
    }

    /// Loads the sockets that existed before tracing started.
    pub fn load_existing(&mut self, socks: &[ExistingSocket], now_ns: u64) {
        let listen_ports: std::collections::HashSet<u16> = socks
            .iter()
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| s.local.port())
            .collect();
        for s in socks {
            let owner = s.pid.map(|pid| self.proc_for_pid(pid, None, now_ns));
            let inbound = s.state != TcpState::Listen && listen_ports.contains(&s.local.port());
            if s.state == TcpState::TimeWait {
                self.push_time_wait(now_ns, s.local, s.remote, owner, inbound);
                continue;
            }
            let key = self.next_synthetic;
            self.next_synthetic += 1;
            if s.state == TcpState::Listen
                && let Some(o) = owner
            {
                self.listeners.insert(s.local.port(), o);
            }
            if s.state == TcpState::CloseWait
                && let Some(p) = owner.and_then(|id| self.procs.get_mut(&id))
            {
                p.cw_entries.push_back(now_ns);
            }
            self.sockets.insert(
                key,
                Sock {
                    state: s.state,
                    // Unknown: the socket is at least as old as tracing; its age counts from now.
                    since_ns: now_ns,
                    local: s.local,
                    remote: s.remote,
                    owner,
                    connect: ConnectPhase::None,
                    connected: is_connected_state(s.state),
                    inbound,
                },
            );
            self.existing.insert((s.local, s.remote), key);
        }
    }

    /// Gives owners to sockets that have none (found later from /proc), by address.
    pub fn assign_owners(&mut self, owners: &[(SocketAddr, SocketAddr, u32)], now_ns: u64) {
        let wanted: HashMap<(SocketAddr, SocketAddr), u32> =
            owners.iter().map(|&(l, r, pid)| ((l, r), pid)).collect();
        let keys: Vec<(u64, u32)> = self
            .sockets
            .iter()
            .filter(|(_, s)| s.owner.is_none())
            .filter_map(|(&k, s)| wanted.get(&(s.local, s.remote)).map(|&pid| (k, pid)))
            .collect();
        for (k, pid) in keys {
            let id = self.proc_for_pid(pid, None, now_ns);
            if let Some(s) = self.sockets.get_mut(&k) {
                s.owner = Some(id);
                if s.state == TcpState::CloseWait
                    && let Some(p) = self.procs.get_mut(&id)
                {
                    p.cw_entries.push_back(s.since_ns);
                }
            }
        }
    }

    /// (local, remote) of CLOSE_WAIT sockets with no known owner.
    pub fn unowned_close_wait(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.sockets
            .values()
            .filter(|s| s.owner.is_none() && s.state == TcpState::CloseWait)
            .map(|s| (s.local, s.remote))
            .collect()
    }

    fn push_time_wait(
        &mut self,
        now_ns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        owner: Option<ProcId>,
        inbound: bool,
    ) {
        let expiry_ns = now_ns + TIME_WAIT_NS;
        if self.time_wait.len() >= self.cfg.max_time_wait
            && let Some(tw) = self.time_wait.pop_front()
        {
            // The kernel holds at most tcp_max_tw_buckets TIME_WAIT sockets.
            self.drop_tw_index(&tw);
        }
        self.tw_index.insert(tuple_key(&local, &remote), expiry_ns);
        self.time_wait.push_back(TimeWait {
            expiry_ns,
            local,
            remote,
            owner,
            inbound,
        });
        if self.sockets.len() + self.time_wait.len() > self.cfg.max_sockets
            && let Some(tw) = self.time_wait.pop_front()
        {
            self.drop_tw_index(&tw);
            self.stats.evicted_sockets += 1;
        }
    }

    /// Whether a TIME_WAIT entry still stands (its pair was not reused by a new connection).
    fn tw_live(&self, tw: &TimeWait) -> bool {
        self.tw_index.get(&tuple_key(&tw.local, &tw.remote)) == Some(&tw.expiry_ns)
    }

    fn drop_tw_index(&mut self, tw: &TimeWait) {
        let key = tuple_key(&tw.local, &tw.remote);
        if self.tw_index.get(&key) == Some(&tw.expiry_ns) {
            self.tw_index.remove(&key);
        }
    }

    /// Applies one event. The only way sockets change state.
    pub fn apply(&mut self, ev: &TcpEvent) {
        self.stats.events += 1;
        match *ev {
            TcpEvent::State {
                ts_ns,
                sk,
                old,
                new,
                local,
                remote,
                owner,
            } => self.apply_state(ts_ns, sk, old, new, local, remote, owner),
            TcpEvent::Connect {
                ts_ns,
                sk,
                remote,
                ret,
                owner,
            } => self.apply_connect(ts_ns, sk, remote, ret, &owner),
            TcpEvent::Error {
                ts_ns,
                local,
                remote,
                errno,
            } => self.apply_error(ts_ns, local, remote, errno),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_state(
        &mut self,
        ts: u64,
        sk: u64,
        old: TcpState,
        new: TcpState,
        local: SocketAddr,
        remote: SocketAddr,
        owner: Option<Owner>,
    ) {
        let owner_id = owner.map(|o| self.owner_id(&o, ts));
        if !self.sockets.contains_key(&sk) {
            self.adopt_or_create(sk, old, local, remote, ts);
        }
        let listeners = &self.listeners;
        let Some(s) = self.sockets.get_mut(&sk) else {
            return;
        };
        // The kernel's recorded owner wins; then what we already knew; then, for an accepted
        // socket, the listener's owner.
        if let Some(id) = owner_id {
            s.owner = Some(id);
        } else if s.owner.is_none() && matches!(new, TcpState::SynRecv) {
            s.owner = listeners.get(&local.port()).copied();
        }
        // The local port is chosen after CLOSE -> SYN_SENT; keep the address up to date.
        if local.port() != 0 || s.local.port() == 0 {
            s.local = local;
        }
        if remote.port() != 0 {
            s.remote = remote;
        }
        s.state = new;
        s.since_ns = ts;
        if new == TcpState::SynRecv {
            s.inbound = true;
        }
        let (owner, local, remote, phase, connected, inbound) = (
            s.owner,
            s.local,
            s.remote,
            s.connect,
            s.connected,
            s.inbound,
        );

        match (old, new) {
            (TcpState::Close, TcpState::SynSent) => {
                self.sockets.get_mut(&sk).unwrap().connect = ConnectPhase::Syscall;
                self.tw_index.remove(&tuple_key(&local, &remote));
            }
            (TcpState::SynSent, TcpState::Established) => {
                let s = self.sockets.get_mut(&sk).unwrap();
                s.connect = ConnectPhase::None;
                s.connected = true;
                self.tw_index.remove(&tuple_key(&local, &remote));
                self.count_connect_ok(owner, remote);
            }
            (_, TcpState::Established) => {
                self.sockets.get_mut(&sk).unwrap().connected = true;
            }
            (_, TcpState::Listen) => {
                if let Some(o) = owner {
                    self.listeners.insert(local.port(), o);
                }
            }
            (_, TcpState::CloseWait) => {
                if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
                    p.cw_entries.push_back(ts);
                }
            }
            _ => {}
        }

        if new == TcpState::Close {
            self.sockets.remove(&sk);
            match old {
                TcpState::Listen
                    if owner.is_some() && self.listeners.get(&local.port()) == owner.as_ref() =>
                {
                    self.listeners.remove(&local.port());
                }
                TcpState::SynSent if phase != ConnectPhase::None => {
                    self.closed_connects.push_back(ClosedConnect {
                        ts_ns: ts,
                        sk,
                        local,
                        remote,
                        owner,
                        async_: phase == ConnectPhase::Async,
                        errno: None,
                    });
                    if self.closed_connects.len() > 4096 {
                        self.closed_connects.pop_front();
                    }
                }
                _ => {}
            }
            if connected || is_connected_state(old) {
                if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
                    p.count_close(ts);
                    if matches!(old, TcpState::FinWait2 | TcpState::Closing) {
                        p.time_wait_total += 1;
                    }
                }
                if matches!(old, TcpState::FinWait2 | TcpState::Closing) {
                    self.push_time_wait(ts, local, remote, owner, inbound);
                }
            }
        }
    }

    /// A transition for a socket we hold no entry for: either one from the start-up snapshot
    /// (matched by address) or one we never saw begin.
    fn adopt_or_create(
        &mut self,
        sk: u64,
        old: TcpState,
        local: SocketAddr,
        remote: SocketAddr,
        ts: u64,
    ) {
        if let Some(key) = self.existing.remove(&(local, remote))
            && let Some(s) = self.sockets.remove(&key)
        {
            self.sockets.insert(sk, s);
            return;
        }
        if !matches!(old, TcpState::Close | TcpState::Listen) {
            self.stats.unknown_socket_events += 1;
        }
        if self.sockets.len() + self.time_wait.len() >= self.cfg.max_sockets {
            self.evict_socket();
        }
        self.sockets.insert(
            sk,
            Sock {
                state: old,
                since_ns: ts,
                local,
                remote,
                owner: None,
                connect: ConnectPhase::None,
                connected: is_connected_state(old),
                inbound: old == TcpState::Listen
                    || (old != TcpState::Close && self.listeners.contains_key(&local.port())),
            },
        );
    }

    /// Makes room for one socket: the oldest TIME_WAIT entry if any, else any socket that is not
    /// in CLOSE_WAIT (those are what the tool is for), else any socket.
    fn evict_socket(&mut self) {
        self.stats.evicted_sockets += 1;
        if let Some(tw) = self.time_wait.pop_front() {
            self.drop_tw_index(&tw);
            return;
        }
        let victim = self
            .sockets
            .iter()
            .find(|(_, s)| s.state != TcpState::CloseWait)
            .or_else(|| self.sockets.iter().next())
            .map(|(&k, _)| k);
        if let Some(k) = victim {
            self.sockets.remove(&k);
        }
    }

    fn apply_connect(&mut self, ts: u64, sk: u64, remote: SocketAddr, ret: i32, owner: &Owner) {
        let errno = -ret;
        let id = self.owner_id(owner, ts);
        // The socket may already be closed, with or without its error reported.
        let closed = (sk != 0)
            .then(|| {
                self.closed_connects
                    .iter()
                    .position(|c| c.sk == sk && !c.async_)
            })
            .flatten();
        if errno == errno::EINPROGRESS {
            if let Some(s) = self.sockets.get_mut(&sk) {
                s.connect = ConnectPhase::Async;
            }
            if let Some(i) = closed {
                match self.closed_connects[i].errno {
                    Some(e) => {
                        let c = self.closed_connects.remove(i).unwrap();
                        self.count_connect_failed(c.owner.or(Some(id)), c.remote, e);
                    }
                    None => self.closed_connects[i].async_ = true,
                }
            }
            return;
        }
        if let Some(i) = closed {
            // connect() reports the outcome itself (counted below, if a failure).
            self.closed_connects.remove(i);
        }
        if errno <= 0 {
            return;
        }
        if sk == 0 && errno::is_repeat_or_not_failure(errno) {
            // A connect() that never reached SYN_SENT: either not a failure (EALREADY, EISCONN)
            // or the repeat of an asynchronous error already counted from its error report.
            return;
        }
        if let Some(s) = self.sockets.get_mut(&sk) {
            s.connect = ConnectPhase::None;
        }
        self.count_connect_failed(Some(id), remote, errno);
    }

    fn apply_error(&mut self, ts: u64, local: SocketAddr, remote: SocketAddr, errno: i32) {
        if errno <= 0 {
            return;
        }
        self.closed_connects
            .retain(|c| ts.saturating_sub(c.ts_ns) <= ASYNC_MATCH_NS);
        // The usual order: the socket closed (SYN_SENT -> CLOSE), then the error is reported.
        if let Some(i) = self
            .closed_connects
            .iter()
            .position(|c| c.local == local && c.remote == remote && c.errno.is_none())
        {
            if self.closed_connects[i].async_ {
                let c = self.closed_connects.remove(i).unwrap();
                self.count_connect_failed(c.owner, c.remote, errno);
            } else {
                // connect() has not returned: its -EINPROGRESS (non-blocking) will count this;
                // a blocking connect returns the error itself.
                self.closed_connects[i].errno = Some(errno);
            }
            return;
        }
        // Older kernels report first and close after: match a non-blocking connect in flight.
        let key = self
            .sockets
            .iter()
            .filter(|(_, s)| s.state == TcpState::SynSent && s.connect == ConnectPhase::Async)
            .find(|(_, s)| s.remote == remote && (s.local.port() == 0 || s.local == local))
            .map(|(&k, _)| k);
        if let Some(k) = key {
            let s = self.sockets.get_mut(&k).unwrap();
            s.connect = ConnectPhase::None;
            let (owner, remote) = (s.owner, s.remote);
            self.count_connect_failed(owner, remote, errno);
        }
    }

    /// Periodic upkeep: expires TIME_WAIT entries, notices exited (or reused) pids, forgets
    /// processes that exited long enough ago.
    pub fn tick(&mut self, now_ns: u64) {
        while let Some(tw) = self.time_wait.front() {
            if tw.expiry_ns > now_ns {
                break;
            }
            let tw = self.time_wait.pop_front().unwrap();
            self.drop_tw_index(&tw);
        }
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
            if self.src.start_time(pid) != Some(start) {
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

    /// Builds what the views show.
    pub fn snapshot(&self, now_ns: u64, opts: &SnapshotOptions) -> Snapshot {
        #[derive(Default)]
        struct Acc<'a> {
            cw: Vec<&'a Sock>,
            tw_now: u64,
            ports: HashMap<SocketAddr, u64>,
            port_match: bool,
        }
        let mut host = HostCounts::default();
        let mut per_proc: HashMap<ProcId, Acc> = HashMap::default();
        let mut dest_ports: HashMap<SocketAddr, u64> = HashMap::default();
        let filter = &opts.filter;
        let port_hit = |l: &SocketAddr, r: &SocketAddr| {
            filter.ports.contains(&l.port()) || filter.ports.contains(&r.port())
        };
        for s in self.sockets.values() {
            match s.state {
                TcpState::Established => host.established += 1,
                TcpState::CloseWait => host.close_wait += 1,
                TcpState::Listen => host.listen += 1,
                _ => {}
            }
            host.total += 1;
            let uses_port = !s.inbound
                && !matches!(s.state, TcpState::Listen | TcpState::Close)
                && s.local.port() != 0
                && s.remote.port() != 0;
            if uses_port {
                *dest_ports.entry(s.remote).or_default() += 1;
            }
            if let Some(id) = s.owner {
                let acc = per_proc.entry(id).or_default();
                if s.state == TcpState::CloseWait {
                    acc.cw.push(s);
                }
                if uses_port {
                    *acc.ports.entry(s.remote).or_default() += 1;
                }
                acc.port_match |= !filter.ports.is_empty() && port_hit(&s.local, &s.remote);
            }
        }
        for tw in &self.time_wait {
            if !self.tw_live(tw) {
                continue;
            }
            host.time_wait += 1;
            host.total += 1;
            if !tw.inbound {
                *dest_ports.entry(tw.remote).or_default() += 1;
            }
            if let Some(id) = tw.owner {
                let acc = per_proc.entry(id).or_default();
                acc.tw_now += 1;
                if !tw.inbound {
                    *acc.ports.entry(tw.remote).or_default() += 1;
                }
            }
        }
        let leak_ns = self.cfg.leak_after_ns;
        let mut processes = Vec::new();
        for (id, p) in &self.procs {
            let acc = per_proc.remove(id).unwrap_or_default();
            if !filter.pids.is_empty() && !filter.pids.contains(&p.pid) {
                continue;
            }
            if !filter.comms.is_empty() && !filter.comms.contains(&p.meta.comm) {
                continue;
            }
            if !filter.ports.is_empty()
                && !acc.port_match
                && !p.dests.keys().any(|d| filter.ports.contains(&d.port()))
            {
                continue;
            }
            let mut cw = CloseWaitView {
                count: acc.cw.len() as u64,
                ..Default::default()
            };
            let mut remotes: HashMap<SocketAddr, u64> = HashMap::default();
            let mut sockets = Vec::new();
            for s in &acc.cw {
                let age = now_ns.saturating_sub(s.since_ns);
                if age > leak_ns {
                    cw.leaked += 1;
                }
                cw.oldest_secs = cw.oldest_secs.max(age as f64 / NS as f64);
                *remotes.entry(s.remote).or_default() += 1;
            }
            // The oldest CLOSE_WAIT sockets with their ages: all of them in reports, the 10
            // oldest in live views.
            let mut oldest: Vec<&&Sock> = acc.cw.iter().collect();
            let keep = if opts.detail { oldest.len() } else { 10 };
            if oldest.len() > keep {
                oldest.select_nth_unstable_by_key(keep, |s| s.since_ns);
                oldest.truncate(keep);
            }
            for s in oldest {
                let age = now_ns.saturating_sub(s.since_ns);
                sockets.push(SocketView {
                    local: s.local.to_string(),
                    remote: s.remote.to_string(),
                    age_secs: round3(age as f64 / NS as f64),
                });
            }
            cw.oldest_secs = round3(cw.oldest_secs);
            let mut remotes: Vec<RemoteCount> = remotes
                .into_iter()
                .map(|(r, count)| RemoteCount {
                    remote: r.to_string(),
                    count,
                })
                .collect();
            remotes.sort_by(|a, b| b.count.cmp(&a.count).then(a.remote.cmp(&b.remote)));
            remotes.truncate(if opts.detail { 20 } else { 5 });
            cw.remotes = remotes;
            cw.new_per_min = p.cw_entries.len() as f64;
            sockets.sort_by(|a, b| {
                b.age_secs
                    .total_cmp(&a.age_secs)
                    .then_with(|| a.remote.cmp(&b.remote))
            });
            cw.sockets = Some(sockets);
            let mut destinations: Vec<ProcDestView> = p
                .dests
                .iter()
                .map(|(r, d)| ProcDestView {
                    remote: r.to_string(),
                    connects: ConnectsView {
                        ok: d.ok,
                        failed: d.failed.by_name(),
                    },
                    ports_in_use: acc.ports.get(r).copied().unwrap_or(0),
                })
                .collect();
            destinations.sort_by(|a, b| {
                (b.connects.failed_total(), b.ports_in_use, b.connects.ok)
                    .cmp(&(a.connects.failed_total(), a.ports_in_use, a.connects.ok))
                    .then(a.remote.cmp(&b.remote))
            });
            destinations.truncate(if opts.detail { 20 } else { 5 });
            processes.push(ProcessView {
                pid: p.pid,
                comm: p.meta.comm.clone(),
                start_time: p.start_time,
                cmdline: opts.detail.then(|| p.meta.cmdline.clone()),
                cgroup: (opts.detail && !p.meta.cgroup.is_empty()).then(|| p.meta.cgroup.clone()),
                container: p.meta.container.clone(),
                exited: p.exited_ns.is_some(),
                close_wait: cw,
                connects: ConnectsView {
                    ok: p.connects_ok,
                    failed: p.failed.by_name(),
                },
                churn: ChurnView {
                    closed_total: p.closed_total,
                    closed_per_sec: round3(p.close_rate(now_ns)),
                    closed_last_min: p.closes_in(now_ns, 60),
                    time_wait_total: p.time_wait_total,
                    time_wait: acc.tw_now,
                },
                destinations,
                findings: None,
            });
        }
        processes.retain(|p| {
            p.close_wait.count > 0
                || p.connects.ok > 0
                || !p.connects.failed.is_empty()
                || p.churn.closed_total > 0
                || p.churn.time_wait > 0
        });
        sort_processes(&mut processes);

        let mut destinations: Vec<DestView> = dest_ports
            .iter()
            .map(|(r, &n)| (*r, n))
            .chain(
                self.dests
                    .keys()
                    .filter(|r| !dest_ports.contains_key(r))
                    .map(|r| (*r, 0)),
            )
            .filter(|(r, _)| filter.ports.is_empty() || filter.ports.contains(&r.port()))
            .map(|(r, ports_in_use)| {
                let d = self.dests.get(&r);
                DestView {
                    remote: r.to_string(),
                    ports_in_use,
                    connects_ok: d.map_or(0, |d| d.ok),
                    connects_failed: d.map(|d| d.failed.by_name()).unwrap_or_default(),
                }
            })
            .collect();
        destinations.sort_by(|a, b| {
            let fa: u64 = a.connects_failed.values().sum();
            let fb: u64 = b.connects_failed.values().sum();
            (fb, b.ports_in_use, b.connects_ok)
                .cmp(&(fa, a.ports_in_use, a.connects_ok))
                .then(a.remote.cmp(&b.remote))
        });
        destinations.truncate(if opts.detail { 50 } else { 20 });

        Snapshot {
            ts: round3(opts.unix_now),
            host,
            dropped_events: opts.dropped_events,
            ephemeral_port_range: [opts.port_range.0, opts.port_range.1],
            processes,
            destinations,
            exited: self.exited.clone(),
        }
    }

    /// Every (local, remote, owner pid) of sockets known in CLOSE_WAIT (tests and reports).
    pub fn close_wait_sockets(&self) -> Vec<(SocketAddr, SocketAddr, Option<u32>)> {
        self.sockets
            .values()
            .filter(|s| s.state == TcpState::CloseWait)
            .map(|s| {
                (
                    s.local,
                    s.remote,
                    s.owner.and_then(|id| self.procs.get(&id)).map(|p| p.pid),
                )
            })
            .collect()
    }

    /// Keep the connect failures counted from now on, for [`Table::take_failures`].
    pub fn record_failures(&mut self) {
        self.record_failures = true;
    }

    /// The connect failures counted since the last call (needs [`Table::record_failures`]).
    pub fn take_failures(&mut self) -> std::vec::Drain<'_, ConnectFailure> {
        self.failures.drain(..)
    }

    /// Owner (pid, comm) and the time it entered its current state, of a socket by kernel address.
    pub fn socket_context(&self, sk: u64) -> Option<(Option<(u32, String)>, u64)> {
        let s = self.sockets.get(&sk)?;
        let owner = s
            .owner
            .and_then(|id| self.procs.get(&id))
            .map(|p| (p.pid, p.meta.comm.clone()));
        Some((owner, s.since_ns))
    }

    /// Command name of the live process with this pid.
    pub fn comm_of(&self, pid: u32) -> Option<String> {
        let id = self.by_pid.get(&pid)?;
        self.procs.get(id).map(|p| p.meta.comm.clone())
    }
}

/// A 64-bit key for a (local, remote) pair.
fn tuple_key(local: &SocketAddr, remote: &SocketAddr) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    local.hash(&mut h);
    remote.hash(&mut h);
    h.finish()
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Worst first: leaked CLOSE_WAIT, then connect failures, then churn, then CLOSE_WAIT count.
pub fn sort_processes(ps: &mut [ProcessView]) {
    ps.sort_by(|a, b| {
        b.close_wait
            .leaked
            .cmp(&a.close_wait.leaked)
            .then(b.connects.failed_total().cmp(&a.connects.failed_total()))
            .then(b.churn.closed_per_sec.total_cmp(&a.churn.closed_per_sec))
            .then(b.close_wait.count.cmp(&a.close_wait.count))
            .then(b.churn.closed_total.cmp(&a.churn.closed_total))
            .then(a.pid.cmp(&b.pid))
    });
}

#[cfg(test)]
mod tests;
