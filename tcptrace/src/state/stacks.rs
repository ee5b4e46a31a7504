//! The call stack each leaked socket was opened with (`--stacks`). The tracer looks stacks up
//! by (holder pid, fd) once a CLOSE_WAIT socket's holders are known and hands them in through
//! [`Table::set_stack`]; the snapshot groups a process's sockets by identical stack.

use std::sync::Arc;

use serde::Serialize;

use super::table::Table;
use crate::kernel::event::TcpState;

/// A symbolized stack, shared by every socket opened from the same code path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeakStack {
    /// "connect" or "accept".
    pub opened: &'static str,
    /// Frames, innermost first: "function (file:line)", "function" or "module+0xOFFSET".
    pub frames: Vec<String>,
    /// Why the frames are incomplete or wrong, when they look so (one sentence naming the
    /// binary and the fix).
    pub problem: Option<String>,
}

/// A socket whose stack the table wants looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackQuery {
    pub key: u64,
    /// (pid, fd) of every holder; the first with a recorded stack answers.
    pub holders: Vec<(u32, u32)>,
    /// The process the kernel side named (a holder that inherited the descriptor by fork has
    /// it under the same number as the process that opened it).
    pub hint: Option<u32>,
}

/// A process's sockets grouped by the stack they were opened with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LeakStackView {
    pub stack: Vec<String>,
    pub sockets: u64,
    pub opened: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Table {
    /// CLOSE_WAIT sockets with known holders whose stack was not looked up yet (at most `max`).
    pub fn stacks_to_resolve(&self, max: usize) -> Vec<StackQuery> {
        self.sockets
            .iter()
            .filter(|(_, s)| s.state == TcpState::CloseWait)
            .filter(|(_, s)| !s.held.stack_tried && !s.held.by.is_empty())
            .take(max)
            .map(|(&key, s)| StackQuery {
                key,
                holders: s
                    .held
                    .by
                    .iter()
                    .filter_map(|(id, fd)| Some((self.procs.get(id)?.pid, *fd)))
                    .collect(),
                hint: s.owner.and_then(|id| self.procs.get(&id)).map(|p| p.pid),
            })
            .collect()
    }

    /// Records the stack socket `key` was opened with (None: none was recorded, not asked
    /// again).
    pub fn set_stack(&mut self, key: u64, stack: Option<Arc<LeakStack>>) {
        if let Some(s) = self.sockets.get_mut(&key) {
            s.held.stack_tried = true;
            s.held.stack = stack;
        }
    }
}

impl Table {
    /// The distinct reasons why stacks of the CLOSE_WAIT sockets are incomplete (a binary
    /// without frame pointers, named), at most `max`, for `tcptrace status`.
    pub fn stack_problems(&self, max: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for st in self.sockets.values().filter_map(|s| s.held.stack.as_ref()) {
            if let Some(p) = &st.problem
                && !out.contains(p)
            {
                out.push(p.clone());
                if out.len() == max {
                    break;
                }
            }
        }
        out.sort();
        out
    }
}

/// Groups sockets by stack, the most sockets first.
pub(super) fn group<'a>(stacks: impl Iterator<Item = &'a Arc<LeakStack>>) -> Vec<LeakStackView> {
    let mut groups: Vec<(&Arc<LeakStack>, u64)> = Vec::new();
    for st in stacks {
        match groups
            .iter_mut()
            .find(|(g, _)| Arc::ptr_eq(g, st) || **g == *st)
        {
            Some((_, n)) => *n += 1,
            None => groups.push((st, 1)),
        }
    }
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.frames.cmp(&b.0.frames)));
    groups
        .into_iter()
        .map(|(st, sockets)| LeakStackView {
            stack: st.frames.clone(),
            sockets,
            opened: st.opened.to_string(),
            problem: st.problem.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(frames: &[&str]) -> Arc<LeakStack> {
        Arc::new(LeakStack {
            opened: "connect",
            frames: frames.iter().map(|f| f.to_string()).collect(),
            problem: None,
        })
    }

    #[test]
    fn groups_equal_stacks_with_counts() {
        let a = st(&["leak_here", "path_a", "main"]);
        let b = st(&["leak_here", "path_b", "main"]);
        let a2 = st(&["leak_here", "path_a", "main"]);
        let all = [a.clone(), b.clone(), a2, a.clone(), b];
        let g = group(all.iter());
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].stack[1].as_str(), g[0].sockets), ("path_a", 3));
        assert_eq!((g[1].stack[1].as_str(), g[1].sockets), ("path_b", 2));
    }
}
