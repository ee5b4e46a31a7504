//! TIME_WAIT and orphaned FIN_WAIT2, modelled: the kernel turns an actively closed socket into an
//! `inet_timewait_sock` that no tracepoint reports (the tracepoint shows FIN_WAIT2/CLOSING ->
//! CLOSE), so the table keeps its own entries.
//!
//! That mini-socket has a substate (`tw_substate`, what `ss` shows):
//! * TIME_WAIT when the peer's FIN had arrived (tcp_fin in FIN_WAIT2, or CLOSING acked). It lasts
//!   60 s (TCP_TIMEWAIT_LEN), ended early when the pair is reused (tcp_tw_reuse).
//! * FIN_WAIT2 when the application closed the socket and the peer had only acked our FIN
//!   (tcp_rcv_state_process FIN_WAIT1 -> FIN_WAIT2 on an orphan, or tcp_close in FIN_WAIT2 calls
//!   tcp_time_wait(sk, TCP_FIN_WAIT2, tcp_fin_timeout)). It waits net.ipv4.tcp_fin_timeout
//!   (default 60 s) for the peer's FIN; that FIN turns it into TIME_WAIT for 60 s
//!   (tcp_timewait_state_process, no tracepoint), an RST kills it.
//!
//! The tracepoint cannot tell the two apart. The table can when the peer is local: its socket is
//! the mirrored pair. FIN_WAIT2 -> CLOSE while that peer sits in CLOSE_WAIT (it has not sent its
//! FIN) is a FIN_WAIT2 mini-socket; the peer's CLOSE_WAIT -> LAST_ACK (its FIN) then makes it
//! TIME_WAIT, its CLOSE_WAIT -> CLOSE (an RST) ends it. With a peer on another host the table
//! cannot see the FIN and counts TIME_WAIT (what a peer that closes promptly gives); a
//! reconcile with the kernel's socket list ([`Table::reconcile`]) corrects it.
//! Both count against net.ipv4.tcp_max_tw_buckets in their network namespace, as the kernel's
//! own: beyond it the kernel makes no mini-socket (the socket just closes), and the table makes
//! no entry. Only live entries count (a TIME_WAIT entry whose pair was reused is dead).

use std::{collections::VecDeque, net::SocketAddr};

use rustc_hash::FxHashMap as HashMap;

use super::{
    processes::ProcId,
    table::{NS, Table},
};

/// TCP_TIMEWAIT_LEN: a socket stays in TIME_WAIT for 60 s (unless its port is reused first).
pub const TIME_WAIT_NS: u64 = 60 * NS;

/// Dead queue entries allowed beyond the live ones before a queue is compacted.
const COMPACT_SLACK: usize = 4096;

/// Orphaned FIN_WAIT2 mini-sockets: by pair, and in order of expiry (all last the same
/// tcp_fin_timeout). A queue entry whose expiry differs from the map's is dead.
#[derive(Default)]
pub(super) struct FinWait2 {
    pub(super) by_pair: HashMap<u64, TimeWait>,
    pub(super) queue: VecDeque<(u64, u64)>,
}

impl FinWait2 {
    /// Whether the queue entry (`key`, `expiry_ns`) is the pair's live entry.
    fn live(&self, key: u64, expiry_ns: u64) -> bool {
        self.by_pair.get(&key).map(|f| f.expiry_ns) == Some(expiry_ns)
    }
}

pub(super) struct TimeWait {
    pub(super) expiry_ns: u64,
    /// Network namespace of the socket (0: unknown).
    pub(super) netns: u64,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) owner: Option<ProcId>,
    pub(super) inbound: bool,
}

/// A mini-socket entry whose expiry is set when it is pushed.
pub(super) fn mini(
    netns: u64,
    local: SocketAddr,
    remote: SocketAddr,
    owner: Option<ProcId>,
    inbound: bool,
) -> TimeWait {
    TimeWait {
        expiry_ns: 0,
        netns,
        local,
        remote,
        owner,
        inbound,
    }
}

impl Table {
    pub(super) fn push_time_wait(
        &mut self,
        now_ns: u64,
        netns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        owner: Option<ProcId>,
        inbound: bool,
    ) {
        let expiry_ns = now_ns + TIME_WAIT_NS;
        let key = tuple_key(netns, &local, &remote);
        if !self.tw_index.contains_key(&key) && !self.mini_room(netns) {
            return;
        }
        if self.tw_index.insert(key, expiry_ns).is_none() {
            self.mini_in(netns);
        }
        self.time_wait.push_back(TimeWait {
            expiry_ns,
            netns,
            local,
            remote,
            owner,
            inbound,
        });
        // Entries of reused pairs stay queued until they expire: compact the queue once they
        // outnumber the live ones, or it grows with the connection rate, not the TIME_WAIT
        // count (a minute of reuse at 50,000 connections a second).
        if self.time_wait.len() > 2 * self.tw_index.len() + COMPACT_SLACK {
            let mut queue = std::mem::take(&mut self.time_wait);
            queue.retain(|tw| self.tw_live(tw));
            self.time_wait = queue;
        }
        if self.tracked() > self.cfg.max_sockets {
            self.evict_socket();
        }
    }

    /// Live entries, the cap's measure: sockets and mini-sockets (dead queue entries, whose
    /// pair was reused or whose FIN_WAIT2 ended, are not counted).
    pub(super) fn tracked(&self) -> usize {
        self.sockets.len() + self.tw_index.len() + self.fin_wait2.by_pair.len()
    }

    /// Drops the oldest live TIME_WAIT entry (and the dead ones before it); false when there is
    /// none.
    pub(super) fn pop_oldest_time_wait(&mut self) -> bool {
        while let Some(tw) = self.time_wait.pop_front() {
            if self.tw_live(&tw) {
                self.drop_tw_index(&tw);
                return true;
            }
        }
        false
    }

    /// An orphaned FIN_WAIT2 mini-socket (see the module documentation); `fw.expiry_ns` is set
    /// here.
    pub(super) fn push_fin_wait2(&mut self, now_ns: u64, mut fw: TimeWait) {
        let key = tuple_key(fw.netns, &fw.local, &fw.remote);
        fw.expiry_ns = now_ns + self.fin_timeout_ns;
        let expiry_ns = fw.expiry_ns;
        let netns = fw.netns;
        if !self.fin_wait2.by_pair.contains_key(&key) && !self.mini_room(netns) {
            return;
        }
        if self.fin_wait2.by_pair.insert(key, fw).is_none() {
            self.mini_in(netns);
        }
        self.fin_wait2.queue.push_back((key, expiry_ns));
        if self.fin_wait2.queue.len() > 2 * self.fin_wait2.by_pair.len() + COMPACT_SLACK {
            let mut queue = std::mem::take(&mut self.fin_wait2.queue);
            queue.retain(|&(k, expiry)| self.fin_wait2.live(k, expiry));
            self.fin_wait2.queue = queue;
        }
        // Over the cap, TIME_WAIT entries go first: a FIN_WAIT2 entry still waits for its
        // peer's FIN, which makes it a TIME_WAIT the process is counted for.
        if self.tracked() > self.cfg.max_sockets {
            self.evict_socket();
        }
    }

    /// Drops the oldest live FIN_WAIT2 entry; false when there is none.
    pub(super) fn pop_oldest_fin_wait2(&mut self) -> bool {
        while let Some((key, expiry)) = self.fin_wait2.queue.pop_front() {
            if self.fin_wait2.live(key, expiry) {
                self.remove_fin_wait2(key);
                return true;
            }
        }
        false
    }

    /// The local peer of an orphaned FIN_WAIT2 socket sent its FIN (CLOSE_WAIT -> LAST_ACK) or
    /// its RST (CLOSE_WAIT -> CLOSE): the mini-socket enters TIME_WAIT, or dies.
    /// `local`/`remote` are the peer's own.
    pub(super) fn peer_closed(
        &mut self,
        ts: u64,
        netns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        fin: bool,
    ) {
        if self.fin_wait2.by_pair.is_empty() {
            return;
        }
        let Some(fw) = self.remove_fin_wait2(tuple_key(netns, &remote, &local)) else {
            return;
        };
        if fin {
            if let Some(p) = fw.owner.and_then(|id| self.procs.get_mut(&id)) {
                p.time_wait_total += 1;
            }
            self.push_time_wait(ts, fw.netns, fw.local, fw.remote, fw.owner, fw.inbound);
        }
    }

    /// Whether a TIME_WAIT entry still stands (its pair was not reused by a new connection).
    pub(super) fn tw_live(&self, tw: &TimeWait) -> bool {
        self.tw_index
            .get(&tuple_key(tw.netns, &tw.local, &tw.remote))
            == Some(&tw.expiry_ns)
    }

    pub(super) fn drop_tw_index(&mut self, tw: &TimeWait) {
        let key = tuple_key(tw.netns, &tw.local, &tw.remote);
        if self.tw_index.get(&key) == Some(&tw.expiry_ns) {
            self.forget_time_wait(tw.netns, key);
        }
    }

    /// The live TIME_WAIT entry of pair `key` in `netns` ends (expired, or the pair reused).
    pub(super) fn forget_time_wait(&mut self, netns: u64, key: u64) {
        if self.tw_index.remove(&key).is_some() {
            self.mini_out(netns);
        }
    }

    /// Removes the FIN_WAIT2 entry of pair `key`.
    pub(super) fn remove_fin_wait2(&mut self, key: u64) -> Option<TimeWait> {
        let fw = self.fin_wait2.by_pair.remove(&key)?;
        self.mini_out(fw.netns);
        Some(fw)
    }

    /// Whether the kernel would make another mini-socket in `netns`.
    fn mini_room(&self, netns: u64) -> bool {
        let limit = self
            .tw_limits
            .get(&netns)
            .copied()
            .unwrap_or(self.cfg.max_time_wait);
        self.minis_by_ns.get(&netns).copied().unwrap_or(0) < limit
    }

    /// Each namespace's net.ipv4.tcp_max_tw_buckets where known (read by the upkeep from the
    /// namespaces of running processes): a namespace may allow more (or fewer) mini-sockets
    /// than the host. A namespace's limit is kept while it holds mini-sockets, even when no
    /// process is left in it to read it from (its TIME_WAIT sockets outlive them).
    pub fn set_time_wait_limits(&mut self, limits: std::collections::HashMap<u64, usize>) {
        let minis = &self.minis_by_ns;
        self.tw_limits.retain(|ns, _| minis.contains_key(ns));
        self.tw_limits.extend(limits);
    }

    fn mini_in(&mut self, netns: u64) {
        *self.minis_by_ns.entry(netns).or_default() += 1;
    }

    fn mini_out(&mut self, netns: u64) {
        if let Some(n) = self.minis_by_ns.get_mut(&netns) {
            *n -= 1;
            if *n == 0 {
                self.minis_by_ns.remove(&netns);
            }
        }
    }

    /// Drops the entries whose 60 s (TIME_WAIT) or tcp_fin_timeout (FIN_WAIT2) are over.
    pub(super) fn expire_time_wait(&mut self, now_ns: u64) {
        while let Some(&(key, expiry)) = self.fin_wait2.queue.front() {
            if expiry > now_ns {
                break;
            }
            self.fin_wait2.queue.pop_front();
            if self.fin_wait2.live(key, expiry) {
                self.remove_fin_wait2(key);
            }
        }
        while let Some(tw) = self.time_wait.front() {
            if tw.expiry_ns > now_ns {
                break;
            }
            let tw = self.time_wait.pop_front().unwrap();
            self.drop_tw_index(&tw);
        }
    }
}

/// A 64-bit key for a (local, remote) pair in a network namespace.
pub(super) fn tuple_key(netns: u64, local: &SocketAddr, remote: &SocketAddr) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    netns.hash(&mut h);
    local.hash(&mut h);
    remote.hash(&mut h);
    h.finish()
}
