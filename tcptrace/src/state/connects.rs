//! Outbound connects and how they end: success at SYN_SENT -> ESTABLISHED, failure from the
//! connect() return value or, for non-blocking connects, from the error report that follows
//! the close. The table decides; the order of these events differs between kernels and between
//! loopback and real networks.

use std::net::SocketAddr;

use super::{
    processes::ProcId,
    sockets::ConnectPhase,
    table::{NS, Table},
};
use crate::kernel::{
    errno,
    event::{Owner, TcpState},
};

/// How long a closed non-blocking connect waits for its error report.
const ASYNC_MATCH_NS: u64 = 2 * NS;

/// A connect whose socket went SYN_SENT -> CLOSE before its outcome was known: either a
/// non-blocking connect (error report still to come) or one whose connect() has not returned
/// yet (on loopback the refusal, the close and the error report all happen inside the call,
/// before it returns -EINPROGRESS or the error).
pub(super) struct ClosedConnect {
    pub(super) ts_ns: u64,
    pub(super) sk: u64,
    pub(super) netns: u64,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) owner: Option<ProcId>,
    /// connect() returned -EINPROGRESS: the error report decides.
    pub(super) async_: bool,
    /// An error report that arrived while connect() had not returned yet.
    pub(super) errno: Option<i32>,
}

/// A connect failure the table has just counted (for the event stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailure {
    pub remote: SocketAddr,
    pub errno: i32,
    pub pid: u32,
    pub comm: String,
}

impl Table {
    pub(super) fn count_connect_ok(
        &mut self,
        owner: Option<ProcId>,
        netns: u64,
        remote: SocketAddr,
    ) {
        if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
            p.connects_ok += 1;
            p.dest(netns, remote).ok += 1;
        }
        if let Some(d) = self.host_dest(netns, remote) {
            d.ok += 1;
        }
    }

    pub(super) fn count_connect_failed(
        &mut self,
        owner: Option<ProcId>,
        netns: u64,
        remote: SocketAddr,
        errno: i32,
    ) {
        let mut who = None;
        if let Some(p) = owner.and_then(|id| self.procs.get_mut(&id)) {
            p.failed.add(errno, 1);
            p.dest(netns, remote).failed.add(errno, 1);
            who = Some((p.pid, p.meta.comm.clone()));
        }
        if self.record_failures {
            self.failures.push(ConnectFailure {
                remote,
                errno,
                pid: who.as_ref().map_or(0, |w| w.0),
                comm: who.map(|w| w.1).unwrap_or_default(),
            });
        }
        if let Some(d) = self.host_dest(netns, remote) {
            d.failed.add(errno, 1);
        }
    }

    pub(super) fn apply_connect(
        &mut self,
        ts: u64,
        sk: u64,
        remote: SocketAddr,
        ret: i32,
        owner: &Owner,
        netns: u64,
    ) {
        let errno = -ret;
        let id = self.owner_id(owner, ts);
        // A connect that failed before the socket changed state has no namespace of its own:
        // the socket's if known, else the process's.
        let netns = match netns {
            0 => self
                .sockets
                .get(&sk)
                .map(|s| s.netns)
                .filter(|&n| n != 0)
                .or_else(|| self.procs.get(&id).and_then(|p| p.netns))
                .unwrap_or(0),
            n => n,
        };
        // The socket may already be closed, with or without its error reported.
        let closed = (sk != 0)
            .then(|| {
                self.closed_connects
                    .iter()
                    .position(|c| c.sk == sk && !c.async_)
            })
            .flatten();
        if errno == errno::EINPROGRESS {
            if let Some(s) = self.sockets.get_mut(&sk) {
                s.connect = ConnectPhase::Async;
            }
            if let Some(i) = closed {
                match self.closed_connects[i].errno {
                    Some(e) => {
                        let c = self.closed_connects.remove(i).unwrap();
                        self.count_connect_failed(c.owner.or(Some(id)), c.netns, c.remote, e);
                    }
                    None => self.closed_connects[i].async_ = true,
                }
            }
            return;
        }
        if let Some(i) = closed {
            // connect() reports the outcome itself (counted below, if a failure).
            self.closed_connects.remove(i);
        }
        if errno <= 0 {
            return;
        }
        if sk == 0 && errno::is_repeat_or_not_failure(errno) {
            // A connect() that never reached SYN_SENT: either not a failure (EALREADY, EISCONN)
            // or the repeat of an asynchronous error already counted from its error report.
            return;
        }
        if let Some(s) = self.sockets.get_mut(&sk) {
            s.connect = ConnectPhase::None;
        }
        self.count_connect_failed(Some(id), netns, remote, errno);
    }

    pub(super) fn apply_error(
        &mut self,
        ts: u64,
        local: SocketAddr,
        remote: SocketAddr,
        errno: i32,
    ) {
        if errno <= 0 {
            return;
        }
        self.closed_connects
            .retain(|c| ts.saturating_sub(c.ts_ns) <= ASYNC_MATCH_NS);
        // The usual order: the socket closed (SYN_SENT -> CLOSE), then the error is reported.
        if let Some(i) = self
            .closed_connects
            .iter()
            .position(|c| c.local == local && c.remote == remote && c.errno.is_none())
        {
            if self.closed_connects[i].async_ {
                let c = self.closed_connects.remove(i).unwrap();
                self.count_connect_failed(c.owner, c.netns, c.remote, errno);
            } else {
                // connect() has not returned: its -EINPROGRESS (non-blocking) will count this;
                // a blocking connect returns the error itself.
                self.closed_connects[i].errno = Some(errno);
            }
            return;
        }
        // Older kernels report first and close after: match a non-blocking connect in flight.
        let key = self
            .sockets
            .iter()
            .filter(|(_, s)| s.state == TcpState::SynSent && s.connect == ConnectPhase::Async)
            .find(|(_, s)| s.remote == remote && (s.local.port() == 0 || s.local == local))
            .map(|(&k, _)| k);
        if let Some(k) = key {
            let s = self.sockets.get_mut(&k).unwrap();
            s.connect = ConnectPhase::None;
            let (owner, netns, remote) = (s.owner, s.netns, s.remote);
            self.count_connect_failed(owner, netns, remote, errno);
        }
    }
}
