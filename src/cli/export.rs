//! `qdora export`: a merged model, or a plain LoRA adapter, as GGUF for llama.cpp.

use std::process::ExitCode;

use anyhow::{Context, Result};

use super::args::ExportArgs;
use crate::adapter::{Bias, LoraConfig};
use crate::export::{export_lora, export_model, ExportOptions};
use crate::model::adapters;
use crate::ops::bf16::ComputeDtype;

/// Runs `qdora export`.
pub fn run(a: ExportArgs) -> Result<ExitCode> {
    if a.out.is_dir() {
        anyhow::bail!(
            "--out {} is a folder; give a .gguf file name",
            a.out.display()
        );
    }
    if a.out.exists() && !a.overwrite {
        anyhow::bail!(
            "--out {} exists; pass --overwrite to replace it",
            a.out.display()
        );
    }
    let dir = super::model_dir(a.model.model.clone())?;
    let name = a.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let summary =
        if a.adapter_only {
            let ad = a
                .model
                .adapter
                .as_deref()
                .context("--adapter-only needs --adapter")?;
            let cfg = LoraConfig::load(ad).with_context(|| format!("reading {}", ad.display()))?;
            if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) || cfg.bias != Bias::None
            {
                anyhow::bail!(
                "{}: the adapter also trains {} (modules_to_save / bias), which a llama.cpp LoRA \
                 adapter cannot hold; export the merged model instead (without --adapter-only)",
                ad.display(),
                if cfg.bias != Bias::None { "biases" } else { "whole modules" }
            );
            }
            let (model, _) = super::infer::load_model(&a.model, false, Some(ComputeDtype::F32))?;
            export_lora(&model, cfg.lora_alpha as f32, &a.out, a.ggml_type, &name)
                .with_context(|| format!("exporting the adapter {}", ad.display()))?
        } else {
            let (mut model, dir) =
                super::infer::load_model(&a.model, false, Some(ComputeDtype::F32))?;
            adapters::merge(&mut model);
            let tok_dir = super::infer::tokenizer_dir(&dir, a.model.adapter.as_deref());
            let opts = ExportOptions {
                ggml_type: a.ggml_type,
                name,
                tokenizer_pre: a.tokenizer_pre.clone(),
            };
            export_model(&model, &tok_dir, &a.out, &opts)
                .with_context(|| format!("exporting {} to {}", dir.display(), a.out.display()))?
        };
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "wrote {} ({} tensors, {:.1} MiB of tensor data)",
        a.out.display(),
        summary.tensors,
        summary.data_bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(ExitCode::SUCCESS)
}
