//! The running pipeline: attached probes, a reader thread that drains the ring buffer into the
//! table, and the periodic upkeep. Views get [`Tracer::snapshot`]s and, for the event stream,
//! a callback run on the reader thread.
//!
//! Start order matters: attach first, then read the existing sockets, then drain. A socket
//! opened in between is in both; the table adopts it by address instead of counting it twice.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

mod from_host;
#[cfg(test)]
mod rate;
mod stacks;

pub use from_host::{SysProcs, existing_sockets, namespaces};

use from_host::{
    KernelLists, NetnsSysctlCache, RECONCILE_AFTER, RECONCILE_GAP, apply_kernel_lists,
    read_kernel_lists, resolve_holders, resolve_owners,
};

use crate::{
    host::{
        clock::{monotonic_ns, unix_now},
        holders::{self, HolderResolver},
        procfs, sockdiag,
    },
    kernel::event::{TcpEvent, TcpState, decode},
    kernel::log::KernelLog,
    kernel::order::Reorder,
    kernel::probes::{KernelCounters, ProbeOptions, Probes},
    state::snapshot::Snapshot,
    state::{ConnectFailure, SnapshotOptions, Table, TableConfig},
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
    kernel_log: KernelLog,
    /// A reconcile happened: the upkeep looks up owners it had given up on again.
    retry_owners: AtomicBool,
    /// ip_local_port_range of each network namespace the table's processes are in.
    port_ranges: Mutex<std::collections::HashMap<u64, (u16, u16)>>,
    /// tcptrace's own network namespace (0: unknown), read once at start.
    host_netns: u64,
    /// Records carry their socket's network namespace.
    netns_known: bool,
    /// Stacks wanted (`--stacks`, the daemon's `stacks`): the reader switches the probes.
    stacks_wanted: AtomicBool,
    /// Stacks being recorded (set by the reader once the probes are switched).
    stacks_on: AtomicBool,
    /// Why stacks could not be switched on, when they could not.
    stacks_error: Mutex<Option<String>>,
    /// Loaded with room for stacks (the upkeep thread owns the lookups).
    stacks_room: bool,
}

/// A running tracer. Dropping it stops the reader and detaches every program.
pub struct Tracer {
    shared: Arc<Shared>,
    /// What works less well here, one sentence each (the probes', then the reader's).
    degraded: Vec<String>,
    reader: Option<JoinHandle<()>>,
    upkeep: Option<JoinHandle<()>>,
}

impl Tracer {
    /// Attaches, loads the existing sockets, starts the reader.
    pub fn start(opts: TracerOptions, sink: Option<EventSink>) -> Result<Self, TracerError> {
        let mut probes = Probes::attach(opts.probes)?;
        let stack_tables = probes.take_stack_tables();
        let stacks_on = probes.stacks();
        let mut table = Table::new(opts.table, Box::new(SysProcs::default()));
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
            kernel_log: probes.kernel_log(),
            port_ranges: Mutex::default(),
            host_netns: holders::netns_of(std::process::id()).unwrap_or(0),
            netns_known: probes.netns_known(),
            retry_owners: AtomicBool::new(false),
            stacks_wanted: AtomicBool::new(stacks_on),
            stacks_on: AtomicBool::new(stacks_on),
            stacks_error: Mutex::new(None),
            stacks_room: stack_tables.is_some(),
        });
        let reader_shared = shared.clone();
        let every = opts.drain_every;
        let mut degraded = probes.degraded().to_vec();
        let (prio_tx, prio_rx) = std::sync::mpsc::sync_channel(1);
        let reader = std::thread::Builder::new()
            .name("tcptrace-reader".into())
            .spawn(move || {
                let _ = prio_tx.send(raise_reader_priority());
                reader_loop(probes, reader_shared, every, sink)
            })
            .map_err(TracerError::Thread)?;
        if let Ok(Err(e)) = prio_rx.recv() {
            degraded.push(format!(
                "the ring reader runs at normal priority (setpriority {READER_NICE}: {e}; it needs \
                 CAP_SYS_NICE): on CPUs saturated by other work it is scheduled later and the \
                 rings fill sooner, so records may be dropped at loads a raised reader keeps up with"
            ));
        }
        let mut tracer = Self {
            shared: shared.clone(),
            degraded,
            reader: Some(reader),
            upkeep: None,
        };
        // Lookups in /proc take their time with many sockets and processes: on a thread of
        // their own, so that the reader keeps draining the ring buffer meanwhile.
        tracer.upkeep = Some(
            std::thread::Builder::new()
                .name("tcptrace-upkeep".into())
                .spawn(move || upkeep_loop(shared, stack_tables))
                .map_err(TracerError::Thread)?,
        );
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
        let kernel = self.shared.kernel.lock().unwrap().clone();
        let mut opts = opts.clone();
        opts.dropped_events = kernel.dropped;
        opts.missed_events = kernel.missed;
        opts.unix_now = unix_now();
        if opts.port_range == (0, 0) {
            opts.port_range = procfs::ephemeral_port_range().unwrap_or((0, 0));
        }
        opts.port_ranges = self.shared.port_ranges.lock().unwrap().clone();
        opts.host_netns = self.shared.host_netns;
        let table = self.shared.table.lock().unwrap();
        table.snapshot(monotonic_ns(), &opts)
    }

    /// Runs `f` with the table locked (status, metrics).
    pub fn with_table<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        f(&mut self.shared.table.lock().unwrap())
    }

    /// Drain rounds the reader has completed (it keeps counting while it is healthy).
    pub fn drains(&self) -> u64 {
        self.shared.drains.load(Ordering::Acquire)
    }

    pub fn kernel_counters(&self) -> KernelCounters {
        self.shared.kernel.lock().unwrap().clone()
    }

    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub fn attached(&self) -> &[&'static str] {
        &self.shared.attached
    }

    /// What works less well here (missing optional tracepoints, a reader at normal priority),
    /// one sentence each.
    pub fn degraded(&self) -> &[String] {
        &self.degraded
    }

    /// What the kernel programs logged on their rare failure paths, read once per second.
    pub fn kernel_log(&self) -> &KernelLog {
        &self.shared.kernel_log
    }

    /// Starts or stops recording the call stacks sockets are opened with (the daemon's
    /// reloadable `stacks`); takes effect within one drain. Fails when the tracer was started
    /// without room for stacks.
    pub fn set_stacks(&self, on: bool) -> Result<(), String> {
        if !self.shared.stacks_room {
            return Err("stacks were not enabled at start".into());
        }
        self.shared.stacks_wanted.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether stacks are being recorded, and why they could not be switched on if they
    /// could not.
    pub fn stacks(&self) -> (bool, Option<String>) {
        (
            self.shared.stacks_on.load(Ordering::Relaxed),
            self.shared.stacks_error.lock().unwrap().clone(),
        )
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
        if let Some(u) = self.upkeep.take() {
            let _ = u.join();
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Once a second: the table's upkeep (TIME_WAIT expiry, exited processes), the port ranges of
/// the namespaces in use, owners of unowned CLOSE_WAIT sockets and holders of every CLOSE_WAIT
/// socket. The table is locked only to read what to look up and to record what was found.
fn upkeep_loop(shared: Arc<Shared>, stack_tables: Option<crate::kernel::stacks::StackTables>) {
    // Symbolizers keep per-thread caches: the lookups live on this thread.
    let mut stack_resolver = stack_tables.map(stacks::StackResolver::new);
    let mut tried_owners: HashSet<(SocketAddr, SocketAddr)> = HashSet::new();
    let mut holders = HolderResolver::default();
    let mut sysctls = NetnsSysctlCache::default();
    let mut next = Instant::now() + Duration::from_secs(1);
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next = now + Duration::from_secs(1);
        if shared.retry_owners.swap(false, Ordering::Relaxed) {
            tried_owners.clear();
        }
        let (unowned, namespaces) = {
            let mut table = shared.table.lock().unwrap();
            table.tick(monotonic_ns());
            (table.unowned_close_wait(), table.process_namespaces())
        };
        sysctls.refresh(&namespaces);
        *shared.port_ranges.lock().unwrap() = sysctls.port_ranges();
        shared
            .table
            .lock()
            .unwrap()
            .set_time_wait_limits(sysctls.time_wait_limits());
        resolve_owners(&shared, unowned, &mut tried_owners);
        resolve_holders(&shared, &mut holders);
        if shared.stacks_on.load(Ordering::Relaxed)
            && let Some(resolver) = stack_resolver.as_mut()
        {
            resolver.resolve(&shared.table);
        }
    }
}

/// The reader thread's nice value. Its work is small (a few percent of a core) but must come
/// soon after a ring fills: at the default nice, on CPUs that busy threads saturate, CFS can
/// leave it waiting long enough for the rings to overflow. Measured on 2 cores, 8-thread RST
/// churn (16 busy threads), 32 KiB rings: 46,195-122,435 records dropped per 4 s at nice 0,
/// 1,070-5,695 at nice -10 (4 alternating rounds each), for the same tracer CPU.
const READER_NICE: i32 = -10;

/// Raises the calling thread's (the reader's) priority to [`READER_NICE`]: on Linux the nice
/// value is per thread, and `setpriority(PRIO_PROCESS, 0)` sets the caller's.
fn raise_reader_priority() -> Result<(), rustix::io::Errno> {
    rustix::process::setpriority_process(None, READER_NICE)
}

fn reader_loop(
    mut probes: Probes,
    shared: Arc<Shared>,
    every: Duration,
    mut sink: Option<EventSink>,
) {
    let mut last_tick = Instant::now();
    // Beyond this many waiting records the reader waits for the table instead.
    const MAX_PENDING: usize = 200_000;
    // After lost records, when to compare the table with the kernel's socket list.
    let mut reconcile_at: Option<Instant> = None;
    let mut last_reconcile: Option<Instant> = None;
    let mut dropped_seen = 0u64;
    let mut reorder = Reorder::new(probes.rings());
    let mut lists_job: Option<std::sync::mpsc::Receiver<Option<KernelLists>>> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        // Drain the rings first, whatever the table is doing: a view computing a snapshot
        // holds the table for a few milliseconds, and the kernel must not find a ring full
        // meanwhile. Records of all rings are put back in time order (`reorder` holds the
        // newest a few milliseconds, and everything while the table is busy).
        // A reconcile is due: the kernel's lists are read on a thread of their own (it can take
        // long; the rings must keep being drained meanwhile).
        if lists_job.is_none() && reconcile_at.is_some_and(|t| Instant::now() >= t) {
            reconcile_at = None;
            last_reconcile = Some(Instant::now());
            let (tx, rx) = std::sync::mpsc::channel();
            let (netns, netns_known) = (shared.host_netns, shared.netns_known);
            let spawned = std::thread::Builder::new()
                .name("tcptrace-lists".into())
                .spawn(move || {
                    let _ = tx.send(read_kernel_lists(netns, netns_known));
                });
            if spawned.is_ok() {
                lists_job = Some(rx);
            }
        }
        // Taken before the drain: every record committed before this moment is read by it,
        // however long the drain takes (the reader can be preempted between two rings, and a
        // record committed on the first meanwhile must not be passed by later ones of the
        // second).
        let drain_started = monotonic_ns();
        probes.drain(|ring, raw| reorder.push(ring, *raw));
        // Lists read: everything drained so far is applied before they are (only records
        // written during the last few microseconds can still come, with older stamps).
        let lists = lists_job.as_ref().and_then(|rx| match rx.try_recv() {
            Ok(lists) => Some(lists),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(None),
        });
        if lists.is_some() {
            lists_job = None;
        }
        let reconcile_due = lists.as_ref().is_some_and(Option::is_some);
        let upto = if reconcile_due {
            u64::MAX
        } else {
            drain_started
        };
        // The table takes the released records directly; while a view holds it, they wait in
        // `reorder` (as many as MAX_PENDING: beyond, the reader waits for the table).
        // Before lists are applied, everything read must be (it is older than they are).
        let table = if reorder.len() < MAX_PENDING && !reconcile_due {
            shared.table.try_lock().ok()
        } else {
            Some(shared.table.lock().unwrap())
        };
        if let Some(mut table) = table {
            apply_released(&mut reorder, upto, &mut table, &mut sink);
        }
        shared.drains.fetch_add(1, Ordering::Release);
        let wanted = shared.stacks_wanted.load(Ordering::Relaxed);
        if wanted != probes.stacks() && shared.stacks_error.lock().unwrap().is_none() {
            match probes.set_stacks(wanted) {
                Ok(()) => shared.stacks_on.store(wanted, Ordering::Relaxed),
                Err(e) => *shared.stacks_error.lock().unwrap() = Some(e.to_string()),
            }
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            let lost = {
                let mut kernel = shared.kernel.lock().unwrap();
                *kernel = probes.counters();
                kernel.lost()
            };
            probes.drain_kernel_log();
            if lost > dropped_seen {
                dropped_seen = lost;
                let soon = Instant::now() + RECONCILE_AFTER;
                let allowed = last_reconcile.map_or(soon, |t| t + RECONCILE_GAP);
                reconcile_at.get_or_insert(soon.max(allowed));
            }
        }
        // Every event read so far is applied (nothing waits in `reorder`): the lists overrule
        // only what happened before they were read.
        if let Some(Some(lists)) = lists
            && reorder.is_empty()
        {
            apply_kernel_lists(&shared, &lists);
            // Owners may have been lost with the records, or looked up too early (a socket
            // still in the accept queue has none): look up unowned sockets again.
            shared.retry_owners.store(true, Ordering::Relaxed);
        }
        probes.wait(every);
    }
    // Records still in the buffer are not applied: the tracer is going away.
    drop(probes);
}

/// Applies the records `reorder` can release at `upto` (see [`Reorder::release`]) to the
/// table, in order, each decoded on the way (no copy in between); with the event stream's sink,
/// each with what the table knew of its socket before.
fn apply_released(
    reorder: &mut Reorder,
    upto: u64,
    table: &mut Table,
    sink: &mut Option<EventSink>,
) {
    reorder.release(upto, |raw| {
        let Some(ev) = decode(raw) else {
            return;
        };
        match sink.as_mut() {
            None => table.apply(&ev),
            Some(sink) => {
                let mut ctx = event_context(table, &ev);
                table.apply(&ev);
                ctx.failures.extend(table.take_failures());
                sink(&ev, &ctx);
            }
        }
    });
}

/// Owner and previous-state time of an event's socket, from the table before it applies it.
fn event_context(table: &Table, ev: &TcpEvent) -> EventContext {
    let now = ev.ts_ns();
    match *ev {
        TcpEvent::State {
            sk,
            owner,
            new,
            local,
            netns,
            ..
        } => {
            let known = table.socket_context(sk);
            let (pid, comm) = match (owner, &known) {
                (Some(o), _) => (
                    o.pid,
                    table.comm_of(o.pid).unwrap_or_else(|| o.comm_str().into()),
                ),
                (None, Some((Some((pid, comm)), _))) => (*pid, comm.clone()),
                // A connection on its way to accept(): its listener's owner.
                (None, _) if new == TcpState::SynRecv => table
                    .listener_owner(netns, local.port())
                    .unwrap_or_default(),
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
