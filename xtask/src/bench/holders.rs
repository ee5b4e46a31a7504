//! Phase 5: what finding the holders of CLOSE_WAIT sockets costs. `--holder-sockets` CLOSE_WAIT
//! sockets, held by a few processes among `--holder-procs` idle ones, under the daemon: its CPU
//! over `--holder-secs` once the first lookups are done (they are then rechecked every 5 s), and
//! a check that it names every holder with its exact count.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{
    Bench, DAEMON_SOCKET, NETNS_PREFIX,
    host::{clk_tck, cpu_ticks, nofile_hard},
    netns::Netns,
    parse::{daemon_report, daemon_status, process_entry},
    procs::{Proc, check_interrupted, wait_until},
};

pub(super) struct HolderResult {
    pub(super) sockets: usize,
    pub(super) holders: usize,
    pub(super) idle_procs: usize,
    pub(super) secs: f64,
    /// The daemon's CPU over `secs`, in percent of one core.
    pub(super) cpu_pct: f64,
    /// Holders whose `close_wait.count` equals the sockets they hold.
    pub(super) exact: usize,
}

impl Bench {
    pub(super) fn holder_cost(&self) -> Result<HolderResult> {
        let ns = Netns::create(&format!("{NETNS_PREFIX}{}-h", std::process::id()))?;
        let _ = std::fs::remove_file(DAEMON_SOCKET);
        let mut daemon = Proc::spawn(
            "tcptrace daemon (holders)",
            std::process::Command::new(&self.bin).args([
                "daemon",
                "--socket",
                DAEMON_SOCKET,
                "--metrics-addr",
                "off",
            ]),
            false,
        )?;
        wait_until(
            Duration::from_secs(30),
            "the daemon's control socket",
            || std::path::Path::new(DAEMON_SOCKET).exists(),
        )?;
        let mut idle = Proc::spawn(
            "churngen idle",
            ns.exec(&self.churngen)
                .args(["idle", "--procs", &self.plan.holder_procs.to_string()]),
            true,
        )?;
        idle.line(Duration::from_secs(120))?;
        let per_proc = ((nofile_hard() as usize).saturating_sub(300) / 2).clamp(1, 9000);
        let mut left = self.plan.holder_sockets;
        let mut holders = Vec::new();
        while left > 0 {
            let n = left.min(per_proc);
            left -= n;
            holders.push((
                Proc::spawn(
                    "churngen hold --close-clients",
                    ns.exec(&self.churngen).args([
                        "hold",
                        "--pairs",
                        &n.to_string(),
                        "--close-clients",
                    ]),
                    true,
                )?,
                n,
            ));
        }
        for (h, _) in &holders {
            h.line(Duration::from_secs(120))?;
        }
        // Until the daemon names every holder with its count (the first lookups), then one
        // full recheck period, before measuring.
        let exact_count = |h: &Proc, n: usize| {
            daemon_report(&self.bin, h.pid()).and_then(|r| {
                process_entry(&r, h.pid()).and_then(|p| p["close_wait"]["count"].as_u64())
            }) == Some(n as u64)
        };
        let named = wait_until(Duration::from_secs(60), "every holder named", || {
            holders.iter().all(|(h, n)| exact_count(h, *n))
        });
        if named.is_ok() && !self.plan.smoke {
            std::thread::sleep(Duration::from_secs(6));
        }
        check_interrupted()?;
        let pid = daemon.pid();
        let t0 = Instant::now();
        let c0 = cpu_ticks(pid).unwrap_or(0);
        std::thread::sleep(Duration::from_secs_f64(self.plan.holder_secs));
        let c1 = cpu_ticks(pid).unwrap_or(0);
        let secs = t0.elapsed().as_secs_f64();
        let cpu_pct = 100.0 * (c1.saturating_sub(c0)) as f64 / clk_tck() / secs;
        let mut exact = 0;
        let mut named = 0;
        for (h, n) in &holders {
            let count = daemon_report(&self.bin, h.pid()).and_then(|r| {
                process_entry(&r, h.pid()).and_then(|p| p["close_wait"]["count"].as_u64())
            });
            if count.is_some_and(|c| c > 0) {
                named += 1;
            }
            if exact_count(h, *n) {
                exact += 1;
            } else {
                // What the kernel says the holder holds (ss, in the namespace), and what the
                // daemon knows of the process's sockets: absent, unaccepted, or another's.
                let ss = ns
                    .exec(std::path::Path::new("ss"))
                    .args(["-tanpH", "state", "close-wait"])
                    .output()
                    .map(|o| {
                        let needle = format!("pid={},", h.pid());
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .filter(|l| l.contains(&needle))
                            .count()
                    })
                    .ok();
                let entry = daemon_report(&self.bin, h.pid())
                    .and_then(|r| process_entry(&r, h.pid()).cloned());
                let unaccepted = entry
                    .as_ref()
                    .and_then(|p| p["close_wait"]["unaccepted"].as_u64());
                let status = daemon_status(&self.bin).map(|s| {
                    format!(
                        "dropped {} missed {} reconciled {}",
                        s["events_dropped"], s["events_missed"], s["reconciled"]
                    )
                });
                println!(
                    "bench: holders: pid {} holds {n} CLOSE_WAIT sockets (ss: {ss:?}), the daemon \
                     says {count:?} (unaccepted {unaccepted:?}); daemon: {status:?}",
                    h.pid()
                );
            }
        }
        println!(
            "bench: holders: {} CLOSE_WAIT sockets in {} holders among {} idle processes: daemon CPU {cpu_pct:.2}% of a core over {secs:.0} s, {exact}/{} holders exact",
            self.plan.holder_sockets,
            holders.len(),
            self.plan.holder_procs,
            holders.len()
        );
        let result = HolderResult {
            sockets: self.plan.holder_sockets,
            holders: holders.len(),
            idle_procs: self.plan.holder_procs,
            secs,
            cpu_pct,
            exact,
        };
        for (mut h, _) in holders {
            h.stop(libc::SIGTERM)?;
        }
        idle.stop(libc::SIGTERM)?;
        daemon.stop(libc::SIGTERM)?;
        drop(ns);
        // The exact counts are the holder tests' job (tests/tests/holders.rs); here they are a
        // figure of the report, like the others.
        if named == 0 {
            bail!("the daemon named none of the holders: the phase measured nothing useful");
        }
        Ok(result)
    }
}

/// The report's section for this phase.
pub(super) fn render(h: &HolderResult) -> String {
    format!(
        "\n## Holders of CLOSE_WAIT sockets\n\n\
         {} CLOSE_WAIT sockets held by {} processes, among {} idle processes, under `tcptrace \
         daemon`: the daemon used **{:.2}% of one core** over {:.0} s (target: < 5%), looking up \
         who holds every socket when it enters CLOSE_WAIT and again every 5 s; {}/{} holders \
         were named with their exact count. Lookups run once per second on the upkeep tick, \
         never per event.\n",
        h.sockets, h.holders, h.idle_procs, h.cpu_pct, h.secs, h.exact, h.holders
    )
}
