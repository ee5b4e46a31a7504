//! Daemon configuration: a TOML file plus command-line flags (flags win).
//!
//! ```toml
//! socket = "/run/tcptrace/tcptrace.sock"   # control socket
//! socket_group = "adm"                     # optional: mode 0660 and this group, else 0600
//! metrics_addr = "127.0.0.1:9464"          # Prometheus endpoint; "off" disables it
//! leak_after_secs = 5.0
//! ring_buffer_kib = 4096
//! stacks = false                           # call stacks of leaked sockets (reloadable)
//!
//! [limits]
//! max_sockets = 1000000
//! max_processes = 20000
//! metrics_top_processes = 50
//! metrics_top_destinations = 50
//!
//! [alerts]
//! close_wait = 10            # CLOSE_WAIT sockets of one process ...
//! close_wait_sustain_secs = 30.0   # ... above this for this long: a leak alert
//! port_share = 0.8           # a destination using this share of the port range
//! quiet_secs = 60.0          # no new EADDRNOTAVAIL for this long: recovered
//! churn_per_sec = 5.0        # closes per second that count as churn in reports
//! time_wait = 5000           # host TIME_WAIT above this is reported
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::views::findings::Thresholds;

pub const DEFAULT_SOCKET: &str = "/run/tcptrace/tcptrace.sock";
/// Read by the daemon when no `--config` is given and it exists (systemd's
/// `ConfigurationDirectory=tcptrace`).
pub const DEFAULT_CONFIG: &str = "/etc/tcptrace/tcptrace.toml";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";

/// Bounds of the settings, one place for the command-line flags (`watch`, `daemon`) and this
/// file, so that a value is refused the same way wherever it is given.
pub mod bounds {
    const DAY: f64 = 86_400.0;

    /// `watch --interval`: faster redraws only burn CPU; slower than a day is not live.
    pub const INTERVAL_SECS: (f64, f64) = (0.1, DAY);
    /// `watch --duration`: at least one shortest interval, at most ten years (far below where
    /// clock arithmetic would overflow).
    pub const DURATION_SECS: (f64, f64) = (0.1, 3650.0 * DAY);
    /// `--leak-after`, `leak_after_secs`: a socket idle in CLOSE_WAIT for a day is a leak.
    pub const LEAK_AFTER_SECS: (f64, f64) = (0.0, DAY);
    /// `alerts.close_wait_sustain_secs`, `alerts.quiet_secs`.
    pub const ALERT_SECS: (f64, f64) = (0.0, DAY);
    /// `--ring-buffer-kib`, `ring_buffer_kib`: 4 KiB (one page) to 1 GiB.
    pub const RING_BUFFER_KIB: (u32, u32) = (4, 1 << 20);

    /// Checks a number of seconds; the error says what is expected.
    pub fn secs(v: f64, (min, max): (f64, f64)) -> Result<f64, String> {
        if v.is_finite() && v >= min && v <= max {
            Ok(v)
        } else {
            Err(format!("must be a number of seconds from {min} to {max}"))
        }
    }

    /// Checks a ring buffer size in KiB.
    pub fn ring_buffer_kib(v: u32) -> Result<u32, String> {
        let (min, max) = RING_BUFFER_KIB;
        if (min..=max).contains(&v) {
            Ok(v)
        } else {
            Err(format!("must be between {min} and {max} KiB"))
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_group: Option<String>,
    /// Address of the metrics endpoint, or "off".
    pub metrics_addr: String,
    pub leak_after_secs: f64,
    pub ring_buffer_kib: u32,
    /// Record the call stack each socket is opened with (about a microsecond per connect and
    /// accept); switched on and off by a reload.
    pub stacks: bool,
    pub limits: Limits,
    pub alerts: Alerts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_sockets: usize,
    pub max_processes: usize,
    pub metrics_top_processes: usize,
    pub metrics_top_destinations: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Alerts {
    pub close_wait: u64,
    pub close_wait_sustain_secs: f64,
    pub port_share: f64,
    pub quiet_secs: f64,
    pub churn_per_sec: f64,
    pub time_wait: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
            metrics_addr: DEFAULT_METRICS.into(),
            leak_after_secs: 5.0,
            ring_buffer_kib: tcptrace_common::DEFAULT_RING_BYTES / 1024,
            stacks: false,
            limits: Limits::default(),
            alerts: Alerts::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sockets: 1_000_000,
            max_processes: 20_000,
            metrics_top_processes: 50,
            metrics_top_destinations: 50,
        }
    }
}

impl Alerts {
    /// The thresholds findings and reports are judged by.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            close_wait: self.close_wait,
            port_share: self.port_share,
            churn_per_sec: self.churn_per_sec,
            time_wait: self.time_wait,
        }
    }
}

impl Default for Alerts {
    fn default() -> Self {
        Self {
            close_wait: 10,
            close_wait_sustain_secs: 30.0,
            port_share: 0.8,
            quiet_secs: 60.0,
            churn_per_sec: 5.0,
            time_wait: 5000,
        }
    }
}

/// What is wrong with a config file or value, in one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {}{}{}: {message}",
        path.display(),
        line.map(|l| format!(" line {l}")).unwrap_or_default(),
        key.as_ref().map(|k| format!(": key `{k}`")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    /// A value out of range, from the file or from a flag.
    #[error("key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
    /// A valid file with an invalid value.
    #[error("config {}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<ConfigError>,
    },
    #[error("`{0}` is not ADDR:PORT (e.g. 127.0.0.1:9464) or \"off\"")]
    MetricsAddr(String),
}

fn invalid(key: &'static str, problem: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, problem })
}

/// Turns a TOML error into one line naming the key (found from the error's position: the key
/// on that line, inside the last `[table]` header above it) and the line number.
fn toml_error(path: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let message = e.message().replace('\n', " ");
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            path: path.to_path_buf(),
            line: None,
            key: None,
            message,
        };
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[..start].rsplit('\n').next().unwrap_or("").to_string()
        + text[start..].split('\n').next().unwrap_or("");
    let section = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .map(|k| match section {
            Some(s) => format!("{s}.{k}"),
            None => k,
        });
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line: Some(line_no),
        key,
        message,
    }
}

impl Config {
    /// Parses and validates a config file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| toml_error(path, text, e))?;
        cfg.validate().map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks every value; the error names the key and what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn secs(key: &'static str, v: f64, range: (f64, f64)) -> Result<(), ConfigError> {
            match bounds::secs(v, range) {
                Ok(_) => Ok(()),
                Err(problem) => invalid(key, format!("{problem}, got {v}")),
            }
        }
        secs(
            "leak_after_secs",
            self.leak_after_secs,
            bounds::LEAK_AFTER_SECS,
        )?;
        secs(
            "alerts.close_wait_sustain_secs",
            self.alerts.close_wait_sustain_secs,
            bounds::ALERT_SECS,
        )?;
        secs(
            "alerts.quiet_secs",
            self.alerts.quiet_secs,
            bounds::ALERT_SECS,
        )?;
        if !(self.alerts.port_share > 0.0 && self.alerts.port_share <= 1.0) {
            return invalid(
                "alerts.port_share",
                format!("must be a share in (0, 1], got {}", self.alerts.port_share),
            );
        }
        if !(self.alerts.churn_per_sec.is_finite() && self.alerts.churn_per_sec > 0.0) {
            return invalid("alerts.churn_per_sec", "must be > 0".into());
        }
        if self.limits.max_sockets < 1024 {
            return invalid(
                "limits.max_sockets",
                format!("must be at least 1024, got {}", self.limits.max_sockets),
            );
        }
        if self.limits.max_processes < 16 {
            return invalid(
                "limits.max_processes",
                format!("must be at least 16, got {}", self.limits.max_processes),
            );
        }
        if self.limits.metrics_top_processes == 0 {
            return invalid("limits.metrics_top_processes", "must be at least 1".into());
        }
        if self.limits.metrics_top_destinations == 0 {
            return invalid(
                "limits.metrics_top_destinations",
                "must be at least 1".into(),
            );
        }
        if let Err(problem) = bounds::ring_buffer_kib(self.ring_buffer_kib) {
            return invalid(
                "ring_buffer_kib",
                format!("{problem}, got {}", self.ring_buffer_kib),
            );
        }
        if self.socket.as_os_str().is_empty() || !self.socket.is_absolute() {
            return invalid(
                "socket",
                format!("must be an absolute path, got {:?}", self.socket),
            );
        }
        if let Err(e) = self.metrics() {
            return invalid("metrics_addr", e.to_string());
        }
        Ok(())
    }

    /// The metrics address, None when disabled.
    pub fn metrics(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_addr == "off" {
            return Ok(None);
        }
        let addr: SocketAddr = self
            .metrics_addr
            .parse()
            .map_err(|_| ConfigError::MetricsAddr(self.metrics_addr.clone()))?;
        Ok(Some(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::logfmt::error_chain;

    #[test]
    fn report_thresholds_default_to_the_alert_defaults() {
        assert_eq!(
            Alerts::default().thresholds(),
            crate::views::findings::Thresholds::default()
        );
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("t.toml"), text).map_err(|e| error_chain(&e))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c = parse(
            "socket = \"/tmp/x.sock\"\nmetrics_addr = \"127.0.0.1:9999\"\nleak_after_secs = 2\n\
             [limits]\nmax_sockets = 5000\n[alerts]\nclose_wait = 3\n",
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(
            c.metrics().unwrap(),
            Some("127.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(c.leak_after_secs, 2.0);
        assert_eq!(c.limits.max_sockets, 5000);
        assert_eq!(c.limits.max_processes, 20_000);
        assert_eq!(c.alerts.close_wait, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("leak_after_secs = \"soon\"").unwrap_err();
        assert!(e.contains("leak_after_secs"), "{e}");
        let e = parse("[alerts]\nport_share = 3.0").unwrap_err();
        assert!(e.contains("alerts.port_share"), "{e}");
        let e = parse("metrics_addr = \"everywhere\"").unwrap_err();
        assert!(e.contains("metrics_addr"), "{e}");
        let e = parse("no_such_key = 1").unwrap_err();
        assert!(e.contains("no_such_key"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = parse("socket = \"/x\"\n[limits]\nmax_sockets = -3\n").unwrap_err();
        assert!(e.contains("line 3: key `limits.max_sockets`"), "{e}");
        let e = parse("leak_after_secs = 1e30").unwrap_err();
        assert!(
            e.contains("leak_after_secs") && e.contains("from 0 to 86400"),
            "{e}"
        );
        let e = parse("[alerts]\nquiet_secs = 1e30").unwrap_err();
        assert!(e.contains("alerts.quiet_secs"), "{e}");
        let e = parse("ring_buffer_kib = 0").unwrap_err();
        assert!(e.contains("between 4 and 1048576 KiB"), "{e}");
        let e = parse("[alerts\n").unwrap_err();
        assert!(e.starts_with("config t.toml line 1:"), "{e}");
    }
}
