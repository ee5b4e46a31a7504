//! Types shared by the kernel programs (`tcptrace-ebpf`) and userspace (`tcptrace`).
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of pointers so that the same bytes mean
//! the same thing on both sides of the ring buffer.
#![no_std]

/// `Event::kind`: a `sock:inet_sock_set_state` transition of a TCP socket.
pub const KIND_STATE: u8 = 1;
/// `Event::kind`: `connect()` returned non-zero (an error, or -EINPROGRESS) on a TCP socket.
pub const KIND_CONNECT: u8 = 2;
/// `Event::kind`: `sock:inet_sk_error_report` on a TCP socket (asynchronous error).
pub const KIND_ERROR: u8 = 3;

/// `Event::flags`: the owner fields were taken from the current task (process context).
pub const FLAG_OWNER_CURRENT: u32 = 1;
/// `Event::flags`: the owner fields come from the owner map (recorded earlier for this socket).
pub const FLAG_OWNER_RECORDED: u32 = 2;
/// `Event::flags`: the owner was inherited from the listening socket (an accepted socket).
pub const FLAG_OWNER_INHERITED: u32 = 4;

/// Largest record the kernel side reads from a tracepoint in one go.
pub const TP_RECORD_MAX: usize = 80;

/// Bytes of a `struct sock` the raw tracepoint program reads in one go from its start (the
/// `sock_common` fields it needs end well before on every kernel with BTF).
pub const SOCK_CHUNK: usize = 128;

/// One record from kernel to userspace. 96 bytes, no padding holes. Its first
/// [`COMPACT_LEN`] bytes are a record of their own (a compact one): a transition that carries
/// no owner (one the kernel makes in softirq) is sent as just those, and userspace reads the
/// rest as zeros. Userspace tells the two apart by length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock` (0 when unknown, e.g. a connect that failed early).
    pub skaddr: u64,
    /// Network namespace of the socket: the inode of its `/proc/PID/ns/net` (0 when unknown:
    /// error reports, or a kernel without BTF).
    pub netns: u32,
    pub kind: u8,
    pub oldstate: u8,
    pub newstate: u8,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u8,
    /// Local port, host byte order (0 before the kernel has chosen one).
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `connect()` return value (negative errno), or the positive errno of an error report.
    pub ret: i32,
    /// Local address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    /// Remote address: IPv4 in the first 4 bytes, or IPv6.
    pub daddr: [u8; 16],
    // End of the compact record.
    /// cgroup v2 id of the owner (0 when unknown).
    pub cgroup: u64,
    /// Owner process (thread-group id); 0 when no owner is known.
    pub pid: u32,
    pub flags: u32,
    /// Owner's command name (thread comm), NUL padded.
    pub comm: [u8; 16],
}

/// Length of a compact record: the fields of [`Event`] up to `daddr`, without owner.
pub const COMPACT_LEN: usize = core::mem::offset_of!(Event, cgroup);

/// The compact record: the first [`COMPACT_LEN`] bytes of an [`Event`], reserved as such in a
/// ring buffer (the kernel writes its fields through an `Event` pointer, which is why it has
/// no fields of its own).
#[repr(C, align(8))]
pub struct Compact(pub [u8; COMPACT_LEN]);

/// Byte offsets of the tracepoint fields the programs read, taken from tracefs `format` files at
/// start-up so that nothing depends on one kernel's layout. `u16::MAX` means "field absent".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub ss_skaddr: u16,
    pub ss_oldstate: u16,
    pub ss_newstate: u16,
    pub ss_sport: u16,
    pub ss_dport: u16,
    pub ss_family: u16,
    pub ss_protocol: u16,
    /// Size in bytes of `protocol` (1 before Linux 5.6, 2 after).
    pub ss_protocol_size: u16,
    pub ss_saddr: u16,
    pub ss_daddr: u16,
    pub ss_saddr_v6: u16,
    pub ss_daddr_v6: u16,
    pub er_error: u16,
    pub er_sport: u16,
    pub er_dport: u16,
    pub er_family: u16,
    pub er_protocol: u16,
    pub er_protocol_size: u16,
    pub er_saddr: u16,
    pub er_daddr: u16,
    pub er_saddr_v6: u16,
    pub er_daddr_v6: u16,
    pub ce_uservaddr: u16,
    pub cx_ret: u16,
    /// `fd` of `sys_enter_connect`.
    pub ce_fd: u16,
    /// `ret` of `sys_exit_accept` / `sys_exit_accept4` (the new descriptor).
    pub ax_ret: u16,
}

impl Offsets {
    /// The layout of Linux 6.x, used only as the compiled-in default; userspace always overrides
    /// it with what tracefs says.
    pub const DEFAULT: Offsets = Offsets {
        ss_skaddr: 8,
        ss_oldstate: 16,
        ss_newstate: 20,
        ss_sport: 24,
        ss_dport: 26,
        ss_family: 28,
        ss_protocol: 30,
        ss_protocol_size: 2,
        ss_saddr: 32,
        ss_daddr: 36,
        ss_saddr_v6: 40,
        ss_daddr_v6: 56,
        er_error: 8,
        er_sport: 12,
        er_dport: 14,
        er_family: 16,
        er_protocol: 18,
        er_protocol_size: 2,
        er_saddr: 20,
        er_daddr: 24,
        er_saddr_v6: 28,
        er_daddr_v6: 44,
        ce_uservaddr: 24,
        cx_ret: 16,
        ce_fd: 16,
        ax_ret: 16,
    };
}

/// Byte offsets inside kernel structs, from the kernel's BTF at start-up, for reading a socket's
/// network namespace: `sock->__sk_common.skc_net.net` then `net->ns.inum`. Zero: not known
/// (the programs then report netns 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsOffsets {
    pub skc_net: u32,
    pub net_inum: u32,
}

/// Where the raw `inet_sock_set_state` program finds what it reports, from the kernel's BTF at
/// start-up: byte offsets inside `struct sock` (the `sock_common` ones all below
/// [`SOCK_CHUNK`]). All zero: unknown, and the classic tracepoint is used instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `skc_daddr` (IPv4 remote address).
    pub daddr: u16,
    /// `skc_rcv_saddr` (IPv4 local address).
    pub rcv_saddr: u16,
    /// `skc_dport` (remote port, network byte order).
    pub dport: u16,
    /// `skc_num` (local port, host byte order).
    pub num: u16,
    /// `skc_family`.
    pub family: u16,
    /// `skc_v6_daddr`.
    pub v6_daddr: u16,
    /// `skc_v6_rcv_saddr`.
    pub v6_rcv_saddr: u16,
    /// `skc_net` (pointer to the `struct net`).
    pub net: u16,
    /// `sk_protocol`, anywhere in `struct sock`.
    pub protocol: u16,
    /// Size of `sk_protocol` in bytes: 1 (an 8-bit bitfield before Linux 5.6) or 2.
    pub protocol_size: u16,
    /// `inet_sport` of `struct inet_sock` (local port, network byte order), read when `skc_num`
    /// is already 0 (a socket closing gives its port back before the tracepoint runs).
    pub inet_sport: u16,
    pub _pad: u16,
    /// `ns.inum` inside `struct net`.
    pub net_inum: u32,
}

impl SockOffsets {
    /// Whether every offset the program needs was found and fits what it reads.
    pub fn usable(&self) -> bool {
        let chunk = [
            (self.daddr, 4),
            (self.rcv_saddr, 4),
            (self.dport, 2),
            (self.num, 2),
            (self.family, 2),
            (self.v6_daddr, 16),
            (self.v6_rcv_saddr, 16),
            (self.net, 8),
        ];
        *self != SockOffsets::default()
            && chunk
                .iter()
                .all(|&(off, len)| off as usize + len <= SOCK_CHUNK)
            && matches!(self.protocol_size, 1 | 2)
            && self.protocol != 0
            && self.inet_sport != 0
    }
}

/// Index into the per-CPU `COUNTERS` array: transition records lost because the ring buffer
/// was full.
pub const COUNTER_DROPPED: u32 = 0;
/// Index into `COUNTERS`: transitions the kernel skipped the state program for (it was
/// interrupted on its CPU) that `inet_state_rescue` reported instead.
pub const COUNTER_RESCUED: u32 = 1;
/// Index into `COUNTERS`: transitions lost because the program could not read the tracepoint's
/// record or the socket (each also logged, rarely).
pub const COUNTER_UNREADABLE: u32 = 2;
/// Index into `COUNTERS`: transitions the state programs ran for and sent no record for, by
/// design: LISTEN -> SYN_RECV unless every transition is asked for (nothing userspace tracks
/// changes), and sockets that are not TCP. With the records seen, dropped and missed, it
/// accounts for every run of the tracepoint (the benchmark checks that it does).
pub const COUNTER_NOT_SENT: u32 = 3;
/// Index into `COUNTERS`: connect and error-report records lost because the ring buffer was
/// full (`COUNTER_DROPPED` counts the transitions').
pub const COUNTER_DROPPED_OTHER: u32 = 4;
pub const COUNTERS_LEN: u32 = 5;

/// Default ring buffer size in bytes (power of two, multiple of the page size): the total over
/// every ring.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;

/// Number of ring buffers (`EVENTS0` ...): a program running on CPU `c` writes to ring
/// `c % RINGS`, so that producers on different CPUs do not share a ring's lock and cache lines
/// (up to this many CPUs; beyond, CPUs share rings by that many).
pub const RINGS: u32 = 16;

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Frames kept of a user call stack (the `STACKS` map's value is this many addresses).
pub const STACK_DEPTH: usize = 32;
/// Words copied from the top of the user stack at the syscall, for the frame a walk by frame
/// pointers skips (the caller of a libc wrapper that keeps no frame of its own).
pub const STACK_TOP_WORDS: usize = 8;
/// [`SockStack::kind`]: the descriptor was connected (`connect()`).
pub const STACK_CONNECT: u32 = 1;
/// [`SockStack::kind`]: the descriptor was returned by `accept()` / `accept4()`.
pub const STACK_ACCEPT: u32 = 2;

/// The user call stack a descriptor was opened with: the value of `SOCK_STACKS`, keyed by the
/// socket's kernel address where the kernel's BTF shows the way from a descriptor to its socket
/// (found again after a hand-off to another process), else by `tgid << 32 | fd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStack {
    /// Id in the `STACKS` map; negative: the walk failed (an errno: -EFAULT, -EEXIST when the
    /// map's bucket holds another stack).
    pub stack_id: i64,
    /// [`STACK_CONNECT`] or [`STACK_ACCEPT`].
    pub kind: u32,
    /// Process that opened it (its address space is what the stack's addresses are in).
    pub pid: u32,
    pub ts_ns: u64,
    /// User stack pointer at the syscall (0: unknown).
    pub sp: u64,
    /// The words at `sp` upwards (zeros: unreadable).
    pub top: [u64; STACK_TOP_WORDS],
}

/// Where the kernel keeps what the stack programs read (from BTF; 0: unknown): the user stack
/// pointer in `struct pt_regs`, and the way from the current task to the socket of a
/// descriptor (`task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`,
/// `file.private_data`, `socket.sk`), so that a stack is found by socket after a hand-off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegsOffsets {
    pub sp: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private: u32,
    pub socket_sk: u32,
    /// Where `struct pt_regs` keeps a syscall's first argument after it returned (x86-64: `di`;
    /// arm64: `orig_x0`), and its second (`si`; `regs[1]`): `connect()`'s descriptor and
    /// sockaddr, read at its exit only when it fails. 0 when unknown (the sockaddr is then read
    /// at every `connect()`'s entry and kept until its exit).
    pub syscall_arg0: u32,
    pub syscall_arg1: u32,
    pub _pad: u32,
}

impl RegsOffsets {
    /// Whether the way from a descriptor to its socket is known.
    pub fn fd_to_sock(&self) -> bool {
        self.task_files != 0 && self.files_fdt != 0 && self.fdt_fd != 0 && self.socket_sk != 0
    }

    /// Whether a syscall's first two arguments can be read at its exit.
    pub fn syscall_args(&self) -> bool {
        self.syscall_arg0 != 0 && self.syscall_arg1 != 0
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::SockStack {}
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::RegsOffsets {}
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::NetnsOffsets {}
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::SockOffsets {}
}

const _: () = assert!(core::mem::size_of::<Event>() == 96);
const _: () = assert!(COMPACT_LEN == 64 && core::mem::size_of::<Compact>() == COMPACT_LEN);
