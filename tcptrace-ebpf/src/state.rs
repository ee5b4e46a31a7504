//! `sock:inet_sock_set_state`: every transition of a TCP socket (with its owner where the
//! application makes it), from the classic tracepoint, the raw one or the BTF one.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::error;
use tcptrace_common::{Compact, Event, FLAG_OWNER_CURRENT, IPPROTO_TCP, KIND_STATE, tcp_state};

use crate::{
    CONNECTS, COUNTER_DROPPED, COUNTER_NOT_SENT, COUNTER_RESCUED, COUNTER_UNREADABLE, Fields,
    Record, SLOT_RESCUE, SLOT_STATE, STATE_HANDLED, Sock, count, current_owner, ring, sock_netns,
    submit_flags, wanted,
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if crate::empty() {
        return 0;
    }
    if let Err(err) = try_set_state(&ctx) {
        count(COUNTER_UNREADABLE);
        rare!(
            error,
            &ctx,
            "inet_sock_set_state: reading the tracepoint record failed (error {}); transition lost",
            err
        );
    }
    0
}

/// The classic tracepoint: fields from its record, at the offsets tracefs gives.
fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let rec = Record::read(ctx, SLOT_STATE)?;
    if rec.proto(off!(ss_protocol), off!(ss_protocol_size)) != IPPROTO_TCP {
        count(COUNTER_NOT_SENT);
        return Ok(());
    }
    let skaddr = rec.u64(off!(ss_skaddr));
    let (old, new) = (
        rec.i32(off!(ss_oldstate)) as u8,
        rec.i32(off!(ss_newstate)) as u8,
    );
    if !wanted(old, new) {
        count(COUNTER_NOT_SENT);
        return Ok(());
    }
    let t = Transition {
        skaddr,
        old,
        new,
        family: rec.u16(off!(ss_family)) as u8,
        sport: rec.u16(off!(ss_sport)),
        dport: rec.u16(off!(ss_dport)),
        netns: sock_netns(skaddr),
    };
    emit_state(
        &t,
        &rec,
        (off!(ss_saddr), off!(ss_daddr)),
        (off!(ss_saddr_v6), off!(ss_daddr_v6)),
    );
    Ok(())
}

/// The same transition as a raw tracepoint (the tracepoint's arguments: the socket and both
/// states), used where the kernel's BTF gives the socket's layout. Cheaper than the classic one
/// (no record is formatted), and the kernel skips it only when it would run nested in itself,
/// where a classic tracepoint program is skipped whenever any BPF program is running on the CPU
/// (another tool's included): transitions would be lost, unseen but for the kernel's
/// `recursion_misses`.
///
/// Nested in itself it is still skipped: a softirq that interrupts it (or interrupts the
/// kernel's own code around it, between the moment the kernel marks it running on the CPU and
/// the moment it unmarks it) makes transitions of its own. Three programs, attached in this
/// order to the tracepoint, make up for those:
///
/// 1. [`inet_state_enter`] marks the transition unreported on its CPU (`STATE_HANDLED` = 0);
/// 2. this program marks it reported (1) and reports it;
/// 3. [`inet_state_rescue`] reports it when it is still unreported: this program was skipped.
///
/// Transitions nest at most once on a CPU (process context, then a softirq; softirqs do not
/// nest, and hard interrupts make no TCP transitions), and whichever program's run the nested
/// transition lands in, the flag is right for both: inside the enter program's run (itself
/// skipped), this program runs for the nested transition and sets 1; inside this program's
/// run, the nested enter sets 0, this program is skipped and the rescue reports it; inside the
/// rescue's run (itself skipped), this program ran for both. The marks are single stores, which
/// an interrupt cannot split.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    if crate::empty() {
        return 0;
    }
    if let Some(h) = STATE_HANDLED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a single store.
        unsafe { core::ptr::write_volatile(h, 1) };
    }
    if let Err(err) = try_set_state_raw(&ctx, SLOT_STATE) {
        count(COUNTER_UNREADABLE);
        rare!(
            error,
            &ctx,
            "inet_sock_set_state: reading the socket failed (error {}); transition lost",
            err
        );
    }
    0
}

/// Attached to the tracepoint before [`inet_sock_set_state_raw`]: marks the transition
/// unreported on this CPU.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_state_enter(_ctx: RawTracePointContext) -> i32 {
    if crate::empty() {
        return 0;
    }
    if let Some(h) = STATE_HANDLED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a single store.
        unsafe { core::ptr::write_volatile(h, 0) };
    }
    0
}

/// Attached to the tracepoint after [`inet_sock_set_state_raw`]: reports the transition that
/// program was skipped for (still unreported on this CPU), counted in
/// `COUNTERS[COUNTER_RESCUED]`. Otherwise it returns at once.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_state_rescue(ctx: RawTracePointContext) -> i32 {
    if crate::empty() {
        return 0;
    }
    let Some(h) = STATE_HANDLED.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; single load and store.
    unsafe {
        if core::ptr::read_volatile(h) != 0 {
            return 0;
        }
        core::ptr::write_volatile(h, 1);
    }
    count(COUNTER_RESCUED);
    if let Err(err) = try_set_state_raw(&ctx, SLOT_RESCUE) {
        count(COUNTER_UNREADABLE);
        rare!(
            error,
            &ctx,
            "inet_sock_set_state: reading the socket failed (error {}); transition lost",
            err
        );
    }
    0
}

fn try_set_state_raw(ctx: &RawTracePointContext, slot: u32) -> Result<(), i32> {
    let skaddr: u64 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    if !wanted(old as u8, new as u8) {
        count(COUNTER_NOT_SENT);
        return Ok(());
    }
    let proto_at = skaddr + sock!(protocol) as u64;
    let proto_size = sock!(protocol_size);
    // SAFETY: kernel memory read through bpf_probe_read_kernel.
    let proto = unsafe {
        if proto_size == 1 {
            bpf_probe_read_kernel(proto_at as *const u8)? as u16
        } else {
            bpf_probe_read_kernel(proto_at as *const u16)?
        }
    };
    if proto != IPPROTO_TCP {
        count(COUNTER_NOT_SENT);
        return Ok(());
    }
    let rec = Record::read_sock(skaddr, slot)?;
    emit_sock(skaddr, old as u8, new as u8, &rec);
    Ok(())
}

/// The same transition as a BTF tracepoint (`tp_btf`), preferred where the kernel loads it:
/// the socket's fields are plain loads the verifier guards (the pointer's type is known), where
/// the raw tracepoint program copies them with helper calls. Same place among the three
/// programs as [`inet_sock_set_state_raw`], same rescue.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    if crate::empty() {
        return 0;
    }
    if let Some(h) = STATE_HANDLED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a single store.
        unsafe { core::ptr::write_volatile(h, 1) };
    }
    set_state_btf(&ctx);
    0
}

#[inline(always)]
fn set_state_btf(ctx: &BtfTracePointContext) {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let (old, new) = (old as u8, new as u8);
    if !wanted(old, new) {
        count(COUNTER_NOT_SENT);
        return;
    }
    let s = Sock(sk);
    if s.proto(sock!(protocol), sock!(protocol_size)) != IPPROTO_TCP {
        count(COUNTER_NOT_SENT);
        return;
    }
    emit_sock(sk as u64, old, new, &s);
}

/// Sends the transition `old` -> `new` of the TCP socket at `skaddr`, whose `struct sock`
/// fields `s` gives (at the offsets from BTF).
#[inline(always)]
fn emit_sock(skaddr: u64, old: u8, new: u8, s: &impl Fields) {
    let mut sport = s.u16(sock!(num));
    if sport == 0 {
        // inet_sport lies beyond struct sock (in inet_sock): a helper read.
        let at = skaddr + sock!(inet_sport) as u64;
        // SAFETY: kernel memory read through bpf_probe_read_kernel.
        sport = u16::from_be(unsafe { bpf_probe_read_kernel(at as *const u16) }.unwrap_or(0));
    }
    let net = s.u64(sock!(net));
    let inum_at = net + sock!(net_inum) as u64;
    let netns = if net == 0 {
        0
    } else {
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel(inum_at as *const u32) }.unwrap_or(0)
    };
    let t = Transition {
        skaddr,
        old,
        new,
        family: s.u16(sock!(family)) as u8,
        sport,
        dport: u16::from_be(s.u16(sock!(dport))),
        netns,
    };
    emit_state(
        &t,
        s,
        (sock!(rcv_saddr), sock!(daddr)),
        (sock!(v6_rcv_saddr), sock!(v6_daddr)),
    );
}

/// One transition of a TCP socket, wherever its fields were read.
struct Transition {
    skaddr: u64,
    old: u8,
    new: u8,
    family: u8,
    sport: u16,
    dport: u16,
    netns: u32,
}

/// Sends one transition (addresses from `rec` at `v4` / `v6`, local then remote). Those the
/// application itself makes carry their owner (a whole [`Event`]); the others, made in softirq,
/// go as a compact record (the first `COMPACT_LEN` bytes of one): userspace knows their
/// socket's owner.
#[inline(always)]
fn emit_state(t: &Transition, rec: &impl Fields, v4: (u16, u16), v6: (u16, u16)) {
    let (old, new) = (t.old, t.new);
    // The application's own context (connect, listen, close, shutdown): the owner is the
    // current task. Other transitions run in softirq, on whatever task was on the CPU, and carry
    // no owner: userspace has the socket's owner from its creation (an accepted socket's from
    // its listener), which is cheaper than a map of owners kept here on every connection.
    let connecting = old == tcp_state::CLOSE && new == tcp_state::SYN_SENT;
    let process_context = connecting
        || new == tcp_state::LISTEN
        || (old == tcp_state::CLOSE_WAIT && new == tcp_state::LAST_ACK)
        || (old == tcp_state::LISTEN && new == tcp_state::CLOSE)
        || (old == tcp_state::ESTABLISHED && new == tcp_state::FIN_WAIT1);
    let rb = ring();
    if !process_context {
        let Some(mut entry) = rb.reserve::<Compact>(0) else {
            count(COUNTER_DROPPED);
            return;
        };
        // SAFETY: the reservation is the compact prefix of an Event, every byte written here.
        unsafe { fill(entry.as_mut_ptr() as *mut Event, t, rec, v4, v6) };
        entry.submit(submit_flags(rb));
        return;
    }
    let Some(mut entry) = rb.reserve::<Event>(0) else {
        count(COUNTER_DROPPED);
        return;
    };
    let ev = entry.as_mut_ptr();
    let o = current_owner();
    // SAFETY: the reservation is exactly one Event; every field is written below.
    unsafe {
        fill(ev, t, rec, v4, v6);
        (*ev).cgroup = o.cgroup;
        (*ev).pid = o.pid;
        (*ev).flags = FLAG_OWNER_CURRENT;
        (*ev).comm = o.comm;
    }
    // Where connect()'s exit reads its arguments itself, it finds the socket from the
    // descriptor; otherwise its entry is waiting for the socket here.
    if connecting
        && !crate::stacks::syscall_args_known()
        && let Some(c) = CONNECTS.get_ptr_mut(o.tid)
    {
        // SAFETY: entry of this thread, written only by this thread.
        unsafe { (*c).skaddr = t.skaddr };
    }
    entry.submit(submit_flags(rb));
}

/// Writes the compact part of a transition's record, field by field (a whole record built on
/// the stack would not fit beside the socket's bytes).
///
/// # Safety
/// `ev` points to at least the first `COMPACT_LEN` bytes of an `Event`, writable.
#[inline(always)]
unsafe fn fill(ev: *mut Event, t: &Transition, rec: &impl Fields, v4: (u16, u16), v6: (u16, u16)) {
    // SAFETY: every field written lies in the compact prefix the caller guarantees.
    unsafe {
        // SAFETY: helper without arguments.
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = t.skaddr;
        (*ev).netns = t.netns;
        (*ev).kind = KIND_STATE;
        (*ev).oldstate = t.old;
        (*ev).newstate = t.new;
        (*ev).family = t.family;
        (*ev).sport = t.sport;
        (*ev).dport = t.dport;
        (*ev).ret = 0;
        rec.addrs(ev, t.family, v4, v6);
    }
}
