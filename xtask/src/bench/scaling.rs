//! Phase 6, when `--threads` lists several counts: the RST churn of the overhead phase at each
//! thread count (baseline, the floor, every tcptrace variant, the counting bpftrace, interleaved
//! over rounds), then one round per tracer with BPF statistics on for the in-kernel cost per
//! program run. The figures issue 10's targets are read from: how the state program's cost and
//! tcptrace's throughput loss change with the number of busy CPUs.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};

use super::{
    Bench,
    configs::{Config, Tracer, Workload},
    kernel_cost::KernelCost,
    numbers::median,
    overhead::Sample,
    procs::check_interrupted,
};

/// One thread count's figures.
pub(super) struct Scale {
    pub(super) threads: usize,
    /// Per configuration (in the order of [`Config::scaling`]): its rounds.
    pub(super) samples: Vec<Vec<Sample>>,
    pub(super) costs: Vec<KernelCost>,
}

impl Bench {
    pub(super) fn scaling(&mut self, configs: &[Config], counts: &[usize]) -> Result<Vec<Scale>> {
        let main_threads = self.plan.threads;
        let mut out = Vec::new();
        for &threads in counts {
            self.plan.threads = threads;
            let mut samples = vec![Vec::new(); configs.len()];
            for round in 1..=self.plan.rounds {
                for (ci, c) in configs.iter().enumerate() {
                    check_interrupted()?;
                    let s = self
                        .round_or_retry(Workload::Rst, c, None)
                        .with_context(|| format!("{threads} threads / {}", c.name))?;
                    println!(
                        "bench: scaling {threads:>3} threads round {round}/{} {:<36} {:>9.0} conn/s",
                        self.plan.rounds, c.name, s.cps
                    );
                    samples[ci].push(s);
                }
            }
            let costs = self.kernel_costs(configs)?;
            out.push(Scale {
                threads,
                samples,
                costs,
            });
        }
        self.plan.threads = main_threads;
        Ok(out)
    }
}

/// ns per run of the state program in `cost` (tcptrace's raw or classic one, bpftrace's).
fn state_ns(cost: &KernelCost) -> Option<f64> {
    cost.progs
        .iter()
        .find(|(name, _)| name.starts_with("inet_sock_set_s"))
        .filter(|(_, (runs, _))| *runs > 0)
        .map(|(_, &(runs, ns))| ns as f64 / runs as f64)
}

/// In-kernel ns per connection, all programs of `cost`.
fn kernel_ns_per_conn(cost: &KernelCost) -> Option<f64> {
    let ns: u64 = cost.progs.values().map(|&(_, ns)| ns).sum();
    (cost.connections > 0).then(|| ns as f64 / cost.connections as f64)
}

/// Fewest cores for the scaling targets' own figures (16 busy threads on as many CPUs).
const TARGET_CORES: usize = 16;

/// The lines under the table: per tcptrace configuration, its state program's ns per run at
/// each count over the figure at 2 threads (the target compares 16 with 2: <= 1.3), and, on a
/// machine with fewer than [`TARGET_CORES`] cores, why its higher counts say little about many
/// CPUs. `rows`: configuration name, then (threads, ns per run) in thread order.
fn summary(cores: usize, rows: &[(&str, Vec<(usize, f64)>)]) -> String {
    let mut r = String::new();
    for (name, figs) in rows {
        let Some(&(_, at2)) = figs.iter().find(|(t, _)| *t == 2) else {
            continue;
        };
        let ratios: Vec<String> = figs
            .iter()
            .filter(|(t, _)| *t != 2)
            .map(|(t, ns)| format!("{t} threads {:.2}", ns / at2))
            .collect();
        if !ratios.is_empty() {
            let _ = writeln!(
                r,
                "{name}: state ns / run over the figure at 2 threads: {}.",
                ratios.join(", ")
            );
        }
    }
    if cores < TARGET_CORES {
        let _ = writeln!(
            r,
            "This machine has {cores} cores: from {} threads on (T clients and T acceptors, 2T \
             busy threads) they share them, so those counts measure CPUs shared, not more CPUs; the \
             targets' figure at 16 threads needs a machine with at least {TARGET_CORES} cores \
             (`cargo xtask bench --threads 2,4,8,16` there).",
            cores / 2 + 1
        );
    }
    if !r.is_empty() {
        r.insert(0, '\n');
    }
    r
}

pub(super) fn render(
    configs: &[Config],
    scales: &[Scale],
    secs: f64,
    rounds: u32,
    cores: usize,
) -> String {
    let mut r = String::new();
    let w = &mut r;
    let _ = writeln!(
        w,
        "\n## Scaling with busy CPUs (RST close)\n\n\
         The RST churn at each thread count (T client and T acceptor threads), {secs} s per \
         configuration and round, {rounds} interleaved round(s); conn/s is the median. The floor \
         is `tcptrace daemon` with `TCPTRACE_EMPTY_PROGRAMS=1`: its programs attached as usual, \
         each returning at once (what attaching costs before any work). Loss = 1 - conn/s / \
         baseline; *loss vs bpftrace* is tcptrace's loss over the counting bpftrace's loss in the \
         same run (target <= 1.5). *state ns / run*: the state program's mean run time with BPF \
         statistics on (one more round per tracer); the target is the figure at 16 threads <= \
         1.3 x the figure at 2.\n"
    );
    let _ = writeln!(
        w,
        "| threads | configuration | conn/s | vs baseline | loss vs bpftrace | dropped | tracer CPU | state ns / run | kernel ns / connection |"
    );
    let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let counting = configs
        .iter()
        .position(|c| matches!(c.tracer, Tracer::Bpftrace { counts: true, .. }));
    for s in scales {
        let cps: Vec<f64> = s
            .samples
            .iter()
            .map(|v| median(&v.iter().map(|x| x.cps).collect::<Vec<_>>()))
            .collect();
        let base = cps.first().copied().filter(|b| *b > 0.0);
        let loss = |i: usize| base.map(|b| 1.0 - cps[i] / b);
        let count_loss = counting.and_then(loss).filter(|l| *l > 0.0);
        for (ci, c) in configs.iter().enumerate() {
            let cost = s.costs.iter().find(|k| k.config == c.name);
            let v = &s.samples[ci];
            let dropped: Option<u64> = v.iter().map(|x| x.dropped).sum();
            let cpu: Vec<f64> = v.iter().filter_map(|x| x.cpu).collect();
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.threads,
                c.name,
                cps[ci] as u64,
                base.map_or("-".into(), |b| format!("{:.1}%", 100.0 * cps[ci] / b)),
                match (&c.tracer, loss(ci), count_loss) {
                    (Tracer::Tcptrace(_), Some(l), Some(cl)) => format!("{:.2}", l / cl),
                    _ => "-".into(),
                },
                dropped.map_or("-".into(), |d| d.to_string()),
                if cpu.is_empty() {
                    "-".into()
                } else {
                    format!("{:.1}%", 100.0 * median(&cpu))
                },
                cost.and_then(state_ns)
                    .map_or("-".into(), |n| format!("{n:.0}")),
                cost.and_then(kernel_ns_per_conn)
                    .map_or("-".into(), |n| format!("{n:.0}")),
            );
        }
    }
    let rows: Vec<(&str, Vec<(usize, f64)>)> = configs
        .iter()
        .filter(|c| matches!(c.tracer, Tracer::Tcptrace(_)))
        .map(|c| {
            let figs = scales
                .iter()
                .filter_map(|s| {
                    let cost = s.costs.iter().find(|k| k.config == c.name)?;
                    Some((s.threads, state_ns(cost)?))
                })
                .collect();
            (c.name.as_str(), figs)
        })
        .collect();
    r.push_str(&summary(cores, &rows));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_gives_each_count_over_two_threads_and_says_when_cores_are_too_few() {
        let rows = [
            (
                "tcptrace daemon",
                vec![(1, 347.0), (2, 350.0), (4, 385.0), (16, 455.0)],
            ),
            // No figure at 2 threads: no ratio line.
            ("tcptrace watch", vec![(1, 343.0), (4, 404.0)]),
        ];
        let two = summary(2, &rows);
        assert_eq!(
            two,
            "\ntcptrace daemon: state ns / run over the figure at 2 threads: 1 threads 0.99, \
             4 threads 1.10, 16 threads 1.30.\n\
             This machine has 2 cores: from 2 threads on (T clients and T acceptors, 2T busy \
             threads) they share them, so those counts measure CPUs shared, not more CPUs; the \
             targets' figure at 16 threads needs a machine with at least 16 cores (`cargo xtask bench \
             --threads 2,4,8,16` there).\n"
        );
        let many = summary(16, &rows);
        assert_eq!(
            many,
            "\ntcptrace daemon: state ns / run over the figure at 2 threads: 1 threads 0.99, \
             4 threads 1.10, 16 threads 1.30.\n"
        );
        assert_eq!(summary(32, &rows[1..]), "");
    }
}
