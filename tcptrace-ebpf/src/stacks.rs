//! Opt-in (`--stacks`): the user call stack each TCP descriptor was opened with, so that a
//! leaked socket can be shown with the code that opened it. Recorded in process context only,
//! where the opening task is current: `connect()` (from `sys_enter_connect`, see `connect.rs`)
//! and `accept()` / `accept4()` (their exits return the new descriptor). Nothing is walked
//! unless userspace set `STACKS_ON`.
//!
//! Equal stacks are stored once in `STACKS` (a stack-trace map, `STACK_DEPTH` frames);
//! `SOCK_STACKS` maps `tgid << 32 | fd` to the stack id, bounded (LRU): a descriptor closed
//! and reused overwrites its entry.

use core::cell::UnsafeCell;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, bpf_map_def, bpf_map_type::BPF_MAP_TYPE_STACK_TRACE},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_get_stackid, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::{Array, LruHashMap},
    programs::TracePointContext,
};
use tcptrace_common::{RegsOffsets, STACK_ACCEPT, STACK_DEPTH, STACK_TOP_WORDS, SockStack};

use crate::{NO_COMMON_LRU, read};

/// `STACKS_ON[0] != 0`: record stacks (set by userspace, changed at run time).
#[map]
static STACKS_ON: Array<u32> = Array::with_max_entries(1, 0);

/// `tgid << 32 | fd` -> the stack that descriptor was opened with.
#[map]
static SOCK_STACKS: LruHashMap<u64, SockStack> = LruHashMap::with_max_entries(32768, NO_COMMON_LRU);

/// A stack-trace map whose values hold [`STACK_DEPTH`] frames (aya-ebpf's `StackTrace` holds
/// the kernel's maximum of 127, four times the memory for frames a report does not show).
#[repr(transparent)]
pub(crate) struct StackMap(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read (by the loader); programs pass its address to helpers.
unsafe impl Sync for StackMap {}

#[unsafe(link_section = "maps")]
#[unsafe(export_name = "STACKS")]
static STACKS: StackMap = StackMap(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_STACK_TRACE,
    key_size: 4,
    value_size: (STACK_DEPTH * 8) as u32,
    max_entries: 8192,
    map_flags: 0,
    id: 0,
    pinning: 0,
}));

/// Where `struct pt_regs` keeps the user stack pointer (from BTF, set by userspace).
#[unsafe(no_mangle)]
static REGS: RegsOffsets = RegsOffsets { sp: 0, _pad: 0 };

#[inline(always)]
pub(crate) fn stacks_on() -> bool {
    STACKS_ON.get(0).is_some_and(|on| *on != 0)
}

/// Records the current user stack as the one descriptor `fd` of the current process was
/// opened with. Callers check [`stacks_on`] first.
#[inline(always)]
pub(crate) fn record<C: EbpfContext>(ctx: &C, fd: u32, kind: u32) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the map is a stack-trace map; the context is the program's own.
    let stack_id =
        unsafe { bpf_get_stackid(ctx.as_ptr(), STACKS.0.get().cast(), BPF_F_USER_STACK as u64) };
    let mut v = SockStack {
        stack_id,
        kind,
        tid: id as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sp: 0,
        top: [0; STACK_TOP_WORDS],
    };
    // SAFETY: aligned read of a static; volatile so the load-time value is used.
    let sp_off = unsafe { core::ptr::read_volatile(&raw const REGS.sp) };
    if sp_off != 0 {
        // SAFETY: the current task's saved user registers, read through
        // bpf_probe_read_kernel; then user memory through bpf_probe_read_user.
        unsafe {
            let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64;
            if regs != 0 {
                v.sp = bpf_probe_read_kernel((regs + sp_off as u64) as *const u64).unwrap_or(0);
                if v.sp != 0 {
                    v.top = bpf_probe_read_user(v.sp as *const [u64; STACK_TOP_WORDS])
                        .unwrap_or([0; STACK_TOP_WORDS]);
                }
            }
        }
    }
    let _ = SOCK_STACKS.insert(&((id & 0xffff_ffff_0000_0000) | fd as u64), &v, 0);
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) {
    if !stacks_on() {
        return;
    }
    match read::<i64>(ctx, off!(ax_ret)) {
        Ok(fd) if (0..=i32::MAX as i64).contains(&fd) => record(ctx, fd as u32, STACK_ACCEPT),
        _ => {}
    }
}
