//! Why the kernel programs could not be loaded or attached, one variant per cause.
//!
//! The messages are those the user sees (`tcptrace: {error:#}`): a variant that wraps a cause
//! exposes it as its `source`, so the alternate form prints "what failed: why", and its own
//! message never repeats the cause.

use std::{io, path::PathBuf};

use aya::{EbpfError, maps::MapError, programs::ProgramError};

use crate::kernel::probes::MissingPrivilege;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither root nor CAP_BPF and CAP_PERFMON.
    #[error(transparent)]
    MissingPrivilege(#[from] MissingPrivilege),

    /// No BPF ring buffer before Linux 5.8.
    #[error("Linux {release} is too old: tcptrace needs 5.8 or later (BPF ring buffer)")]
    KernelTooOld { release: String },

    /// tracefs is not mounted and mounting it failed.
    #[error(
        "tracefs is not mounted and mounting it failed ({cause}): run `mount -t tracefs nodev /sys/kernel/tracing` as root"
    )]
    TracefsUnavailable { cause: io::Error },

    /// A tracepoint the programs need has no `format` file.
    #[error(
        "tracepoint {tracepoint} is missing ({}): this kernel is too old or lacks it",
        path.display()
    )]
    TracepointMissing {
        tracepoint: String,
        path: PathBuf,
        source: io::Error,
    },

    /// A tracepoint lacks a field the programs read.
    #[error("tracepoint {tracepoint} has no field `{field}`: unsupported kernel")]
    FieldMissing {
        tracepoint: &'static str,
        field: &'static str,
    },

    /// The number of possible CPUs could not be read.
    #[error("cannot read the possible CPUs from /sys/devices/system/cpu/possible")]
    Cpus(#[source] io::Error),

    /// A setting from the environment is not valid (the message says which and what to do).
    #[error("{0}")]
    Setting(String),

    /// The binary was built with AYA_BUILD_SKIP.
    #[error(
        "this tcptrace binary was built without its eBPF programs (AYA_BUILD_SKIP): rebuild with `cargo xtask build`"
    )]
    NotBuiltIn,

    /// The kernel refused the object (maps, BTF, relocations).
    #[error("loading the eBPF programs into the kernel failed")]
    Load(#[source] EbpfError),

    /// The object lacks a program this binary expects (a build mismatch).
    #[error("program {program} missing from the eBPF object")]
    ProgramMissing { program: &'static str },

    /// A program of the object is of another kind than expected (a build mismatch).
    #[error("program {program} is not a tracepoint")]
    NotATracepoint {
        program: &'static str,
        source: ProgramError,
    },

    /// The verifier rejected a program.
    #[error("the kernel refused program {program}")]
    Refused {
        program: &'static str,
        source: ProgramError,
    },

    /// Attaching a loaded program to its tracepoint failed.
    #[error("attaching to tracepoint {tracepoint} failed")]
    Attach {
        tracepoint: String,
        source: ProgramError,
    },

    /// The object lacks a map this binary reads (a build mismatch).
    #[error("map {map} missing")]
    MapMissing { map: &'static str },

    /// A map could not be opened from user space.
    #[error(transparent)]
    Map(#[from] MapError),
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    /// The message `main` prints (`{e:#}`) and the one-line form, for a typed error and for the
    /// anyhow context chain it replaced: they must be the same, byte for byte.
    fn same(typed: Error, old: anyhow::Error) {
        let typed = anyhow::Error::from(typed);
        assert_eq!(format!("{typed:#}"), format!("{old:#}"));
        assert_eq!(typed.to_string(), old.to_string());
    }

    fn not_found() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn messages_are_those_of_the_context_chains_they_replace() {
        same(
            MissingPrivilege(
                "needs root (or CAP_BPF) to load its eBPF programs: run it with sudo".into(),
            )
            .into(),
            anyhow::Error::new(MissingPrivilege(
                "needs root (or CAP_BPF) to load its eBPF programs: run it with sudo".into(),
            )),
        );
        same(
            Error::KernelTooOld {
                release: "5.4.0".into(),
            },
            anyhow::anyhow!(
                "Linux 5.4.0 is too old: tcptrace needs 5.8 or later (BPF ring buffer)"
            ),
        );
        same(
            Error::TracefsUnavailable {
                cause: io::Error::from_raw_os_error(libc::EPERM),
            },
            anyhow::anyhow!(
                "tracefs is not mounted and mounting it failed ({}): run `mount -t tracefs nodev /sys/kernel/tracing` as root",
                io::Error::from_raw_os_error(libc::EPERM)
            ),
        );
        let path = PathBuf::from("/t/events/sock/x/format");
        same(
            Error::TracepointMissing {
                tracepoint: "sock:x".into(),
                path: path.clone(),
                source: not_found(),
            },
            Err::<(), _>(not_found())
                .with_context(|| {
                    format!(
                        "tracepoint sock:x is missing ({}): this kernel is too old or lacks it",
                        path.display()
                    )
                })
                .unwrap_err(),
        );
        let load = || EbpfError::FileError {
            path: "/x".into(),
            error: not_found(),
        };
        same(
            Error::Load(load()),
            Err::<(), _>(load())
                .context("loading the eBPF programs into the kernel failed")
                .unwrap_err(),
        );
        same(
            Error::Attach {
                tracepoint: "sock:inet_sock_set_state".into(),
                source: ProgramError::UnexpectedProgramType,
            },
            Err::<(), _>(ProgramError::UnexpectedProgramType)
                .context("attaching to tracepoint sock:inet_sock_set_state failed")
                .unwrap_err(),
        );
        same(
            Error::Refused {
                program: "p",
                source: ProgramError::UnexpectedProgramType,
            },
            Err::<(), _>(ProgramError::UnexpectedProgramType)
                .context("the kernel refused program p")
                .unwrap_err(),
        );
        same(
            Error::NotATracepoint {
                program: "p",
                source: ProgramError::UnexpectedProgramType,
            },
            Err::<(), _>(ProgramError::UnexpectedProgramType)
                .context("program p is not a tracepoint")
                .unwrap_err(),
        );
        same(
            Error::ProgramMissing { program: "p" },
            anyhow::anyhow!("program p missing from the eBPF object"),
        );
        same(
            Error::MapMissing { map: "EVENTS" },
            anyhow::anyhow!("map EVENTS missing"),
        );
        let map = || MapError::CreateError {
            name: "EVENTS".into(),
            io_error: not_found(),
        };
        same(Error::from(map()), anyhow::Error::new(map()));
    }
}
