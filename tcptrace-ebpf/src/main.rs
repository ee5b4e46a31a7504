//! Kernel side of tcptrace: classic tracepoints, and one raw tracepoint where BTF allows.
//!
//! * `sock:inet_sock_set_state` (TCP only): every state transition. Those the kernel makes in
//!   the application's context (connect, listen, its close or shutdown) carry the current task
//!   as owner; softirq transitions carry none (never whatever task happened to be on the CPU):
//!   userspace knows each socket's owner from its creation, an accepted socket's from its
//!   listener. As a BTF tracepoint (`inet_sock_set_state_btf`: the socket's fields read in
//!   place) where the kernel loads it, else as a raw tracepoint (`inet_sock_set_state_raw`:
//!   helper reads) where the kernel's BTF gives the layout of `struct sock`, else as the
//!   classic one.
//! * `syscalls:sys_enter_connect` / `sys_exit_connect`: destination and return value of every
//!   IPv4/IPv6 `connect()` that does not succeed at once (errors and -EINPROGRESS), read at the
//!   exit from the task's saved registers where BTF gives their layout (a connect that
//!   succeeds costs two returns), else kept from the entry in `CONNECTS`.
//! * `sock:inet_sk_error_report` (TCP only, connect-phase errors only): asynchronous errors,
//!   e.g. a non-blocking connect refused.
//!
//! Field offsets come from userspace (`OFFSETS`, read from tracefs at start-up). Records go to
//! userspace through one ring buffer per CPU (`RINGS` of them, `cpu % RINGS`), submitted
//! without wake-up: the reader drains them on a timer, which costs far less than one wake-up
//! per record, and puts the records of all rings back in time order. A record that cannot be reserved is
//! counted in the per-CPU `COUNTERS[COUNTER_DROPPED]`.
//!
//! Cost matters: these programs run in the workload's own context on every connection, so the
//! per-transition path touches no map but its CPU's ring and counters (a connect's thread
//! entry aside). Maps whose entries are always removed use plain hashes; the LRU maps use
//! per-CPU LRU lists (BPF_F_NO_COMMON_LRU) so that inserts on different CPUs do not contend.
//!
//! Failures that should not happen (a record or a user sockaddr that cannot be read, a map
//! insert refused) are logged with aya-log ([`rare!`]), out of line: the per-transition path
//! never logs and only gains the test of a helper's result.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_smp_processor_id, bpf_probe_read_kernel,
    },
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};

mod record;
use record::{Fields, Record, Sock};
use tcptrace_common::{
    COUNTER_DROPPED, COUNTER_NOT_SENT, COUNTER_RESCUED, COUNTER_UNREADABLE, COUNTERS_LEN,
    DEFAULT_RING_BYTES, NetnsOffsets, Offsets, RINGS, SOCK_CHUNK, SockOffsets, tcp_state,
};

/// Overridden at load time with the offsets tracefs gives (read-only data: the verifier knows
/// the values). Read field by field with [`off!`] so that no copy of the whole struct lands on
/// the stack.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::DEFAULT;

/// Where a socket's network namespace number is (from BTF, set by userspace; zeros: unknown).
#[unsafe(no_mangle)]
static NETNS: NetnsOffsets = NetnsOffsets {
    skc_net: 0,
    net_inum: 0,
};

/// The network namespace (inode number) of the socket at `sk`; 0 when unknown.
#[inline(always)]
fn sock_netns(sk: u64) -> u32 {
    // SAFETY: aligned reads of a static; volatile so the load-time values are used.
    let (skc_net, inum) = unsafe {
        (
            core::ptr::read_volatile(&raw const NETNS.skc_net),
            core::ptr::read_volatile(&raw const NETNS.net_inum),
        )
    };
    if skc_net == 0 || sk == 0 {
        return 0;
    }
    // SAFETY: kernel memory read through bpf_probe_read_kernel; a bad address reads as 0.
    let net = unsafe { bpf_probe_read_kernel((sk + skc_net as u64) as *const u64) }.unwrap_or(0);
    if net == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel((net + inum as u64) as *const u32) }.unwrap_or(0)
}

/// Whether every transition is sent (set by userspace for the event stream). Otherwise the
/// state programs send nothing for a transition that changes nothing userspace tracks: LISTEN ->
/// SYN_RECV, the birth of an accepted socket, which moves on to ESTABLISHED (or CLOSE) in the
/// same softirq and is known from that next transition and its listener.
#[unsafe(no_mangle)]
static ALL_TRANSITIONS: u8 = 1;

/// Set by userspace for the benchmark's floor (`TCPTRACE_EMPTY_PROGRAMS=1`): every program
/// returns at once, so that what attaching them costs is measured apart from their work.
/// Read-only data: the verifier removes the branch not taken.
#[unsafe(no_mangle)]
static EMPTY: u8 = 0;

#[inline(always)]
fn empty() -> bool {
    // SAFETY: aligned read of a static; volatile so the load-time value is used.
    unsafe { core::ptr::read_volatile(&raw const EMPTY) != 0 }
}

/// Whether the transition `old` -> `new` is worth a record (see [`ALL_TRANSITIONS`]).
#[inline(always)]
fn wanted(old: u8, new: u8) -> bool {
    // SAFETY: aligned read of a static; volatile so the load-time value is used.
    let all = unsafe { core::ptr::read_volatile(&raw const ALL_TRANSITIONS) };
    all != 0 || !(old == tcp_state::LISTEN && new == tcp_state::SYN_RECV)
}

/// Unread bytes in a ring buffer beyond which a record wakes the reader at once (set by
/// userspace to a quarter of one ring). Below it, records are submitted without wake-up and
/// the reader drains them on its timer.
#[unsafe(no_mangle)]
static WAKE_AT: u64 = 1 << 20;

/// Submit flags for the next record: wake the reader only when the buffer is filling up.
#[inline(always)]
fn submit_flags(rb: &RingBuf) -> u64 {
    // SAFETY: aligned read of a static; volatile so the load-time value is used.
    let wake_at = unsafe { core::ptr::read_volatile(&raw const WAKE_AT) };
    if rb.query(BPF_RB_AVAIL_DATA as u64) > wake_at {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Overridden at load time with the layout of `struct sock` from BTF when the raw tracepoint
/// program is used (read-only data, like [`OFFSETS`]).
#[unsafe(no_mangle)]
static SOCK: SockOffsets = SockOffsets {
    daddr: 0,
    rcv_saddr: 0,
    dport: 0,
    num: 0,
    family: 0,
    v6_daddr: 0,
    v6_rcv_saddr: 0,
    net: 0,
    protocol: 0,
    protocol_size: 0,
    inet_sport: 0,
    _pad: 0,
    net_inum: 0,
};

macro_rules! sock {
    ($field:ident) => {
        // SAFETY: as for `off!`.
        unsafe { core::ptr::read_volatile(&raw const $crate::SOCK.$field) }
    };
}

macro_rules! off {
    ($field:ident) => {
        // SAFETY: aligned read of a field of a static; volatile so the compiler does not fold in
        // the compile-time default.
        unsafe { core::ptr::read_volatile(&raw const $crate::OFFSETS.$field) }
    };
}

/// Logs from a rare failure path through aya-log (forwarded to the user-space log). The
/// statement (a few hundred instructions) lives in its own cold function: the caller only gains
/// a call, in a branch the common path does not take. Arguments are named locals, passed as
/// i64: `rare!(warn, ctx, "... {}", err)`.
macro_rules! rare {
    ($level:ident, $ctx:expr, $fmt:literal $(, $arg:ident)*) => {{
        #[cold]
        #[inline(never)]
        fn rare_log<C: aya_ebpf::EbpfContext>(ctx: &C $(, $arg: i64)*) {
            $level!(ctx, $fmt $(, $arg)*);
        }
        rare_log($ctx $(, $arg as i64)*);
    }};
}

/// Who owns a socket, recorded in process context.
#[derive(Clone, Copy)]
#[repr(C)]
struct Owner {
    pid: u32,
    tid: u32,
    cgroup: u64,
    comm: [u8; 16],
}

/// A `connect()` in flight on one thread.
#[derive(Clone, Copy)]
#[repr(C)]
struct ConnectCtx {
    skaddr: u64,
    daddr: [u8; 16],
    dport: u16,
    family: u8,
    _pad: [u8; 5],
}

/// BPF_F_NO_COMMON_LRU: each CPU keeps its own LRU list (cheaper inserts under load).
const NO_COMMON_LRU: u32 = 2;

/// Declares the rings and [`ring`], which picks the current CPU's.
macro_rules! rings {
    ($($n:literal => $name:ident),* $(,)?) => {
        $(
            #[map]
            static $name: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES / RINGS, 0);
        )*

        /// The ring of the CPU this runs on (`cpu % RINGS`).
        #[inline(always)]
        fn ring() -> &'static RingBuf {
            // SAFETY: helper without arguments.
            let cpu = unsafe { bpf_get_smp_processor_id() };
            match cpu % RINGS {
                $($n => &$name,)*
                _ => &EVENTS0,
            }
        }
    };
}

rings!(
    0 => EVENTS0, 1 => EVENTS1, 2 => EVENTS2, 3 => EVENTS3,
    4 => EVENTS4, 5 => EVENTS5, 6 => EVENTS6, 7 => EVENTS7,
    8 => EVENTS8, 9 => EVENTS9, 10 => EVENTS10, 11 => EVENTS11,
    12 => EVENTS12, 13 => EVENTS13, 14 => EVENTS14, 15 => EVENTS15,
);
const _: () = assert!(RINGS == 16, "rings! declares 16 rings");

/// Per-CPU scratch space for one tracepoint record or socket chunk (too big for the 512-byte
/// stack beside the rest), one slot per program that uses it: a program can run nested in
/// another on the same CPU (a softirq arriving while a program runs), never in itself.
#[map]
pub(crate) static SCRATCH: PerCpuArray<[u8; SOCK_CHUNK]> = PerCpuArray::with_max_entries(3, 0);
/// [`SCRATCH`] slot of the state programs (classic or raw, never both attached).
const SLOT_STATE: u32 = 0;
/// [`SCRATCH`] slot of `inet_sk_error_report`.
const SLOT_ERROR: u32 = 1;
/// [`SCRATCH`] slot of `inet_state_rescue` (it runs while the state program holds its slot).
const SLOT_RESCUE: u32 = 2;

/// Per CPU: whether the transition being traced there has been reported. `inet_state_enter`
/// (attached first) sets 0, `inet_sock_set_state_raw` sets 1 when it runs, and
/// `inet_state_rescue` (attached last) reports the transition when it is still 0 (see the
/// state module).
#[map]
static STATE_HANDLED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// thread id -> connect() in flight. Every entry is removed when the syscall returns.
#[map]
static CONNECTS: HashMap<u32, ConnectCtx> = HashMap::with_max_entries(16384, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn current_owner() -> Owner {
    let id = bpf_get_current_pid_tgid();
    Owner {
        pid: (id >> 32) as u32,
        tid: id as u32,
        // SAFETY: helper without arguments.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u16) -> Result<T, i32> {
    // SAFETY: bounded kernel read through bpf_probe_read_kernel.
    unsafe { ctx.read_at::<T>(off as usize) }
}

mod connect;
mod stacks;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
