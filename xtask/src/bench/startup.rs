//! Phase 4: start-up time and peak RSS with many existing sockets.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{
    Bench, NETNS_PREFIX,
    host::{nofile_hard, vm_hwm_kib},
    netns::Netns,
    numbers::median,
    parse::parse_json,
    procs::{Proc, check_interrupted},
};

pub(super) struct StartupResult {
    pub(super) sockets: usize,
    /// Sockets in the first JSON object's host totals.
    pub(super) seen: u64,
    pub(super) empty_secs: f64,
    pub(super) empty_hwm_kib: u64,
    pub(super) full_secs: f64,
    pub(super) full_hwm_kib: u64,
    /// How long making the sockets took.
    pub(super) make_secs: f64,
}

impl Bench {
    /// Phase 4: time to the first JSON line and peak RSS, in an empty namespace and in one
    /// holding `sockets` sockets. tcptrace reads existing sockets of its own namespace only, so
    /// it runs in there too.
    pub(super) fn startup(&self) -> Result<StartupResult> {
        let ns = Netns::create(&format!("{NETNS_PREFIX}{}-s", std::process::id()))?;
        let runs = if self.plan.smoke { 1 } else { 3 };
        let measure = |label: &str| -> Result<(f64, u64, u64)> {
            let mut secs = Vec::new();
            let mut hwm = Vec::new();
            let mut seen = 0;
            for _ in 0..runs {
                check_interrupted()?;
                let t0 = Instant::now();
                let mut p = Proc::spawn(
                    label,
                    ns.exec(&self.bin)
                        .args(["watch", "--json", "--interval", "1"]),
                    true,
                )?;
                let first = p.line(Duration::from_secs(60))?;
                secs.push(t0.elapsed().as_secs_f64());
                seen = parse_json(&first.text)?["host"]["total"]
                    .as_u64()
                    .unwrap_or(0);
                // One more interval, so that the first upkeep tick is in the peak too.
                p.line(Duration::from_secs(10))?;
                hwm.push(vm_hwm_kib(p.pid()).unwrap_or(0) as f64);
                p.stop(libc::SIGTERM)?;
            }
            Ok((median(&secs), median(&hwm) as u64, seen))
        };
        let (empty_secs, empty_hwm_kib, _) = measure("tcptrace watch (empty netns)")?;

        // One holder per ~9,000 pairs: a process may not have more descriptors than its hard
        // RLIMIT_NOFILE, which we cannot raise without CAP_SYS_RESOURCE.
        let pairs = self.plan.sockets.div_ceil(2);
        let per_proc = ((nofile_hard() as usize).saturating_sub(300) / 2).clamp(1, 9000);
        let t0 = Instant::now();
        let mut holders = Vec::new();
        let mut left = pairs;
        while left > 0 {
            let n = left.min(per_proc);
            left -= n;
            holders.push(Proc::spawn(
                "churngen hold",
                ns.exec(&self.churngen)
                    .args(["hold", "--pairs", &n.to_string()]),
                true,
            )?);
        }
        for h in &holders {
            h.line(Duration::from_secs(120))?; // "ready ..."
        }
        let make_secs = t0.elapsed().as_secs_f64();
        println!(
            "bench: start-up: {} sockets made in {make_secs:.1} s by {} processes",
            2 * pairs,
            holders.len()
        );
        let (full_secs, full_hwm_kib, seen) = measure("tcptrace watch (many sockets)")?;
        for mut h in holders {
            h.stop(libc::SIGTERM)?;
        }
        Ok(StartupResult {
            sockets: 2 * pairs,
            seen,
            empty_secs,
            empty_hwm_kib,
            full_secs,
            full_hwm_kib,
            make_secs,
        })
    }
}
