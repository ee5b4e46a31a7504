//! Who holds each CLOSE_WAIT socket. The owner recorded by the kernel side (or inherited from a
//! listener) is a hint; the truth is the set of processes whose descriptor tables hold the socket
//! now, looked up from /proc by the tracer and handed in through [`Table::set_holders`]. A
//! CLOSE_WAIT socket counts for every process that holds it, and as leaked only once it has been
//! looked up; one that no process has accepted yet is the listener's accept backlog, not a leak.

use std::net::SocketAddr;

use super::{
    processes::ProcId,
    table::{NS, Table},
};
use crate::kernel::event::TcpState;

/// How often the holders of a socket that stays in CLOSE_WAIT are looked up again (a fork or
/// a hand-off changes them).
pub const RECHECK_NS: u64 = 5 * NS;

/// What the table knows of a socket's holders.
#[derive(Clone, Debug, Default)]
pub(super) struct Held {
    /// When the holders were last looked up; None: never (the owner is a hint).
    pub(super) checked_ns: Option<u64>,
    /// Processes holding the socket and the descriptor each holds it under.
    pub(super) by: Vec<(ProcId, u32)>,
    /// In a listener's accept queue: no process has accepted it.
    pub(super) unaccepted: bool,
    /// The socket's inode once known (it never changes; 0 until a process accepts it).
    pub(super) inode: u64,
    /// The call stack it was opened with (`--stacks`), once looked up.
    pub(super) stack: Option<std::sync::Arc<super::stacks::LeakStack>>,
    /// The stack was looked up (found or not).
    pub(super) stack_tried: bool,
}

/// A socket whose holders the table wants looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderQuery {
    /// Kernel address (or synthetic key) of the socket, to hand back in [`Table::set_holders`].
    pub key: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The process the kernel side named (live), whose process tree is searched first and
    /// whose network namespace the socket is in.
    pub hint: Option<u32>,
    /// The socket's inode, when an earlier lookup found it.
    pub inode: Option<u64>,
    /// The processes an earlier lookup found holding it (searched first, with the hint).
    pub holders: Vec<u32>,
    /// The socket's network namespace (0: unknown).
    pub netns: u64,
}

/// The answer for one [`HolderQuery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeldBy {
    /// These (pid, fd) hold the socket of this inode.
    Processes { inode: u64, by: Vec<(u32, u32)> },
    /// The kernel lists it without a file: still in its listener's accept queue.
    Unaccepted,
    /// Not found (gone, or in a namespace that could not be read): what was known stands (the
    /// hint, or the holders an earlier lookup found).
    Unknown,
}

impl Table {
    /// CLOSE_WAIT sockets whose holders were never looked up since they entered the state, or
    /// not in the current [`RECHECK_NS`] period (periods are aligned, so that the rechecks of
    /// one process's sockets come together and its descriptors are read once); at most `max`,
    /// those never looked up first.
    pub fn holders_to_resolve(&self, now_ns: u64, max: usize) -> Vec<HolderQuery> {
        let mut due: Vec<(bool, HolderQuery)> = self
            .sockets
            .iter()
            .filter(|(_, s)| s.state == TcpState::CloseWait)
            // Not a socket its application is closing right now (connection churn passes
            // through CLOSE_WAIT for microseconds): one that stayed min(leak threshold, 1 s).
            .filter(|(_, s)| now_ns.saturating_sub(s.since_ns) >= self.cfg.leak_after_ns.min(NS))
            .filter(|(_, s)| match s.held.checked_ns {
                None => true,
                Some(t) => t < s.since_ns || t / RECHECK_NS != now_ns / RECHECK_NS,
            })
            .map(|(&key, s)| {
                let hint = s
                    .owner
                    .and_then(|id| self.procs.get(&id))
                    .filter(|p| p.exited_ns.is_none())
                    .map(|p| p.pid);
                let never = s.held.checked_ns.is_none_or(|t| t < s.since_ns);
                (
                    never,
                    HolderQuery {
                        key,
                        local: s.local,
                        remote: s.remote,
                        hint,
                        inode: (s.held.inode != 0).then_some(s.held.inode),
                        holders: s
                            .held
                            .by
                            .iter()
                            .filter_map(|(id, _)| self.procs.get(id).map(|p| p.pid))
                            .collect(),
                        netns: s.netns,
                    },
                )
            })
            .collect();
        if due.len() > max {
            due.sort_by_key(|(never, q)| (!never, q.key));
            due.truncate(max);
        }
        due.into_iter().map(|(_, q)| q).collect()
    }

    /// Records who holds the socket `key` now. Holders' names are read again when they are
    /// older than [`RECHECK_NS`] (a holder that exec()s another program shows its new name).
    pub fn set_holders(&mut self, key: u64, held_by: HeldBy, now_ns: u64) {
        if !self.sockets.contains_key(&key) {
            return;
        }
        let old = &self.sockets[&key].held;
        let (stack, stack_tried) = (old.stack.clone(), old.stack_tried);
        let mut held = match held_by {
            // Not found this time: what an earlier lookup found stands.
            HeldBy::Unknown => Held {
                checked_ns: Some(now_ns),
                ..self.sockets[&key].held.clone()
            },
            HeldBy::Unaccepted => Held {
                checked_ns: Some(now_ns),
                unaccepted: true,
                ..Default::default()
            },
            HeldBy::Processes { inode, by: list } => {
                let mut by = Vec::with_capacity(list.len());
                for (pid, fd) in list {
                    let id = self.proc_for_pid(pid, None, now_ns);
                    self.refresh_meta(id, now_ns);
                    by.push((id, fd));
                }
                Held {
                    checked_ns: Some(now_ns),
                    by,
                    unaccepted: false,
                    inode,
                    ..Default::default()
                }
            }
        };
        // The stack the socket was opened with does not change with its holders.
        held.stack = stack;
        held.stack_tried = stack_tried;
        if let Some(s) = self.sockets.get_mut(&key) {
            s.held = held;
        }
    }

    /// Re-reads a live process's description when it is older than [`RECHECK_NS`].
    fn refresh_meta(&mut self, id: ProcId, now_ns: u64) {
        let Some(p) = self.procs.get(&id) else {
            return;
        };
        if p.exited_ns.is_some() || now_ns.saturating_sub(p.meta_ns) < RECHECK_NS {
            return;
        }
        let pid = p.pid;
        let meta = self.src.meta(pid);
        if let Some(p) = self.procs.get_mut(&id) {
            p.meta_ns = now_ns;
            if let Some(mut m) = meta {
                if m.comm.is_empty() {
                    m.comm = std::mem::take(&mut p.meta.comm);
                }
                p.meta = m;
            }
        }
    }
}

/// Whom a CLOSE_WAIT socket counts for in a snapshot.
pub(super) enum HeldAs<'a> {
    /// Every process holding it.
    Holders(&'a [(ProcId, u32)]),
    /// Nobody has accepted it: its listener's process, as accept backlog.
    Backlog(Option<ProcId>),
    /// Not looked up yet, or not found: the owner the kernel side named.
    Hint(Option<ProcId>),
}

impl super::sockets::Sock {
    pub(super) fn held_by(&self) -> HeldAs<'_> {
        if self.held.checked_ns.is_some() {
            if !self.held.by.is_empty() {
                return HeldAs::Holders(&self.held.by);
            }
            if self.held.unaccepted {
                return HeldAs::Backlog(self.owner);
            }
        }
        HeldAs::Hint(self.owner)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::{
        kernel::event::{Owner, OwnerSource, TcpEvent},
        state::{ProcMeta, ProcSource, SnapshotOptions, TableConfig, snapshot::Snapshot},
    };

    #[derive(Clone, Default)]
    struct Procs(Arc<Mutex<HashMap<u32, String>>>);

    impl ProcSource for Procs {
        fn start_time(&mut self, pid: u32) -> Option<u64> {
            self.0.lock().unwrap().contains_key(&pid).then_some(1)
        }
        fn meta(&mut self, pid: u32) -> Option<ProcMeta> {
            let comm = self.0.lock().unwrap().get(&pid)?.clone();
            Some(ProcMeta {
                comm,
                ..Default::default()
            })
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn owner(pid: u32) -> Owner {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"server");
        Owner {
            pid,
            cgroup: 0,
            comm,
            source: OwnerSource::Inherited,
        }
    }

    /// A listener of `parent` on :80 and `n` accepted sockets that reach CLOSE_WAIT.
    fn table_with_close_wait(procs: &Procs, parent: u32, n: u64) -> Table {
        let mut t = Table::new(
            TableConfig {
                resolve_holders: true,
                ..Default::default()
            },
            Box::new(procs.clone()),
        );
        let l = sa("127.0.0.1:80");
        let any = sa("0.0.0.0:0");
        t.apply(&TcpEvent::State {
            ts_ns: 1,
            sk: 1,
            old: TcpState::Close,
            new: TcpState::Listen,
            local: l,
            remote: any,
            owner: Some(owner(parent)),
            netns: 0,
        });
        for i in 0..n {
            let sk = 100 + i;
            let r = sa(&format!("127.0.0.1:{}", 40000 + i));
            for (old, new) in [
                (TcpState::Listen, TcpState::SynRecv),
                (TcpState::SynRecv, TcpState::Established),
                (TcpState::Established, TcpState::CloseWait),
            ] {
                t.apply(&TcpEvent::State {
                    ts_ns: 2 * NS,
                    sk,
                    old,
                    new,
                    local: l,
                    remote: r,
                    owner: None,
                    netns: 0,
                });
            }
        }
        t
    }

    fn cw(s: &Snapshot, pid: u32) -> Option<(u64, u64, u64)> {
        s.processes.iter().find(|p| p.pid == pid).map(|p| {
            (
                p.close_wait.count,
                p.close_wait.leaked,
                p.close_wait.unaccepted,
            )
        })
    }

    #[test]
    fn holders_replace_the_hint_and_leaks_wait_for_them() {
        let procs = Procs::default();
        for (pid, name) in [(10, "master"), (11, "worker"), (12, "worker")] {
            procs.0.lock().unwrap().insert(pid, name.into());
        }
        let mut t = table_with_close_wait(&procs, 10, 3);
        let now = 20 * NS;
        // Before the lookup the hint (the listener's process) has them, none leaked yet.
        let s = t.snapshot(now, &SnapshotOptions::default());
        assert_eq!(cw(&s, 10), Some((3, 0, 0)));
        let q = t.holders_to_resolve(now, 100);
        assert_eq!(q.len(), 3);
        assert!(q.iter().all(|q| q.hint == Some(10)));
        // Worker 11 holds two, worker 12 one, and both hold the third (after a fork).
        t.set_holders(
            100,
            HeldBy::Processes {
                inode: 5,
                by: vec![(11, 5)],
            },
            now,
        );
        t.set_holders(
            101,
            HeldBy::Processes {
                inode: 6,
                by: vec![(11, 6)],
            },
            now,
        );
        t.set_holders(
            102,
            HeldBy::Processes {
                inode: 7,
                by: vec![(11, 7), (12, 7)],
            },
            now,
        );
        let s = t.snapshot(now, &SnapshotOptions::default());
        assert_eq!(cw(&s, 10), None, "the parent holds none");
        assert_eq!(cw(&s, 11), Some((3, 3, 0)));
        assert_eq!(cw(&s, 12), Some((1, 1, 0)));
        assert_eq!(s.host.close_wait, 3, "each socket counted once on the host");
        let shared = s.processes.iter().find(|p| p.pid == 12).unwrap();
        let sock = &shared.close_wait.sockets.as_ref().unwrap()[0];
        assert_eq!(
            sock.holders,
            vec![
                crate::state::snapshot::HolderView { pid: 11, fd: 7 },
                crate::state::snapshot::HolderView { pid: 12, fd: 7 }
            ]
        );
        // Nothing is due again until the next RECHECK_NS period (now is 20 s: 20..25 s),
        // then all three at once, with their inodes.
        assert!(t.holders_to_resolve(now + 4 * NS, 100).is_empty());
        let again = t.holders_to_resolve(now + RECHECK_NS, 100);
        assert_eq!(again.len(), 3);
        let mut inodes: Vec<_> = again.iter().map(|q| q.inode).collect();
        inodes.sort();
        assert_eq!(inodes, vec![Some(5), Some(6), Some(7)]);
    }

    #[test]
    fn unaccepted_sockets_are_backlog_not_leaks() {
        let procs = Procs::default();
        procs.0.lock().unwrap().insert(10, "server".into());
        let mut t = table_with_close_wait(&procs, 10, 3);
        let now = 20 * NS;
        for key in 100..103 {
            t.set_holders(key, HeldBy::Unaccepted, now);
        }
        let s = t.snapshot(now, &SnapshotOptions::default());
        assert_eq!(cw(&s, 10), Some((0, 0, 3)));
        assert_eq!(s.host.close_wait, 3);
    }

    #[test]
    fn a_holder_that_execs_shows_its_new_name() {
        let procs = Procs::default();
        procs.0.lock().unwrap().insert(10, "inetd".into());
        procs.0.lock().unwrap().insert(11, "inetd".into());
        let mut t = table_with_close_wait(&procs, 10, 1);
        t.set_holders(
            100,
            HeldBy::Processes {
                inode: 9,
                by: vec![(11, 0)],
            },
            20 * NS,
        );
        procs.0.lock().unwrap().insert(11, "handler".into());
        let later = 20 * NS + RECHECK_NS;
        t.set_holders(
            100,
            HeldBy::Processes {
                inode: 9,
                by: vec![(11, 0)],
            },
            later,
        );
        let s = t.snapshot(later, &SnapshotOptions::default());
        let p = s.processes.iter().find(|p| p.pid == 11).unwrap();
        assert_eq!(p.comm, "handler");
    }
}
