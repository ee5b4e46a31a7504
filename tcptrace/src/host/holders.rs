//! Who holds a socket now: the processes whose descriptor table has it (its inode among the
//! links of `/proc/PID/fd`), which is what `ss -p` shows. The owner the kernel side recorded is
//! only a hint: after fork() both processes hold every inherited descriptor, prefork workers
//! accept on their parent's listener, and a socket can be handed to a child or to an unrelated
//! process (SCM_RIGHTS).
//!
//! Cost: the hint's process tree is searched first (it holds the socket in every architecture
//! but an SCM_RIGHTS hand-off to an unrelated process); a scan of every process only for what
//! the tree did not explain, and at most once per [`FULL_SCAN_EVERY`].

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    time::{Duration, Instant},
};

use super::procfs::{SockRecord, for_each_fd_socket, list_pids, read_tcp_sockets_of};

/// Least time between two scans of every process.
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(5);
/// Most processes searched in one hint's tree (a fork bomb of a server is not searched whole).
const MAX_TREE: usize = 4096;

/// One process holding a socket, with the descriptor number it holds it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder {
    pub pid: u32,
    pub fd: u32,
}

/// The network namespace of a process: the inode of `/proc/PID/ns/net`.
pub fn netns_of(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Direct children of a process, from every thread's `children` file.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        out.extend(
            text.split_ascii_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The process and its descendants, breadth first, at most `max`.
fn tree(root: u32, max: usize) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() && out.len() < max {
        let kids = children_of(out[i]);
        for k in kids {
            if out.len() >= max {
                break;
            }
            if !out.contains(&k) {
                out.push(k);
            }
        }
        i += 1;
    }
    out
}

/// Records every (pid, fd) of `pid` whose socket is in `wanted` into `found`.
fn scan_process(pid: u32, wanted: &HashSet<u64>, found: &mut HashMap<u64, Vec<Holder>>) {
    let mut path = Vec::with_capacity(32);
    // Cannot fail: writing to a Vec.
    let _ = write!(path, "/proc/{pid}/fd\0");
    for_each_fd_socket(&path, |fd, inode| {
        if wanted.contains(&inode) {
            let v = found.entry(inode).or_default();
            let h = Holder { pid, fd };
            if !v.contains(&h) {
                v.push(h);
            }
        }
        true
    });
}

/// Finds holders of socket inodes, remembering when it last scanned every process.
#[derive(Default)]
pub struct HolderResolver {
    last_full_scan: Option<Instant>,
    /// Processes searched and scans made, for the status line and the benchmark.
    pub stats: ResolverStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolverStats {
    pub tree_scans: u64,
    pub full_scans: u64,
    pub processes_searched: u64,
}

impl HolderResolver {
    /// Holders of each of `inodes`: every process of the trees of `hints` (each hint and its
    /// descendants) is searched; inodes none of them holds are looked for in every process, if
    /// the last such scan is older than [`FULL_SCAN_EVERY`]. An inode absent from the answer
    /// is held by nobody that could be found (or the full scan was not due).
    pub fn resolve(&mut self, inodes: &HashSet<u64>, hints: &[u32]) -> Resolved {
        let mut found: HashMap<u64, Vec<Holder>> = HashMap::new();
        if inodes.is_empty() {
            return Resolved {
                holders: found,
                complete: true,
            };
        }
        let mut searched: HashSet<u32> = HashSet::new();
        for &h in hints {
            if searched.contains(&h) {
                continue;
            }
            for pid in tree(h, MAX_TREE) {
                if searched.insert(pid) {
                    scan_process(pid, inodes, &mut found);
                }
            }
            self.stats.tree_scans += 1;
        }
        let missing: HashSet<u64> = inodes
            .iter()
            .filter(|i| !found.contains_key(i))
            .copied()
            .collect();
        let mut complete = missing.is_empty();
        if !missing.is_empty()
            && self
                .last_full_scan
                .is_none_or(|t| t.elapsed() >= FULL_SCAN_EVERY)
        {
            self.last_full_scan = Some(Instant::now());
            self.stats.full_scans += 1;
            for pid in list_pids() {
                if searched.insert(pid) {
                    scan_process(pid, &missing, &mut found);
                }
            }
            complete = true;
        }
        self.stats.processes_searched += searched.len() as u64;
        for v in found.values_mut() {
            v.sort_unstable();
        }
        Resolved {
            holders: found,
            complete,
        }
    }
}

/// What [`HolderResolver::resolve`] found.
#[derive(Debug, Default)]
pub struct Resolved {
    pub holders: HashMap<u64, Vec<Holder>>,
    /// Every process was searched for the inodes the hints did not explain: an inode absent
    /// from `holders` is held by no process.
    pub complete: bool,
}

/// The TCP sockets of the network namespace `pid` is in, or of ours without a pid.
pub fn sockets_of_netns(pid: Option<u32>) -> std::io::Result<Vec<SockRecord>> {
    match pid {
        Some(p) => read_tcp_sockets_of(&format!("/proc/{p}")),
        None => read_tcp_sockets_of("/proc/self"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn inode_of(fd: i32) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let s = link.to_str().unwrap();
        s.strip_prefix("socket:[")
            .unwrap()
            .strip_suffix(']')
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn finds_our_own_socket_with_its_fd() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = c.as_raw_fd();
        let inode = inode_of(fd);
        let me = std::process::id();
        let mut r = HolderResolver::default();
        let got = r.resolve(&HashSet::from([inode]), &[me]);
        assert_eq!(
            got.holders.get(&inode),
            Some(&vec![Holder {
                pid: me,
                fd: fd as u32
            }])
        );
        assert!(got.complete);
        assert_eq!(r.stats.full_scans, 0, "the hint's tree explained it");
    }

    #[test]
    fn a_socket_nobody_holds_is_absent_after_a_full_scan() {
        let mut r = HolderResolver::default();
        // No socket has inode 1 (it is the root directory's inode on most file systems).
        let got = r.resolve(&HashSet::from([1]), &[std::process::id()]);
        assert!(got.holders.is_empty());
        assert!(got.complete);
        assert_eq!(r.stats.full_scans, 1);
        // The next full scan is not due yet.
        let again = r.resolve(&HashSet::from([1]), &[]);
        assert!(!again.complete);
        assert_eq!(r.stats.full_scans, 1);
    }

    #[test]
    fn our_namespace_lists_our_listener() {
        assert!(netns_of(std::process::id()).is_some());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = inode_of(l.as_raw_fd());
        let mine = sockets_of_netns(Some(std::process::id())).unwrap();
        assert!(
            mine.iter()
                .any(|r| r.inode == inode && r.local == l.local_addr().unwrap())
        );
    }
}
