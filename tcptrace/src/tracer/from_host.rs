//! What the pipeline reads from the host beside the kernel's records: processes for the table
//! ([`SysProcs`]), the sockets that exist at start, network namespaces, and the upkeep lookups
//! (holders of CLOSE_WAIT sockets, owners, namespaces' port ranges, the reconcile after lost
//! records).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::Shared;
use crate::{
    host::{
        clock::monotonic_ns,
        containers::PodDirectory,
        holders::{self, HolderResolver},
        procfs, sockdiag,
    },
    kernel::event::TcpState,
    state::{ExistingSocket, HeldBy, KernelSocket, ProcMeta, ProcSource, snapshot::PodView},
};

/// Processes as /proc describes them (and the node's pod log links, for pod names).
#[derive(Default)]
pub struct SysProcs {
    pods: PodDirectory,
}

impl ProcSource for SysProcs {
    fn start_time(&mut self, pid: u32) -> Option<u64> {
        match procfs::pid_status(pid) {
            procfs::PidStatus::Started(t) => Some(t),
            procfs::PidStatus::Gone | procfs::PidStatus::Unknown => None,
        }
    }
    fn still_running(&mut self, pid: u32, start: u64) -> bool {
        match procfs::pid_status(pid) {
            procfs::PidStatus::Started(t) => t == start,
            procfs::PidStatus::Gone => false,
            procfs::PidStatus::Unknown => true,
        }
    }
    fn netns(&mut self, pid: u32) -> Option<u64> {
        holders::netns_of(pid)
    }
    fn meta(&mut self, pid: u32) -> Option<ProcMeta> {
        let p = procfs::process_info(pid)?;
        let pod = p
            .container_id
            .as_deref()
            .filter(|_| p.pod_uid.is_some())
            .and_then(|id| self.pods.lookup(id))
            .map(|n| PodView {
                namespace: n.namespace,
                name: n.pod,
                container: n.container,
            });
        Some(ProcMeta {
            comm: p.comm,
            cmdline: p.cmdline,
            cgroup: p.cgroup,
            container: p.container,
            container_id: p.container_id,
            pod_uid: p.pod_uid,
            pod,
        })
    }
}

/// The sockets that exist now, with owners, as the table takes them: with `all_namespaces`,
/// those of every network namespace some process is in (each namespace's list read once,
/// through one of its processes), each marked with its namespace; else those of ours, with
/// namespace 0 (unknown, as the records will be).
pub fn existing_sockets(all_namespaces: bool) -> std::io::Result<Vec<ExistingSocket>> {
    let mut lists: Vec<(u64, Vec<procfs::SockRecord>)> = Vec::new();
    if all_namespaces {
        for (netns, pid) in namespaces() {
            // A process may exit meanwhile: its namespace is then read through another one next
            // time, or learned from events.
            if let Ok(records) = holders::sockets_of_netns(Some(pid)) {
                lists.push((netns, records));
            }
        }
    }
    if lists.is_empty() {
        lists.push((0, procfs::read_tcp_sockets()?));
    }
    let wanted: HashSet<u64> = lists
        .iter()
        .flat_map(|(_, l)| l.iter().map(|r| r.inode))
        .filter(|&i| i != 0)
        .collect();
    let owners = procfs::socket_owners(Some(&wanted));
    // How long CLOSE_WAIT sockets of our namespace have been there: the peer's FIN came with
    // the last ACK received (tcp_info's last_ack_recv; a lower bound of the time since the
    // FIN). Other namespaces' sockets are aged from now.
    let own = holders::netns_of(std::process::id());
    let ages: HashMap<(SocketAddr, SocketAddr), u64> = sockdiag::close_wait_sockets()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.state == tcptrace_common::tcp_state::CLOSE_WAIT)
        .filter_map(|d| Some(((d.local, d.remote), d.last_ack_recv_ms? as u64 * 1_000_000)))
        .collect();
    Ok(lists
        .into_iter()
        .flat_map(|(netns, records)| records.into_iter().map(move |r| (netns, r)))
        .filter_map(|(netns, r)| {
            Some(ExistingSocket {
                netns,
                local: r.local,
                remote: r.remote,
                state: TcpState::from_u8(r.state)?,
                pid: owners.get(&r.inode).copied(),
                age_ns: None,
            })
        })
        .map(|mut e| {
            if e.state == TcpState::CloseWait && (e.netns == 0 || Some(e.netns) == own) {
                e.age_ns = ages.get(&(e.local, e.remote)).copied();
            }
            e
        })
        .collect())
}

/// Every network namespace some process is in, with one of its processes (ours first for our
/// own namespace).
pub fn namespaces() -> Vec<(u64, u32)> {
    let me = std::process::id();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    if let Some(n) = holders::netns_of(me) {
        seen.insert(n, me);
    }
    for pid in procfs::list_pids() {
        if let Some(n) = holders::netns_of(pid) {
            seen.entry(n).or_insert(pid);
        }
    }
    let mut v: Vec<(u64, u32)> = seen.into_iter().collect();
    v.sort_unstable();
    v
}

/// How long after records were lost the table is compared with the kernel's socket list: lost
/// records come in bursts, one comparison after the burst is enough (another follows if records
/// are still being lost).
pub(super) const RECONCILE_AFTER: Duration = Duration::from_secs(1);
/// Least time between two: a host that loses records all the time (a ring buffer too small for
/// its load) would otherwise pay for a dump of every socket each second.
pub(super) const RECONCILE_GAP: Duration = Duration::from_secs(3);

/// The kernel's socket lists after lost records, read off the reader thread (reading every
/// namespace's list can take long on a busy host; the reader keeps draining meanwhile).
pub(super) struct KernelLists {
    /// When the first list was read: entries the table changed since are not compared.
    read_at: u64,
    /// Ours (sock_diag), then every other namespace's (/proc/PID/net/tcp{,6} of one of its
    /// processes) when records carry their namespace.
    own: (u64, Vec<KernelSocket>),
    others: Vec<(u64, Vec<KernelSocket>)>,
}

/// Reads the lists (`netns`: ours, 0 when unknown); None when ours cannot be read (the next
/// loss tries again).
pub(super) fn read_kernel_lists(netns: u64, netns_known: bool) -> Option<KernelLists> {
    if netns == 0 {
        return None;
    }
    let read_at = monotonic_ns();
    let listed = sockdiag::tcp_sockets().ok()?;
    let own: Vec<KernelSocket> = listed
        .into_iter()
        .filter_map(|d| {
            Some(KernelSocket {
                local: d.local,
                remote: d.remote,
                state: TcpState::from_u8(d.state)?,
                timewait: d.timewait,
            })
        })
        .collect();
    let mut others = Vec::new();
    if netns_known {
        for (other, pid) in namespaces().into_iter().filter(|&(n, _)| n != netns) {
            let Ok(records) = holders::sockets_of_netns(Some(pid)) else {
                continue;
            };
            let kernel: Vec<KernelSocket> = records
                .into_iter()
                .filter_map(|r| {
                    let state = TcpState::from_u8(r.state)?;
                    Some(KernelSocket {
                        local: r.local,
                        remote: r.remote,
                        state,
                        // /proc lists mini-sockets with their substate and no inode; only
                        // TIME_WAIT tells them from full sockets for sure.
                        timewait: state == TcpState::TimeWait,
                    })
                })
                .collect();
            others.push((other, kernel));
        }
    }
    Some(KernelLists {
        read_at,
        own: (netns, own),
        others,
    })
}

/// Corrects the table from the lists (every record read before they were is applied).
pub(super) fn apply_kernel_lists(shared: &Shared, lists: &KernelLists) {
    let mut table = shared.table.lock().unwrap();
    let (netns, own) = &lists.own;
    table.reconcile(own, *netns, lists.read_at, monotonic_ns());
    for (other, kernel) in &lists.others {
        table.reconcile_netns(kernel, *other, lists.read_at, monotonic_ns());
    }
}

/// ip_local_port_range and tcp_max_tw_buckets of the namespaces the table's processes are in,
/// each read again after [`SYSCTL_TTL`]. A namespace whose processes are gone keeps its values
/// for [`SYSCTL_KEEP`]: its sockets outlive them (TIME_WAIT, a client that runs now and then),
/// and the host's range in their place would misjudge its port use.
#[derive(Default)]
pub(super) struct NetnsSysctlCache(HashMap<u64, (Instant, procfs::NetnsSysctls)>);

const SYSCTL_TTL: Duration = Duration::from_secs(10);
const SYSCTL_KEEP: Duration = Duration::from_secs(600);

impl NetnsSysctlCache {
    pub(super) fn refresh(&mut self, namespaces: &[(u64, u32)]) {
        self.forget_unlisted(namespaces, Instant::now());
        for &(netns, pid) in namespaces {
            if self
                .0
                .get(&netns)
                .is_some_and(|(at, _)| at.elapsed() < SYSCTL_TTL)
            {
                continue;
            }
            match procfs::netns_sysctls_of(pid) {
                Some(r) => {
                    self.0.insert(netns, (Instant::now(), r));
                }
                None => {
                    self.0.remove(&netns);
                }
            }
        }
    }

    /// Drops the namespaces no longer listed whose values are older than [`SYSCTL_KEEP`].
    fn forget_unlisted(&mut self, namespaces: &[(u64, u32)], now: Instant) {
        self.0.retain(|n, (at, _)| {
            now.duration_since(*at) < SYSCTL_KEEP || namespaces.iter().any(|(m, _)| m == n)
        });
    }

    /// Each namespace's ip_local_port_range, where it could be read.
    pub(super) fn port_ranges(&self) -> std::collections::HashMap<u64, (u16, u16)> {
        self.0
            .iter()
            .filter_map(|(&n, (_, s))| Some((n, s.port_range?)))
            .collect()
    }

    /// Each namespace's tcp_max_tw_buckets, where it could be read.
    pub(super) fn time_wait_limits(&self) -> std::collections::HashMap<u64, usize> {
        self.0
            .iter()
            .filter_map(|(&n, (_, s))| Some((n, s.max_tw_buckets?)))
            .collect()
    }
}

/// Most CLOSE_WAIT sockets whose holders are looked up per second.
const MAX_HOLDER_QUERIES: usize = 200_000;

/// Looks up who holds the CLOSE_WAIT sockets the table asks about (new ones, and every few
/// seconds those that stay): their inodes from the socket list of the namespace of the process
/// the kernel side named (read once per namespace), then the holders of those inodes from
/// /proc/PID/fd, that process's tree first.
pub(super) fn resolve_holders(shared: &Shared, resolver: &mut HolderResolver) {
    let queries = shared
        .table
        .lock()
        .unwrap()
        .holders_to_resolve(monotonic_ns(), MAX_HOLDER_QUERIES);
    if queries.is_empty() {
        return;
    }
    // Inodes not known yet: from the socket list of the socket's namespace (through the hint,
    // or through any process in that namespace), each list read once. A socket nobody is known
    // to own and whose namespace is unknown is looked for in ours, then in every namespace.
    let mut lists: HashMap<u64, HashMap<(SocketAddr, SocketAddr), u64>> = HashMap::new();
    let mut all_namespaces: Option<Vec<(u64, u32)>> = None;
    let read_list = |lists: &mut HashMap<u64, HashMap<(SocketAddr, SocketAddr), u64>>,
                     ns: u64,
                     pid: u32,
                     q_key: (SocketAddr, SocketAddr)|
     -> Option<u64> {
        lists
            .entry(ns)
            .or_insert_with(|| {
                holders::sockets_of_netns(Some(pid))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| ((r.local, r.remote), r.inode))
                    .collect()
            })
            .get(&(q_key.0, q_key.1))
            .copied()
    };
    let mut inode_of = Vec::with_capacity(queries.len());
    for q in &queries {
        if q.inode.is_some() {
            inode_of.push(q.inode);
            continue;
        }
        let mut found = None;
        // The hint's namespace first.
        if let Some(pid) = q.hint
            && let Some(ns) = holders::netns_of(pid)
        {
            found = read_list(&mut lists, ns, pid, (q.local, q.remote));
        }
        // Then the socket's own namespace (known from the records), or, when nothing says
        // where it is, every namespace, ours first.
        if found.is_none() && (q.netns != 0 || q.hint.is_none()) {
            let namespaces = all_namespaces.get_or_insert_with(|| {
                let own = holders::netns_of(std::process::id());
                let mut v = super::namespaces();
                v.sort_by_key(|(n, _)| Some(*n) != own);
                v
            });
            for &(ns, pid) in namespaces.iter() {
                if q.netns != 0 && ns != q.netns {
                    continue;
                }
                found = read_list(&mut lists, ns, pid, (q.local, q.remote));
                if found.is_some() {
                    break;
                }
            }
        }
        inode_of.push(found);
    }
    let inodes: HashSet<u64> = inode_of
        .iter()
        .flatten()
        .filter(|&&i| i != 0)
        .copied()
        .collect();
    let mut hints: Vec<u32> = queries
        .iter()
        .flat_map(|q| q.hint.iter().chain(&q.holders).copied())
        .collect();
    hints.sort_unstable();
    hints.dedup();
    let found = resolver.resolve(&inodes, &hints);
    let now = monotonic_ns();
    let mut table = shared.table.lock().unwrap();
    for (q, inode) in queries.iter().zip(inode_of) {
        let held = match inode {
            None => HeldBy::Unknown,
            Some(0) => HeldBy::Unaccepted,
            Some(inode) => match found.holders.get(&inode) {
                Some(list) => HeldBy::Processes {
                    inode,
                    by: list.iter().map(|h| (h.pid, h.fd)).collect(),
                },
                None => HeldBy::Unknown,
            },
        };
        table.set_holders(q.key, held, now);
    }
}

/// CLOSE_WAIT sockets nobody owns in the table (accepted before tracing began by a listener we
/// did not see, or whose kernel owner entry was evicted): look them up in /proc. Each address
/// is tried once, so sockets of other network namespaces do not cost a scan every second.
pub(super) fn resolve_owners(
    shared: &Shared,
    unowned: Vec<(SocketAddr, SocketAddr)>,
    tried: &mut HashSet<(SocketAddr, SocketAddr)>,
) {
    let fresh: Vec<_> = unowned.into_iter().filter(|k| tried.insert(*k)).collect();
    if fresh.is_empty() {
        return;
    }
    if tried.len() > 100_000 {
        tried.clear();
    }
    let Ok(records) = procfs::read_tcp_sockets() else {
        return;
    };
    let wanted: HashSet<(SocketAddr, SocketAddr)> = fresh.into_iter().collect();
    let by_inode: Vec<(u64, SocketAddr, SocketAddr)> = records
        .iter()
        .filter(|r| r.inode != 0 && wanted.contains(&(r.local, r.remote)))
        .map(|r| (r.inode, r.local, r.remote))
        .collect();
    if by_inode.is_empty() {
        return;
    }
    let inodes: HashSet<u64> = by_inode.iter().map(|x| x.0).collect();
    let owners = procfs::socket_owners(Some(&inodes));
    let found: Vec<(SocketAddr, SocketAddr, u32)> = by_inode
        .into_iter()
        .filter_map(|(i, l, r)| owners.get(&i).map(|&pid| (l, r, pid)))
        .collect();
    if !found.is_empty() {
        shared
            .table
            .lock()
            .unwrap()
            .assign_owners(&found, monotonic_ns());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_without_processes_keeps_its_sysctls_for_a_while() {
        let mut cache = NetnsSysctlCache::default();
        let values = procfs::NetnsSysctls {
            port_range: Some((1024, 65535)),
            max_tw_buckets: Some(1_000_000),
        };
        cache.0.insert(7, (Instant::now(), values));
        // Its last process exited: the namespace is no longer listed.
        cache.refresh(&[]);
        assert_eq!(cache.port_ranges().get(&7), Some(&(1024, 65535)));
        assert_eq!(cache.time_wait_limits().get(&7), Some(&1_000_000));
        // Still without processes once the values are older than SYSCTL_KEEP: forgotten,
        // unless listed again.
        let later = Instant::now() + SYSCTL_KEEP;
        cache.forget_unlisted(&[(7, 1)], later);
        assert_eq!(cache.port_ranges().len(), 1);
        cache.forget_unlisted(&[], later);
        assert!(cache.port_ranges().is_empty());
    }
}
