//! The table itself: its configuration, its counters and its doors. Every socket and process
//! tcptrace knows lives here, changed only by [`Table::apply`], [`Table::load_existing`],
//! [`Table::assign_owners`] and [`Table::tick`]; views read it through [`Table::snapshot`].
//!
//! What it tracks is split by subject: [`super::sockets`], [`super::processes`],
//! [`super::connects`], [`super::destinations`], [`super::time_wait`]; the snapshot is built in
//! [`super::snapshot`]. Time is CLOCK_MONOTONIC nanoseconds, the clock of `bpf_ktime_get_ns()`.

use std::{collections::VecDeque, net::SocketAddr};

// Keys are kernel addresses, pids and socket addresses: no untrusted input to defend against, so
// the fast non-cryptographic hasher.
use rustc_hash::FxHashMap as HashMap;

use super::{
    connects::{ClosedConnect, ConnectFailure},
    destinations::DestStats,
    processes::{Proc, ProcId, ProcSource},
    snapshot::ExitedTotals,
    sockets::{SYNTHETIC, Sock},
    time_wait::{FinWait2, TIME_WAIT_NS, TimeWait},
};
use crate::kernel::event::{TcpEvent, TcpState};

pub(super) const NS: u64 = 1_000_000_000;

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
    /// Most mini-sockets (TIME_WAIT and orphaned FIN_WAIT2) modelled per network namespace: the
    /// kernel's net.ipv4.tcp_max_tw_buckets (beyond it the kernel makes none).
    pub max_time_wait: usize,
    /// Someone looks up who holds CLOSE_WAIT sockets ([`Table::set_holders`]): a socket counts
    /// as leaked only once that is done. Off where nobody does (tests of pure logic).
    pub resolve_holders: bool,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            leak_after_ns: 5 * NS,
            max_sockets: 1_000_000,
            max_processes: 20_000,
            exited_linger_ns: 30 * NS,
            max_time_wait: 262_144,
            resolve_holders: false,
        }
    }
}

/// Counters about the table itself (status, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub events: u64,
    /// The part of `events` that are state transitions.
    pub transitions: u64,
    pub unknown_socket_events: u64,
    /// Transitions that never arrived although a later one of their socket shows they
    /// happened (see `fill_gap`).
    pub gaps: u64,
    /// Records of a socket that came after the first record of the next socket at its
    /// address, dropped (see `fill_gap`).
    pub stale: u64,
    pub evicted_sockets: u64,
    pub evicted_processes: u64,
    pub sockets: u64,
    pub processes: u64,
    /// Corrections made by [`Table::reconcile`] since start.
    pub reconciled: Reconciled,
}

/// Corrections a reconcile with the kernel's socket list made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reconciled {
    /// Sockets the table held that the kernel no longer has.
    pub removed: u64,
    /// Sockets the kernel has that the table had missed.
    pub added: u64,
    /// Sockets whose state differed.
    pub fixed: u64,
}

impl Reconciled {
    pub fn total(&self) -> u64 {
        self.removed + self.added + self.fixed
    }
}

pub struct Table {
    pub(super) cfg: TableConfig,
    pub(super) src: Box<dyn ProcSource + Send>,
    pub(super) sockets: HashMap<u64, Sock>,
    /// Sockets from the start-up snapshot not yet seen in an event, by (local, remote).
    pub(super) existing: HashMap<(u64, SocketAddr, SocketAddr), u64>,
    pub(super) next_synthetic: u64,
    pub(super) time_wait: VecDeque<TimeWait>,
    /// hash of (local, remote) -> expiry of the live TIME_WAIT entry for that pair; an entry of
    /// `time_wait` whose expiry differs was reused by a new connection (tcp_tw_reuse) and is dead.
    pub(super) tw_index: HashMap<u64, u64>,
    /// Orphaned FIN_WAIT2 mini-sockets.
    pub(super) fin_wait2: FinWait2,
    /// Live mini-sockets (TIME_WAIT and FIN_WAIT2 entries) per network namespace: the kernel's
    /// net.ipv4.tcp_max_tw_buckets bounds each namespace's.
    pub(super) minis_by_ns: HashMap<u64, usize>,
    /// That limit by namespace where it was read (each namespace has its own sysctl); the
    /// others use `cfg.max_time_wait` (the host's).
    pub(super) tw_limits: HashMap<u64, usize>,
    /// How long those last: net.ipv4.tcp_fin_timeout.
    pub(super) fin_timeout_ns: u64,
    /// hash of (local, remote) -> how many sockets in CLOSE_WAIT have that pair: tells whether the
    /// local peer of a closing socket has sent its FIN yet.
    pub(super) close_wait_pairs: HashMap<u64, u32>,
    pub(super) procs: HashMap<ProcId, Proc>,
    pub(super) by_pid: HashMap<u32, ProcId>,
    /// pid -> the process that last exited with it.
    pub(super) exited_by_pid: HashMap<u32, ProcId>,
    pub(super) next_proc: ProcId,
    /// Network namespace (listening socket's namespace, local port) -> owner, to attribute
    /// accepted sockets.
    pub(super) listeners: HashMap<(u64, u16), ProcId>,
    /// Our own network namespace, once a reconcile has named it (0 before).
    pub(super) own_netns: u64,
    pub(super) dests: HashMap<(u64, SocketAddr), DestStats>,
    pub(super) closed_connects: VecDeque<ClosedConnect>,
    pub(super) exited: ExitedTotals,
    pub(super) stats: TableStats,
    /// Whether to keep the failures counted, for [`Table::take_failures`] (event stream only).
    pub(super) record_failures: bool,
    pub(super) failures: Vec<ConnectFailure>,
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
            fin_wait2: FinWait2::default(),
            minis_by_ns: HashMap::default(),
            tw_limits: HashMap::default(),
            fin_timeout_ns: TIME_WAIT_NS,
            close_wait_pairs: HashMap::default(),
            procs: HashMap::default(),
            by_pid: HashMap::default(),
            exited_by_pid: HashMap::default(),
            next_proc: 1,
            listeners: HashMap::default(),
            own_netns: 0,
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

    /// How long an orphaned FIN_WAIT2 socket waits for the peer's FIN: net.ipv4.tcp_fin_timeout
    /// (the kernel keeps a full socket for the part above 60 s, then a mini-socket for the rest).
    pub fn set_fin_timeout(&mut self, secs: u64) {
        let secs = if secs > 60 { secs - 60 } else { secs.max(1) };
        self.fin_timeout_ns = secs * NS;
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            sockets: self.tracked() as u64,
            processes: self.procs.len() as u64,
            ..self.stats
        }
    }

    /// Applies one event. The only way sockets change state.
    pub fn apply(&mut self, ev: &TcpEvent) {
        self.stats.events += 1;
        self.stats.transitions += matches!(ev, TcpEvent::State { .. }) as u64;
        match *ev {
            TcpEvent::State {
                ts_ns,
                sk,
                old,
                new,
                local,
                remote,
                owner,
                netns,
            } => self.apply_state(ts_ns, sk, old, new, local, remote, owner, netns),
            TcpEvent::Connect {
                ts_ns,
                sk,
                remote,
                ret,
                owner,
                netns,
            } => self.apply_connect(ts_ns, sk, remote, ret, &owner, netns),
            TcpEvent::Error {
                ts_ns,
                local,
                remote,
                errno,
            } => self.apply_error(ts_ns, local, remote, errno),
        }
    }

    /// Periodic upkeep: expires TIME_WAIT entries, notices exited (or reused) pids, forgets
    /// processes that exited long enough ago.
    pub fn tick(&mut self, now_ns: u64) {
        self.expire_time_wait(now_ns);
        self.tick_processes(now_ns);
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
    /// Owner (pid, comm) of the socket listening on `port` in `netns`.
    pub fn listener_owner(&self, netns: u64, port: u16) -> Option<(u32, String)> {
        let p = self.procs.get(self.listeners.get(&(netns, port))?)?;
        Some((p.pid, p.meta.comm.clone()))
    }

    pub fn comm_of(&self, pid: u32) -> Option<String> {
        let id = self.by_pid.get(&pid)?;
        self.procs.get(id).map(|p| p.meta.comm.clone())
    }
}
