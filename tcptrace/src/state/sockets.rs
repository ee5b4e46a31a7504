//! Sockets by kernel address: state transitions, owners, sockets that existed before tracing
//! started (adopted by address at their first event), eviction under the socket cap.

use std::net::SocketAddr;

use rustc_hash::FxHashMap as HashMap;

use super::{
    connects::ClosedConnect,
    holders::Held,
    processes::ProcId,
    table::Table,
    time_wait::{mini, tuple_key},
};
use crate::kernel::event::{Owner, TcpState};

/// A socket that existed before tracing started (from /proc/net/tcp and /proc/PID/fd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingSocket {
    /// Network namespace the socket list was read from (0: unknown).
    pub netns: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub pid: Option<u32>,
    /// How long it has been in its state, when the kernel's `tcp_info` allows an estimate
    /// (CLOSE_WAIT: time since the last ACK received, which came with the peer's FIN).
    pub age_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnectPhase {
    /// Not an outbound connect, or one that has completed.
    None,
    /// Inside a connect() syscall (blocking): the syscall's return value tells the outcome.
    Syscall,
    /// connect() returned -EINPROGRESS: an error comes as an error report.
    Async,
}

#[derive(Clone, Debug)]
pub(super) struct Sock {
    pub(super) state: TcpState,
    pub(super) since_ns: u64,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) owner: Option<ProcId>,
    pub(super) connect: ConnectPhase,
    /// Reached a synchronized state: its close counts as a closed connection.
    pub(super) connected: bool,
    /// Accepted from a listener (its remote is a client, not a destination).
    pub(super) inbound: bool,
    /// Who holds it, once looked up (CLOSE_WAIT sockets).
    pub(super) held: Held,
    /// Network namespace (0: unknown).
    pub(super) netns: u64,
    /// `since_ns` is an estimate (a socket older than tracing, aged from `tcp_info`).
    pub(super) age_estimated: bool,
    /// Its state comes from a socket list (start-up, reconcile), not from its transitions: the
    /// first transition seen need not follow from it.
    pub(super) listed: bool,
}

/// Keys of snapshot sockets that have no kernel address yet live above this bit.
pub(super) const SYNTHETIC: u64 = 1 << 63;

pub(super) fn is_connected_state(s: TcpState) -> bool {
    !matches!(
        s,
        TcpState::SynSent
            | TcpState::SynRecv
            | TcpState::NewSynRecv
            | TcpState::Listen
            | TcpState::Close
    )
}

impl Table {
    /// Loads the sockets that existed before tracing started.
    pub fn load_existing(&mut self, socks: &[ExistingSocket], now_ns: u64) {
        // Room for all at once: growing by doubling would hold the old and the new table of
        // each map together at every step (the start-up's peak memory with 100,000 sockets).
        self.sockets.reserve(socks.len());
        self.existing.reserve(socks.len());
        let listen_ports: std::collections::HashSet<(u64, u16)> = socks
            .iter()
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| (s.netns, s.local.port()))
            .collect();
        for s in socks {
            let owner = s.pid.map(|pid| self.proc_for_pid(pid, None, now_ns));
            let inbound =
                s.state != TcpState::Listen && listen_ports.contains(&(s.netns, s.local.port()));
            if s.state == TcpState::TimeWait {
                self.push_time_wait(now_ns, s.netns, s.local, s.remote, owner, inbound);
                continue;
            }
            // FIN_WAIT2 without an owner: an orphan, almost always the mini-socket, which no
            // event will end.
            if s.state == TcpState::FinWait2 && owner.is_none() {
                self.push_fin_wait2(now_ns, mini(s.netns, s.local, s.remote, owner, inbound));
                continue;
            }
            let key = self.next_synthetic;
            self.next_synthetic += 1;
            if s.state == TcpState::Listen
                && let Some(o) = owner
            {
                self.listeners.insert((s.netns, s.local.port()), o);
            }
            if s.state == TcpState::CloseWait {
                self.close_wait_pair(s.netns, s.local, s.remote, true);
                if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
                    p.cw_entries.push_back(now_ns);
                }
            }
            self.sockets.insert(
                key,
                Sock {
                    state: s.state,
                    // Estimated from tcp_info where the kernel gives it; else at least as old as
                    // tracing, counted from now.
                    since_ns: now_ns.saturating_sub(s.age_ns.unwrap_or(0)),
                    local: s.local,
                    remote: s.remote,
                    owner,
                    connect: ConnectPhase::None,
                    connected: is_connected_state(s.state),
                    inbound,
                    held: Held::default(),
                    netns: s.netns,
                    age_estimated: s.age_ns.is_some(),
                    listed: true,
                },
            );
            self.existing.insert((s.netns, s.local, s.remote), key);
        }
    }

    /// Gives owners to sockets that have none (found later from /proc), by address.
    pub fn assign_owners(&mut self, owners: &[(SocketAddr, SocketAddr, u32)], now_ns: u64) {
        let wanted: HashMap<(SocketAddr, SocketAddr), u32> =
            owners.iter().map(|&(l, r, pid)| ((l, r), pid)).collect();
        let keys: Vec<(u64, u32)> = self
            .sockets
            .iter()
            .filter(|(_, s)| s.owner.is_none())
            .filter_map(|(&k, s)| wanted.get(&(s.local, s.remote)).map(|&pid| (k, pid)))
            .collect();
        for (k, pid) in keys {
            let id = self.proc_for_pid(pid, None, now_ns);
            if let Some(s) = self.sockets.get_mut(&k) {
                s.owner = Some(id);
                if s.state == TcpState::CloseWait
                    && let Some(p) = self.procs.get_mut(&id)
                {
                    p.cw_entries.push_back(s.since_ns);
                }
            }
        }
    }

    /// (local, remote) of CLOSE_WAIT sockets with no known owner.
    pub fn unowned_close_wait(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.sockets
            .values()
            .filter(|s| s.owner.is_none() && s.state == TcpState::CloseWait)
            .map(|s| (s.local, s.remote))
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_state(
        &mut self,
        ts: u64,
        sk: u64,
        old: TcpState,
        new: TcpState,
        local: SocketAddr,
        remote: SocketAddr,
        owner: Option<Owner>,
        netns: u64,
    ) {
        let owner_id = owner.map(|o| self.owner_id(&o, ts));
        let gap = match self.sockets.get(&sk) {
            None => {
                self.adopt_or_create(sk, old, netns, local, remote, ts);
                None
            }
            Some(s) if s.state != old && !s.listed => Some((s.state, s.local, s.remote)),
            Some(_) => None,
        };
        if let Some((s_state, s_local, s_remote)) = gap {
            // A new socket's first transition (from CLOSE, or an accepted socket's).
            let birth = matches!(old, TcpState::Close | TcpState::SynRecv)
                || (old == TcpState::Listen && new == TcpState::SynRecv);
            // Addressed to another connection than the one the table holds there: a late
            // record of the socket that had the address before (its end was made up for when
            // the new one's first record came first), not news of this one. A connect whose
            // local port is not known yet (still in SYN_SENT) shows no address to compare:
            // a record from past ESTABLISHED cannot be its own but after two lost records in a
            // row (counted losses, which a comparison with the kernel's socket list follows).
            let past_established = !matches!(
                old,
                TcpState::Close
                    | TcpState::Listen
                    | TcpState::SynSent
                    | TcpState::SynRecv
                    | TcpState::Established
            );
            let other = remote != s_remote
                || (s_local.port() != 0 && local != s_local)
                || (s_local.port() == 0 && s_state == TcpState::SynSent && past_established);
            if !birth && other {
                self.stats.stale += 1;
                return;
            }
            self.fill_gap(ts, sk, old, birth);
            if !self.sockets.contains_key(&sk) {
                self.adopt_or_create(sk, old, netns, local, remote, ts);
            }
        }
        let listeners = &self.listeners;
        let Some(s) = self.sockets.get_mut(&sk) else {
            return;
        };
        // The state the table had: the event's `old` may differ after lost records.
        let prev = s.state;
        // The owner the kernel sends (the application's own context) wins; then what we
        // already knew; then, for an accepted socket, the listener's owner (the kernel sends
        // none from softirq).
        // An accepted socket is first seen at LISTEN -> SYN_RECV, or (the kernel sends that one
        // only to the event stream) at SYN_RECV -> ESTABLISHED.
        let accepted = new == TcpState::SynRecv || old == TcpState::SynRecv;
        if let Some(id) = owner_id {
            s.owner = Some(id);
        } else if s.owner.is_none() && accepted {
            s.owner = listeners.get(&(netns, local.port())).copied();
        }
        if netns != 0 {
            s.netns = netns;
        }
        // The local port is chosen after CLOSE -> SYN_SENT; keep the address up to date.
        if local.port() != 0 || s.local.port() == 0 {
            s.local = local;
        }
        if remote.port() != 0 {
            s.remote = remote;
        }
        s.state = new;
        s.since_ns = ts;
        s.listed = false;
        if accepted {
            s.inbound = true;
        }
        if prev != new && (prev == TcpState::CloseWait || new == TcpState::CloseWait) {
            let (n, l, r) = (s.netns, s.local, s.remote);
            self.close_wait_pair(n, l, r, new == TcpState::CloseWait);
        }
        let s = self.sockets.get_mut(&sk).unwrap();
        let (netns, owner, local, remote, phase, connected, inbound) = (
            s.netns,
            s.owner,
            s.local,
            s.remote,
            s.connect,
            s.connected,
            s.inbound,
        );
        // A socket added by a reconcile (or the start-up snapshot) under this address, now seen
        // with its kernel address: one socket, not two.
        if !self.existing.is_empty()
            && local.port() != 0
            && let Some(key) = self.existing.remove(&(netns, local, remote))
        {
            self.remove_socket(key);
        }

        match (old, new) {
            (TcpState::Close, TcpState::SynSent) => {
                self.sockets.get_mut(&sk).unwrap().connect = ConnectPhase::Syscall;
                self.forget_time_wait(netns, tuple_key(netns, &local, &remote));
            }
            (TcpState::SynSent, TcpState::Established) => {
                let s = self.sockets.get_mut(&sk).unwrap();
                s.connect = ConnectPhase::None;
                s.connected = true;
                self.forget_time_wait(netns, tuple_key(netns, &local, &remote));
                self.count_connect_ok(owner, netns, remote);
            }
            (_, TcpState::Established) => {
                self.sockets.get_mut(&sk).unwrap().connected = true;
            }
            (_, TcpState::Listen) => {
                if let Some(o) = owner {
                    self.listeners.insert((netns, local.port()), o);
                }
            }
            // The peer of a local orphaned FIN_WAIT2 socket sends its FIN, or an RST.
            (TcpState::CloseWait, TcpState::LastAck | TcpState::Close) => {
                self.peer_closed(ts, netns, local, remote, new == TcpState::LastAck);
            }
            (_, TcpState::CloseWait) => {
                if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
                    p.cw_entries.push_back(ts);
                }
            }
            _ => {}
        }

        if new == TcpState::Close {
            self.sockets.remove(&sk);
            match old {
                TcpState::Listen
                    if owner.is_some()
                        && self.listeners.get(&(netns, local.port())) == owner.as_ref() =>
                {
                    self.listeners.remove(&(netns, local.port()));
                }
                TcpState::SynSent if phase != ConnectPhase::None => {
                    self.closed_connects.push_back(ClosedConnect {
                        ts_ns: ts,
                        sk,
                        netns,
                        local,
                        remote,
                        owner,
                        async_: phase == ConnectPhase::Async,
                        errno: None,
                    });
                    if self.closed_connects.len() > 4096 {
                        self.closed_connects.pop_front();
                    }
                }
                _ => {}
            }
            if connected || is_connected_state(old) {
                // A local peer still in CLOSE_WAIT has not sent its FIN: the mini-socket is in
                // FIN_WAIT2, not TIME_WAIT (see time_wait.rs).
                let fin_wait2 = old == TcpState::FinWait2
                    && self
                        .close_wait_pairs
                        .contains_key(&tuple_key(netns, &remote, &local));
                let time_wait = matches!(old, TcpState::FinWait2 | TcpState::Closing) && !fin_wait2;
                if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
                    p.count_close(ts);
                    if time_wait {
                        p.time_wait_total += 1;
                    }
                }
                if time_wait {
                    self.push_time_wait(ts, netns, local, remote, owner, inbound);
                } else if fin_wait2 {
                    self.push_fin_wait2(ts, mini(netns, local, remote, owner, inbound));
                }
            }
        }
    }

    /// A transition of `sk` that does not follow from the state the table holds: the ones
    /// between never arrived (lost records; and, measured on 6.18 under heavy churn, hits of
    /// the tracepoint for which the kernel ran none of the programs, without counting them as
    /// missed: a client's FIN_WAIT1 -> FIN_WAIT2 -> CLOSE, a server's CLOSE_WAIT -> LAST_ACK).
    /// Counted in `gaps`, and what they must have done is done (no comparison with the
    /// kernel's socket list follows, unlike after counted losses: gaps come under heavy churn,
    /// where that list is hundreds of thousands of TIME_WAIT entries that change while they
    /// are read, and a comparison made counts worse, not better):
    /// * CLOSE_WAIT, then a transition from LAST_ACK: the socket sent its FIN (a local peer's
    ///   FIN_WAIT2 mini-socket becomes TIME_WAIT);
    /// * a new socket at the address (a transition from CLOSE, or an accepted socket's first):
    ///   the previous one closed unseen, the way it was going (FIN_WAIT1 through FIN_WAIT2,
    ///   CLOSE_WAIT through LAST_ACK): its close counts for its owner.
    ///
    /// A record that comes after the first one of the next socket at its address (records of
    /// different CPUs ordered by stamps taken a little after each transition) is dropped,
    /// counted in `stale`, when its addresses show it belongs to the socket before.
    /// `birth`: the transition is a new socket's first.
    fn fill_gap(&mut self, ts: u64, sk: u64, old: TcpState, birth: bool) {
        self.stats.gaps += 1;
        let Some(s) = self.sockets.get(&sk) else {
            return;
        };
        let (prev, netns, local, remote) = (s.state, s.netns, s.local, s.remote);
        if prev == TcpState::CloseWait && (old == TcpState::LastAck || birth) {
            self.close_wait_pair(netns, local, remote, false);
            self.peer_closed(ts, netns, local, remote, true);
            if let Some(s) = self.sockets.get_mut(&sk) {
                s.state = TcpState::LastAck;
            }
        }
        if birth {
            let last = match prev {
                TcpState::FinWait1 => TcpState::FinWait2,
                TcpState::CloseWait => TcpState::LastAck,
                p => p,
            };
            if let Some(s) = self.sockets.get_mut(&sk) {
                s.state = last;
                // A connect whose outcome never arrived: neither a success nor a failure, and
                // no errno is to be waited for (the next connect at this address would take
                // the wait for its own).
                s.connect = ConnectPhase::None;
            }
            self.apply_state(ts, sk, last, TcpState::Close, local, remote, None, netns);
        }
    }

    /// A transition for a socket we hold no entry for: either one from the start-up snapshot
    /// (matched by address) or one we never saw begin.
    pub(super) fn adopt_or_create(
        &mut self,
        sk: u64,
        old: TcpState,
        netns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        ts: u64,
    ) {
        // Listed in the event's namespace; or where the namespace could not be known (0); or,
        // for an event whose namespace is unknown, in ours (a reconcile lists our own).
        let other = if netns != 0 { 0 } else { self.own_netns };
        let listed = if self.existing.is_empty() {
            None
        } else {
            self.existing
                .remove(&(netns, local, remote))
                .or_else(|| self.existing.remove(&(other, local, remote)))
        };
        if let Some(key) = listed
            && let Some(mut s) = self.sockets.remove(&key)
        {
            if netns != 0 {
                s.netns = netns;
            }
            self.sockets.insert(sk, s);
            return;
        }
        // Births: a new socket (CLOSE), a connection request (LISTEN), an accepted socket
        // whose LISTEN -> SYN_RECV was not sent (SYN_RECV).
        if !matches!(old, TcpState::Close | TcpState::Listen | TcpState::SynRecv) {
            self.stats.unknown_socket_events += 1;
        }
        if self.tracked() >= self.cfg.max_sockets {
            self.evict_socket();
        }
        if old == TcpState::CloseWait {
            self.close_wait_pair(netns, local, remote, true);
        }
        self.sockets.insert(
            sk,
            Sock {
                state: old,
                since_ns: ts,
                local,
                remote,
                owner: None,
                connect: ConnectPhase::None,
                connected: is_connected_state(old),
                inbound: old == TcpState::Listen
                    || (old != TcpState::Close
                        && self.listeners.contains_key(&(netns, local.port()))),
                held: Held::default(),
                netns,
                age_estimated: false,
                listed: false,
            },
        );
    }

    /// Makes room for one socket: the oldest live TIME_WAIT entry if any, else the oldest
    /// FIN_WAIT2 one, else any socket that is not in CLOSE_WAIT (those are what the tool is
    /// for), else any socket.
    pub(super) fn evict_socket(&mut self) {
        self.stats.evicted_sockets += 1;
        if self.pop_oldest_time_wait() {
            return;
        }
        if self.pop_oldest_fin_wait2() {
            return;
        }
        let victim = self
            .sockets
            .iter()
            .find(|(_, s)| s.state != TcpState::CloseWait)
            .or_else(|| self.sockets.iter().next())
            .map(|(&k, _)| k);
        if let Some(k) = victim {
            self.remove_socket(k);
        }
    }

    /// Takes a socket out of the table, with its CLOSE_WAIT pair.
    pub(super) fn remove_socket(&mut self, key: u64) -> Option<Sock> {
        let s = self.sockets.remove(&key)?;
        if s.state == TcpState::CloseWait {
            self.close_wait_pair(s.netns, s.local, s.remote, false);
        }
        Some(s)
    }

    /// Counts a (local, remote) pair in or out of CLOSE_WAIT.
    pub(super) fn close_wait_pair(
        &mut self,
        netns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        add: bool,
    ) {
        let key = tuple_key(netns, &local, &remote);
        if add {
            *self.close_wait_pairs.entry(key).or_default() += 1;
        } else if let Some(n) = self.close_wait_pairs.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.close_wait_pairs.remove(&key);
            }
        }
    }
}
