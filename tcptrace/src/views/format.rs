//! Small formatting helpers shared by the human-readable views.

/// HH:MM:SS.mmm (UTC) of a unix time.
pub fn clock(ts: f64) -> String {
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
