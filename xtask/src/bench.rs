//! `cargo xtask bench`: tracing overhead on a connection-churn workload.

use std::path::Path;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {}

pub fn run(_bin: &Path, _args: BenchArgs) -> Result<()> {
    bail!("the benchmark is not written yet")
}
