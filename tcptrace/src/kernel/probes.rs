//! Loading and attaching the kernel programs, and reading what they send.
//!
//! Dropping [`Probes`] detaches every program (the links are file descriptors owned by the
//! `Ebpf` object), so an error at any step leaves nothing attached.

use std::{fmt, os::fd::AsFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use aya_log::EbpfLogger;
use tcptrace_common::{
    COMPACT_LEN, COUNTER_DROPPED, COUNTER_DROPPED_OTHER, COUNTER_NOT_SENT, COUNTER_RESCUED,
    COUNTER_UNREADABLE, Event, NetnsOffsets, Offsets, RINGS, RegsOffsets, SockOffsets,
};

use crate::kernel::{
    Error,
    btf::Btf,
    log::{Collector, KernelLog},
    offsets::{netns_offsets, regs_offsets, sock_offsets},
    stacks::StackTables,
    state_hook::{
        EMPTY_PROGRAMS_VAR, STATE_HOOK_VAR, StateHook, attach_raw, attach_state, detach_raw,
        empty_programs_from_env,
    },
    tracefs,
};

/// The programs, in attach order: (program name, tracepoint category, tracepoint name). The
/// last one is replaced by [`RAW_STATE`] where the kernel's BTF allows; the first is attached
/// only with stacks where the kernel's BTF gives the layout of the saved registers.
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    (CONNECT_ENTRY, "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("inet_sk_error_report", "sock", "inet_sk_error_report"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
];

pub use super::counters::KernelCounters;
use super::counters::recursion_misses;

/// The entry of `connect()`: keeps the destination for the exit where the exit cannot read the
/// syscall's arguments, and records the stack when stacks are on.
pub const CONNECT_ENTRY: &str = "sys_enter_connect";

/// The raw tracepoint program for `inet_sock_set_state`: cheaper, and not skipped while another
/// BPF program runs on the CPU (see the eBPF crate).
pub const RAW_STATE: &str = "inet_sock_set_state_raw";

/// The state program as a BTF tracepoint: reads the socket's fields with plain guarded loads
/// instead of helper calls; preferred to [`RAW_STATE`] where the kernel loads it.
pub const BTF_STATE: &str = "inet_sock_set_state_btf";

/// Attached before [`RAW_STATE`] to the same tracepoint: marks each transition unreported on its
/// CPU, for [`RESCUE`].
pub const ENTER: &str = "inet_state_enter";

/// Attached after [`RAW_STATE`] to the same tracepoint: reports the transitions the kernel skips
/// [`RAW_STATE`] for (made by a softirq that interrupted it on its CPU).
pub const RESCUE: &str = "inet_state_rescue";

/// The rings' map names, by index.
const RING_NAMES: [&str; RINGS as usize] = [
    "EVENTS0", "EVENTS1", "EVENTS2", "EVENTS3", "EVENTS4", "EVENTS5", "EVENTS6", "EVENTS7",
    "EVENTS8", "EVENTS9", "EVENTS10", "EVENTS11", "EVENTS12", "EVENTS13", "EVENTS14", "EVENTS15",
];

/// What is missing to run the tracer, as one line for the user.
#[derive(Debug)]
pub struct MissingPrivilege(pub String);

impl fmt::Display for MissingPrivilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MissingPrivilege {}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Fails with one line naming what is missing when this process cannot load and attach the
/// programs (needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN).
pub fn check_privileges() -> Result<(), MissingPrivilege> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    Err(MissingPrivilege(format!(
        "needs root (or {}) to load its eBPF programs: run it with sudo",
        missing.join(" and ")
    )))
}

/// The BPF ring buffer needs Linux 5.8 (the version as aya reads it: distributions' own version
/// strings included).
fn check_kernel() -> Result<(), Error> {
    use aya::util::KernelVersion;
    match KernelVersion::current() {
        Ok(v) if v < KernelVersion::new(5, 8, 0) => {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            Err(Error::KernelTooOld {
                release: release.trim().to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort, a no-op
/// where memory cgroups account BPF memory).
fn raise_memlock() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    let _ = setrlimit(Resource::Memlock, unlimited);
}

/// Loaded and attached programs plus the maps userspace reads.
pub struct Probes {
    // Field order matters for drop: the ring buffers and counters are dropped before the object.
    /// The rings CPUs write to (`cpu % RINGS`); rings no CPU maps to are not opened.
    rings: Vec<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// None when the object logs nothing (no AYA_LOGS map) or the map could not be opened.
    logger: Option<EbpfLogger<Collector>>,
    pub(super) _ebpf: Ebpf,
    kernel_log: KernelLog,
    attached: Vec<&'static str>,
    degraded: Vec<String>,
    /// Records carry their socket's network namespace (BTF offsets were found).
    netns_known: bool,
    /// `STACKS_ON`; None when the object was loaded without room for stacks.
    pub(super) stacks_on: Option<Array<MapData, u32>>,
    /// Links of the stack programs while stacks are on.
    pub(super) stack_links: Vec<(&'static str, TracePointLinkId)>,
    /// Whether `sys_enter_connect` is one of them: attached only while stacks are on, where
    /// `sys_exit_connect` reads the syscall's arguments itself.
    pub(super) connect_entry_for_stacks: bool,
    /// The stack maps, until [`Probes::take_stack_tables`].
    pub(super) stack_tables: Option<StackTables>,
}

/// Options for [`Probes::attach`].
#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes (rounded up to a power of two of at least one page).
    pub ring_bytes: u32,
    /// Send every transition (the event stream); otherwise none for those that change nothing
    /// the table tracks (LISTEN -> SYN_RECV: the next transition and the listener tell it).
    pub all_transitions: bool,
    /// Call stacks of opened descriptors: None, never (the stack maps get one entry); Some(on),
    /// maps sized for them and recording on or off (switched with [`Probes::set_stacks`]).
    pub stacks: Option<bool>,
    /// The program for state transitions (set from `TCPTRACE_STATE_PROGRAM` by `attach`).
    pub state_hook: StateHook,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: tcptrace_common::DEFAULT_RING_BYTES,
            all_transitions: false,
            stacks: None,
            state_hook: StateHook::Auto,
        }
    }
}

/// Returns freed heap memory to the system (the kernel BTF parsed at start-up is tens of
/// megabytes, freed in a thread's arena that the table's threads would not reuse).
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: plain libc call, no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Size of each ring in use and how many are in use, for a total of `total` bytes on a host with
/// `cpus` possible CPUs: the total split between the rings CPUs write to (at least one page
/// each), so the memory stays bounded however many CPUs there are.
pub fn ring_layout(total: u32, cpus: usize) -> (u32, usize) {
    let used = cpus.clamp(1, RINGS as usize);
    (ring_size(total / used as u32), used)
}

/// Rounds a ring buffer size to what the kernel accepts: a power of two, at least one page.
pub fn ring_size(bytes: u32) -> u32 {
    let page = 4096u32;
    bytes
        .max(page)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The classic tracepoint program `prog` of the object.
pub(super) fn tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut TracePoint, Error> {
    ebpf.program_mut(prog)
        .ok_or(Error::ProgramMissing { program: prog })?
        .try_into()
        .map_err(|source| Error::NotATracepoint {
            program: prog,
            source,
        })
}

impl Probes {
    /// Checks privileges, reads tracepoint offsets, loads and attaches every program.
    pub fn attach(mut opts: ProbeOptions) -> Result<Self, Error> {
        opts.state_hook = StateHook::from_env().map_err(Error::Setting)?;
        check_privileges()?;
        check_kernel()?;
        raise_memlock();
        let root = tracefs::tracefs_root()?;
        let (offsets, degraded) = tracefs::offsets_from(&root)?;
        let btf = Btf::from_sys();
        let sock = btf.as_ref().ok().and_then(sock_offsets);
        let regs = btf.as_ref().map(regs_offsets).unwrap_or_default();
        let (netns, netns_degraded) = match btf.and_then(|b| netns_offsets(&b)) {
            Ok(n) => (n, None),
            Err(e) => (
                NetnsOffsets::default(),
                Some(format!(
                    "network namespaces of sockets unknown ({e}{}): sockets of every namespace \
                     are counted as the host's",
                    std::error::Error::source(&e)
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                )),
            ),
        };
        let mut probes = Self::attach_with(offsets, netns, sock, regs, opts, degraded.is_some())?;
        probes.degraded.extend(degraded);
        probes.degraded.extend(netns_degraded);
        Ok(probes)
    }

    fn attach_with(
        offsets: Offsets,
        netns: NetnsOffsets,
        sock: Option<SockOffsets>,
        regs: RegsOffsets,
        opts: ProbeOptions,
        skip_error_report: bool,
    ) -> Result<Self, Error> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));
        if object.is_empty() {
            return Err(Error::NotBuiltIn);
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
        let (per_ring, used) = ring_layout(opts.ring_bytes, cpus);
        // What the loader borrows lives longer than it.
        let (sock_offsets, wake_at) = (sock.unwrap_or_default(), per_ring as u64 / 4);
        let all_transitions = u8::from(opts.all_transitions);
        let empty = empty_programs_from_env().map_err(Error::Setting)?;
        let empty_flag = u8::from(empty);
        // One parse of the kernel's BTF (megabytes of types), shared by the loader and the BTF
        // tracepoint, and dropped once the programs are attached: the loader's own parse is
        // dropped before ours is made.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let kernel_btf = aya::Btf::from_sys_fs().ok();
        loader.btf(kernel_btf.as_ref());
        for (i, name) in RING_NAMES.iter().enumerate() {
            // Rings no CPU writes to get the smallest size the kernel takes.
            let size = if i < used { per_ring } else { ring_size(0) };
            loader.map_max_entries(name, size);
        }
        if opts.stacks.is_none() {
            loader.map_max_entries("SOCK_STACKS", 1);
            loader.map_max_entries("STACKS", 1);
        }
        let mut ebpf = loader
            .override_global("OFFSETS", &offsets, true)
            .override_global("NETNS", &netns, true)
            .override_global("SOCK", &sock_offsets, true)
            .override_global("WAKE_AT", &wake_at, true)
            .override_global("ALL_TRANSITIONS", &all_transitions, true)
            .override_global("EMPTY", &empty_flag, true)
            .override_global("REGS", &regs, true)
            .load(object)
            .map_err(Error::Load)?;
        let mut attached = Vec::new();
        let mut degraded = Vec::new();
        if empty {
            degraded.push(format!(
                "{EMPTY_PROGRAMS_VAR}=1: every program returns at once, nothing is traced"
            ));
        }
        let hook = opts.state_hook;
        if hook != StateHook::Auto {
            degraded.push(format!(
                "state program chosen by {STATE_HOOK_VAR}={}",
                format!("{hook:?}").to_lowercase()
            ));
        }
        // Where sys_exit_connect reads connect()'s arguments from the saved registers, the
        // entry program has nothing to do but record stacks: attached only while they are on.
        let connect_entry_for_stacks = regs.syscall_args();
        for (prog, cat, name) in PROGRAMS {
            if skip_error_report && *name == "inet_sk_error_report" {
                continue;
            }
            if connect_entry_for_stacks && *prog == CONNECT_ENTRY {
                continue;
            }
            if *prog == "inet_sock_set_state" && sock.is_some() && hook != StateHook::Classic {
                // In this order: the enter program must run before the state program for every
                // transition, the rescue program after it (programs on a tracepoint run in the
                // order they were attached).
                let enter = attach_raw(&mut ebpf, ENTER, name);
                let entered = enter.is_ok();
                match attach_state(&mut ebpf, name, hook, kernel_btf.as_ref()) {
                    Ok((state, btf_refused)) => {
                        attached.push(state);
                        // Every kernel with a ring buffer (5.8) loads BTF tracepoints: a refusal
                        // is news (a verifier that changed), and the raw program is slower.
                        if let Some(e) = btf_refused {
                            degraded.push(format!(
                                "state transitions use the raw tracepoint (helper reads, slower): \
                                 the BTF one was refused: {e}"
                            ));
                        }
                        match enter.and_then(|()| attach_raw(&mut ebpf, RESCUE, name)) {
                            Ok(()) => attached.extend([ENTER, RESCUE]),
                            Err(e) => degraded.push(format!(
                                "transitions made while the state program is interrupted are \
                                 lost (counted as missed): {e}{}",
                                detach_raw(&mut ebpf, ENTER, entered)
                            )),
                        }
                        continue;
                    }
                    // A link left by a failed attach is dropped with the program's unload.
                    Err(e) => degraded.push(format!(
                        "state transitions use the classic tracepoint ({e}): the kernel skips it \
                         while another BPF program runs on the same CPU (counted as missed){}",
                        detach_raw(&mut ebpf, ENTER, entered)
                    )),
                }
            } else if *prog == "inet_sock_set_state" && hook != StateHook::Classic {
                degraded.push(
                    "state transitions use the classic tracepoint (no usable BTF layout of \
                     struct sock): the kernel skips it while another BPF program runs on the same \
                     CPU (counted as missed)"
                        .to_string(),
                );
            }
            let p = tracepoint(&mut ebpf, prog)?;
            p.load().map_err(|source| Error::Refused {
                program: prog,
                source,
            })?;
            p.attach(cat, name).map_err(|source| Error::Attach {
                tracepoint: format!("{cat}:{name}"),
                source,
            })?;
            attached.push(*prog);
        }
        let mut take = |map: &'static str| ebpf.take_map(map).ok_or(Error::MapMissing { map });
        let rings = RING_NAMES[..used]
            .iter()
            .map(|name| Ok(RingBuf::try_from(take(name)?)?))
            .collect::<Result<Vec<_>, Error>>()?;
        let counters = PerCpuArray::try_from(take("COUNTERS")?)?;
        let (stacks_on, stack_tables) = match opts.stacks {
            None => (None, None),
            Some(_) => (
                Some(Array::try_from(take("STACKS_ON")?)?),
                Some(StackTables::new(
                    HashMap::try_from(take("SOCK_STACKS")?)?,
                    StackTraceMap::try_from(take("STACKS")?)?,
                )),
            ),
        };
        // Kernel diagnostics are a help, not a need: without them the tracer runs as well.
        let kernel_log = KernelLog::default();
        let logger = match EbpfLogger::init_with_logger(&mut ebpf, Collector(kernel_log.clone())) {
            Ok(logger) => Some(logger),
            Err(aya_log::Error::MapNotFound) => None,
            Err(e) => {
                degraded.push(format!(
                    "kernel diagnostics are not forwarded to the log: {e}"
                ));
                None
            }
        };
        drop(loader);
        drop(kernel_btf);
        give_back_freed_memory();
        let mut probes = Self {
            rings,
            counters,
            logger,
            _ebpf: ebpf,
            kernel_log,
            attached,
            degraded,
            netns_known: netns != NetnsOffsets::default(),
            stacks_on,
            stack_links: Vec::new(),
            connect_entry_for_stacks,
            stack_tables,
        };
        if opts.stacks == Some(true) {
            probes.set_stacks(true)?;
        }
        Ok(probes)
    }

    /// Whether records carry their socket's network namespace.
    pub fn netns_known(&self) -> bool {
        self.netns_known
    }

    /// What works less well on this kernel, one sentence each.
    pub fn degraded(&self) -> &[String] {
        &self.degraded
    }

    /// Names of the attached programs.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// How many rings are read (one per CPU, up to [`RINGS`]).
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    /// Waits until the kernel wakes the reader (a ring is a quarter full) or `timeout` passes,
    /// whichever is first.
    pub fn wait(&self, timeout: std::time::Duration) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut pfds: Vec<PollFd<'_>> = self
            .rings
            .iter()
            .map(|r| PollFd::from_borrowed_fd(r.as_fd(), PollFlags::IN))
            .collect();
        let timeout = Timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: timeout.subsec_nanos().into(),
        };
        // The result only decides whether to drain now or later.
        let _ = poll(&mut pfds, Some(&timeout));
    }

    /// Calls `f` with every record waiting in the rings and its ring's index, ring by ring
    /// (each ring's records in order; see [`super::order`] for putting rings together); returns
    /// how many were read. A compact record comes as an `Event` without owner; records of an
    /// unexpected size are skipped.
    pub fn drain(&mut self, mut f: impl FnMut(usize, &Event)) -> usize {
        let mut n = 0;
        for (i, ring) in self.rings.iter_mut().enumerate() {
            while let Some(item) = ring.next() {
                if let Some(ev) = record(&item) {
                    f(i, &ev);
                }
                n += 1;
            }
        }
        n
    }

    /// Moves what the kernel programs logged into [`Probes::kernel_log`]. Cheap when nothing
    /// was logged (one read of the ring's positions): call it once per tick, not per event.
    pub fn drain_kernel_log(&mut self) {
        let Some(logger) = self.logger.as_mut() else {
            return;
        };
        // aya-log panics on a record it cannot decode, which only a mismatch between the
        // kernel and user halves of aya-log could write: stop reading rather than lose the
        // reader thread.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush()));
        if read.is_err() {
            self.logger = None;
            self.kernel_log.push(
                "error",
                "kernel: a log record could not be decoded; kernel diagnostics are off".into(),
            );
        }
    }

    /// The lines the kernel programs logged, filled by [`Probes::drain_kernel_log`]; the
    /// handle stays valid after the probes are dropped.
    pub fn kernel_log(&self) -> KernelLog {
        self.kernel_log.clone()
    }

    /// Kernel-side counters summed over CPUs, and the runs the kernel skipped that nothing
    /// made up for.
    pub fn counters(&self) -> KernelCounters {
        let sum = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        // Both drop counters per CPU, read once: the total is their sum.
        let per_cpu = |index: u32| -> Vec<u64> {
            self.counters
                .get(&index, 0)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default()
        };
        let (transitions, other) = (per_cpu(COUNTER_DROPPED), per_cpu(COUNTER_DROPPED_OTHER));
        let dropped_transitions: u64 = transitions.iter().sum();
        let dropped = dropped_transitions + other.iter().sum::<u64>();
        let dropped_by_cpu = (0..transitions.len().max(other.len()))
            .map(|cpu| {
                let n = |v: &[u64]| v.get(cpu).copied().unwrap_or(0);
                (cpu as u32, n(&transitions) + n(&other))
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        // The enter and rescue programs' own skips lose nothing (the state program ran); the
        // state program's skips that the rescue program reported are not lost either.
        let skipped = |state: bool| -> u64 {
            self.attached
                .iter()
                .filter(|&&name| name != RESCUE && name != ENTER)
                .filter(|&&name| {
                    (name == BTF_STATE || name == RAW_STATE || name == "inet_sock_set_state")
                        == state
                })
                .filter_map(|name| self._ebpf.program(name)?.fd().ok())
                .filter_map(|fd| recursion_misses(fd.as_fd()))
                .sum()
        };
        // Plus the transitions a program saw but could not read.
        let missed_transitions =
            skipped(true).saturating_sub(sum(COUNTER_RESCUED)) + sum(COUNTER_UNREADABLE);
        KernelCounters {
            dropped,
            dropped_by_cpu,
            dropped_transitions,
            missed: missed_transitions + skipped(false),
            missed_transitions,
            not_sent: sum(COUNTER_NOT_SENT),
        }
    }
}

/// The record in a ring buffer item: a whole [`Event`], or a compact one (its first
/// [`COMPACT_LEN`] bytes; the owner fields read as zeros). None for any other size.
pub(crate) fn record(item: &[u8]) -> Option<Event> {
    let mut ev = Event::default();
    let len = match item.len() {
        n if n >= size_of::<Event>() => size_of::<Event>(),
        n if n >= COMPACT_LEN => COMPACT_LEN,
        _ => return None,
    };
    // SAFETY: Event is plain-old-data (every byte pattern valid) and `len` bytes fit both the
    // item and the Event.
    unsafe {
        std::ptr::copy_nonoverlapping(item.as_ptr(), (&raw mut ev).cast::<u8>(), len);
    }
    Some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_whole_records_read_the_same_but_for_the_owner() {
        let whole = Event {
            ts_ns: 7,
            skaddr: 0xffff_8881_0000_1000,
            netns: 4026531840,
            kind: tcptrace_common::KIND_STATE,
            oldstate: 1,
            newstate: 7,
            family: 2,
            sport: 40000,
            dport: 80,
            ret: -111,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            daddr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8],
            cgroup: 42,
            pid: 1234,
            flags: 1,
            comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
        };
        // SAFETY: plain-old-data viewed as its bytes.
        let bytes: [u8; 96] = unsafe { std::mem::transmute(whole) };
        assert_eq!(record(&bytes), Some(whole));
        let compact = record(&bytes[..COMPACT_LEN]).unwrap();
        assert_eq!(
            compact,
            Event {
                cgroup: 0,
                pid: 0,
                flags: 0,
                comm: [0; 16],
                ..whole
            }
        );
        assert_eq!(record(&bytes[..COMPACT_LEN - 8]), None);
    }

    #[test]
    fn ring_memory_is_bounded_whatever_the_number_of_cpus() {
        // The default 4 MiB: split between the CPUs' rings, never more in all.
        assert_eq!(ring_layout(4 << 20, 2), (2 << 20, 2));
        assert_eq!(ring_layout(4 << 20, 16), (256 << 10, 16));
        assert_eq!(ring_layout(4 << 20, 128), (256 << 10, 16));
        assert_eq!(ring_layout(4 << 20, 1), (4 << 20, 1));
        // A tiny total still gives each ring a page.
        assert_eq!(ring_layout(4096, 2), (4096, 2));
        assert_eq!(ring_layout(4096, 0), (4096, 1));
    }

    #[test]
    fn ring_sizes_are_powers_of_two_of_at_least_a_page() {
        assert_eq!(ring_size(0), 4096);
        assert_eq!(ring_size(5000), 8192);
        assert_eq!(ring_size(1 << 20), 1 << 20);
    }
}
