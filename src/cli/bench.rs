//! `qdora bench quant | layers | train`: prints figures as JSON lines (see `crate::bench`).

use std::process::ExitCode;

use anyhow::Result;

use super::args::{BenchArgs, BenchWeights, BenchWhat};
use crate::bench;

/// The preset name, the model folder, or the bundled model.
fn source(a: &BenchArgs) -> Result<String> {
    Ok(match (&a.preset, &a.model) {
        (Some(p), _) if crate::model::random::preset(p).is_none() => anyhow::bail!(
            "unknown --preset {p:?}: expected one of {} (or --model DIR)",
            crate::model::random::PRESETS.join(", ")
        ),
        (Some(p), _) => p.clone(),
        (None, Some(m)) => m.display().to_string(),
        (None, None) => super::model_dir(None)?.display().to_string(),
    })
}

/// Runs `qdora bench`.
pub fn run(a: BenchArgs) -> Result<ExitCode> {
    match a.what {
        BenchWhat::Quant => {
            for l in bench::quant(a.quick) {
                println!("{}", serde_json::to_string(&l)?);
            }
        }
        BenchWhat::Layers => {
            for l in bench::layers(a.quick, a.lora_dropout as f32, a.dora_dropout) {
                println!("{}", serde_json::to_string(&l)?);
            }
        }
        BenchWhat::Train => {
            let line = bench::train_step(&bench::TrainBenchOptions {
                source: source(&a)?,
                mode: a.mode,
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                steps: a.steps.max(1),
                gradient_checkpointing: a.gradient_checkpointing,
                lora_dropout: a.lora_dropout,
                dora_dropout: a.dora_dropout,
                compute_dtype: a.compute_dtype,
            })?;
            println!("{}", serde_json::to_string(&line)?);
        }
        BenchWhat::Generate => {
            let nf4: &[bool] = match a.weights {
                BenchWeights::Both => &[false, true],
                BenchWeights::F32 => &[false],
                BenchWeights::Nf4 => &[true],
            };
            for l in bench::generate(&source(&a)?, a.seq_len, 64, nf4, a.compute_dtype)? {
                println!("{}", serde_json::to_string(&l)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
