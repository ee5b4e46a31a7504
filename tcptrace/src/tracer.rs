//! The running pipeline: attached probes, a reader thread that drains the ring buffer into the
//! table, and the periodic upkeep. Views get [`Tracer::snapshot`]s and, for the event stream,
//! a callback run on the reader thread.
//!
//! Start order matters: attach first, then read the existing sockets, then drain. A socket
//! opened in between is in both; the table adopts it by address instead of counting it twice.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    host::clock::{monotonic_ns, unix_now},
    host::{
        holders::{self, HolderResolver},
        procfs, sockdiag,
    },
    kernel::event::{TcpEvent, TcpState, decode},
    kernel::log::KernelLog,
    kernel::probes::{KernelCounters, ProbeOptions, Probes},
    state::snapshot::Snapshot,
    state::{
        ConnectFailure, ExistingSocket, HeldBy, KernelSocket, ProcMeta, ProcSource,
        SnapshotOptions, Table, TableConfig,
    },
};

/// Why the tracer could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// Loading or attaching the kernel programs failed.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::Error),
    #[error("reading /proc/net/tcp")]
    Sockets(#[source] std::io::Error),
    #[error("starting the reader thread")]
    Thread(#[source] std::io::Error),
}

/// Processes as /proc describes them.
pub struct SysProcs;

impl ProcSource for SysProcs {
    fn start_time(&mut self, pid: u32) -> Option<u64> {
        match procfs::pid_status(pid) {
            procfs::PidStatus::Started(t) => Some(t),
            procfs::PidStatus::Gone | procfs::PidStatus::Unknown => None,
        }
    }
    fn still_running(&mut self, pid: u32, start: u64) -> bool {
        match procfs::pid_status(pid) {
            procfs::PidStatus::Started(t) => t == start,
            procfs::PidStatus::Gone => false,
            procfs::PidStatus::Unknown => true,
        }
    }
    fn netns(&mut self, pid: u32) -> Option<u64> {
        sockdiag::netns_of(&format!("/proc/{pid}"))
    }
    fn meta(&mut self, pid: u32) -> Option<ProcMeta> {
        procfs::process_info(pid).map(|p| ProcMeta {
            comm: p.comm,
            cmdline: p.cmdline,
            cgroup: p.cgroup,
            container: p.container,
        })
    }
}

/// The sockets that exist now, with owners, as the table takes them: with `all_namespaces`,
/// those of every network namespace some process is in (each namespace's list read once,
/// through one of its processes), each marked with its namespace; else those of ours, with
/// namespace 0 (unknown, as the records will be).
pub fn existing_sockets(all_namespaces: bool) -> std::io::Result<Vec<ExistingSocket>> {
    let mut lists: Vec<(u64, Vec<procfs::SockRecord>)> = Vec::new();
    if all_namespaces {
        for (netns, pid) in namespaces() {
            // A process may exit meanwhile: its namespace is then read through another one next
            // time, or learned from events.
            if let Ok(records) = holders::sockets_of_netns(Some(pid)) {
                lists.push((netns, records));
            }
        }
    }
    if lists.is_empty() {
        lists.push((0, procfs::read_tcp_sockets()?));
    }
    let wanted: HashSet<u64> = lists
        .iter()
        .flat_map(|(_, l)| l.iter().map(|r| r.inode))
        .filter(|&i| i != 0)
        .collect();
    let owners = procfs::socket_owners(Some(&wanted));
    Ok(lists
        .into_iter()
        .flat_map(|(netns, records)| records.into_iter().map(move |r| (netns, r)))
        .filter_map(|(netns, r)| {
            Some(ExistingSocket {
                netns,
                local: r.local,
                remote: r.remote,
                state: TcpState::from_u8(r.state)?,
                pid: owners.get(&r.inode).copied(),
            })
        })
        .collect())
}

/// Every network namespace some process is in, with one of its processes (ours first for our
/// own namespace).
pub fn namespaces() -> Vec<(u64, u32)> {
    let me = std::process::id();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    if let Some(n) = holders::netns_of(me) {
        seen.insert(n, me);
    }
    for pid in procfs::list_pids() {
        if let Some(n) = holders::netns_of(pid) {
            seen.entry(n).or_insert(pid);
        }
    }
    let mut v: Vec<(u64, u32)> = seen.into_iter().collect();
    v.sort_unstable();
    v
}

/// Called on the reader thread for every event, after the table has applied it.
pub type EventSink = Box<dyn FnMut(&TcpEvent, &EventContext) + Send>;

/// What the table knew about an event's socket, for the event stream.
#[derive(Clone, Debug, Default)]
pub struct EventContext {
    pub pid: u32,
    pub comm: String,
    /// Time spent in the previous state, when the socket was known.
    pub prev_ns: Option<u64>,
    /// Connect failures the table counted on this event (a failure is decided by the table:
    /// a refused non-blocking connect shows up as an error report, not as a connect() return).
    pub failures: Vec<ConnectFailure>,
}

#[derive(Clone, Debug)]
pub struct TracerOptions {
    pub probes: ProbeOptions,
    pub table: TableConfig,
    /// How often the reader drains the ring buffer at least (records are submitted without
    /// wake-up until the buffer is a quarter full).
    pub drain_every: Duration,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            probes: ProbeOptions::default(),
            table: TableConfig::default(),
            drain_every: Duration::from_millis(10),
        }
    }
}

struct Shared {
    table: Mutex<Table>,
    kernel: Mutex<KernelCounters>,
    stop: AtomicBool,
    /// Drain rounds the reader has completed.
    drains: std::sync::atomic::AtomicU64,
    started: Instant,
    attached: Vec<&'static str>,
    degraded: Vec<String>,
    kernel_log: KernelLog,
    /// ip_local_port_range of each network namespace the table's processes are in.
    port_ranges: Mutex<std::collections::HashMap<u64, (u16, u16)>>,
}

/// A running tracer. Dropping it stops the reader and detaches every program.
pub struct Tracer {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl Tracer {
    /// Attaches, loads the existing sockets, starts the reader.
    pub fn start(opts: TracerOptions, sink: Option<EventSink>) -> Result<Self, TracerError> {
        let probes = Probes::attach(opts.probes)?;
        let mut table = Table::new(opts.table, Box::new(SysProcs));
        if sink.is_some() {
            table.record_failures();
        }
        if let Some(secs) = sockdiag::tcp_fin_timeout() {
            table.set_fin_timeout(secs);
        }
        let existing = existing_sockets(probes.netns_known()).map_err(TracerError::Sockets)?;
        table.load_existing(&existing, monotonic_ns());
        let shared = Arc::new(Shared {
            table: Mutex::new(table),
            kernel: Mutex::new(KernelCounters::default()),
            stop: AtomicBool::new(false),
            drains: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
            attached: probes.attached().to_vec(),
            degraded: probes.degraded().to_vec(),
            kernel_log: probes.kernel_log(),
            port_ranges: Mutex::default(),
        });
        let reader_shared = shared.clone();
        let every = opts.drain_every;
        let reader = std::thread::Builder::new()
            .name("tcptrace-reader".into())
            .spawn(move || reader_loop(probes, reader_shared, every, sink))
            .map_err(TracerError::Thread)?;
        let tracer = Self {
            shared,
            reader: Some(reader),
        };
        // One drain before the first view, so that it includes what happened during start-up.
        tracer.wait_drained();
        Ok(tracer)
    }

    /// Waits (at most a second) until the reader has finished one more drain.
    fn wait_drained(&self) {
        let start = self.shared.drains.load(Ordering::Acquire);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.shared.drains.load(Ordering::Acquire) < start + 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn snapshot(&self, opts: &SnapshotOptions) -> Snapshot {
        let kernel = *self.shared.kernel.lock().unwrap();
        let mut opts = opts.clone();
        opts.dropped_events = kernel.dropped;
        opts.unix_now = unix_now();
        if opts.port_range == (0, 0) {
            opts.port_range = procfs::ephemeral_port_range().unwrap_or((0, 0));
        }
        opts.port_ranges = self.shared.port_ranges.lock().unwrap().clone();
        opts.host_netns = holders::netns_of(std::process::id()).unwrap_or(0);
        let table = self.shared.table.lock().unwrap();
        table.snapshot(monotonic_ns(), &opts)
    }

    /// Runs `f` with the table locked (status, metrics).
    pub fn with_table<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        f(&mut self.shared.table.lock().unwrap())
    }

    pub fn kernel_counters(&self) -> KernelCounters {
        *self.shared.kernel.lock().unwrap()
    }

    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub fn attached(&self) -> &[&'static str] {
        &self.shared.attached
    }

    /// What works less well on this kernel (missing optional tracepoints), one sentence each.
    pub fn degraded(&self) -> &[String] {
        &self.shared.degraded
    }

    /// What the kernel programs logged on their rare failure paths, read once per second.
    pub fn kernel_log(&self) -> &KernelLog {
        &self.shared.kernel_log
    }

    /// Stops the reader and detaches every program.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn reader_loop(
    mut probes: Probes,
    shared: Arc<Shared>,
    every: Duration,
    mut sink: Option<EventSink>,
) {
    let mut last_tick = Instant::now();
    let mut tried_owners: HashSet<(SocketAddr, SocketAddr)> = HashSet::new();
    let mut holders = HolderResolver::default();
    let mut port_ranges = PortRanges::default();
    let mut batch: Vec<TcpEvent> = Vec::with_capacity(4096);
    // Beyond this many waiting events the reader waits for the table instead.
    const MAX_PENDING: usize = 200_000;
    // After lost records, when to compare the table with the kernel's socket list.
    let mut reconcile_at: Option<Instant> = None;
    let mut last_reconcile: Option<Instant> = None;
    let mut dropped_seen = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        // Drain the ring buffer first, whatever the table is doing: a view computing a snapshot
        // holds the table for a few milliseconds, and the kernel must not find the buffer full
        // meanwhile. Events wait in `batch` until the table is free.
        probes.drain(|raw| {
            if let Some(ev) = decode(raw) {
                batch.push(ev);
            }
        });
        if !batch.is_empty() {
            let table = if batch.len() < MAX_PENDING {
                shared.table.try_lock().ok()
            } else {
                Some(shared.table.lock().unwrap())
            };
            if let Some(mut table) = table {
                for ev in &batch {
                    match sink.as_mut() {
                        None => table.apply(ev),
                        Some(sink) => {
                            let mut ctx = event_context(&table, ev);
                            table.apply(ev);
                            ctx.failures.extend(table.take_failures());
                            sink(ev, &ctx);
                        }
                    }
                }
                batch.clear();
            }
        }
        shared.drains.fetch_add(1, Ordering::Release);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            let counters = probes.counters();
            *shared.kernel.lock().unwrap() = counters;
            probes.drain_kernel_log();
            if counters.dropped > dropped_seen {
                dropped_seen = counters.dropped;
                let soon = Instant::now() + RECONCILE_AFTER;
                let allowed = last_reconcile.map_or(soon, |t| t + RECONCILE_GAP);
                reconcile_at.get_or_insert(soon.max(allowed));
            }
            let (unowned, namespaces) = {
                let mut table = shared.table.lock().unwrap();
                table.tick(monotonic_ns());
                (table.unowned_close_wait(), table.process_namespaces())
            };
            port_ranges.refresh(&namespaces);
            *shared.port_ranges.lock().unwrap() = port_ranges.current();
            resolve_owners(&shared, unowned, &mut tried_owners);
            resolve_holders(&shared, &mut holders);
        }
        // Every event read so far is applied (nothing waits in `batch`): the kernel's list, read
        // now, can overrule only what happened before.
        if batch.is_empty() && reconcile_at.is_some_and(|t| Instant::now() >= t) {
            reconcile_at = None;
            last_reconcile = Some(Instant::now());
            if reconcile(&shared) {
                // Owners may have been lost with the records, or looked up too early (a socket
                // still in the accept queue has none): look up unowned sockets again.
                tried_owners.clear();
            }
        }
        probes.wait(every);
    }
    // Records still in the buffer are not applied: the tracer is going away.
    drop(probes);
}

/// How long after records were lost the table is compared with the kernel's socket list: lost
/// records come in bursts, one comparison after the burst is enough (another follows if records
/// are still being lost).
const RECONCILE_AFTER: Duration = Duration::from_secs(1);
/// Least time between two: a host that loses records all the time (a ring buffer too small for
/// its load) would otherwise pay for a dump of every socket each second.
const RECONCILE_GAP: Duration = Duration::from_secs(3);

/// Corrects the table from the kernel's socket list (sock_diag) after lost records. A failed
/// read leaves the table as it is (the next loss tries again) and returns false.
fn reconcile(shared: &Shared) -> bool {
    let read_at = monotonic_ns();
    let Ok(listed) = sockdiag::tcp_sockets() else {
        return false;
    };
    let kernel: Vec<KernelSocket> = listed
        .into_iter()
        .filter_map(|d| {
            Some(KernelSocket {
                local: d.local,
                remote: d.remote,
                state: TcpState::from_u8(d.state)?,
                timewait: d.timewait,
            })
        })
        .collect();
    let Some(netns) = sockdiag::netns_of("/proc/self") else {
        return false;
    };
    shared
        .table
        .lock()
        .unwrap()
        .reconcile(&kernel, netns, read_at, monotonic_ns());
    true
}

/// Owner and previous-state time of an event's socket, from the table before it applies it.
fn event_context(table: &Table, ev: &TcpEvent) -> EventContext {
    let now = ev.ts_ns();
    match *ev {
        TcpEvent::State { sk, owner, .. } => {
            let known = table.socket_context(sk);
            let (pid, comm) = match (owner, &known) {
                (Some(o), _) => (
                    o.pid,
                    table.comm_of(o.pid).unwrap_or_else(|| o.comm_str().into()),
                ),
                (None, Some((Some((pid, comm)), _))) => (*pid, comm.clone()),
                _ => (0, String::new()),
            };
            EventContext {
                pid,
                comm,
                prev_ns: known.map(|(_, since)| now.saturating_sub(since)),
                failures: Vec::new(),
            }
        }
        TcpEvent::Connect { owner, .. } => EventContext {
            pid: owner.pid,
            comm: table
                .comm_of(owner.pid)
                .unwrap_or_else(|| owner.comm_str().into()),
            prev_ns: None,
            failures: Vec::new(),
        },
        TcpEvent::Error { .. } => EventContext::default(),
    }
}

/// ip_local_port_range of the namespaces the table's processes are in, each read again after
/// [`PORT_RANGE_TTL`].
#[derive(Default)]
struct PortRanges(HashMap<u64, (Instant, (u16, u16))>);

const PORT_RANGE_TTL: Duration = Duration::from_secs(10);

impl PortRanges {
    fn refresh(&mut self, namespaces: &[(u64, u32)]) {
        self.0.retain(|n, _| namespaces.iter().any(|(m, _)| m == n));
        for &(netns, pid) in namespaces {
            if self
                .0
                .get(&netns)
                .is_some_and(|(at, _)| at.elapsed() < PORT_RANGE_TTL)
            {
                continue;
            }
            match procfs::ephemeral_port_range_of(pid) {
                Some(r) => {
                    self.0.insert(netns, (Instant::now(), r));
                }
                None => {
                    self.0.remove(&netns);
                }
            }
        }
    }

    fn current(&self) -> std::collections::HashMap<u64, (u16, u16)> {
        self.0.iter().map(|(&n, &(_, r))| (n, r)).collect()
    }
}

/// Most CLOSE_WAIT sockets whose holders are looked up per second.
const MAX_HOLDER_QUERIES: usize = 20_000;

/// Looks up who holds the CLOSE_WAIT sockets the table asks about (new ones, and every few
/// seconds those that stay): their inodes from the socket list of the namespace of the process
/// the kernel side named (read once per namespace), then the holders of those inodes from
/// /proc/PID/fd, that process's tree first.
fn resolve_holders(shared: &Shared, resolver: &mut HolderResolver) {
    let queries = shared
        .table
        .lock()
        .unwrap()
        .holders_to_resolve(monotonic_ns(), MAX_HOLDER_QUERIES);
    if queries.is_empty() {
        return;
    }
    // Inodes not known yet: from the socket list of the hint's namespace, read once.
    let mut ns_of_hint: HashMap<Option<u32>, Option<u64>> = HashMap::new();
    let mut lists: HashMap<Option<u64>, HashMap<(SocketAddr, SocketAddr), u64>> = HashMap::new();
    let mut inode_of = Vec::with_capacity(queries.len());
    for q in &queries {
        if q.inode.is_some() {
            inode_of.push(q.inode);
            continue;
        }
        let ns = *ns_of_hint
            .entry(q.hint)
            .or_insert_with(|| holders::netns_of(q.hint.unwrap_or_else(std::process::id)));
        let list = lists.entry(ns).or_insert_with(|| {
            holders::sockets_of_netns(q.hint)
                .unwrap_or_default()
                .into_iter()
                .map(|r| ((r.local, r.remote), r.inode))
                .collect()
        });
        inode_of.push(list.get(&(q.local, q.remote)).copied());
    }
    let inodes: HashSet<u64> = inode_of
        .iter()
        .flatten()
        .filter(|&&i| i != 0)
        .copied()
        .collect();
    let mut hints: Vec<u32> = queries
        .iter()
        .flat_map(|q| q.hint.iter().chain(&q.holders).copied())
        .collect();
    hints.sort_unstable();
    hints.dedup();
    let found = resolver.resolve(&inodes, &hints);
    let now = monotonic_ns();
    let mut table = shared.table.lock().unwrap();
    for (q, inode) in queries.iter().zip(inode_of) {
        let held = match inode {
            None => HeldBy::Unknown,
            Some(0) => HeldBy::Unaccepted,
            Some(inode) => match found.holders.get(&inode) {
                Some(list) => HeldBy::Processes {
                    inode,
                    by: list.iter().map(|h| (h.pid, h.fd)).collect(),
                },
                None => HeldBy::Unknown,
            },
        };
        table.set_holders(q.key, held, now);
    }
}

/// CLOSE_WAIT sockets nobody owns in the table (accepted before tracing began by a listener we
/// did not see, or whose kernel owner entry was evicted): look them up in /proc. Each address
/// is tried once, so sockets of other network namespaces do not cost a scan every second.
fn resolve_owners(
    shared: &Shared,
    unowned: Vec<(SocketAddr, SocketAddr)>,
    tried: &mut HashSet<(SocketAddr, SocketAddr)>,
) {
    let fresh: Vec<_> = unowned.into_iter().filter(|k| tried.insert(*k)).collect();
    if fresh.is_empty() {
        return;
    }
    if tried.len() > 100_000 {
        tried.clear();
    }
    let Ok(records) = procfs::read_tcp_sockets() else {
        return;
    };
    let wanted: HashSet<(SocketAddr, SocketAddr)> = fresh.into_iter().collect();
    let by_inode: Vec<(u64, SocketAddr, SocketAddr)> = records
        .iter()
        .filter(|r| r.inode != 0 && wanted.contains(&(r.local, r.remote)))
        .map(|r| (r.inode, r.local, r.remote))
        .collect();
    if by_inode.is_empty() {
        return;
    }
    let inodes: HashSet<u64> = by_inode.iter().map(|x| x.0).collect();
    let owners = procfs::socket_owners(Some(&inodes));
    let found: Vec<(SocketAddr, SocketAddr, u32)> = by_inode
        .into_iter()
        .filter_map(|(i, l, r)| owners.get(&i).map(|&pid| (l, r, pid)))
        .collect();
    if !found.is_empty() {
        shared
            .table
            .lock()
            .unwrap()
            .assign_owners(&found, monotonic_ns());
    }
}
