//! Names for the return addresses of a process's call stack: ELF symbols and DWARF of its
//! binaries (through `/proc/PID/map_files`, so binaries inside containers and deleted ones are
//! found), and perf maps (`/tmp/perf-PID.map`, written by JIT runtimes) — with blazesym, which
//! caches each binary's parsed symbols. A frame that cannot be named is `module+0xOFFSET`.
//!
//! Names come from other processes' files: untrusted bytes, kept as they are here and escaped
//! by the views.

use std::path::Path;

use blazesym::{
    Pid,
    normalize::{NormalizeOpts, Normalizer, UserMeta},
    symbolize::{Input, Symbolized, Symbolizer, source::Process, source::Source},
};

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Function name (demangled), when known.
    pub function: Option<String>,
    /// Source file and line, when the binary has DWARF.
    pub source: Option<(String, u32)>,
    /// File name of the binary the address is in ("" when in no file: anonymous memory).
    pub module: String,
    /// Offset of the address in that file.
    pub offset: u64,
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.function, &self.source) {
            (Some(func), Some((file, line))) => write!(f, "{func} ({file}:{line})"),
            (Some(func), None) => f.write_str(func),
            (None, _) if self.module.is_empty() => write!(f, "[unknown]+{:#x}", self.offset),
            (None, _) => write!(f, "{}+{:#x}", self.module, self.offset),
        }
    }
}

/// Symbolizes stacks of live processes, keeping what it parsed of each binary.
pub struct Symbols {
    symbolizer: Symbolizer,
    normalizer: Normalizer,
}

impl Default for Symbols {
    fn default() -> Self {
        Self {
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(false)
                .enable_demangling(true)
                .build(),
            normalizer: Normalizer::builder().enable_build_ids(false).build(),
        }
    }
}

impl Symbols {
    /// Names the return addresses `ips` (innermost first, as the kernel walked them) of
    /// process `pid`; the empty list when the process is gone.
    pub fn frames(&self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        if ips.is_empty() {
            return Vec::new();
        }
        // Every frame but the innermost is a return address: the call is the instruction
        // before it (which may be the last of another function).
        let lookup: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| if i == 0 { ip } else { ip.saturating_sub(1) })
            .collect();
        let src = Source::Process(Process::new(Pid::from(pid)));
        let Ok(syms) = self.symbolizer.symbolize(&src, Input::AbsAddr(&lookup)) else {
            return Vec::new();
        };
        let modules = self
            .normalizer
            .normalize_user_addrs_opts(Pid::from(pid), &lookup, &NormalizeOpts::default())
            .ok();
        syms.iter()
            .enumerate()
            .map(|(i, s)| {
                let (module, offset) = modules
                    .as_ref()
                    .and_then(|m| {
                        let (off, meta) = *m.outputs.get(i)?;
                        match m.meta.get(meta)? {
                            UserMeta::Elf(elf) => Some((file_name(&elf.path), off)),
                            _ => None,
                        }
                    })
                    .unwrap_or((String::new(), lookup[i]));
                match s {
                    Symbolized::Sym(sym) => Frame {
                        function: Some(sym.name.to_string()),
                        source: sym.code_info.as_ref().and_then(|c| {
                            Some((Path::new(&c.file).to_string_lossy().into_owned(), c.line?))
                        }),
                        module,
                        offset,
                    },
                    Symbolized::Unknown(_) => Frame {
                        function: None,
                        source: None,
                        module,
                        offset,
                    },
                }
            })
            .collect()
    }
}

/// The return address into the caller of a syscall wrapper that keeps no frame of its own
/// (glibc's `connect` and `accept`): a walk by frame pointers skips that caller, whose return
/// address is in the words at the top of the user stack (`top`, read at the syscall). It is
/// the first of them that points into an executable mapping of `pid` just after a call
/// instruction.
pub fn leaf_caller(pid: u32, top: &[u64]) -> Option<u64> {
    use std::os::unix::fs::FileExt as _;
    let maps = std::fs::read(format!("/proc/{pid}/maps")).ok()?;
    let exec: Vec<(u64, u64)> = String::from_utf8_lossy(&maps)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let perms = it.next()?;
            if !perms.contains('x') {
                return None;
            }
            let (lo, hi) = range.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .collect();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    top.iter().copied().find(|&ra| {
        ra >= 8 && exec.iter().any(|&(lo, hi)| ra - 8 >= lo && ra < hi) && {
            let mut before = [0u8; 7];
            mem.read_exact_at(&mut before, ra - 7).is_ok() && after_call(&before)
        }
    })
}

/// Whether the 7 bytes before a return address end with an x86-64 call instruction: `e8`
/// rel32, `ff /2` through a register, a register with an 8-bit displacement, or rip-relative
/// / 32-bit displacement.
fn after_call(b: &[u8; 7]) -> bool {
    let modrm_is_call = |m: u8| (m >> 3) & 7 == 2;
    b[2] == 0xe8
        || (b[5] == 0xff && modrm_is_call(b[6]) && b[6] >> 6 == 3)
        || (b[4] == 0xff && modrm_is_call(b[5]) && b[5] >> 6 == 1)
        || (b[1] == 0xff && modrm_is_call(b[2]) && matches!(b[2] >> 6, 0 | 2))
}

/// Functions a complete user stack ends in (program and thread entry points).
pub fn is_stack_root(function: &str) -> bool {
    matches!(
        function,
        "main"
            | "_start"
            | "__libc_start_main"
            | "__libc_start_call_main"
            | "start_thread"
            | "clone"
            | "clone3"
            | "__clone"
            | "__clone3"
            | "runtime.goexit"
            | "runtime.main"
    ) || function.starts_with("__libc_start_main")
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_distinctive_function_name() -> u64 {
        a_distinctive_function_name as *const () as u64
    }

    #[test]
    fn names_a_function_of_this_process() {
        let ip = a_distinctive_function_name() + 1;
        let frames = Symbols::default().frames(std::process::id(), &[ip]);
        assert_eq!(frames.len(), 1);
        let f = frames[0].function.as_deref().unwrap_or("");
        assert!(f.contains("a_distinctive_function_name"), "{frames:?}");
        assert!(!frames[0].module.is_empty(), "{frames:?}");
    }

    #[test]
    fn call_instructions_before_a_return_address() {
        // call rel32
        assert!(after_call(&[0, 0, 0xe8, 1, 2, 3, 4]));
        // call *%rax
        assert!(after_call(&[0, 0, 0, 0, 0, 0xff, 0xd0]));
        // call *0x10(%rax)
        assert!(after_call(&[0, 0, 0, 0, 0xff, 0x50, 0x10]));
        // call *0x1234(%rip)
        assert!(after_call(&[0, 0xff, 0x15, 0x34, 0x12, 0, 0]));
        // jmp *%rax, and plain data
        assert!(!after_call(&[0, 0, 0, 0, 0, 0xff, 0xe0]));
        assert!(!after_call(&[1, 2, 3, 4, 5, 6, 7]));
    }

    #[test]
    fn words_that_are_no_return_address_are_skipped() {
        // Small numbers, an unmapped address, an address on the stack (not executable).
        let local = 0u64;
        let on_stack = &raw const local as u64;
        assert_eq!(
            leaf_caller(
                std::process::id(),
                &[0x1234, 0x10, 0xdead_0000_0000, on_stack]
            ),
            None
        );
    }

    #[test]
    fn unknown_frames_show_module_and_offset() {
        let f = Frame {
            function: None,
            source: None,
            module: "libfoo.so".into(),
            offset: 0x1234,
        };
        assert_eq!(f.to_string(), "libfoo.so+0x1234");
        let f = Frame {
            function: Some("handle_upload".into()),
            source: Some(("up.c".into(), 42)),
            module: "srv".into(),
            offset: 1,
        };
        assert_eq!(f.to_string(), "handle_upload (up.c:42)");
    }
}
