//! How the state transitions are hooked: a BTF tracepoint program where the kernel loads one
//! (plain guarded loads of the socket's fields), else a raw tracepoint program (helper reads),
//! else the classic tracepoint (see `probes`). `TCPTRACE_STATE_PROGRAM` picks one by hand: a
//! way around a kernel that misbehaves with one of them, and how the tests run every path on
//! one kernel.

use aya::{
    Ebpf,
    programs::{BtfTracePoint, RawTracePoint},
};

use super::probes::{BTF_STATE, RAW_STATE};

/// The environment variable that picks the state hook.
pub const STATE_HOOK_VAR: &str = "TCPTRACE_STATE_PROGRAM";

/// The environment variable that attaches every program empty: each returns at once, nothing
/// is traced. The benchmark's floor: what attaching tcptrace's programs costs, apart from their
/// work.
pub const EMPTY_PROGRAMS_VAR: &str = "TCPTRACE_EMPTY_PROGRAMS";

/// From [`EMPTY_PROGRAMS_VAR`]: `1` attaches the programs empty; unset, empty or `0` does not.
pub fn empty_programs_from_env() -> Result<bool, String> {
    match std::env::var_os(EMPTY_PROGRAMS_VAR)
        .as_deref()
        .map(|v| v.to_str())
    {
        None | Some(Some("" | "0")) => Ok(false),
        Some(Some("1")) => Ok(true),
        Some(v) => Err(format!(
            "{EMPTY_PROGRAMS_VAR}={:?} is not 0 or 1: unset it to trace (1 attaches every \
             program empty, for the benchmark's floor)",
            v.unwrap_or("(not UTF-8)")
        )),
    }
}

/// Which program reports state transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateHook {
    /// The best this kernel loads: BTF, raw, classic, in that order.
    Auto,
    Btf,
    Raw,
    Classic,
}

impl StateHook {
    /// From [`STATE_HOOK_VAR`]: unset or empty is [`StateHook::Auto`].
    pub fn from_env() -> Result<Self, String> {
        let v = std::env::var_os(STATE_HOOK_VAR).unwrap_or_default();
        match v.to_str() {
            Some("") => Ok(Self::Auto),
            Some(s) => Self::parse(s).ok_or_else(|| {
                format!(
                    "{STATE_HOOK_VAR}={:?} is not a state program: use btf, raw or classic, or \
                     unset it (the best this kernel loads)",
                    s
                )
            }),
            None => Err(format!(
                "{STATE_HOOK_VAR} is not valid UTF-8: use btf, raw or classic, or unset it"
            )),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "btf" => Some(Self::Btf),
            "raw" => Some(Self::Raw),
            "classic" => Some(Self::Classic),
            _ => None,
        }
    }
}

/// Why program `prog` did not load, on one line: a verifier's refusal comes with its whole log
/// (hundreds of lines), of which the first line and the last two (the reason, then the
/// verifier's statistics) are kept.
fn load_error(prog: &str, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let said = match lines.as_slice() {
        [] => String::new(),
        [first, .., prev, last] if lines.len() > 3 => format!("{first} ... {prev}; {last}"),
        _ => lines.join("; "),
    };
    format!("loading {prog}: {said}")
}

/// Loads program `prog` and attaches it to raw tracepoint `name`.
pub(super) fn attach_raw(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{prog}: {e}"))?;
    p.load().map_err(|e| load_error(prog, &e))?;
    if let Err(e) = p.attach(name) {
        let _ = p.unload();
        return Err(format!("attaching raw tracepoint {name}: {e}"));
    }
    Ok(())
}

/// The state program as `hook` asks: by default as a BTF tracepoint ([`BTF_STATE`]) where the
/// kernel loads it, else as a raw one ([`RAW_STATE`]). Returns the name of the one attached and,
/// when the raw one stands in for a refused BTF one, why it was refused; or why none was
/// attached (the classic tracepoint is then used).
pub(super) fn attach_state(
    ebpf: &mut Ebpf,
    name: &str,
    hook: StateHook,
    btf: Option<&aya::Btf>,
) -> Result<(&'static str, Option<String>), String> {
    let btf_error = match hook {
        StateHook::Classic => return Err(format!("{STATE_HOOK_VAR}=classic")),
        StateHook::Raw => None,
        StateHook::Auto | StateHook::Btf => match attach_btf(ebpf, BTF_STATE, name, btf) {
            Ok(()) => return Ok((BTF_STATE, None)),
            Err(e) if hook == StateHook::Btf => return Err(e),
            Err(e) => Some(e),
        },
    };
    match attach_raw(ebpf, RAW_STATE, name) {
        Ok(()) => Ok((RAW_STATE, btf_error)),
        Err(e) => Err(format!(
            "{e} (and as a BTF tracepoint: {})",
            btf_error.unwrap_or_else(|| format!("not tried ({STATE_HOOK_VAR}=raw)"))
        )),
    }
}

/// Loads program `prog` against the kernel's BTF and attaches it to tracepoint `name`.
fn attach_btf(
    ebpf: &mut Ebpf,
    prog: &str,
    name: &str,
    btf: Option<&aya::Btf>,
) -> Result<(), String> {
    let btf = btf.ok_or("the kernel's BTF could not be read")?;
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{prog}: {e}"))?;
    p.load(name, btf).map_err(|e| load_error(prog, &e))?;
    if let Err(e) = p.attach() {
        let _ = p.unload();
        return Err(format!("attaching BTF tracepoint {name}: {e}"));
    }
    Ok(())
}

/// Unloads raw tracepoint program `prog` (its links go with it) when it was `attached`.
/// Returns what to add to a message when that fails (the program then stays attached,
/// harmless but useless).
pub(super) fn detach_raw(ebpf: &mut Ebpf, prog: &str, attached: bool) -> String {
    if !attached {
        return String::new();
    }
    let p: Option<&mut RawTracePoint> = ebpf.program_mut(prog).and_then(|p| p.try_into().ok());
    match p.map(|p| p.unload()) {
        None | Some(Ok(())) => String::new(),
        Some(Err(e)) => format!(" ({prog} stays attached: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_log_is_cut_to_one_line() {
        let log = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier \
                   output: 0: R1=ctx() R10=fp0\n; 0: (bf) r6 = r1\n\n1: (85) call #158\n\
                   R1 invalid mem access 'scalar'\nprocessed 12 insns (limit 1000000)\n";
        assert_eq!(
            load_error("p", &log),
            "loading p: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
             Verifier output: 0: R1=ctx() R10=fp0 ... R1 invalid mem access 'scalar'; processed \
             12 insns (limit 1000000)"
        );
        assert_eq!(load_error("p", &"no such file"), "loading p: no such file");
        assert_eq!(load_error("p", &"a\nb"), "loading p: a; b");
    }

    #[test]
    fn state_hook_names() {
        assert_eq!(StateHook::parse("btf"), Some(StateHook::Btf));
        assert_eq!(StateHook::parse("raw"), Some(StateHook::Raw));
        assert_eq!(StateHook::parse("classic"), Some(StateHook::Classic));
        assert_eq!(StateHook::parse("kprobe"), None);
        assert_eq!(StateHook::parse("BTF"), None);
    }
}
