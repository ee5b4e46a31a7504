//! Where the kernel programs find what they read inside kernel structs (`struct sock`, the
//! saved registers, a task's descriptors, a network namespace), from the kernel's BTF at
//! start-up: handed to the programs as read-only data.

use tcptrace_common::{NetnsOffsets, RegsOffsets, SockOffsets};

use super::btf::{Btf, BtfError};

/// The offsets the stack and connect programs use; each 0 where BTF does not give it (that part is then
/// skipped: no stack pointer, or stacks keyed by descriptor instead of socket).
pub(super) fn regs_offsets(btf: &Btf) -> RegsOffsets {
    let at = |name: &str, path: &str| btf.offset_of(name, path).unwrap_or(0);
    let mut r = RegsOffsets {
        sp: at("pt_regs", "sp"),
        task_files: at("task_struct", "files"),
        files_fdt: at("files_struct", "fdt"),
        fdt_max_fds: at("fdtable", "max_fds"),
        fdt_fd: at("fdtable", "fd"),
        file_private: at("file", "private_data"),
        socket_sk: at("socket", "sk"),
        syscall_arg0: 0,
        syscall_arg1: 0,
        _pad: 0,
    };
    (r.syscall_arg0, r.syscall_arg1) = syscall_arg_offsets(btf);
    // max_fds is the first member of fdtable (offset 0 is valid there): only the others
    // must be non-zero.
    if !r.fd_to_sock() {
        (
            r.task_files,
            r.files_fdt,
            r.fdt_fd,
            r.file_private,
            r.socket_sk,
        ) = (0, 0, 0, 0, 0);
    }
    r
}

/// Where `struct pt_regs` keeps a syscall's first two arguments once it has returned (the
/// return value overwrites none of them): (0, 0) when this architecture's layout is not known.
fn syscall_arg_offsets(btf: &Btf) -> (u32, u32) {
    let at = |path: &str| btf.offset_of("pt_regs", path).ok();
    let found = if cfg!(target_arch = "x86_64") {
        at("di").zip(at("si"))
    } else if cfg!(target_arch = "aarch64") {
        // regs[0] holds the return value by then; orig_x0 keeps the first argument.
        at("orig_x0").zip(at("regs").map(|r| r + 8))
    } else {
        None
    };
    match found {
        Some((a0, a1)) if a0 != 0 && a1 != 0 => (a0, a1),
        _ => (0, 0),
    }
}

/// Where the programs find a socket's network namespace number.
pub(super) fn netns_offsets(btf: &Btf) -> Result<NetnsOffsets, BtfError> {
    Ok(NetnsOffsets {
        skc_net: btf.offset_of("sock_common", "skc_net.net")?,
        net_inum: btf.offset_of("net", "ns.inum")?,
    })
}

/// The layout of `struct sock` for the raw state program, from the kernel's BTF; None when a
/// field is missing or out of the program's reach (the classic tracepoint is used then).
pub fn sock_offsets(btf: &Btf) -> Option<SockOffsets> {
    let common = |path: &str| -> Option<u16> {
        let off = btf.offset_of("sock", &format!("__sk_common.{path}")).ok()?;
        u16::try_from(off).ok()
    };
    let (protocol, protocol_size) = btf.integer_member("sock", "sk_protocol").ok()?;
    let s = SockOffsets {
        daddr: common("skc_daddr")?,
        rcv_saddr: common("skc_rcv_saddr")?,
        dport: common("skc_dport")?,
        num: common("skc_num")?,
        family: common("skc_family")?,
        v6_daddr: common("skc_v6_daddr")?,
        v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        net: common("skc_net")?,
        protocol: u16::try_from(protocol).ok()?,
        protocol_size: protocol_size as u16,
        inet_sport: u16::try_from(btf.offset_of("inet_sock", "inet_sport").ok()?).ok()?,
        _pad: 0,
        net_inum: btf.offset_of("net", "ns.inum").ok()?,
    };
    s.usable().then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn connect_arguments_are_read_from_di_and_si_of_the_saved_registers() {
        // The x86-64 pt_regs layout: r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx,
        // si (104), di (112).
        let btf = Btf::from_sys().expect("this kernel has BTF");
        assert_eq!(syscall_arg_offsets(&btf), (112, 104));
        let regs = regs_offsets(&btf);
        assert!(regs.syscall_args() && regs.fd_to_sock(), "{regs:?}");
    }
}
