//! Small formatting helpers shared by the human-readable views.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the text views show local time (`-T`) rather than UTC.
static LOCAL_TIME: AtomicBool = AtomicBool::new(false);

/// Shows local time instead of UTC in the text views from now on (set once, at start).
pub fn use_local_time(on: bool) {
    LOCAL_TIME.store(on, Ordering::Relaxed);
}

/// Seconds east of UTC of local time at unix time `ts` (0 when it cannot be known).
fn utc_offset(ts: f64) -> i64 {
    // time_t is 64 bits on every target we build (glibc x86_64, and musl since 1.2, whose
    // libc crate alias is marked deprecated for that change).
    #[allow(deprecated)]
    let t = ts as libc::time_t;
    // SAFETY: all-zero is a valid tm; localtime_r writes it and reads only `t`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the call's duration.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

/// The zone the text views' clocks are in: "UTC", or local time's offset ("+01:00").
pub fn zone(ts: f64) -> String {
    if !LOCAL_TIME.load(Ordering::Relaxed) {
        return "UTC".into();
    }
    let off = utc_offset(ts);
    let sign = if off < 0 { '-' } else { '+' };
    format!("{sign}{:02}:{:02}", off.abs() / 3600, off.abs() % 3600 / 60)
}

/// HH:MM:SS.mmm of a unix time: UTC, or local time after [`use_local_time`] (see [`zone`]).
pub fn clock(ts: f64) -> String {
    let ts = if LOCAL_TIME.load(Ordering::Relaxed) {
        ts + utc_offset(ts) as f64
    } else {
        ts
    };
    let ms = (ts * 1000.0) as u64;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}
pub fn fmt_age(secs: f64) -> String {
    if secs <= 0.0 {
        "-".into()
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{:.1}m", secs / 60.0)
    } else if secs < 86400.0 {
        format!("{:.1}h", secs / 3600.0)
    } else {
        format!("{:.1}d", secs / 86400.0)
    }
}

/// Records lost by CPU, for a line that already gives the total: "" when none, else
/// " (CPU 3: 1204, CPU 0: 88)", the CPUs that lost most first, at most 8 and how many more.
pub fn cpu_drops(by_cpu: &[(u32, u64)]) -> String {
    if by_cpu.is_empty() {
        return String::new();
    }
    let mut most: Vec<(u32, u64)> = by_cpu.to_vec();
    most.sort_by_key(|&(cpu, n)| (std::cmp::Reverse(n), cpu));
    let mut parts: Vec<String> = most
        .iter()
        .take(8)
        .map(|(cpu, n)| format!("CPU {cpu}: {n}"))
        .collect();
    if most.len() > 8 {
        parts.push(format!("{} more CPUs", most.len() - 8));
    }
    format!(" ({})", parts.join(", "))
}

/// Text from other processes (command names and lines, cgroup and container names) made safe
/// for a terminal: every C0 control, DEL, C1 control and Unicode bidirectional or invisible
/// formatting character is written as an escape (`\x1b`, `\x7f`, `\u{9b}`, `\u{202e}`) and
/// a backslash as `\\`, so that no name can move the cursor, clear the screen, retitle the
/// terminal or reorder what is shown, and an escaped name cannot pass for another one. Text
/// without such characters is returned as it is.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    std::borrow::Cow::Owned(out)
}

/// Whether [`escape`] rewrites `c`.
pub fn needs_escape(c: char) -> bool {
    c == '\\' || is_unsafe(c)
}

/// Characters a terminal or a text viewer may act on rather than show.
fn is_unsafe(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c,
            '\u{200B}'..='\u{200F}' // zero-width spaces and joiners, LRM, RLM
            | '\u{2028}'..='\u{202E}' // line and paragraph separators, bidi embeddings
            | '\u{2060}'..='\u{2069}' // word joiner, invisible operators, bidi isolates
            | '\u{FEFF}') // zero-width no-break space
}

/// Appends `c` as [`escape`] writes it.
pub fn push_escaped(out: &mut String, c: char) {
    use std::fmt::Write as _;
    match c {
        '\\' => out.push_str("\\\\"),
        c if (c as u32) < 0x80 && is_unsafe(c) => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if is_unsafe(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// [`escape`]d `s` cut to at most `max` characters, for fixed-width columns; an escape is
/// kept whole or left out, never cut.
pub fn escape_cut(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut unit = String::new();
    let mut len = 0;
    for c in s.chars() {
        unit.clear();
        push_escaped(&mut unit, c);
        len += unit.chars().count();
        if len > max {
            break;
        }
        out.push_str(&unit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_control() {
        assert_eq!(escape("nginx: worker"), "nginx: worker");
        assert!(matches!(escape("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            escape("\x1b[2J\x1b]0;pwned\x07"),
            "\\x1b[2J\\x1b]0;pwned\\x07"
        );
        assert_eq!(
            escape("a\tb\nc\rd\0e\x7f"),
            "a\\x09b\\x0ac\\x0dd\\x00e\\x7f"
        );
        // C1 controls (CSI U+009B, OSC U+009D) and bidi overrides.
        assert_eq!(escape("x\u{9b}2J\u{9d}y"), "x\\u{9b}2J\\u{9d}y");
        assert_eq!(escape("ab\u{202e}cd"), "ab\\u{202e}cd");
        // A literal backslash is doubled, so a name spelled `\x1b` stays distinguishable.
        assert_eq!(escape("\\x1b"), "\\\\x1b");
        // Non-ASCII letters and the replacement character of a lossy decode are kept.
        assert_eq!(escape("ééé\u{FFFD}"), "ééé\u{FFFD}");
        for c in (0u32..0x110000).filter_map(char::from_u32) {
            let e = escape(&c.to_string()).into_owned();
            assert!(
                !e.chars().any(|x| x.is_control()),
                "U+{:04X} escaped to {e:?}",
                c as u32
            );
        }
        assert_eq!(escape_cut("\x1b[2Jabcdefghijkl", 10), "\\x1b[2Jabc");
        assert_eq!(escape_cut("ab\x1b[2J", 5), "ab");
        assert_eq!(escape_cut("ééé", 2), "éé");
    }

    #[test]
    fn drops_by_cpu_read_most_first_and_stop_at_eight() {
        assert_eq!(cpu_drops(&[]), "");
        assert_eq!(cpu_drops(&[(0, 2), (3, 9)]), " (CPU 3: 9, CPU 0: 2)");
        let many: Vec<(u32, u64)> = (0..10).map(|c| (c, 100 - u64::from(c))).collect();
        assert_eq!(
            cpu_drops(&many),
            " (CPU 0: 100, CPU 1: 99, CPU 2: 98, CPU 3: 97, CPU 4: 96, CPU 5: 95, CPU 6: 94, \
             CPU 7: 93, 2 more CPUs)"
        );
    }
}
