//! The call stacks descriptors were opened with (`--stacks`), as the kernel side recorded them:
//! `SOCK_STACKS` (`tgid << 32 | fd` -> stack id) and `STACKS` (id -> return addresses).

use std::collections::HashSet;

use aya::{
    maps::{HashMap, MapData, StackTraceMap},
    programs::TracePoint,
};
use tcptrace_common::{STACK_ACCEPT, STACK_TOP_WORDS, SockStack};

use super::{Error, probes::Probes};

/// The programs that record the stack of accepted descriptors, attached while stacks are on
/// (connects record theirs in `sys_enter_connect`, attached with them where it has nothing else
/// to do).
const ACCEPT_PROGRAMS: [&str; 2] = ["sys_exit_accept", "sys_exit_accept4"];

impl Probes {
    /// The stack maps, once (for the thread that looks stacks up); None when loaded without
    /// room for stacks.
    pub fn take_stack_tables(&mut self) -> Option<StackTables> {
        self.stack_tables.take()
    }

    /// Whether stacks are being recorded.
    pub fn stacks(&self) -> bool {
        !self.stack_links.is_empty()
    }

    /// Starts or stops recording the stacks descriptors are opened with: attaches or detaches
    /// the accept programs and sets `STACKS_ON`. Fails when the object was loaded without room
    /// for stacks, or a program cannot be attached (then nothing is left attached).
    pub fn set_stacks(&mut self, on: bool) -> Result<(), Error> {
        if on == self.stacks() {
            return Ok(());
        }
        let Some(flag) = self.stacks_on.as_mut() else {
            return Err(Error::MapMissing { map: "STACKS_ON" });
        };
        flag.set(0, u32::from(on), 0)?;
        if !on {
            for (prog, link) in self.stack_links.drain(..) {
                if let Some(p) = self._ebpf.program_mut(prog)
                    && let Ok(p) = <&mut TracePoint>::try_from(p)
                {
                    let _ = p.detach(link);
                }
            }
            return Ok(());
        }
        let connect = self
            .connect_entry_for_stacks
            .then_some(super::probes::CONNECT_ENTRY);
        for prog in ACCEPT_PROGRAMS.into_iter().chain(connect) {
            let attached = (|| {
                let p = super::probes::tracepoint(&mut self._ebpf, prog)?;
                if p.fd().is_err() {
                    p.load().map_err(|source| Error::Refused {
                        program: prog,
                        source,
                    })?;
                }
                p.attach("syscalls", prog).map_err(|source| Error::Attach {
                    tracepoint: format!("syscalls:{prog}"),
                    source,
                })
            })();
            match attached {
                Ok(link) => self.stack_links.push((prog, link)),
                Err(e) => {
                    self.set_stacks(false)?;
                    if let Some(flag) = self.stacks_on.as_mut() {
                        flag.set(0, 0, 0)?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// How a descriptor was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opened {
    Connect,
    Accept,
}

/// The stack one descriptor was opened with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedStack {
    pub opened: Opened,
    /// The process that opened it.
    pub pid: u32,
    /// Return addresses, innermost first (empty: the walk failed, see `error`).
    pub ips: Vec<u64>,
    /// The errno the walk failed with (EFAULT: nothing readable; EEXIST: the stack map's bucket
    /// held another stack).
    pub error: Option<i32>,
    /// The user stack pointer at the syscall and the words above it (for the frame a walk by
    /// frame pointers skips; zeros: unreadable).
    pub sp: u64,
    pub top: [u64; STACK_TOP_WORDS],
}

/// The two maps, read by the upkeep thread.
pub struct StackTables {
    socks: HashMap<MapData, u64, SockStack>,
    stacks: StackTraceMap<MapData>,
    /// Stack ids no descriptor referred to at the last sweep.
    unreferenced: HashSet<u32>,
}

impl StackTables {
    pub(super) fn new(
        socks: HashMap<MapData, u64, SockStack>,
        stacks: StackTraceMap<MapData>,
    ) -> Self {
        Self {
            socks,
            stacks,
            unreferenced: HashSet::new(),
        }
    }

    /// The stack descriptor `fd` of process `pid` was opened with, if it was recorded by
    /// descriptor (and not evicted since).
    pub fn lookup(&self, pid: u32, fd: u32) -> Option<OpenedStack> {
        self.lookup_key((pid as u64) << 32 | fd as u64)
    }

    /// The stack the socket at kernel address `sk` was opened with, if it was recorded by
    /// socket (whichever process holds it now).
    pub fn lookup_sock(&self, sk: u64) -> Option<OpenedStack> {
        // Kernel addresses only: `tgid << 32 | fd` keys are far below.
        (sk >= 0xffff_0000_0000_0000).then(|| self.lookup_key(sk))?
    }

    fn lookup_key(&self, key: u64) -> Option<OpenedStack> {
        let v = self.socks.get(&key, 0).ok()?;
        let opened = if v.kind == STACK_ACCEPT {
            Opened::Accept
        } else {
            Opened::Connect
        };
        let (ips, error) = match u32::try_from(v.stack_id) {
            Ok(id) => match self.stacks.get(&id, 0) {
                Ok(t) => (t.frames().iter().map(|f| f.ip).collect(), None),
                Err(_) => (Vec::new(), Some(libc::ENOENT)),
            },
            Err(_) => (Vec::new(), Some(-(v.stack_id as i32))),
        };
        Some(OpenedStack {
            opened,
            pid: v.pid,
            ips,
            error,
            sp: v.sp,
            top: v.top,
        })
    }

    /// Deletes the stacks no descriptor has referred to for two sweeps in a row (a stack is
    /// stored a moment before the descriptor's entry that refers to it), so that the bounded
    /// map keeps room for new stacks. Returns how many were deleted.
    pub fn sweep(&mut self) -> usize {
        let referenced: HashSet<u32> = self
            .socks
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, v)| u32::try_from(v.stack_id).ok())
            .collect();
        let unreferenced: HashSet<u32> = self
            .stacks
            .stack_ids()
            .filter_map(Result::ok)
            .filter(|id| !referenced.contains(id))
            .collect();
        let mut deleted = 0;
        for id in unreferenced.intersection(&self.unreferenced) {
            if self.stacks.remove(id).is_ok() {
                deleted += 1;
            }
        }
        self.unreferenced = unreferenced;
        deleted
    }
}
