//! Tracepoint field offsets, read from tracefs `format` files at start-up.

use std::{collections::HashMap, fs, path::PathBuf};

use tcptrace_common::Offsets;

use crate::kernel::Error;

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// Parses the `field:` lines of a tracefs `format` file into name -> (offset, size).
/// Array fields such as `__u8 saddr[4]` are named without their brackets.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u16>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse::<u16>().ok();
            } else if decl.is_none() && !part.is_empty() && !part.contains(':') {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), Field { offset, size });
    }
    fields
}

/// Where tracefs is mounted, mounting it at /sys/kernel/tracing when it is not.
pub fn tracefs_root() -> Result<PathBuf, Error> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let p = PathBuf::from(p);
        if p.join("events").is_dir() {
            return Ok(p);
        }
    }
    use rustix::mount::{MountFlags, mount};
    let cause = match mount(
        "nodev",
        "/sys/kernel/tracing",
        "tracefs",
        MountFlags::empty(),
        None,
    ) {
        Ok(()) if PathBuf::from("/sys/kernel/tracing/events").is_dir() => {
            return Ok(PathBuf::from("/sys/kernel/tracing"));
        }
        Ok(()) => std::io::Error::from(std::io::ErrorKind::NotFound),
        Err(e) => e.into(),
    };
    Err(Error::TracefsUnavailable { cause })
}

fn read_event(
    root: &std::path::Path,
    cat: &str,
    name: &str,
) -> Result<HashMap<String, Field>, Error> {
    let path = root.join("events").join(cat).join(name).join("format");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(parse_format(&text)),
        Err(source) => Err(Error::TracepointMissing {
            tracepoint: format!("{cat}:{name}"),
            path,
            source,
        }),
    }
}

fn get(
    fields: &HashMap<String, Field>,
    tracepoint: &'static str,
    field: &'static str,
) -> Result<Field, Error> {
    fields
        .get(field)
        .copied()
        .ok_or(Error::FieldMissing { tracepoint, field })
}

/// Builds the offsets from the format files under `root`. `sock:inet_sk_error_report` (Linux
/// 5.14) is optional: without it the second value says what is lost.
pub fn offsets_from(root: &std::path::Path) -> Result<(Offsets, Option<String>), Error> {
    let ss = read_event(root, "sock", "inet_sock_set_state")?;
    let (er, degraded) = match read_event(root, "sock", "inet_sk_error_report") {
        Ok(er) => (er, None),
        Err(_) => (
            ERROR_REPORT_FALLBACK.iter().map(|(n, o, sz)| (n.to_string(), Field { offset: *o, size: *sz })).collect(),
            Some(
                "tracepoint sock:inet_sk_error_report is missing (Linux < 5.14): failures of non-blocking connects are not counted"
                    .to_string(),
            ),
        ),
    };
    let ce = read_event(root, "syscalls", "sys_enter_connect")?;
    let cx = read_event(root, "syscalls", "sys_exit_connect")?;
    Ok((offsets_from_fields(&ss, &er, &ce, &cx)?, degraded))
}

/// Placeholder layout for a kernel without `inet_sk_error_report` (its program is not attached).
const ERROR_REPORT_FALLBACK: &[(&str, u16, u16)] = &[
    ("error", 8, 4),
    ("sport", 12, 2),
    ("dport", 14, 2),
    ("family", 16, 2),
    ("protocol", 18, 2),
    ("saddr", 20, 4),
    ("daddr", 24, 4),
    ("saddr_v6", 28, 16),
    ("daddr_v6", 44, 16),
];

/// Pure part of [`offsets_from`]: maps parsed fields to [`Offsets`].
pub fn offsets_from_fields(
    ss: &HashMap<String, Field>,
    er: &HashMap<String, Field>,
    ce: &HashMap<String, Field>,
    cx: &HashMap<String, Field>,
) -> Result<Offsets, Error> {
    let s = "sock:inet_sock_set_state";
    let e = "sock:inet_sk_error_report";
    let ss_proto = get(ss, s, "protocol")?;
    let er_proto = get(er, e, "protocol")?;
    Ok(Offsets {
        ss_skaddr: get(ss, s, "skaddr")?.offset,
        ss_oldstate: get(ss, s, "oldstate")?.offset,
        ss_newstate: get(ss, s, "newstate")?.offset,
        ss_sport: get(ss, s, "sport")?.offset,
        ss_dport: get(ss, s, "dport")?.offset,
        ss_family: get(ss, s, "family")?.offset,
        ss_protocol: ss_proto.offset,
        ss_protocol_size: ss_proto.size,
        ss_saddr: get(ss, s, "saddr")?.offset,
        ss_daddr: get(ss, s, "daddr")?.offset,
        ss_saddr_v6: get(ss, s, "saddr_v6")?.offset,
        ss_daddr_v6: get(ss, s, "daddr_v6")?.offset,
        er_error: get(er, e, "error")?.offset,
        er_sport: get(er, e, "sport")?.offset,
        er_dport: get(er, e, "dport")?.offset,
        er_family: get(er, e, "family")?.offset,
        er_protocol: er_proto.offset,
        er_protocol_size: er_proto.size,
        er_saddr: get(er, e, "saddr")?.offset,
        er_daddr: get(er, e, "daddr")?.offset,
        er_saddr_v6: get(er, e, "saddr_v6")?.offset,
        er_daddr_v6: get(er, e, "daddr_v6")?.offset,
        ce_uservaddr: get(ce, "syscalls:sys_enter_connect", "uservaddr")?.offset,
        cx_ret: get(cx, "syscalls:sys_exit_connect", "ret")?.offset,
        ce_fd: get(ce, "syscalls:sys_enter_connect", "fd")?.offset,
        // Every sys_exit_* record has the same layout (syscall number, then ret).
        ax_ret: get(cx, "syscalls:sys_exit_connect", "ret")?.offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE_5_4: &str = "name: inet_sock_set_state
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 protocol;\toffset:30;\tsize:1;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:31;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:35;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:39;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:55;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"
";

    #[test]
    fn parses_fields_with_arrays_and_pointers() {
        let f = parse_format(SET_STATE_5_4);
        assert_eq!(f["skaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            f["protocol"],
            Field {
                offset: 30,
                size: 1
            }
        );
        assert_eq!(
            f["saddr"],
            Field {
                offset: 31,
                size: 4
            }
        );
        assert_eq!(
            f["daddr_v6"],
            Field {
                offset: 55,
                size: 16
            }
        );
        assert_eq!(f["common_pid"], Field { offset: 4, size: 4 });
    }

    #[test]
    fn missing_field_names_the_tracepoint() {
        let ss = parse_format(SET_STATE_5_4);
        let empty = HashMap::new();
        let err = offsets_from_fields(&ss, &empty, &empty, &empty).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracepoint sock:inet_sk_error_report has no field `protocol`: unsupported kernel"
        );
    }
}
