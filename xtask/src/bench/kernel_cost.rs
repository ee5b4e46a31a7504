//! Phase 2: in-kernel cost per program, from BPF run-time statistics.

use anyhow::Result;

use super::{
    Bench,
    bpf_stats::{BpfStats, ProgStats, prog_stats},
    configs::{Config, Tracer, Workload},
    host::{clk_tck, cpu_ticks},
    procs::check_interrupted,
};

pub(super) struct KernelCost {
    pub(super) config: String,
    pub(super) connections: u64,
    /// Per program: runs and ns over the round.
    pub(super) progs: ProgStats,
    /// Tracer process CPU seconds over the round.
    pub(super) user_cpu_secs: f64,
}

impl Bench {
    /// Phase 2: per-program run counts and run time with BPF statistics on (they cost a little
    /// themselves, so this is a round of its own, RST workload).
    pub(super) fn kernel_costs(&self, configs: &[Config]) -> Result<Vec<KernelCost>> {
        let _stats = BpfStats::enable()?;
        let mut out = Vec::new();
        for c in configs.iter().filter(|c| !matches!(c.tracer, Tracer::None)) {
            check_interrupted()?;
            let mut t = self.start_tracer(&c.tracer)?.expect("a tracer");
            let pid = t.pid();
            let before = prog_stats(pid)?;
            let cpu0 = cpu_ticks(pid);
            let churn = self.churn(Workload::Rst, None, self.plan.secs.min(2.0))?;
            let cpu1 = cpu_ticks(pid);
            let after = prog_stats(pid)?;
            t.stop(libc::SIGINT)?;
            let progs = after
                .iter()
                .map(|(name, &(runs, ns))| {
                    let (r0, n0) = before.get(name).copied().unwrap_or((0, 0));
                    (
                        name.clone(),
                        (runs.saturating_sub(r0), ns.saturating_sub(n0)),
                    )
                })
                .collect();
            println!(
                "bench: kernel cost  {:<30} {:>9.0} conn/s (with BPF statistics on)",
                c.name, churn.cps
            );
            out.push(KernelCost {
                config: c.name.clone(),
                connections: churn.connections,
                progs,
                user_cpu_secs: cpu1
                    .zip(cpu0)
                    .map_or(0.0, |(b, a)| (b - a) as f64 / clk_tck()),
            });
        }
        Ok(out)
    }
}
