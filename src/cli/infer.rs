//! `qdora generate`, `qdora eval` and `qdora logits`: inference with an optional adapter.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use super::args::{EvalArgs, GenerateArgs, LogitsArgs, ModelArgs};
use crate::io::{Checkpoint, OwnedTensor};
use crate::model::generate::{generate as gen, GenerateOptions};
use crate::model::tokenizer::{GenerationConfig, Message, Tokenizer};
use crate::model::{adapters, load, BaseStorage, Llama, LoadOptions};
use crate::ops::bf16::ComputeDtype;
use crate::train::data::{self, DataOptions};
use crate::train::TrainConfig;

/// Loads the model, and the adapter if given. An adapter trained by qdora in a 4-bit mode gets
/// the base quantized exactly as during training (read from its `train_config.toml`). The
/// frozen weights compute in `compute`; `None` takes the training run's compute dtype (f32
/// without one). Merging and exporting pass f32, so their files do not depend on it.
pub(super) fn load_model(
    m: &ModelArgs,
    force_nf4: bool,
    compute: Option<ComputeDtype>,
) -> Result<(Llama, std::path::PathBuf)> {
    let dir = super::model_dir(m.model.clone())?;
    let mut storage = BaseStorage::AsStored;
    let mut trained_compute = ComputeDtype::F32;
    if let Some(ad) = &m.adapter {
        let tc = ad.join("train_config.toml");
        if let Ok(text) = std::fs::read_to_string(&tc) {
            let cfg: TrainConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", tc.display()))?;
            if cfg.mode.quantized() {
                storage = BaseStorage::Quantize(cfg.quantize_options());
            }
            trained_compute = cfg.compute_dtype;
        }
    }
    if force_nf4 {
        storage = BaseStorage::Quantize(Default::default());
    }
    let compute = compute.unwrap_or(trained_compute).resolve();
    let mut model = load(&dir, &LoadOptions { storage, compute })
        .with_context(|| format!("loading model {}", dir.display()))?;
    if compute.is_bf16() {
        tracing::info!(kernels = %compute.kernels(), "bf16 compute");
    }
    if let Some(ad) = &m.adapter {
        adapters::load_adapter(&mut model, ad)
            .with_context(|| format!("loading adapter {}", ad.display()))?;
    }
    Ok((model, dir))
}

/// Where the tokenizer comes from: the adapter folder when it holds one (qdora writes the
/// tokenizer beside an adapter), else the model folder.
pub(super) fn tokenizer_dir(dir: &Path, adapter: Option<&Path>) -> std::path::PathBuf {
    match adapter {
        Some(a) if a.join("tokenizer.json").exists() => a.to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

fn tokenizer_for(dir: &Path, adapter: Option<&Path>) -> Result<Tokenizer> {
    let d = tokenizer_dir(dir, adapter);
    Tokenizer::load(&d).with_context(|| format!("loading tokenizer of {}", d.display()))
}

/// Runs `qdora generate`: streams tokens to stdout.
pub fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let (mut model, dir) = load_model(&a.model, false, a.compute_dtype)?;
    let tok = tokenizer_for(&dir, a.model.adapter.as_deref())?;
    let gcfg = GenerationConfig::load(&dir);
    let text = if a.chat {
        tok.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
        )?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text, !a.chat)?;
    let mut stop: Vec<u32> = gcfg.eos_token_ids.clone();
    stop.extend(model.config.eos_token_ids.iter().copied());
    stop.extend(tok.eos_token_id);
    // llama2.c-converted models (stories260K) stop when they produce BOS.
    stop.extend(model.config.bos_token_id);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: stop,
    };
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", a.prompt);
    let mut ids: Vec<u32> = Vec::new();
    let mut shown = 0usize;
    let res = gen(&mut model, &prompt, &opts, &mut |t| {
        ids.push(t);
        // Decode the whole continuation each time so multi-byte pieces print correctly.
        if let Ok(s) = tok.decode(&[prompt.clone(), ids.clone()].concat()) {
            let full_prompt = tok.decode(&prompt).unwrap_or_default();
            let new = s.get(full_prompt.len()..).unwrap_or("");
            if new.len() > shown && new.is_char_boundary(shown) {
                let _ = write!(out, "{}", &new[shown..]);
                let _ = out.flush();
                shown = new.len();
            }
        }
    });
    let _ = writeln!(out);
    res?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `qdora eval`.
pub fn eval(a: EvalArgs) -> Result<ExitCode> {
    let (mut model, dir) = load_model(&a.model, a.nf4, a.compute_dtype)?;
    let tok = Tokenizer::load(&dir).ok();
    let ds = data::load(
        &a.data,
        tok.as_ref(),
        &DataOptions {
            seq_len: a.seq_len,
            packing: true,
            train_on_prompt: false,
            skip_bad_records: false,
        },
    )?;
    model.ensure_positions(a.seq_len);
    let bar = ProgressBar::new(ds.sequences.len() as u64);
    let (sum, count) =
        crate::train::evaluate_with(&mut model, &ds.sequences, a.batch_size, &mut |n| {
            bar.inc(n as u64)
        })?;
    bar.finish_and_clear();
    let loss = sum / count.max(1) as f64;
    println!(
        "{} sequences, {count} tokens: loss {loss:.6}, perplexity {:.3}",
        ds.sequences.len(),
        loss.exp()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `qdora logits`.
pub fn logits(a: LogitsArgs) -> Result<ExitCode> {
    let (mut model, _) = load_model(&a.model, false, a.compute_dtype)?;
    let input =
        Checkpoint::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let t = input.get("input_ids")?;
    if t.shape.len() != 2 {
        anyhow::bail!(
            "{}: input_ids has shape {:?}, expected [batch, seq]",
            a.input.display(),
            t.shape
        );
    }
    let (b, s) = (t.shape[0], t.shape[1]);
    let ids: Vec<u32> = t
        .to_i64()?
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            u32::try_from(x).map_err(|_| {
                anyhow::anyhow!("{}: input_ids[{i}] = {x} is negative", a.input.display())
            })
        })
        .collect::<Result<_>>()?;
    model.ensure_positions(s);
    let logits = model
        .logits(&ids, b, s)
        .with_context(|| format!("running {}", a.input.display()))?;
    let v = model.config.vocab_size;
    let mut tensors = vec![OwnedTensor::f32("logits", vec![b, s, v], &logits)];
    if input.contains("labels") {
        let labels = input.get("labels")?.to_i64()?;
        let (sum, count) = model.loss(&ids, &labels, b, s)?;
        tensors.push(OwnedTensor::f32(
            "loss",
            vec![1],
            &[(sum / count.max(1) as f64) as f32],
        ));
    }
    crate::io::write_safetensors(&a.out, &tensors, &crate::io::pt_metadata())?;
    println!("wrote {} (logits [{b}, {s}, {v}])", a.out.display());
    Ok(ExitCode::SUCCESS)
}
