//! `--smoke`: checks that every phase ran and reported something.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};

use super::{
    configs::{Config, Ready, Tracer, Workload},
    kernel_cost::KernelCost,
    leak_latency::LeakResult,
    overhead::Sample,
    startup::StartupResult,
};

/// `--smoke`: every phase ran and reported something.
pub(super) fn smoke_checks(
    configs: &[Config],
    samples: &BTreeMap<(usize, usize), Vec<Sample>>,
    costs: &[KernelCost],
    leaks: &[LeakResult],
    startup: &StartupResult,
) -> Result<()> {
    for (wi, w) in Workload::ALL.iter().enumerate() {
        for (ci, c) in configs.iter().enumerate() {
            let s = samples
                .get(&(wi, ci))
                .and_then(|v| v.first())
                .with_context(|| format!("no sample for {} / {}", w.name(), c.name))?;
            if s.connections == 0 {
                bail!("{} / {}: no connections", w.name(), c.name);
            }
            if let Tracer::Tcptrace(v) = &c.tracer {
                if s.cpu.is_none() || s.hwm_kib.is_none() {
                    bail!("{} / {}: no CPU or RSS figure", w.name(), c.name);
                }
                if v.ready == Ready::FirstJsonLine && s.dropped.is_none() {
                    bail!(
                        "{} / {}: no dropped_events in watch's JSON",
                        w.name(),
                        c.name
                    );
                }
            }
            if matches!(c.tracer, Tracer::Floor) && s.events != Some(0) {
                bail!(
                    "{} / {}: the daemon with empty programs saw {:?} events, not 0",
                    w.name(),
                    c.name,
                    s.events
                );
            }
            if matches!(c.tracer, Tracer::Bpftrace { counts: true, .. })
                && s.events.unwrap_or(0) == 0
            {
                bail!("{} / {}: bpftrace counted nothing", w.name(), c.name);
            }
        }
    }
    if costs
        .iter()
        .any(|k| k.progs.values().all(|&(runs, _)| runs == 0))
    {
        bail!("BPF statistics show no program runs");
    }
    if let Some(l) = leaks.iter().find(|l| l.latencies.is_empty()) {
        bail!("no leak latency from {}", l.via.name());
    }
    if startup.seen < startup.sockets as u64 {
        bail!(
            "start-up: watch saw {} sockets of {}",
            startup.seen,
            startup.sockets
        );
    }
    println!("bench: smoke checks passed");
    Ok(())
}
