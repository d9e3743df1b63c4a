//! `qdora bench`: prints benchmark figures (see `crate::bench`).

use std::process::ExitCode;

use anyhow::Result;

use super::args::BenchArgs;

/// Runs `qdora bench`.
pub fn run(a: BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("bench {} is not available in this build", a.what)
}
