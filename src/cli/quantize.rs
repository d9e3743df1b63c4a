//! `qdora quantize` and `qdora merge`: checkpoint conversions, written into a staged folder and
//! renamed into place.

use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{MergeArgs, QuantizeArgs};
use crate::io::{Checkpoint, StagedDir};
use crate::model::load::{save, SaveAs};
use crate::model::{adapters, LlamaConfig, Proj};
use crate::quant::{bnb_io, QuantizeOptions};

const COPY_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

fn copy_side_files(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    for f in COPY_FILES {
        let p = src.join(f);
        if p.exists() {
            std::fs::copy(&p, dst.join(f)).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    Ok(())
}

/// Runs `qdora quantize`.
pub fn quantize(a: QuantizeArgs) -> Result<ExitCode> {
    super::check_out(&a.out, &a.model, a.overwrite)?;
    let opts = QuantizeOptions {
        quant_type: a.quant_type,
        blocksize: a.blocksize,
        double_quant: !a.no_double_quant,
    };
    crate::quant::blockwise::check_blocksize(a.blocksize)?;
    let compute = a.compute_dtype;
    let config = LlamaConfig::load(&a.model)
        .with_context(|| format!("reading {}/config.json", a.model.display()))?;
    if config.raw.get("quantization_config").is_some() {
        anyhow::bail!("{}: the model is already quantized", a.model.display());
    }
    let skip: Vec<String> = a
        .skip_modules
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let src =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let staged = StagedDir::new(&a.out)?;
    let bar = ProgressBar::new(src.keys().count() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // transformers quantizes every nn.Linear except the output layer (and tied/skipped modules).
    let is_linear = |k: &str, shape: &[usize]| {
        shape.len() == 2
            && k.starts_with("model.layers.")
            && k.ends_with("_proj.weight")
            && !skip.iter().any(|s| {
                k.trim_end_matches(".weight") == s
                    || k.trim_end_matches(".weight").ends_with(&format!(".{s}"))
            })
    };
    bnb_io::quantize_checkpoint(
        &src,
        &staged.path.join("model.safetensors"),
        opts,
        &is_linear,
        &mut |done, _, name| {
            bar.set_position(done as u64);
            bar.set_message(name.to_string());
        },
    )?;
    bar.finish_and_clear();
    let mut raw = config.raw.clone();
    if let Some(o) = raw.as_object_mut() {
        o.insert(
            "quantization_config".into(),
            bnb_io::quantization_config(
                &opts,
                compute,
                (!skip.is_empty()).then_some(skip.as_slice()),
            ),
        );
    }
    crate::io::write_text(
        &staged.path.join("config.json"),
        &serde_json::to_string_pretty(&raw)?,
    )?;
    copy_side_files(&a.model, &staged.path)?;
    let out = staged.commit()?;
    println!(
        "wrote {} ({} {}, blocksize {}, double quant {})",
        out.display(),
        opts.quant_type.as_str(),
        compute.as_str(),
        opts.blocksize,
        opts.double_quant
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `qdora merge`.
pub fn merge(a: MergeArgs) -> Result<ExitCode> {
    super::check_out(&a.out, &a.model, a.overwrite)?;
    // The base as the adapter was trained against: an adapter trained by qdora in a 4-bit mode
    // is merged into the same NF4 base, dequantized (PEFT's recommended dense merge).
    let (mut model, _) = super::infer::load_model(
        &super::args::ModelArgs {
            model: Some(a.model.clone()),
            adapter: Some(a.adapter.clone()),
        },
        false,
        Some(crate::ops::bf16::ComputeDtype::F32),
    )?;
    let original_quant = model
        .layers
        .first()
        .and_then(|l| match &l.linear(Proj::QProj).weight {
            crate::adapter::BaseWeight::Quant(q) => Some(QuantizeOptions {
                quant_type: q.quant_type,
                blocksize: q.blocksize,
                double_quant: matches!(q.absmax, crate::quant::Absmax::Nested { .. }),
            }),
            _ => None,
        });
    adapters::merge(&mut model);
    let how = if a.requantize {
        SaveAs::Quantized(original_quant.unwrap_or_default())
    } else {
        SaveAs::Dense(a.dtype)
    };
    let staged = StagedDir::new(&a.out)?;
    save(&model, &staged.path, how)?;
    copy_side_files(&a.model, &staged.path)?;
    let out = staged.commit()?;
    println!("wrote merged model {}", out.display());
    Ok(ExitCode::SUCCESS)
}
