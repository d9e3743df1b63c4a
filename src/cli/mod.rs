//! The command-line front end: parses flags (`args.rs`), turns them into library options, runs
//! the library, prints results, and maps failures to exit code 2 (1 for a failed check).

pub mod args;
mod bench;
mod compare;
mod export;
mod infer;
mod quantize;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use args::{Cli, Command};

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // MPI stays initialized until this returns (under mpirun with the `mpi` feature).
    let _mpi = crate::dist::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(t) = cli.threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    let result = match cli.command {
        Command::Train(a) => train::run(*a),
        Command::Generate(a) => infer::generate(a),
        Command::Eval(a) => infer::eval(a),
        Command::Logits(a) => infer::logits(a),
        Command::Quantize(a) => quantize::quantize(a),
        Command::Merge(a) => quantize::merge(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Compare(a) => compare::run(*a),
    };
    match result {
        Ok(code) => code,
        Err(e) if crate::dist::size() > 1 => {
            // One rank's failure stops them all, instead of leaving the others waiting.
            eprintln!(
                "error on rank {} of {}: {e:#}",
                crate::dist::rank(),
                crate::dist::size()
            );
            crate::dist::abort(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The model folder, or the bundled stories260K.
fn model_dir(p: Option<PathBuf>) -> Result<PathBuf> {
    match p {
        Some(p) => Ok(p),
        None => qdora_embedded_model(),
    }
}

fn qdora_embedded_model() -> Result<PathBuf> {
    crate::embedded::stories260k()
        .context("writing the bundled stories260K model to the temp directory")
}

/// Refuses to write into a non-empty folder without --overwrite, or into the input folder.
fn check_out(out: &std::path::Path, input: &std::path::Path, overwrite: bool) -> Result<()> {
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(out) == canon(input) {
        anyhow::bail!(
            "--out {} is the input folder; choose another",
            out.display()
        );
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        && !overwrite
    {
        anyhow::bail!(
            "--out {} is not empty; pass --overwrite to replace it",
            out.display()
        );
    }
    Ok(())
}
