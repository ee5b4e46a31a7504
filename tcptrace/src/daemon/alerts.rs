//! Daemon alerts: one log line when a problem starts and one when it recovers, never one per
//! second. Pure: fed snapshots and the time, returns the lines to log.

use std::collections::HashMap;

use crate::{daemon::config::Alerts, state::snapshot::Snapshot};

#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub level: &'static str,
    pub msg: &'static str,
    pub fields: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct Episode {
    /// When the condition was first seen true in the current stretch.
    since: Option<f64>,
    /// An alert was logged and no recovery yet.
    active: bool,
    /// Last count seen (EADDRNOTAVAIL) and when it last grew.
    last_count: u64,
    last_growth: f64,
}

/// Process key: pid and start time.
type ProcKey = (u32, u64);

#[derive(Default)]
pub struct Alerter {
    leaks: HashMap<ProcKey, Episode>,
    addr: HashMap<ProcKey, Episode>,
    ports: HashMap<String, Episode>,
}

impl Alerter {
    pub fn evaluate(&mut self, snap: &Snapshot, now: f64, cfg: &Alerts) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut seen: Vec<ProcKey> = Vec::new();
        for p in &snap.processes {
            let key = (p.pid, p.start_time);
            seen.push(key);
            let who = || {
                vec![
                    ("pid", p.pid.to_string()),
                    ("comm", p.comm.clone()),
                    ("container", p.container.clone().unwrap_or_default()),
                ]
            };

            let e = self.leaks.entry(key).or_default();
            if p.close_wait.count > cfg.close_wait {
                let since = *e.since.get_or_insert(now);
                if !e.active && now - since >= cfg.close_wait_sustain_secs {
                    e.active = true;
                    let mut f = who();
                    f.push(("close_wait", p.close_wait.count.to_string()));
                    f.push(("leaked", p.close_wait.leaked.to_string()));
                    f.push(("oldest_secs", format!("{:.1}", p.close_wait.oldest_secs)));
                    f.push(("threshold", cfg.close_wait.to_string()));
                    out.push(Alert {
                        level: "warn",
                        msg: "CLOSE_WAIT leak: process keeps sockets its peers closed",
                        fields: f,
                    });
                }
            } else {
                e.since = None;
                if e.active {
                    e.active = false;
                    let mut f = who();
                    f.push(("close_wait", p.close_wait.count.to_string()));
                    out.push(Alert {
                        level: "info",
                        msg: "CLOSE_WAIT leak recovered",
                        fields: f,
                    });
                }
            }

            let n = p.connects.failed.get("EADDRNOTAVAIL").copied().unwrap_or(0);
            let e = self.addr.entry(key).or_default();
            if n > e.last_count {
                e.last_count = n;
                e.last_growth = now;
                if !e.active {
                    e.active = true;
                    let mut f = who();
                    f.push(("eaddrnotavail_total", n.to_string()));
                    if let Some(d) = p
                        .destinations
                        .iter()
                        .find(|d| d.connects.failed.contains_key("EADDRNOTAVAIL"))
                    {
                        f.push(("remote", d.remote.clone()));
                    }
                    out.push(Alert {
                        level: "warn",
                        msg: "EADDRNOTAVAIL: connect() found no free local port",
                        fields: f,
                    });
                }
            } else if e.active && now - e.last_growth >= cfg.quiet_secs {
                e.active = false;
                let mut f = who();
                f.push(("eaddrnotavail_total", n.to_string()));
                out.push(Alert {
                    level: "info",
                    msg: "EADDRNOTAVAIL recovered: no new failures",
                    fields: f,
                });
            }
        }
        // Processes gone from the view: close their episodes quietly (they exited).
        self.leaks.retain(|k, _| seen.contains(k));
        self.addr.retain(|k, _| seen.contains(k));

        let r = snap.ephemeral_port_range;
        let size = if r[1] >= r[0] && r[1] > 0 {
            (r[1] - r[0]) as f64 + 1.0
        } else {
            0.0
        };
        {
            for d in &snap.destinations {
                // The destination's own namespace's range when the snapshot has it.
                let (share, range) = if d.port_range != [0, 0] {
                    let r = d.port_range;
                    (d.port_share, (r[1] - r[0]) as u64 + 1)
                } else if size > 0.0 {
                    (d.ports_in_use as f64 / size, size as u64)
                } else {
                    continue;
                };
                let e = self.ports.entry(d.remote.clone()).or_default();
                let over = share >= cfg.port_share;
                if over && !e.active {
                    e.active = true;
                    out.push(Alert {
                        level: "warn",
                        msg: "destination uses most of the ephemeral port range",
                        fields: vec![
                            ("remote", d.remote.clone()),
                            ("ports_in_use", d.ports_in_use.to_string()),
                            ("range_size", range.to_string()),
                        ],
                    });
                } else if !over && e.active {
                    e.active = false;
                    out.push(Alert {
                        level: "info",
                        msg: "destination port use recovered",
                        fields: vec![
                            ("remote", d.remote.clone()),
                            ("ports_in_use", d.ports_in_use.to_string()),
                        ],
                    });
                }
            }
            let listed: Vec<&str> = snap
                .destinations
                .iter()
                .map(|d| d.remote.as_str())
                .collect();
            for (remote, e) in self.ports.iter_mut() {
                if e.active && !listed.contains(&remote.as_str()) {
                    e.active = false;
                    out.push(Alert {
                        level: "info",
                        msg: "destination port use recovered",
                        fields: vec![("remote", remote.clone()), ("ports_in_use", "0".into())],
                    });
                }
            }
            self.ports.retain(|_, e| e.active);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{CloseWaitView, ConnectsView, DestView, ProcessView};

    fn snap(cw: u64, eaddr: u64, ports: u64) -> Snapshot {
        Snapshot {
            ephemeral_port_range: [40000, 40009],
            processes: vec![ProcessView {
                pid: 7,
                comm: "app".into(),
                close_wait: CloseWaitView {
                    count: cw,
                    ..Default::default()
                },
                connects: ConnectsView {
                    ok: 0,
                    failed: if eaddr > 0 {
                        [("EADDRNOTAVAIL".to_string(), eaddr)].into()
                    } else {
                        Default::default()
                    },
                },
                ..Default::default()
            }],
            destinations: vec![DestView {
                remote: "10.0.0.1:80".into(),
                ports_in_use: ports,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn msgs(v: &[Alert]) -> Vec<&'static str> {
        v.iter().map(|a| a.msg).collect()
    }

    #[test]
    fn one_line_per_episode() {
        let cfg = Alerts {
            close_wait: 2,
            close_wait_sustain_secs: 3.0,
            port_share: 0.8,
            quiet_secs: 10.0,
            ..Default::default()
        };
        let mut a = Alerter::default();
        assert!(
            a.evaluate(&snap(5, 0, 0), 0.0, &cfg).is_empty(),
            "not sustained yet"
        );
        assert!(a.evaluate(&snap(5, 0, 0), 2.0, &cfg).is_empty());
        let v = a.evaluate(&snap(5, 1, 8), 3.0, &cfg);
        assert_eq!(
            msgs(&v),
            vec![
                "CLOSE_WAIT leak: process keeps sockets its peers closed",
                "EADDRNOTAVAIL: connect() found no free local port",
                "destination uses most of the ephemeral port range"
            ]
        );
        assert!(v[0].fields.contains(&("pid", "7".into())));
        // Still bad, still growing: nothing new.
        assert!(a.evaluate(&snap(6, 2, 9), 4.0, &cfg).is_empty());
        assert!(a.evaluate(&snap(6, 3, 9), 10.0, &cfg).is_empty());
        // Recovery: fewer CLOSE_WAIT, ports freed, no new EADDRNOTAVAIL for quiet_secs.
        let v = a.evaluate(&snap(1, 3, 2), 15.0, &cfg);
        assert_eq!(
            msgs(&v),
            vec![
                "CLOSE_WAIT leak recovered",
                "destination port use recovered"
            ]
        );
        let v = a.evaluate(&snap(1, 3, 2), 20.0, &cfg);
        assert_eq!(msgs(&v), vec!["EADDRNOTAVAIL recovered: no new failures"]);
        assert!(a.evaluate(&snap(1, 3, 2), 30.0, &cfg).is_empty());
    }
}
