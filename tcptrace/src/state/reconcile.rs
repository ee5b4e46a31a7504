//! Reconcile: after the kernel lost records (ring buffer full, runs skipped), the table may hold sockets that
//! closed unseen, miss sockets that opened unseen, or show stale states. [`Table::reconcile`]
//! compares it with the kernel's own socket list of this network namespace (sock_diag) and
//! corrects it, counting what it changed.
//!
//! Two limits keep it from undoing what it cannot see:
//! * Time: only entries whose last change is older than the moment the list was read are
//!   compared, so an event still in flight is never overruled.
//! * Namespaces: a list holds one network namespace. Records carry their socket's namespace
//!   where the kernel has BTF; then every namespace is compared with its own list
//!   ([`Table::reconcile_netns`]) and entries of other namespaces are left alone. An entry whose
//!   namespace is unknown (0: no BTF) is compared only when its owner was in the list's
//!   namespace when the table first saw it (its netns inode, from [`super::ProcSource::netns`]);
//!   sockets without a known owner are left as they are (and TIME_WAIT entries expire by
//!   themselves). One exception: a socket without a known owner whose pair the list holds in
//!   another state takes that state (the pair says it is this namespace's socket); the tracer
//!   then looks its owner up again.

use std::net::SocketAddr;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{
    processes::ProcId,
    sockets::{ConnectPhase, Sock, is_connected_state},
    table::{Reconciled, Table},
    time_wait::{mini, tuple_key},
};
use crate::kernel::event::TcpState;

/// One socket of the kernel's list (sock_diag, or /proc/net/tcp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The state as `ss` shows it: for a mini-socket, its substate (TIME_WAIT or FIN_WAIT2).
    pub state: TcpState,
    /// A mini-socket (`inet_timewait_sock`) rather than a full socket.
    pub timewait: bool,
}

/// States not compared: connection requests and sockets on their way in or out.
fn transient(s: TcpState) -> bool {
    matches!(
        s,
        TcpState::SynRecv | TcpState::NewSynRecv | TcpState::Close | TcpState::SynSent
    )
}

impl Table {
    /// Makes the table agree with `kernel`, the socket list of network namespace `netns` (its
    /// inode), read after `read_at_ns` (every event before that has been applied). Returns the
    /// corrections, also added to [`super::TableStats::reconciled`].
    pub fn reconcile(
        &mut self,
        kernel: &[KernelSocket],
        netns: u64,
        read_at_ns: u64,
        now_ns: u64,
    ) -> Reconciled {
        self.own_netns = netns;
        self.reconcile_netns(kernel, netns, read_at_ns, now_ns)
    }

    /// Like [`Table::reconcile`], for the list of another network namespace than ours (records
    /// carry their namespace: their sockets are told apart).
    pub fn reconcile_netns(
        &mut self,
        kernel: &[KernelSocket],
        netns: u64,
        read_at_ns: u64,
        now_ns: u64,
    ) -> Reconciled {
        let mut r = Reconciled::default();
        let kmap: HashMap<(SocketAddr, SocketAddr), KernelSocket> = kernel
            .iter()
            .filter(|k| !transient(k.state))
            .map(|k| ((k.local, k.remote), *k))
            .collect();
        let procs = &self.procs;
        // In this namespace: the kernel side says so, or (namespace unknown) the owner was.
        let here = |ns: u64, owner: Option<ProcId>| -> bool {
            ns == netns
                || (ns == 0
                    && owner
                        .and_then(|id| procs.get(&id))
                        .is_some_and(|p| p.netns == Some(netns)))
        };
        let elsewhere = |ns: u64| ns != 0 && ns != netns;

        // Every pair the table holds, to find what it misses.
        let mut known: HashSet<(SocketAddr, SocketAddr)> = HashSet::default();
        // Full sockets: (key, what the kernel says, or None when it has no such socket).
        let mut full: Vec<(u64, Option<KernelSocket>)> = Vec::new();
        for (&k, s) in &self.sockets {
            if elsewhere(s.netns) {
                continue;
            }
            known.insert((s.local, s.remote));
            if s.since_ns >= read_at_ns || transient(s.state) {
                continue;
            }
            match kmap.get(&(s.local, s.remote)) {
                Some(ks) if ks.state == s.state => {}
                // Without a known owner, the kernel having the pair says it is this namespace's
                // socket (the same pair in two namespaces at once is unusual); its absence says
                // nothing.
                Some(ks) if s.owner.is_none() => full.push((k, Some(*ks))),
                ks if here(s.netns, s.owner) => full.push((k, ks.copied())),
                _ => {}
            }
        }
        // TIME_WAIT entries are not compared (nor missing ones added): they leave by
        // themselves within TIME_WAIT_NS, and on a churning host they are most of both lists,
        // which made a reconcile hold the table for hundreds of milliseconds (the rings filled
        // meanwhile, and the records lost called for another reconcile).
        let mut fw2: Vec<(u64, Option<KernelSocket>)> = Vec::new();
        for (&key, f) in &self.fin_wait2.by_pair {
            if elsewhere(f.netns) {
                continue;
            }
            known.insert((f.local, f.remote));
            if f.expiry_ns.saturating_sub(self.fin_timeout_ns) >= read_at_ns
                || !here(f.netns, f.owner)
            {
                continue;
            }
            match kmap.get(&(f.local, f.remote)) {
                Some(ks) if ks.state == TcpState::FinWait2 => {}
                ks => fw2.push((key, ks.copied())),
            }
        }

        for (k, ks) in full {
            match ks {
                None => {
                    if let Some(s) = self.remove_socket(k) {
                        self.forget_listener(&s);
                        self.closed_unseen(&s, false, now_ns);
                    }
                    r.removed += 1;
                }
                Some(ks) if ks.timewait || ks.state == TcpState::TimeWait => {
                    if let Some(s) = self.remove_socket(k) {
                        self.forget_listener(&s);
                        self.closed_unseen(&s, ks.state != TcpState::FinWait2, now_ns);
                        self.add_mini(ks, netns, now_ns, s.owner, s.inbound);
                    }
                    r.fixed += 1;
                }
                Some(ks) => {
                    self.set_state(k, ks.state, now_ns);
                    r.fixed += 1;
                }
            }
        }
        for (key, ks) in fw2 {
            let Some(f) = self.remove_fin_wait2(key) else {
                continue;
            };
            match ks {
                Some(ks) if ks.state == TcpState::TimeWait => {
                    self.push_time_wait(now_ns, f.netns, f.local, f.remote, f.owner, f.inbound);
                    r.fixed += 1;
                }
                _ => r.removed += 1,
            }
        }

        for ks in kmap.values() {
            // A mini-socket the table holds as TIME_WAIT is not missing either.
            if ks.state == TcpState::TimeWait
                || known.contains(&(ks.local, ks.remote))
                || (ks.timewait
                    && [netns, 0].iter().any(|&n| {
                        self.tw_index
                            .contains_key(&tuple_key(n, &ks.local, &ks.remote))
                    }))
            {
                continue;
            }
            r.added += 1;
            let inbound = ks.state != TcpState::Listen
                && self.listeners.contains_key(&(netns, ks.local.port()));
            if ks.timewait || ks.state == TcpState::TimeWait {
                self.add_mini(*ks, netns, now_ns, None, inbound);
                continue;
            }
            let key = self.next_synthetic;
            self.next_synthetic += 1;
            if ks.state == TcpState::CloseWait {
                self.close_wait_pair(netns, ks.local, ks.remote, true);
            }
            self.sockets.insert(
                key,
                Sock {
                    state: ks.state,
                    since_ns: now_ns,
                    local: ks.local,
                    remote: ks.remote,
                    owner: None,
                    connect: ConnectPhase::None,
                    connected: is_connected_state(ks.state),
                    inbound,
                    held: Default::default(),
                    netns,
                    age_estimated: false,
                    listed: true,
                },
            );
            self.existing.insert((netns, ks.local, ks.remote), key);
        }
        self.stats.reconciled.removed += r.removed;
        self.stats.reconciled.added += r.added;
        self.stats.reconciled.fixed += r.fixed;
        r
    }

    /// A mini-socket the kernel has: TIME_WAIT, or FIN_WAIT2 waiting for the peer's FIN.
    fn add_mini(
        &mut self,
        ks: KernelSocket,
        netns: u64,
        now_ns: u64,
        owner: Option<ProcId>,
        inbound: bool,
    ) {
        if ks.state == TcpState::FinWait2 {
            self.push_fin_wait2(now_ns, mini(netns, ks.local, ks.remote, owner, inbound));
        } else {
            self.push_time_wait(now_ns, netns, ks.local, ks.remote, owner, inbound);
        }
    }

    /// A connection the kernel no longer lists as open closed while its records were lost: it
    /// counts as closed for its owner (and as a TIME_WAIT entered when it is one now), as the
    /// records would have counted it.
    fn closed_unseen(&mut self, s: &Sock, time_wait: bool, now_ns: u64) {
        if !(s.connected || is_connected_state(s.state)) {
            return;
        }
        if let Some(p) = s.owner.and_then(|id| self.procs.get_mut(&id)) {
            p.count_close(now_ns);
            if time_wait {
                p.time_wait_total += 1;
            }
        }
    }

    fn set_state(&mut self, key: u64, state: TcpState, now_ns: u64) {
        let Some(s) = self.sockets.get_mut(&key) else {
            return;
        };
        let (prev, netns, local, remote) = (s.state, s.netns, s.local, s.remote);
        s.state = state;
        s.since_ns = now_ns;
        s.connected |= is_connected_state(state);
        if prev == TcpState::CloseWait || state == TcpState::CloseWait {
            self.close_wait_pair(netns, local, remote, state == TcpState::CloseWait);
        }
    }

    fn forget_listener(&mut self, s: &Sock) {
        if s.state == TcpState::Listen
            && s.owner.is_some()
            && self.listeners.get(&(s.netns, s.local.port())) == s.owner.as_ref()
        {
            self.listeners.remove(&(s.netns, s.local.port()));
        }
    }
}
