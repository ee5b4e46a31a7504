//! Opt-in (`--stacks`): the user call stack each TCP descriptor was opened with, so that a
//! leaked socket can be shown with the code that opened it. Recorded in process context only,
//! where the opening task is current: `connect()` (from `sys_enter_connect`, see `connect.rs`)
//! and `accept()` / `accept4()` (their exits return the new descriptor). Nothing is walked
//! unless userspace set `STACKS_ON`.
//!
//! Equal stacks are stored once in `STACKS` (a stack-trace map, `STACK_DEPTH` frames);
//! `SOCK_STACKS` maps the socket's kernel address (followed from the descriptor, where BTF
//! gives the way) or else `tgid << 32 | fd` to the stack id, bounded (LRU): a socket address or
//! descriptor reused overwrites its entry.

use core::cell::UnsafeCell;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, bpf_map_def, bpf_map_type::BPF_MAP_TYPE_STACK_TRACE},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_task, bpf_get_current_task_btf, bpf_get_stackid, bpf_task_pt_regs,
        },
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

/// Where `struct pt_regs` keeps the user stack pointer and a syscall's arguments, and the way
/// from a descriptor to its socket (from BTF, set by userspace).
#[unsafe(no_mangle)]
static REGS: RegsOffsets = RegsOffsets {
    sp: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private: 0,
    socket_sk: 0,
    syscall_arg0: 0,
    syscall_arg1: 0,
    _pad: 0,
};

macro_rules! regs {
    ($field:ident) => {
        // SAFETY: aligned read of a field of a static; volatile so the load-time value is used.
        unsafe { core::ptr::read_volatile(&raw const REGS.$field) as u64 }
    };
}

/// Whether the current syscall's first two arguments can be read at its exit.
#[inline(always)]
pub(crate) fn syscall_args_known() -> bool {
    regs!(syscall_arg0) != 0 && regs!(syscall_arg1) != 0
}

/// The current syscall's first two arguments, read from the task's saved registers (at its
/// exit too: the return value overwrites neither). Callers check [`syscall_args_known`].
#[inline(always)]
pub(crate) fn syscall_args() -> Result<(u64, u64), i32> {
    let (a0, a1) = (regs!(syscall_arg0), regs!(syscall_arg1));
    // SAFETY: the current task's saved user registers, read through bpf_probe_read_kernel.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64;
        if regs == 0 {
            return Err(-1);
        }
        Ok((
            bpf_probe_read_kernel((regs + a0) as *const u64)?,
            bpf_probe_read_kernel((regs + a1) as *const u64)?,
        ))
    }
}

/// The kernel address of the socket behind descriptor `fd` of the current task (0: unknown):
/// task -> files -> fdt -> fd[fd] -> file -> private_data (struct socket) -> sk.
#[inline(always)]
pub(crate) fn sock_of_fd(fd: u32) -> u64 {
    let (files_at, fdt_at, max_at, fd_at, private_at, sk_at) = (
        regs!(task_files),
        regs!(files_fdt),
        regs!(fdt_max_fds),
        regs!(fdt_fd),
        regs!(file_private),
        regs!(socket_sk),
    );
    if files_at == 0 || fdt_at == 0 || fd_at == 0 || sk_at == 0 {
        return 0;
    }
    // SAFETY: kernel memory read through bpf_probe_read_kernel; a bad address reads as an
    // error and gives 0.
    let read = |at: u64| unsafe { bpf_probe_read_kernel(at as *const u64) }.unwrap_or(0);
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files = read(task + files_at);
    if files == 0 {
        return 0;
    }
    let fdt = read(files + fdt_at);
    if fdt == 0 {
        return 0;
    }
    // SAFETY: as above.
    let max = unsafe { bpf_probe_read_kernel((fdt + max_at) as *const u32) }.unwrap_or(0);
    if fd >= max {
        return 0;
    }
    let table = read(fdt + fd_at);
    if table == 0 {
        return 0;
    }
    let file = read(table + fd as u64 * 8);
    if file == 0 {
        return 0;
    }
    let socket = read(file + private_at);
    if socket == 0 {
        return 0;
    }
    read(socket + sk_at)
}

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
        pid: (id >> 32) as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sp: 0,
        top: [0; STACK_TOP_WORDS],
    };
    let sp_off = regs!(sp);
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
    // By socket where the way there is known (found again after a hand-off), else by
    // (process, descriptor). Kernel addresses and `tgid << 32 | fd` never meet.
    let sk = sock_of_fd(fd);
    let key = if sk != 0 {
        sk
    } else {
        (id & 0xffff_ffff_0000_0000) | fd as u64
    };
    let _ = SOCK_STACKS.insert(&key, &v, 0);
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    if crate::empty() {
        return 0;
    }
    accepted(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    if crate::empty() {
        return 0;
    }
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
