//! `syscalls:sys_enter_connect` / `sys_exit_connect` and `sock:inet_sk_error_report`: how
//! connects end when they do not succeed at once.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::{error, warn};
use tcptrace_common::{
    AF_INET, AF_INET6, COUNTER_DROPPED_OTHER, Event, FLAG_OWNER_CURRENT, IPPROTO_TCP, KIND_CONNECT,
    KIND_ERROR, STACK_CONNECT,
};

use crate::{
    CONNECTS, ConnectCtx, Fields, Record, SLOT_ERROR, count, current_owner, read, ring, sock_netns,
};

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    if crate::empty() {
        return 0;
    }
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
        "connect: reading the sockaddr from user memory failed (error {}, pid {}); connect not followed",
        err,
        pid
    );
}

/// The destination in the user's sockaddr at `uaddr`: None when it is not IPv4 or IPv6, or
/// cannot be read (logged).
#[inline(always)]
fn destination(ctx: &TracePointContext, uaddr: u64) -> Option<ConnectCtx> {
    let uaddr = uaddr as *const [u8; 16];
    // SAFETY: user memory read through bpf_probe_read_user.
    let head = match unsafe { bpf_probe_read_user(uaddr) } {
        Ok(head) => head,
        Err(err) => {
            sockaddr_unreadable(ctx, err);
            return None;
        }
    };
    let family = u16::from_ne_bytes([head[0], head[1]]) as u8;
    if family != AF_INET && family != AF_INET6 {
        return None;
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
        match unsafe { bpf_probe_read_user(uaddr as *const [u8; 24]) } {
            Ok(full) => c.daddr.copy_from_slice(&full[8..24]),
            Err(err) => {
                sockaddr_unreadable(ctx, err);
                return None;
            }
        }
    }
    Some(c)
}

/// At the entry of `connect()`: the call stack when stacks are on; and, only where the
/// syscall's arguments cannot be read at its exit, the destination, kept for the exit. Where
/// they can (x86-64, arm64 with BTF), a connect that succeeds at once costs a return here and
/// one at the exit: no user memory read, no map entry.
fn try_enter_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let at_exit = crate::stacks::syscall_args_known();
    let stacks = crate::stacks::stacks_on();
    if at_exit && !stacks {
        return Ok(());
    }
    let uaddr = read::<u64>(ctx, off!(ce_uservaddr))?;
    let Some(c) = destination(ctx, uaddr) else {
        return Ok(());
    };
    if stacks {
        let fd = read::<i64>(ctx, off!(ce_fd))?;
        if (0..=i32::MAX as i64).contains(&fd) {
            crate::stacks::record(ctx, fd as u32, STACK_CONNECT);
        }
    }
    if at_exit {
        return Ok(());
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
    if crate::empty() {
        return 0;
    }
    if let Err(err) = try_exit_connect(&ctx) {
        rare!(
            error,
            &ctx,
            "sys_exit_connect: reading the tracepoint record or the syscall's arguments failed (error {}); connect result lost",
            err
        );
    }
    0
}

/// Success is visible as SYN_SENT -> ESTABLISHED; only errors and -EINPROGRESS are sent. A
/// call that failed before any TCP state change (no route) may be on a datagram socket too:
/// userspace counts those as failures to reach the destination.
fn try_exit_connect(ctx: &TracePointContext) -> Result<(), i32> {
    if crate::stacks::syscall_args_known() {
        let ret = read::<i64>(ctx, off!(cx_ret))?;
        if ret == 0 {
            return Ok(());
        }
        // The descriptor and the sockaddr, still where the caller put them.
        let (fd, uaddr) = crate::stacks::syscall_args()?;
        let Some(mut c) = destination(ctx, uaddr) else {
            return Ok(());
        };
        let fd = fd as i32;
        if fd >= 0 {
            c.skaddr = crate::stacks::sock_of_fd(fd as u32);
        }
        emit_connect(&c, ret);
        return Ok(());
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: value copied out before the entry is removed.
    let Some(c) = (unsafe { CONNECTS.get(&tid) }).copied() else {
        return Ok(());
    };
    let _ = CONNECTS.remove(&tid);
    let ret = read::<i64>(ctx, off!(cx_ret))?;
    if ret != 0 {
        emit_connect(&c, ret);
    }
    Ok(())
}

/// Sends the result `ret` of a connect to `c`, with the current task as owner.
#[inline(always)]
fn emit_connect(c: &ConnectCtx, ret: i64) {
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
    if ring()
        .output::<Event>(&ev, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(COUNTER_DROPPED_OTHER);
    }
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    if crate::empty() {
        return 0;
    }
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
    let rec = Record::read(ctx, SLOT_ERROR)?;
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
    let (family, v4, v6) = (
        ev.family,
        (off!(er_saddr), off!(er_daddr)),
        (off!(er_saddr_v6), off!(er_daddr_v6)),
    );
    // SAFETY: a whole Event on the stack.
    unsafe { rec.addrs(&mut ev, family, v4, v6) };
    if ring()
        .output::<Event>(&ev, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(COUNTER_DROPPED_OTHER);
    }
    Ok(())
}
