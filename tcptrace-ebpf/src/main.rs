//! Kernel side of tcptrace: classic tracepoints only.
//!
//! * `sock:inet_sock_set_state` (TCP only): every state transition, reported with the socket's
//!   recorded owner. The owner is recorded where the kernel runs in the owner's context
//!   (connect, listen, the application's close) and inherited by accepted sockets from their
//!   listener; softirq transitions never take whatever task happened to be on the CPU.
//! * `syscalls:sys_enter_connect` / `sys_exit_connect`: destination and return value of every
//!   IPv4/IPv6 `connect()` that does not succeed at once (errors and -EINPROGRESS).
//! * `sock:inet_sk_error_report` (TCP only, connect-phase errors only): asynchronous errors,
//!   e.g. a non-blocking connect refused.
//!
//! Field offsets come from userspace (`OFFSETS`, read from tracefs at start-up). Records go to
//! userspace through one ring buffer, submitted without wake-up: the reader drains it on a
//! timer, which costs far less than one wake-up per record. A record that cannot be reserved is
//! counted in the per-CPU `COUNTERS[COUNTER_DROPPED]`.
//!
//! Cost matters: these programs run in the workload's own context on every connection. Maps
//! whose entries are always removed use plain hashes; the LRU maps use per-CPU LRU lists
//! (BPF_F_NO_COMMON_LRU) so that inserts on different CPUs do not contend.
//!
//! Failures that should not happen (a record or a user sockaddr that cannot be read, an owner
//! map insert refused) are logged with aya-log ([`rare!`]), out of line: the per-transition path
//! never logs and only gains the test of a helper's result.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::{error, warn};

mod record;
use record::Record;
use tcptrace_common::{
    AF_INET, AF_INET6, COUNTER_DROPPED, COUNTERS_LEN, DEFAULT_RING_BYTES, Event,
    FLAG_OWNER_CURRENT, FLAG_OWNER_INHERITED, FLAG_OWNER_RECORDED, IPPROTO_TCP, KIND_CONNECT,
    KIND_ERROR, KIND_STATE, NetnsOffsets, Offsets, TP_RECORD_MAX, tcp_state,
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

/// (netns, family, port) of a listening socket, the key of LISTENERS: namespaces have ports of
/// their own.
#[inline(always)]
fn listener_key(netns: u32, family: u8, port: u16) -> u64 {
    (netns as u64) << 32 | (family as u64) << 16 | port as u64
}

/// Unread bytes in the ring buffer beyond which a record wakes the reader at once (set by
/// userspace to a quarter of the ring). Below it, records are submitted without wake-up and
/// the reader drains them on its timer.
#[unsafe(no_mangle)]
static WAKE_AT: u64 = 1 << 20;

/// Submit flags for the next record: wake the reader only when the buffer is filling up.
#[inline(always)]
fn submit_flags() -> u64 {
    // SAFETY: aligned read of a static; volatile so the load-time value is used.
    let wake_at = unsafe { core::ptr::read_volatile(&raw const WAKE_AT) };
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > wake_at {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

macro_rules! off {
    ($field:ident) => {
        // SAFETY: aligned read of a field of a static; volatile so the compiler does not fold in
        // the compile-time default.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
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
        fn rare_log(ctx: &TracePointContext $(, $arg: i64)*) {
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

#[derive(Clone, Copy)]
#[repr(C)]
struct Listener {
    owner: Owner,
    skaddr: u64,
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

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Per-CPU scratch space for one tracepoint record (too big for the 512-byte stack beside the rest).
#[map]
pub(crate) static SCRATCH: PerCpuArray<[u8; TP_RECORD_MAX]> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// skaddr -> owner. LRU and bounded: a socket whose entry was evicted is reported without owner
/// and userspace falls back to its own table.
#[map]
static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(131072, NO_COMMON_LRU);

/// (netns, family, port) -> owner of the listening socket, inherited by accepted sockets.
#[map]
static LISTENERS: LruHashMap<u64, Listener> = LruHashMap::with_max_entries(8192, NO_COMMON_LRU);

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

#[inline(always)]
fn set_owner(ev: &mut Event, o: &Owner, flag: u32) {
    ev.pid = o.pid;
    ev.cgroup = o.cgroup;
    ev.comm = o.comm;
    ev.flags |= flag;
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_set_state(&ctx) {
        rare!(
            error,
            &ctx,
            "inet_sock_set_state: reading the tracepoint record failed (error {}); transition lost",
            err
        );
    }
    0
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let rec = Record::read(ctx)?;
    if rec.proto(off!(ss_protocol), off!(ss_protocol_size)) != IPPROTO_TCP {
        return Ok(());
    }
    let skaddr = rec.u64(off!(ss_skaddr));
    let old = rec.i32(off!(ss_oldstate)) as u8;
    let new = rec.i32(off!(ss_newstate)) as u8;
    let family = rec.u16(off!(ss_family)) as u8;
    let sport = rec.u16(off!(ss_sport));

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(COUNTER_DROPPED);
        // Keep the owner map consistent even when the record is lost.
        if new == tcp_state::CLOSE {
            let _ = OWNERS.remove(&skaddr);
        }
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: the reservation is exactly one Event; every field is written below.
    let ev = unsafe { &mut *ev };
    // Field by field: a whole Event built on the stack would not fit beside the record.
    ev.skaddr = skaddr;
    ev.cgroup = 0;
    ev.pid = 0;
    let netns = sock_netns(skaddr);
    ev.netns = netns;
    ev.kind = KIND_STATE;
    ev.oldstate = old;
    ev.newstate = new;
    ev.family = family;
    ev.sport = sport;
    ev.ret = 0;
    ev.flags = 0;
    ev.comm = [0; 16];
    // SAFETY: helper without arguments.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.dport = rec.u16(off!(ss_dport));
    rec.addrs(
        ev,
        (off!(ss_saddr), off!(ss_daddr)),
        (off!(ss_saddr_v6), off!(ss_daddr_v6)),
    );

    let process_context = (old == tcp_state::CLOSE && new == tcp_state::SYN_SENT)
        || new == tcp_state::LISTEN
        || (old == tcp_state::CLOSE_WAIT && new == tcp_state::LAST_ACK)
        || (old == tcp_state::LISTEN && new == tcp_state::CLOSE)
        || (old == tcp_state::ESTABLISHED && new == tcp_state::FIN_WAIT1);

    if new == tcp_state::SYN_SENT && old == tcp_state::CLOSE || new == tcp_state::LISTEN {
        // The owner is the current task: record it.
        let o = current_owner();
        set_owner(ev, &o, FLAG_OWNER_CURRENT);
        if let Err(err) = OWNERS.insert(&skaddr, &o, 0) {
            owner_insert_failed(ctx, err);
        }
        if new == tcp_state::LISTEN {
            let key = listener_key(netns, family, sport);
            if let Err(err) = LISTENERS.insert(&key, &Listener { owner: o, skaddr }, 0) {
                rare!(
                    warn,
                    ctx,
                    "inet_sock_set_state: LISTENERS insert failed (error {}); sockets accepted from this listener get no owner",
                    err
                );
            }
        } else if let Some(c) = CONNECTS.get_ptr_mut(o.tid) {
            // SAFETY: entry of this thread, written only by this thread.
            unsafe { (*c).skaddr = skaddr };
        }
    } else if new == tcp_state::SYN_RECV {
        // A connection on its way to accept(): it belongs to the listener's owner.
        let key = listener_key(netns, family, sport);
        // SAFETY: value copied out before use.
        if let Some(l) = unsafe { LISTENERS.get(&key) } {
            let o = l.owner;
            set_owner(ev, &o, FLAG_OWNER_INHERITED);
            if let Err(err) = OWNERS.insert(&skaddr, &o, 0) {
                owner_insert_failed(ctx, err);
            }
        }
    } else if new == tcp_state::CLOSE_WAIT {
        // Runs in softirq, on whatever task was on the CPU: the recorded owner is the truth.
        // SAFETY: value copied out by set_owner.
        if let Some(o) = unsafe { OWNERS.get(&skaddr) } {
            set_owner(ev, o, FLAG_OWNER_RECORDED);
        }
    } else if process_context {
        // The application itself (close, shutdown, listen socket closed).
        let o = current_owner();
        set_owner(ev, &o, FLAG_OWNER_CURRENT);
    }
    // Other transitions carry no owner: userspace has the socket's owner from its creation,
    // and skipping the lookup keeps the common path cheap.

    if new == tcp_state::CLOSE {
        let _ = OWNERS.remove(&skaddr);
        if old == tcp_state::LISTEN {
            let key = listener_key(netns, family, sport);
            // SAFETY: value read before removal.
            if let Some(l) = unsafe { LISTENERS.get(&key) } {
                if l.skaddr == skaddr {
                    let _ = LISTENERS.remove(&key);
                }
            }
        }
    }
    entry.submit(submit_flags());
    Ok(())
}

/// An OWNERS insert failed: the socket's later softirq transitions are reported without owner.
#[inline(always)]
fn owner_insert_failed(ctx: &TracePointContext, err: i32) {
    rare!(
        warn,
        ctx,
        "inet_sock_set_state: OWNERS insert failed (error {}); the socket is reported without owner",
        err
    );
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_enter_connect(&ctx) {
        rare!(
            error,
            &ctx,
            "sys_enter_connect: reading the tracepoint record failed (error {}); connect not followed",
            err
        );
    }
    0
}

/// A connect() whose sockaddr could not be read from user memory (bad pointer, page not present).
#[inline(always)]
fn sockaddr_unreadable(ctx: &TracePointContext, err: i32) {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    rare!(
        warn,
        ctx,
        "sys_enter_connect: reading the sockaddr from user memory failed (error {}, pid {}); connect not followed",
        err,
        pid
    );
}

fn try_enter_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let uaddr = read::<u64>(ctx, off!(ce_uservaddr))? as *const [u8; 16];
    // SAFETY: user memory read through bpf_probe_read_user.
    let head = match unsafe { bpf_probe_read_user(uaddr) } {
        Ok(head) => head,
        Err(err) => {
            sockaddr_unreadable(ctx, err);
            return Ok(());
        }
    };
    let family = u16::from_ne_bytes([head[0], head[1]]) as u8;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let mut c = ConnectCtx {
        skaddr: 0,
        daddr: [0; 16],
        dport: u16::from_be_bytes([head[2], head[3]]),
        family,
        _pad: [0; 5],
    };
    if family == AF_INET {
        c.daddr[..4].copy_from_slice(&head[4..8]);
    } else {
        // sockaddr_in6: family, port, flowinfo (4 bytes), then the 16-byte address at offset 8.
        // SAFETY: user memory read through bpf_probe_read_user.
        let full = match unsafe { bpf_probe_read_user(uaddr as *const [u8; 24]) } {
            Ok(full) => full,
            Err(err) => {
                sockaddr_unreadable(ctx, err);
                return Ok(());
            }
        };
        c.daddr.copy_from_slice(&full[8..24]);
    }
    let id = bpf_get_current_pid_tgid();
    if let Err(err) = CONNECTS.insert(&(id as u32), &c, 0) {
        // Full (more threads inside connect() than entries) or busy.
        let pid = id >> 32;
        rare!(
            warn,
            ctx,
            "sys_enter_connect: CONNECTS insert failed (error {}, pid {}); connect not followed",
            err,
            pid
        );
    }
    Ok(())
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_exit_connect(&ctx) {
        rare!(
            error,
            &ctx,
            "sys_exit_connect: reading the tracepoint record failed (error {}); connect result lost",
            err
        );
    }
    0
}

fn try_exit_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: value copied out before the entry is removed.
    let Some(c) = (unsafe { CONNECTS.get(&tid) }).copied() else {
        return Ok(());
    };
    let _ = CONNECTS.remove(&tid);
    let ret = read::<i64>(ctx, off!(cx_ret))?;
    // Success is visible as SYN_SENT -> ESTABLISHED; only errors and -EINPROGRESS are sent.
    // A call that failed before any TCP state change (no route) may be on a datagram socket
    // too: userspace counts those as failures to reach the destination.
    if ret == 0 {
        return Ok(());
    }
    let o = current_owner();
    let ev = Event {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: c.skaddr,
        cgroup: o.cgroup,
        pid: o.pid,
        netns: sock_netns(c.skaddr),
        kind: KIND_CONNECT,
        oldstate: 0,
        newstate: 0,
        family: c.family,
        sport: 0,
        dport: c.dport,
        ret: ret as i32,
        flags: FLAG_OWNER_CURRENT,
        saddr: [0; 16],
        daddr: c.daddr,
        comm: o.comm,
    };
    if EVENTS
        .output::<Event>(&ev, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(COUNTER_DROPPED);
    }
    Ok(())
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_error_report(&ctx) {
        rare!(
            error,
            &ctx,
            "inet_sk_error_report: reading the tracepoint record failed (error {}); error lost",
            err
        );
    }
    0
}

fn try_error_report(ctx: &TracePointContext) -> Result<(), i32> {
    // Only errors a connect can end with; ECONNRESET, EPIPE and the like (established
    // connections, one or two per closed-by-RST connection) are filtered here, cheaply.
    let error = read::<i32>(ctx, off!(er_error))?;
    if !matches!(error, 1 | 13 | 100 | 101 | 110 | 111 | 112 | 113) {
        return Ok(());
    }
    let rec = Record::read(ctx)?;
    if rec.proto(off!(er_protocol), off!(er_protocol_size)) != IPPROTO_TCP {
        return Ok(());
    }
    let mut ev = Event {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind: KIND_ERROR,
        family: rec.u16(off!(er_family)) as u8,
        sport: rec.u16(off!(er_sport)),
        dport: rec.u16(off!(er_dport)),
        ret: error,
        ..Event::default()
    };
    rec.addrs(
        &mut ev,
        (off!(er_saddr), off!(er_daddr)),
        (off!(er_saddr_v6), off!(er_daddr_v6)),
    );
    if EVENTS
        .output::<Event>(&ev, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(COUNTER_DROPPED);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
