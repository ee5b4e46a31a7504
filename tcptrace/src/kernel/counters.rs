//! What the kernel counts about the programs: records lost to a full ring, and runs it skipped
//! (`recursion_misses`).

/// How many times the kernel skipped program `prog` because a BPF program was already running
/// on the CPU (`bpf_prog_info.recursion_misses`, Linux 5.12+); None when it cannot say.
pub(super) fn recursion_misses(prog: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: plain-old-data kernel struct; all zeros is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    // union bpf_attr { struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; } info; }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: the attribute points at `info`, of the size it says; the kernel writes at most
    // that much.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            size_of_val(&attr) as libc::c_uint,
        )
    };
    (r == 0).then_some(info.recursion_misses)
}

/// Per-CPU kernel counters, summed (and the drops by CPU).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Records lost because the ring buffer was full.
    pub dropped: u64,
    /// `dropped` by the CPU that lost them, ascending, only CPUs that lost any: CPU `c`
    /// writes to ring `c % 16` (all rings the same size), so one CPU losing records while
    /// the others lose none says its ring is the one too small (softirq work concentrated on
    /// the CPUs that take the network interrupts, for one).
    pub dropped_by_cpu: Vec<(u32, u64)>,
    /// The part of `dropped` that are state transitions.
    pub dropped_transitions: u64,
    /// Program runs the kernel skipped because another BPF program was running on the CPU
    /// (what they would have sent is lost too), and transitions a program could not read.
    pub missed: u64,
    /// The part of `missed` that are state transitions.
    pub missed_transitions: u64,
    /// Transitions the state program ran for and sent nothing for, by design (LISTEN ->
    /// SYN_RECV unless every transition is asked for; sockets that are not TCP). Lost nothing.
    pub not_sent: u64,
}

impl KernelCounters {
    /// Everything lost, however.
    pub fn lost(&self) -> u64 {
        self.dropped + self.missed
    }
}
