//! TIME_WAIT, modelled: the kernel turns an actively closed socket into an
//! `inet_timewait_sock` that no tracepoint reports, so the table keeps its own entry for 60 s
//! after FIN_WAIT2/CLOSING -> CLOSE, ended early when the pair is reused (tcp_tw_reuse) and
//! capped at net.ipv4.tcp_max_tw_buckets like the kernel's own.

use std::net::SocketAddr;

use super::{
    processes::ProcId,
    table::{NS, Table},
};

/// TCP_TIMEWAIT_LEN: a socket stays in TIME_WAIT for 60 s (unless its port is reused first).
pub const TIME_WAIT_NS: u64 = 60 * NS;

pub(super) struct TimeWait {
    pub(super) expiry_ns: u64,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) owner: Option<ProcId>,
    pub(super) inbound: bool,
}

impl Table {
    pub(super) fn push_time_wait(
        &mut self,
        now_ns: u64,
        local: SocketAddr,
        remote: SocketAddr,
        owner: Option<ProcId>,
        inbound: bool,
    ) {
        let expiry_ns = now_ns + TIME_WAIT_NS;
        if self.time_wait.len() >= self.cfg.max_time_wait
            && let Some(tw) = self.time_wait.pop_front()
        {
            // The kernel holds at most tcp_max_tw_buckets TIME_WAIT sockets.
            self.drop_tw_index(&tw);
        }
        self.tw_index.insert(tuple_key(&local, &remote), expiry_ns);
        self.time_wait.push_back(TimeWait {
            expiry_ns,
            local,
            remote,
            owner,
            inbound,
        });
        if self.sockets.len() + self.time_wait.len() > self.cfg.max_sockets
            && let Some(tw) = self.time_wait.pop_front()
        {
            self.drop_tw_index(&tw);
            self.stats.evicted_sockets += 1;
        }
    }

    /// Whether a TIME_WAIT entry still stands (its pair was not reused by a new connection).
    pub(super) fn tw_live(&self, tw: &TimeWait) -> bool {
        self.tw_index.get(&tuple_key(&tw.local, &tw.remote)) == Some(&tw.expiry_ns)
    }

    pub(super) fn drop_tw_index(&mut self, tw: &TimeWait) {
        let key = tuple_key(&tw.local, &tw.remote);
        if self.tw_index.get(&key) == Some(&tw.expiry_ns) {
            self.tw_index.remove(&key);
        }
    }

    /// Drops the entries whose 60 s are over.
    pub(super) fn expire_time_wait(&mut self, now_ns: u64) {
        while let Some(tw) = self.time_wait.front() {
            if tw.expiry_ns > now_ns {
                break;
            }
            let tw = self.time_wait.pop_front().unwrap();
            self.drop_tw_index(&tw);
        }
    }
}

/// A 64-bit key for a (local, remote) pair.
pub(super) fn tuple_key(local: &SocketAddr, remote: &SocketAddr) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    local.hash(&mut h);
    remote.hash(&mut h);
    h.finish()
}
