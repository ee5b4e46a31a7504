//! Findings: which problem a process shows (a CLOSE_WAIT leak, connection churn, port
//! exhaustion) under which thresholds, and the plain-language advice for each.

use crate::state::snapshot::{HostCounts, ProcessView};

pub const CLOSE_WAIT_LEAK: &str = "close_wait_leak";
pub const CONNECTION_CHURN: &str = "connection_churn";
pub const PORT_EXHAUSTION: &str = "port_exhaustion";
pub const ACCEPT_BACKLOG: &str = "accept_backlog";
/// The thresholds findings are judged by (the daemon's `[alerts]` settings).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// CLOSE_WAIT sockets on the host above which the host rule of thumb is crossed.
    pub close_wait: u64,
    /// Share of the ephemeral port range one destination may hold before it is near exhaustion.
    pub port_share: f64,
    /// Closes per second (now, or averaged over the last minute) that count as churn.
    pub churn_per_sec: f64,
    /// TIME_WAIT sockets on the host above which the host rule of thumb is crossed.
    pub time_wait: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            close_wait: 10,
            port_share: 0.8,
            churn_per_sec: 5.0,
            time_wait: 5000,
        }
    }
}

/// The findings of one process under these thresholds.
pub fn findings(p: &ProcessView, range_size: u64, alerts: &Thresholds) -> Vec<String> {
    let mut f = Vec::new();
    if p.close_wait.leaked > 0 {
        f.push(CLOSE_WAIT_LEAK.to_string());
    }
    if p.close_wait.unaccepted > 0 {
        f.push(ACCEPT_BACKLOG.to_string());
    }
    // A fifth of the host TIME_WAIT rule of thumb in one process is churn too.
    let many_tw = p.churn.time_wait > 0 && p.churn.time_wait >= alerts.time_wait / 5;
    // Churning now, or on average over the last minute (a report often comes after the burst).
    let per_sec_1m = p.churn.closed_last_min as f64 / 60.0;
    if p.churn.closed_per_sec >= alerts.churn_per_sec
        || per_sec_1m >= alerts.churn_per_sec
        || many_tw
    {
        f.push(CONNECTION_CHURN.to_string());
    }
    // Against the destination's own namespace's range when the snapshot has it.
    let near_full = p.destinations.iter().any(|d| {
        if d.port_range != [0, 0] {
            d.port_share >= alerts.port_share
        } else {
            range_size > 0 && d.ports_in_use as f64 >= alerts.port_share * range_size as f64
        }
    });
    if p.connects.failed.contains_key("EADDRNOTAVAIL") || near_full {
        f.push(PORT_EXHAUSTION.to_string());
    }
    f
}

pub fn range_size(r: [u16; 2]) -> u64 {
    if r[1] >= r[0] && r[1] > 0 {
        (r[1] - r[0]) as u64 + 1
    } else {
        0
    }
}

/// Host rules of thumb: CLOSE_WAIT above 10, TIME_WAIT above 5000 (configurable).
pub fn host_thresholds(h: &HostCounts, alerts: &Thresholds) -> Vec<String> {
    let mut v = Vec::new();
    if h.close_wait > alerts.close_wait {
        v.push(format!(
            "close_wait {} > {}",
            h.close_wait, alerts.close_wait
        ));
    }
    if h.time_wait > alerts.time_wait {
        v.push(format!("time_wait {} > {}", h.time_wait, alerts.time_wait));
    }
    v
}
/// Plain-language explanation and advice for a finding.
pub fn advice(finding: &str) -> &'static str {
    match finding {
        CLOSE_WAIT_LEAK => {
            "CLOSE_WAIT leak: the peer closed these connections and this process never called close(). \
             Usually a socket or response stream not closed on an error or timeout path, or a pool that \
             never evicts dead connections. Close sockets on every path (try/finally, using, defer), \
             dispose HTTP response bodies, enable idle eviction in the connection pool."
        }
        CONNECTION_CHURN => {
            "Connection churn: connections are opened and closed instead of reused. Usually a new \
             HTTP client or connection per request, or keep-alive disabled. Reuse one client, use a \
             connection pool, enable keep-alive; the closer leaves TIME_WAIT sockets holding ports."
        }
        PORT_EXHAUSTION => {
            "Port exhaustion: connect() finds no free local port for this destination (EADDRNOTAVAIL), \
             or the destination holds most of ip_local_port_range. Usually churn to one destination \
             with TIME_WAIT piling up. Reuse connections (pool, keep-alive); as stopgaps widen \
             net.ipv4.ip_local_port_range or spread over more destination addresses."
        }
        ACCEPT_BACKLOG => {
            "Accept backlog: clients gave up on connections this server never accepted (they sit \
             in CLOSE_WAIT in the listen queue, held by no process). The server does not accept \
             fast enough: every worker busy or blocked on slow calls. Add workers, put timeouts on \
             slow calls; a bigger listen backlog only hides it."
        }
        _ => "",
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{ChurnView, CloseWaitView, ConnectsView, ProcDestView};

    #[test]
    fn findings_follow_the_thresholds() {
        let a = Thresholds::default();
        let mut p = ProcessView::default();
        assert!(findings(&p, 28232, &a).is_empty());
        p.close_wait = CloseWaitView {
            count: 3,
            leaked: 1,
            ..Default::default()
        };
        p.churn = ChurnView {
            closed_per_sec: 6.0,
            ..Default::default()
        };
        p.connects = ConnectsView {
            ok: 0,
            failed: [("EADDRNOTAVAIL".to_string(), 2)].into(),
        };
        assert_eq!(
            findings(&p, 28232, &a),
            vec![CLOSE_WAIT_LEAK, CONNECTION_CHURN, PORT_EXHAUSTION]
        );
        let q = ProcessView {
            destinations: vec![ProcDestView {
                remote: "10.0.0.1:443".into(),
                ports_in_use: 90,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(findings(&q, 100, &a), vec![PORT_EXHAUSTION]);
        let backlog = ProcessView {
            close_wait: CloseWaitView {
                unaccepted: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(findings(&backlog, 100, &a), vec![ACCEPT_BACKLOG]);
        assert!(!advice(ACCEPT_BACKLOG).is_empty());
    }

    #[test]
    fn host_rules_of_thumb() {
        let h = HostCounts {
            close_wait: 11,
            time_wait: 5001,
            ..Default::default()
        };
        assert_eq!(
            host_thresholds(&h, &Thresholds::default()),
            vec!["close_wait 11 > 10", "time_wait 5001 > 5000"]
        );
    }
}
