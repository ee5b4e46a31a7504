//! Log lines for the daemon on stderr, in logfmt (`level=warn msg="..." key=value`), which
//! journald keeps as is and log pipelines parse.

use std::fmt::Write as _;

use crate::views::format::{needs_escape, push_escaped};

/// An error and its causes on one line, "what failed: why: why", as `{:#}` shows an
/// anyhow error; for the daemon's log lines, where errors are not turned into anyhow's.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Quotes a value when it needs it. Inside quotes `"` and `\\` are escaped with a backslash,
/// newline as `\n`, and every other control or invisible formatting character as the views
/// write it (`\x1b`, `\u{9b}`): values come from other processes (command names, cgroups)
/// and must not reach a terminal that shows the log, nor split or forge a log line.
fn push_value(out: &mut String, v: &str) {
    if !v.is_empty()
        && !v.contains(|c: char| c.is_whitespace() || c == '"' || c == '=' || needs_escape(c))
    {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => push_escaped(out, c),
        }
    }
    out.push('"');
}

/// Formats one line.
pub fn line(level: &str, msg: &str, fields: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(64);
    let _ = write!(out, "level={level} msg=");
    push_value(&mut out, msg);
    for (k, v) in fields {
        out.push(' ');
        out.push_str(k);
        out.push('=');
        push_value(&mut out, v);
    }
    out
}

/// The syslog priority journald gives a line starting with `<N>` (sd-daemon(3)): so that
/// `journalctl -p warning` shows the alerts.
fn priority(level: &str) -> u8 {
    match level {
        "error" => 3,
        "warn" => 4,
        "info" => 6,
        _ => 7,
    }
}

/// Whether stderr is connected to the journal: JOURNAL_STREAM names its device and inode
/// (systemd sets it for the service; a redirected stderr no longer matches).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    static JOURNAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
            return false;
        };
        let Ok(meta) = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
        else {
            return false;
        };
        use std::os::unix::fs::MetadataExt as _;
        dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
    })
}

/// Writes one line to stderr (with its priority prefix when stderr is the journal).
pub fn log(level: &str, msg: &str, fields: &[(&str, String)]) {
    if stderr_is_journal() {
        eprintln!("<{}>{}", priority(level), line(level, msg, fields));
    } else {
        eprintln!("{}", line(level, msg, fields));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_priorities() {
        assert_eq!(
            ["error", "warn", "info", "debug"].map(priority),
            [3, 4, 6, 7]
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(
            line(
                "warn",
                "CLOSE_WAIT leak",
                &[
                    ("pid", "42".into()),
                    ("cmdline", "a \"b\"".into()),
                    ("x", "".into())
                ]
            ),
            "level=warn msg=\"CLOSE_WAIT leak\" pid=42 cmdline=\"a \\\"b\\\"\" x=\"\""
        );
    }

    #[test]
    fn controls_are_escaped() {
        let l = line(
            "warn",
            "leak",
            &[
                ("comm", "\x1b[2J\x1b]0;pwned\x07".into()),
                ("cmdline", "a\nlevel=error msg=forged\u{9b}\\".into()),
            ],
        );
        assert_eq!(
            l,
            "level=warn msg=leak comm=\"\\x1b[2J\\x1b]0;pwned\\x07\" \
             cmdline=\"a\\nlevel=error msg=forged\\u{9b}\\\\\""
        );
        assert!(!l.chars().any(char::is_control), "{l:?}");
    }
}
