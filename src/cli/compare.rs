//! `qdora compare`: trains several modes and writes a comparison.

use std::process::ExitCode;

use anyhow::Result;

use super::args::CompareArgs;

/// Runs `qdora compare`.
pub fn run(_a: CompareArgs) -> Result<ExitCode> {
    anyhow::bail!("compare is not available in this build")
}
