//! What already exists when we start: TCP sockets from /proc/net/tcp{,6}, the processes that
//! own them (via /proc/<pid>/fd), and per-process details (stat, comm, cmdline, cgroup).
//!
//! Everything here is best effort: processes come and go while we read, so vanished or
//! unreadable entries are skipped rather than reported as errors.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockRecord {
    /// IPv4-mapped IPv6 addresses are normalized to plain V4.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state number ("st" column): 1=ESTABLISHED .. 6=TIME_WAIT, 8=CLOSE_WAIT, 10=LISTEN.
    pub state: u8,
    /// 0 for TIME_WAIT (and other socket-less) entries.
    pub inode: u64,
    pub uid: u32,
}

/// Parses the text of /proc/net/tcp or /proc/net/tcp6. The header, and any line that does
/// not look like a socket entry, is skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<SockRecord> {
    text.lines()
        .filter_map(|l| parse_tcp_line(l.as_bytes()))
        .collect()
}

/// Reads /proc/net/tcp and /proc/net/tcp6 of the current network namespace
/// (tcp6 may be absent when IPv6 is disabled).
pub fn read_tcp_sockets() -> io::Result<Vec<SockRecord>> {
    let mut out = Vec::new();
    read_tcp_file("/proc/net/tcp", &mut out)?;
    match read_tcp_file("/proc/net/tcp6", &mut out) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r?,
    }
    Ok(out)
}

/// Reads `<proc_dir>/net/tcp` and `tcp6`: the sockets of the network namespace of the process
/// whose /proc directory that is (e.g. "/proc/1234").
pub fn read_tcp_sockets_of(proc_dir: &str) -> io::Result<Vec<SockRecord>> {
    let mut out = Vec::new();
    read_tcp_file(&format!("{proc_dir}/net/tcp"), &mut out)?;
    match read_tcp_file(&format!("{proc_dir}/net/tcp6"), &mut out) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r?,
    }
    Ok(out)
}

/// Streams one table, reusing a single line buffer. Large reads matter: the kernel regenerates
/// the table per read() call, so fewer calls are cheaper with many sockets.
fn read_tcp_file(path: &str, out: &mut Vec<SockRecord>) -> io::Result<()> {
    let mut rd = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        if rd.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if let Some(r) = parse_tcp_line(&line) {
            out.push(r);
        }
    }
}

/// One line: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_tcp_line(line: &[u8]) -> Option<SockRecord> {
    let mut f = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|s| !s.is_empty());
    let sl = f.next()?;
    if sl.len() < 2 || sl.last() != Some(&b':') {
        return None; // header ("sl") or garbage
    }
    let local = parse_sockaddr(f.next()?)?;
    let remote = parse_sockaddr(f.next()?)?;
    let state = u8::try_from(parse_hex(f.next()?)?).ok()?;
    let uid = u32::try_from(parse_dec(f.nth(3)?)?).ok()?; // skip tx:rx, tr:when, retrnsmt
    let inode = parse_dec(f.nth(1)?)?; // skip timeout
    Some(SockRecord {
        local,
        remote,
        state,
        inode,
        uid,
    })
}

/// "0100007F:1F90" or 32 hex digits + ":PORT". The address is the in-memory (network order)
/// bytes printed as native-endian 32-bit words; the port is a plain hex number.
fn parse_sockaddr(s: &[u8]) -> Option<SocketAddr> {
    let colon = s.iter().position(|&b| b == b':')?;
    let (ip, port) = (&s[..colon], &s[colon + 1..]);
    if port.is_empty() || port.len() > 4 {
        return None;
    }
    let port = parse_hex(port)? as u16;
    let word = |i: usize| parse_hex(&ip[i * 8..i * 8 + 8]).map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            // to_ipv4_mapped, not to_ipv4: "::1" must stay IPv6.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn parse_hex(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    s.iter().try_fold(0u32, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some(acc << 4 | d)
    })
}

fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        if !c.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &[u8]) -> Option<u64> {
    parse_dec(link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?)
}

/// Scans /proc/*/fd and returns socket inode -> owning process id (the /proc/<pid> directory
/// number, i.e. the thread-group id). With `wanted`, only those inodes are returned and the
/// scan stops once all are found. Processes that vanish or deny access are skipped. When
/// several processes share a socket, the lowest pid wins.
pub fn socket_owners(wanted: Option<&HashSet<u64>>) -> HashMap<u64, u32> {
    let mut owners = HashMap::new();
    if wanted.is_some_and(|w| w.is_empty()) {
        return owners;
    }
    let mut pids = list_pids();
    pids.sort_unstable();
    let mut path = Vec::with_capacity(32);
    'pids: for pid in pids {
        path.clear();
        // Cannot fail: writing to a Vec.
        let _ = write!(path, "/proc/{pid}/fd\0");
        let mut done = false;
        for_each_fd_socket(&path, |_fd, inode| {
            if wanted.is_none_or(|w| w.contains(&inode)) {
                owners.entry(inode).or_insert(pid);
                if wanted.is_some_and(|w| owners.len() == w.len()) {
                    done = true;
                    return false;
                }
            }
            true
        });
        if done {
            break 'pids;
        }
    }
    owners
}

/// Numeric entries of /proc. Thread ids are not listed there, only thread-group ids.
pub fn list_pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Calls `f` with the fd number and inode of every socket fd in the directory `dir_path`
/// (NUL-terminated) until it returns false. Reads the directory with getdents64 and each link
/// with readlinkat on the open directory, so that each link costs one short lookup and no
/// allocation.
pub fn for_each_fd_socket(dir_path: &[u8], mut f: impl FnMut(u32, u64) -> bool) {
    use rustix::fs::{CWD, Dir, Mode, OFlags, openat, readlinkat_raw};
    let Ok(path) = std::ffi::CStr::from_bytes_with_nul(dir_path) else {
        debug_assert!(false, "not NUL-terminated: {dir_path:?}");
        return;
    };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    // openat, not open: the system call the seccomp profile allows (as the standard library
    // uses).
    let Ok(mut dir) = openat(CWD, path, flags, Mode::empty()).and_then(Dir::new) else {
        return; // gone or EACCES
    };
    let mut link = [0u8; 64];
    while let Some(Ok(ent)) = dir.read() {
        let name = ent.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue; // "." and ".."
        }
        let Ok(dfd) = dir.fd() else { return };
        let n = match readlinkat_raw(dfd, name, &mut link[..]) {
            Ok(n) => n,
            Err(_) => continue, // fd closed meanwhile
        };
        let fd = parse_dec(name.to_bytes()).and_then(|n| u32::try_from(n).ok());
        if let (Some(inode), Some(fd)) = (socket_inode(&link[..n]), fd)
            && !f(fd, inode)
        {
            return;
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    /// Field 22 of /proc/<pid>/stat, clock ticks since boot; (pid, start_time) is unique.
    /// 0 when stat could not be parsed.
    pub start_time: u64,
    /// The name is bytes, any but NUL: decoded lossily (an invalid or cut UTF-8 sequence
    /// becomes U+FFFD). Views escape control characters when they print it.
    pub comm: String,
    /// NULs replaced by spaces, trimmed, lossily decoded; empty for kernel threads.
    pub cmdline: String,
    /// cgroup v2 path (the "0::" line), e.g. "/system.slice/nginx.service", lossily decoded;
    /// empty if unknown.
    pub cgroup: String,
    /// First 12 chars of a container id found in the cgroup path.
    pub container: Option<String>,
    /// The container id (64 hex) and, on Kubernetes, the pod uid from the cgroup path.
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// What /proc says about a pid right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PidStatus {
    /// /proc/<pid> does not exist: no such process (or it is a thread id, not a process).
    Gone,
    /// The process exists and started at this time (field 22 of stat).
    Started(u64),
    /// The process exists but its stat could not be read or parsed. Not a reason to think it
    /// gone: only [`PidStatus::Gone`] or another start time says that.
    Unknown,
}

/// Reads stat, comm, cmdline and cgroup of `pid`; None if the process does not exist.
/// Files that disappear or cannot be parsed leave their fields empty (start time 0): a
/// process whose name is not UTF-8 is still described.
pub fn process_info(pid: u32) -> Option<ProcInfo> {
    let stat = match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(b) => Some(b),
        Err(_) if !pid_dir_exists(pid) => return None,
        Err(_) => None,
    };
    let (stat_comm, start_time) = match stat.as_deref().and_then(parse_stat) {
        Some((c, t)) => (Some(c), t),
        None => (None, 0),
    };
    let comm = std::fs::read(format!("/proc/{pid}/comm"))
        .ok()
        .map(|b| lossy(b.strip_suffix(b"\n").unwrap_or(&b)))
        .or(stat_comm)
        .unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            let b: Vec<u8> = b
                .into_iter()
                .map(|c| if c == 0 { b' ' } else { c })
                .collect();
            String::from_utf8_lossy(&b).trim().to_string()
        })
        .unwrap_or_default();
    let cgroup_text = std::fs::read(format!("/proc/{pid}/cgroup"))
        .map(|b| lossy(&b))
        .unwrap_or_default();
    let cgroup = cgroup_text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string();
    // Prefer the v2 path; on v1/hybrid hosts the id may only appear in a v1 hierarchy.
    let found = super::containers::from_cgroup(&cgroup).or_else(|| {
        cgroup_text
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .find_map(super::containers::from_cgroup)
    });
    let container = found.as_ref().map(|c| c.id[..12].to_string());
    let (container_id, pod_uid) = match found {
        Some(c) => (Some(c.id), c.pod_uid),
        None => (None, None),
    };
    Some(ProcInfo {
        pid,
        start_time,
        comm,
        cmdline,
        cgroup,
        container,
        container_id,
        pod_uid,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pid_dir_exists(pid: u32) -> bool {
    match std::fs::metadata(format!("/proc/{pid}")) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// Whether `pid` exists and since when, from field 22 of /proc/<pid>/stat.
pub fn pid_status(pid: u32) -> PidStatus {
    let mut buf = [0u8; 1024];
    // One read is enough: stat is generated whole on the first read and is well under 1 KiB.
    let n = match File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| io::Read::read(&mut f, &mut buf))
    {
        Ok(n) => n,
        // ESRCH: it exited between open and read.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return PidStatus::Gone,
        Err(_) if !pid_dir_exists(pid) => return PidStatus::Gone,
        Err(_) => return PidStatus::Unknown,
    };
    match parse_stat(&buf[..n]) {
        Some((_, t)) => PidStatus::Started(t),
        None => PidStatus::Unknown,
    }
}

/// Parses /proc/<pid>/stat: returns (comm, start_time). comm is any bytes but NUL, spaces
/// and ')' included (it spans from the first '(' to the last ')'), and is decoded lossily;
/// the numbers after it are ASCII.
pub fn parse_stat(text: &[u8]) -> Option<(String, u64)> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let comm = lossy(&text[open + 1..close]);
    // After ')' come fields 3 (state) onwards; field 22 is the 20th of them.
    let start = text[close + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .nth(22 - 3)?;
    Some((comm, parse_dec(start)?))
}

/// The first 12 chars of the container id of a cgroup path (see [`super::containers`]).
pub fn container_id_from_cgroup(path: &str) -> Option<String> {
    super::containers::from_cgroup(path).map(|c| c.id[..12].to_string())
}

/// /proc/sys/net/ipv4/ip_local_port_range as (lo, hi); None if unreadable.
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    parse_port_range(&std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?)
}

/// The sysctls of one network namespace that the table needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsSysctls {
    /// net.ipv4.ip_local_port_range.
    pub port_range: Option<(u16, u16)>,
    /// net.ipv4.tcp_max_tw_buckets.
    pub max_tw_buckets: Option<usize>,
}

/// The sysctls of the network namespace `pid` is in; None if it cannot be entered. /proc/sys
/// shows the reading thread's namespace, so a short-lived thread enters `pid`'s first (that
/// needs CAP_SYS_ADMIN; without it, None).
pub fn netns_sysctls_of(pid: u32) -> Option<NetnsSysctls> {
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
    use std::os::fd::AsFd as _;
    let ns = File::open(format!("/proc/{pid}/ns/net")).ok()?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // This short-lived thread's network namespace only.
                move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).ok()?;
                Some(NetnsSysctls {
                    port_range: ephemeral_port_range(),
                    max_tw_buckets: max_tw_buckets(),
                })
            })
            .join()
            .ok()
            .flatten()
    })
}

/// Parses "32768\t60999\n".
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_ascii_whitespace();
    let lo = it.next()?.parse().ok()?;
    let hi = it.next()?.parse().ok()?;
    (it.next().is_none() && lo <= hi).then_some((lo, hi))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, from the kernel's auxiliary vector); 100 if
/// it says 0 (the value on every common Linux build).
pub fn clock_ticks_per_sec() -> u64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100,
        t => t,
    }
}

/// Boot time in unix seconds, from the "btime" line of /proc/stat.
pub fn boot_time_unix() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// /proc/sys/net/ipv4/tcp_max_tw_buckets: most TIME_WAIT sockets the kernel keeps.
pub fn max_tw_buckets() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    // Fixtures captured on an x86_64 (little-endian) machine; the hex words are host order.
    // The last TCP6 line is hand-made: 2001:db8::1 and a mapped 254.0.0.0, inode > u32::MAX.
    const TCP4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1667 1 00000000874ce83e 100 0 0 10 0                      
   1: 0100007F:946B 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 12517 1 000000005f112ab6 100 0 0 10 0                     
   2: 020200C0:99DC 507100CB:01BB 06 00000000:00000000 03:000001FC 00000000     0        0 0 3 00000000e2f66468                                      
   3: 0100007F:EC72 0100007F:C685 01 00000000:00000000 00:00000000 00000000     0        0 12482 2 000000005f112ab6 20 0 0 10 -1                     
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:C685 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12481 1 00000000057f8e05 100 0 0 10 0
   1: 00000000000000000000000001000000:81F7 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 12516 1 00000000e1d4b7dd 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:C685 0000000000000000FFFF00000100007F:EC72 01 00000000:00000000 00:00000000 00000000     0        0 12483 1 0000000079d2fd21 20 0 0 10 -1
   3: 00000000000000000000000001000000:BC2E 00000000000000000000000001000000:C685 06 00000000:00000000 03:0000166E 00000000     0        0 0 3 000000006df03826
   4: B80D0120000000000000000001000000:01BB 0000000000000000FFFF0000000000FE:0050 08 00000000:00000000 00:00000000 00000000  1000        0 4294967296 1 0000000000000000 20 0 0 10 -1
";

    fn rec(local: &str, remote: &str, state: u8, inode: u64, uid: u32) -> SockRecord {
        SockRecord {
            local: sa(local),
            remote: sa(remote),
            state,
            inode,
            uid,
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv4_table() {
        assert_eq!(
            parse_proc_net_tcp(TCP4),
            vec![
                rec("0.0.0.0:2024", "0.0.0.0:0", 10, 1667, 0),
                rec("127.0.0.1:37995", "0.0.0.0:0", 10, 12517, 65534),
                // TIME_WAIT: no socket, inode 0.
                rec("192.0.2.2:39388", "203.0.113.80:443", 6, 0, 0),
                rec("127.0.0.1:60530", "127.0.0.1:50821", 1, 12482, 0),
            ]
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv6_table_and_normalizes_mapped() {
        assert_eq!(
            parse_proc_net_tcp(TCP6),
            vec![
                rec("[::]:50821", "[::]:0", 10, 12481, 0),
                rec("[::1]:33271", "[::]:0", 10, 12516, 65534),
                // v4-mapped on both ends -> plain V4.
                rec("127.0.0.1:50821", "127.0.0.1:60530", 1, 12483, 0),
                rec("[::1]:48174", "[::1]:50821", 6, 0, 0),
                rec("[2001:db8::1]:443", "254.0.0.0:80", 8, 4294967296, 1000),
            ]
        );
        let r = parse_proc_net_tcp(TCP6);
        assert!(r[2].local.is_ipv4() && r[2].remote.is_ipv4());
        assert!(r[1].local.is_ipv6(), "::1 must not become 0.0.0.1");
    }

    #[test]
    fn skips_garbage_lines() {
        assert!(parse_proc_net_tcp("").is_empty());
        assert!(parse_proc_net_tcp("sl local\n  0: zz:1 00000000:0000 0A\n").is_empty());
        // Truncated line (missing inode).
        assert!(
            parse_proc_net_tcp("   0: 00000000:07E8 00000000:0000 0A 0:0 0:0 0 0 0\n").is_empty()
        );
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "4242 (my ) (prog) 1) S 1 4242 4242 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 987654 12345678 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(stat.as_bytes()),
            Some(("my ) (prog) 1".to_string(), 987654))
        );
        assert_eq!(
            parse_stat(b"1 (systemd) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 0 0"),
            Some(("systemd".to_string(), 42))
        );
        assert_eq!(parse_stat(b"1 (x) S 0 1"), None);
        assert_eq!(parse_stat(b""), None);
        // Names are bytes: 7 two-byte letters and the first byte of an eighth (the kernel
        // cuts at 15 bytes), and a 0xff byte. The start time must still be read.
        let mut cut = b"77 (".to_vec();
        cut.extend_from_slice(&"ééééééé".as_bytes()[..14]);
        cut.push(0xc3);
        cut.extend_from_slice(b") S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5555 0 0\n");
        assert_eq!(
            parse_stat(&cut),
            Some(("ééééééé\u{FFFD}".to_string(), 5555))
        );
        assert_eq!(
            parse_stat(b"78 (a\xffb) S 1 78 78 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 6666 0 0\n"),
            Some(("a\u{FFFD}b".to_string(), 6666))
        );
    }

    #[test]
    fn container_ids() {
        let id = "3f9c2a6b1d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef012";
        let short = Some("3f9c2a6b1d4e".to_string());
        for p in [
            format!("/system.slice/docker-{id}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{id}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podab_cd.slice/crio-{id}.scope"
            ),
            format!("/machine.slice/libpod-{id}.scope"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope/container"
            ),
            format!("/docker/{id}"),
            format!("/kubepods/burstable/pod0f1e2d3c-aaaa-bbbb-cccc-000000000000/{id}"),
            format!("/kubepods/{id}"),
        ] {
            assert_eq!(container_id_from_cgroup(&p), short, "{p}");
        }
        for p in [
            "/system.slice/nginx.service".to_string(),
            "/".to_string(),
            String::new(),
            "/process_api/a56c56437005777d66641dc4720237a1".to_string(),
            format!("/system.slice/{id}"),          // bare id without a known parent
            format!("/system.slice/docker-{id}"),   // no .scope
            format!("/system.slice/docker-{}.scope", &id[..63]),
            "/system.slice/docker-zz9c2a6b1d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef01.scope".to_string(),
        ] {
            assert_eq!(container_id_from_cgroup(&p), None, "{p}");
        }
    }

    #[test]
    fn port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("32768\n"), None);
        assert_eq!(parse_port_range("60999\t32768\n"), None);
        assert_eq!(parse_port_range("1 70000\n"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }

    fn fd_inode(fd: i32) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        socket_inode(link.to_str().unwrap().as_bytes()).unwrap()
    }

    #[test]
    fn finds_own_live_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let laddr = listener.local_addr().unwrap();
        let client = TcpStream::connect(laddr).unwrap();
        let (server, caddr) = listener.accept().unwrap();
        assert_eq!(caddr, client.local_addr().unwrap());
        let (l_ino, c_ino, s_ino) = (
            fd_inode(listener.as_raw_fd()),
            fd_inode(client.as_raw_fd()),
            fd_inode(server.as_raw_fd()),
        );

        let socks = read_tcp_sockets().unwrap();
        let by_inode = |ino| socks.iter().find(|r| r.inode == ino).cloned();
        let uid = rustix::process::geteuid().as_raw();
        assert_eq!(
            by_inode(l_ino),
            Some(rec(&laddr.to_string(), "0.0.0.0:0", 10, l_ino, uid))
        );
        assert_eq!(
            by_inode(c_ino),
            Some(SockRecord {
                local: caddr,
                remote: laddr,
                state: 1,
                inode: c_ino,
                uid
            })
        );
        assert_eq!(
            by_inode(s_ino),
            Some(SockRecord {
                local: laddr,
                remote: caddr,
                state: 1,
                inode: s_ino,
                uid
            })
        );

        let me = std::process::id();
        let all = socket_owners(None);
        for ino in [l_ino, c_ino, s_ino] {
            assert_eq!(all.get(&ino), Some(&me));
        }
        let wanted: HashSet<u64> = [l_ino, s_ino].into();
        let some = socket_owners(Some(&wanted));
        assert_eq!(some, HashMap::from([(l_ino, me), (s_ino, me)]));
        assert!(socket_owners(Some(&HashSet::new())).is_empty());
    }

    #[test]
    fn own_process_info() {
        let me = std::process::id();
        let info = process_info(me).unwrap();
        assert_eq!(info.pid, me);
        assert!(!info.comm.is_empty() && !info.cmdline.is_empty());
        assert!(info.start_time > 0);
        assert_eq!(pid_status(me), PidStatus::Started(info.start_time));
        assert_eq!(process_info(u32::MAX), None);
        assert_eq!(pid_status(u32::MAX), PidStatus::Gone);
        assert!(clock_ticks_per_sec() > 0);
        assert!(boot_time_unix().unwrap() > 1_000_000_000);
        let (lo, hi) = ephemeral_port_range().unwrap();
        assert!(lo <= hi);
    }
}
