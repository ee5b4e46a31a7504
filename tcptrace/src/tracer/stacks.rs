//! `--stacks`: the call stack each leaked socket was opened with. Once a CLOSE_WAIT socket's
//! holders are known, its stack is looked up by (holder pid, fd) in the kernel's maps,
//! completed with the frame a walk by frame pointers skips, symbolized, and handed to the table.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    host::symbols::{self, Frame, Symbols},
    kernel::stacks::{Opened, OpenedStack, StackTables},
    state::{LeakStack, StackQuery, Table},
};

/// Sockets whose stacks are looked up per upkeep round at most.
const PER_ROUND: usize = 2000;
/// How often stacks no descriptor refers to are deleted from the kernel's map.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The upkeep thread's stack lookups: the kernel's maps and what was symbolized.
pub struct StackResolver {
    tables: StackTables,
    symbols: Symbols,
    /// (pid, addresses) -> the symbolized stack, shared by every socket opened from there.
    cache: HashMap<(u32, Vec<u64>), Arc<LeakStack>>,
    last_sweep: Instant,
}

impl StackResolver {
    pub fn new(tables: StackTables) -> Self {
        Self {
            tables,
            symbols: Symbols::default(),
            cache: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Looks up the stacks the table asks for (the table is locked only to read the list and
    /// to record the answers).
    pub fn resolve(&mut self, table: &std::sync::Mutex<Table>) {
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            self.tables.sweep();
        }
        let queries = table.lock().unwrap().stacks_to_resolve(PER_ROUND);
        if queries.is_empty() {
            return;
        }
        if self.cache.len() > 10_000 {
            self.cache.clear();
        }
        let answers: Vec<(u64, Option<Arc<LeakStack>>)> =
            queries.iter().map(|q| (q.key, self.stack_of(q))).collect();
        let mut table = table.lock().unwrap();
        for (key, stack) in answers {
            table.set_stack(key, stack);
        }
    }

    fn stack_of(&mut self, q: &StackQuery) -> Option<Arc<LeakStack>> {
        // By socket first (recorded in the opener's context, found whoever holds it now: a
        // hand-off by fork, exec or SCM_RIGHTS); its addresses are in the opener's address
        // space while the opener lives, else in a holder's (a fork shares them).
        let by_sock = self.tables.lookup_sock(q.key).map(|opened| {
            let alive = std::path::Path::new(&format!("/proc/{}", opened.pid)).exists();
            let pid = match q.holders.first() {
                Some(&(holder, _)) if !alive => holder,
                _ => opened.pid,
            };
            (pid, opened)
        });
        // Else a holder's own descriptor; then the process the kernel side named, under a
        // holder's descriptor number (a child that inherited it by fork keeps the number).
        let (pid, opened) = by_sock
            .or_else(|| {
                q.holders
                    .iter()
                    .find_map(|&(pid, fd)| Some((pid, self.tables.lookup(pid, fd)?)))
            })
            .or_else(|| {
                let hint = q.hint?;
                q.holders
                    .iter()
                    .find_map(|&(_, fd)| Some((hint, self.tables.lookup(hint, fd)?)))
            })?;
        let ips = complete(pid, &opened);
        if let Some(st) = self.cache.get(&(pid, ips.clone())) {
            return Some(st.clone());
        }
        let frames = self.symbols.frames(pid, &ips);
        let st = Arc::new(describe(pid, &opened, &frames));
        self.cache.insert((pid, ips), st.clone());
        Some(st)
    }
}

/// The walked return addresses with the skipped caller of the syscall wrapper put back.
fn complete(pid: u32, opened: &OpenedStack) -> Vec<u64> {
    let mut ips = opened.ips.clone();
    if ips.is_empty() {
        return ips;
    }
    if let Some(ra) = symbols::leaf_caller(pid, &opened.top)
        && ips.get(1) != Some(&ra)
        && ips[0] != ra
    {
        ips.insert(1, ra);
    }
    ips
}

/// The stack as the views show it, with a sentence when it looks cut short.
fn describe(pid: u32, opened: &OpenedStack, frames: &[Frame]) -> LeakStack {
    let kind = match opened.opened {
        Opened::Connect => "connect",
        Opened::Accept => "accept",
    };
    let text: Vec<String> = frames.iter().map(ToString::to_string).collect();
    let problem = if let Some(errno) = opened.error {
        Some(match errno {
            libc::EEXIST | libc::ENOENT => {
                "stack not kept: the kernel's stack map had no room for it (too many distinct \
                 stacks at once)"
                    .to_string()
            }
            _ => format!(
                "stack could not be walked (error {}): the process was probably built without \
                 frame pointers",
                crate::kernel::errno::name(errno)
            ),
        })
    } else if !frames
        .iter()
        .any(|f| f.function.as_deref().is_some_and(symbols::is_stack_root))
    {
        // The walk stopped (or went astray) before the program's entry point: the binary
        // where it did keeps no frame pointers, or names no functions.
        let binary = frames
            .iter()
            .rev()
            .map(|f| f.module.as_str())
            .find(|m| !m.is_empty() && !m.starts_with("libc.so") && !m.starts_with("ld-linux"))
            .map(str::to_string)
            .or_else(|| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            })
            .unwrap_or_else(|| format!("pid {pid}"));
        Some(format!(
            "stack incomplete: {binary} was probably built without frame pointers; rebuild it \
             with -fno-omit-frame-pointer (C, C++), RUSTFLAGS=\"-C force-frame-pointers=yes\" \
             (Rust), or have its runtime write /tmp/perf-PID.map (Java: perf-map-agent; .NET: \
             DOTNET_PerfMapEnabled=1; Python 3.12+: -X perf)"
        ))
    } else {
        None
    };
    LeakStack {
        opened: kind,
        frames: text,
        problem,
    }
}
