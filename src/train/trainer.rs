//! The training loop: build the model for a mode, prepare data, then for each optimizer step
//! accumulate gradients over micro-batches, clip, AdamW, schedule; log metrics, evaluate,
//! checkpoint, stop on non-finite numbers or Ctrl-C (after saving), and write the PEFT adapter
//! (or the full checkpoint) with the tokenizer, resolved config, metrics and loss plot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::checkpoint::{self, TrainerState};
use super::config::{Mode, TrainConfig};
use super::data::{self, DataOptions, Sequence};
use super::error::{Error, Result};
use super::optim::{clip_coefficient, AdamW, AdamWOptions};
use super::plot;
use crate::adapter::{BaseWeight, DoraDropout, LoraConfig};
use crate::model::adapters;
use crate::model::tokenizer::Tokenizer;
use crate::model::{load, loss, BaseStorage, Grads, Llama, LoadOptions, StepOptions};
use crate::ops::{self, Rng};
use crate::quant::{QuantType, QuantizeOptions};

/// Set by a Ctrl-C handler; the loop saves a checkpoint and returns at the next step boundary.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Where and what to train.
#[derive(Debug, Clone)]
pub struct TrainRun {
    /// The base model folder.
    pub model_dir: PathBuf,
    /// Training data file.
    pub data: PathBuf,
    /// Evaluation data file (else a held-out fraction of the training data).
    pub eval_data: Option<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Settings.
    pub config: TrainConfig,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Write into a non-empty output folder.
    pub overwrite: bool,
    /// Start even if the memory estimate exceeds available memory.
    pub force: bool,
}

/// One optimizer step's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    /// 1-based step.
    pub step: usize,
    /// Steps in the run.
    pub total: usize,
    /// Mean train loss of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed per second in this step.
    pub tokens_per_s: f64,
    /// Evaluation loss, on steps that evaluate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// Things the loop tells its caller (the CLI draws the progress bar from these).
pub enum Event<'a> {
    /// Before the first step.
    Start {
        /// PEFT-style trainable parameter line.
        trainable: &'a str,
        /// Memory estimate text.
        memory: &'a str,
        /// Steps to run.
        total: usize,
        /// First step (after resume).
        first: usize,
    },
    /// After each step.
    Step(&'a StepReport),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
    /// A note for the user.
    Message(&'a str),
}

/// Receives [`Event`]s.
pub trait Observer {
    /// Called for each event.
    fn event(&mut self, e: Event<'_>);
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {
    fn event(&mut self, _: Event<'_>) {}
}

/// What a run achieved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainSummary {
    /// Mode.
    pub mode: String,
    /// Steps completed.
    pub steps: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters (4-bit at logical size).
    pub total_params: usize,
    /// Bytes of the base weights as stored.
    pub weight_bytes: usize,
    /// Final train loss (mean of the last step).
    pub final_train_loss: f64,
    /// Eval loss before training.
    pub initial_eval_loss: Option<f64>,
    /// Final eval loss.
    pub final_eval_loss: Option<f64>,
    /// Peak resident memory of the process (MiB).
    pub peak_rss_mib: f64,
    /// Wall time of the training steps (s).
    pub train_seconds: f64,
    /// Median seconds per optimizer step.
    pub step_seconds: f64,
    /// Training tokens per second (all positions of all sequences).
    pub tokens_per_s: f64,
    /// (step, train loss).
    pub train_curve: Vec<(usize, f64)>,
    /// (step, eval loss), step 0 = before training.
    pub eval_curve: Vec<(usize, f64)>,
    /// Stopped by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// Records skipped as unparsable.
    pub skipped_records: usize,
}

/// Prefix of a model "path" that names a random-initialised preset (`preset:llama-tiny-512`).
pub const PRESET_PREFIX: &str = "preset:";

/// Loads the model for `cfg.mode` (a folder, or `preset:<name>` for random weights) and makes
/// its trainable parts trainable; returns the PEFT config for adapter modes.
///
/// # Errors
/// Model loading and adapter errors; an unknown preset.
pub fn build_model(model_dir: &Path, cfg: &TrainConfig) -> Result<(Llama, Option<LoraConfig>)> {
    let storage = if cfg.mode.quantized() {
        BaseStorage::Quantize(quantize_options(cfg))
    } else {
        BaseStorage::Dense
    };
    let preset = model_dir
        .to_str()
        .and_then(|s| s.strip_prefix(PRESET_PREFIX));
    let mut model = match preset {
        Some(name) => {
            let c = crate::model::random::preset(name).ok_or_else(|| {
                Error::Settings(vec![format!(
                    "unknown preset {name:?} (known: llama-tiny-512, llama-small-1024, llama2-7b)"
                )])
            })?;
            let q = cfg.mode.quantized().then(|| quantize_options(cfg));
            crate::model::random::random_model(c, q, cfg.seed)
        }
        None => load(model_dir, &LoadOptions { storage })?,
    };
    let lora = prepare_model(&mut model, cfg, &model_dir.display().to_string())?;
    Ok((model, lora))
}

/// Quantization settings of a 4-bit mode.
pub fn quantize_options(cfg: &TrainConfig) -> QuantizeOptions {
    QuantizeOptions {
        quant_type: QuantType::parse(&cfg.quant_type).unwrap_or(QuantType::Nf4),
        blocksize: cfg.blocksize,
        double_quant: cfg.double_quant,
    }
}

/// Makes a loaded model trainable for `cfg.mode` (adapters, or every weight for full).
///
/// # Errors
/// Adapter configuration errors.
pub fn prepare_model(
    model: &mut Llama,
    cfg: &TrainConfig,
    base_name: &str,
) -> Result<Option<LoraConfig>> {
    if cfg.mode == Mode::Full {
        model.train_embed_tokens = true;
        model.train_lm_head = true;
        model.norm.train = true;
        for layer in &mut model.layers {
            layer.input_layernorm.train = true;
            layer.post_attention_layernorm.train = true;
            for n in [&mut layer.self_attn.q_norm, &mut layer.self_attn.k_norm]
                .into_iter()
                .flatten()
            {
                n.train = true;
            }
            for name in crate::model::llama::LINEAR_NAMES {
                let l = layer.linear_mut(name);
                l.train_weight = matches!(l.weight, BaseWeight::Dense { .. });
                l.train_bias = l.bias.is_some();
            }
        }
        return Ok(None);
    }
    let lcfg = cfg.lora_config(base_name);
    lcfg.validate("<train config>")?;
    let mut rng = Rng::new(cfg.seed).fork(7);
    adapters::attach(model, &lcfg, &mut rng)?;
    for layer in &mut model.layers {
        for name in crate::model::llama::LINEAR_NAMES {
            if let Some(a) = &mut layer.linear_mut(name).adapter {
                a.dora_dropout = cfg.dora_dropout;
            }
        }
    }
    Ok(Some(lcfg))
}

/// A memory estimate (MiB) for training: (weights as stored, trainable + grads + AdamW,
/// activations with checkpointing, activations without).
pub fn memory_estimate(model: &mut Llama, cfg: &TrainConfig) -> (f64, f64, f64, f64) {
    let (trainable, _) = model.parameter_counts();
    let c = &model.config;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let weights = (model.embed_tokens.stored_bytes()
        + model.lm_head.as_ref().map_or(0, |h| h.stored_bytes())
        + model.linear_weight_bytes()) as f64;
    let states = trainable as f64 * 4.0 * 4.0; // param + grad + m + v
    let n = (cfg.batch_size * cfg.seq_len) as f64;
    let (d, f) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    // attention keeps its probabilities; with checkpointing the last block keeps two softmax
    // statistics per probability row instead, and a recomputed block its probabilities
    let rows = (cfg.batch_size * c.num_attention_heads * cfg.seq_len) as f64;
    let (probs, stats) = (rows * cfg.seq_len as f64, rows * 2.0);
    // DoRA keeps each adapted layer's pre-scale output `z` for the magnitude's gradient
    // (dropout masks are regenerated from a seed, never stored); where the output is exactly
    // `k⊙z` (no dropout on the base path), the MLP rebuilds gate/up outputs from it instead
    // of keeping them.
    let dora_z = if cfg.mode.dora() {
        n * (q + 2.0 * kv + 2.0 * d + 2.0 * f)
    } else {
        0.0
    };
    let factors =
        cfg.mode.dora() && (cfg.dora_dropout == DoraDropout::LoraOnly || cfg.lora_dropout == 0.0);
    let mlp_kept = if factors { 0.0 } else { 2.0 * n * f };
    let per_block = 4.0 * (5.0 * n * d + n * (2.0 * q + 2.0 * kv) + mlp_kept + dora_z);
    let (block_full, block_lean) = (per_block + 4.0 * probs, per_block + 4.0 * stats);
    let layers = c.num_hidden_layers as f64;
    // one chunk of logits (the head forms them `CHUNK_ROWS` positions at a time, or
    // `LEAN_CHUNK_ROWS` with checkpointing)
    let head = |rows: usize| 4.0 * (rows as f64 * c.vocab_size as f64 + 2.0 * n * d);
    let full = block_full * layers + head(loss::CHUNK_ROWS);
    let ckpt = 4.0 * n * d * layers + block_lean + block_full + head(loss::LEAN_CHUNK_ROWS);
    (mib(weights), mib(states), mib(ckpt), mib(full))
}

fn order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed).fork(1000 + epoch as u64);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// Flattens `seqs[idx]` into (ids, labels).
pub fn make_batch(seqs: &[Sequence], idx: &[usize]) -> (Vec<u32>, Vec<i64>) {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for &i in idx {
        ids.extend_from_slice(&seqs[i].input_ids);
        labels.extend_from_slice(&seqs[i].labels);
    }
    (ids, labels)
}

/// Mean loss of `model` over `seqs` in batches.
///
/// # Errors
/// Model errors.
pub fn evaluate(model: &mut Llama, seqs: &[Sequence], batch_size: usize) -> Result<f64> {
    let (sum, count) = evaluate_with(model, seqs, batch_size, &mut |_| {})?;
    Ok(sum / count.max(1) as f64)
}

/// Summed loss and counted tokens of `model` over `seqs` in batches; `on_batch(sequences)` is
/// called after each batch (progress bars).
///
/// # Errors
/// Model errors.
pub fn evaluate_with(
    model: &mut Llama,
    seqs: &[Sequence],
    batch_size: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0.0, 0usize);
    for chunk in (0..seqs.len())
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
    {
        let (ids, labels) = make_batch(seqs, chunk);
        let t = seqs[chunk[0]].input_ids.len();
        let (s, c) = model.loss(&ids, &labels, chunk.len(), t)?;
        sum += s;
        count += c;
        on_batch(chunk.len());
    }
    Ok((sum, count))
}

/// Accumulates `src` into `dst` by name (same order every micro-batch).
fn accumulate(dst: &mut Grads, src: Grads) {
    if dst.is_empty() {
        *dst = src;
        return;
    }
    for ((dn, d), (sn, s)) in dst.iter_mut().zip(src) {
        debug_assert_eq!(dn, &sn);
        crate::ops::add_assign(d, &s);
    }
}

/// One optimizer step on `batches` (micro-batches of (ids, labels, b, t)): returns
/// (mean loss, grad norm before clipping, tokens).
///
/// # Errors
/// [`Error::NonFinite`] naming the loss or the first gradient at fault; model errors.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step(
    model: &mut Llama,
    opt: &mut AdamW,
    batches: &[(Vec<u32>, Vec<i64>, usize, usize)],
    lr: f32,
    cfg: &TrainConfig,
    step: usize,
    last_checkpoint: &str,
) -> Result<(f64, f64)> {
    let total_labels: usize = batches
        .iter()
        .map(|(_, l, b, t)| {
            (0..*b)
                .map(|bi| (1..*t).filter(|&i| l[bi * t + i] != -100).count())
                .sum::<usize>()
        })
        .sum();
    let opts = StepOptions {
        gradient_checkpointing: cfg.checkpointing(),
        grad_scale: 1.0 / total_labels.max(1) as f32,
    };
    let mut grads: Grads = Vec::new();
    let mut loss_sum = 0.0;
    let base = Rng::new(cfg.seed).fork(1_000_000 + step as u64);
    for (k, (ids, labels, b, t)) in batches.iter().enumerate() {
        let mut rng = base.fork(k as u64);
        let (s, _, g) = model.forward_backward(ids, labels, *b, *t, &opts, &mut rng)?;
        loss_sum += s;
        accumulate(&mut grads, g);
    }
    let loss = loss_sum / total_labels.max(1) as f64;
    let non_finite = |what: String, value: f64| Error::NonFinite {
        step,
        what,
        value,
        last_checkpoint: last_checkpoint.to_string(),
    };
    if !loss.is_finite() {
        return Err(non_finite("loss".into(), loss));
    }
    // A NaN or Inf anywhere makes the global norm non-finite; only then look for the culprit.
    let norm = super::optim::global_norm(&grads);
    if !norm.is_finite() {
        if let Some((name, g)) = grads.iter().find(|(_, g)| g.iter().any(|v| !v.is_finite())) {
            let v = g
                .iter()
                .find(|v| !v.is_finite())
                .copied()
                .unwrap_or(f32::NAN);
            return Err(non_finite(format!("gradient of {name}"), v as f64));
        }
        return Err(non_finite("gradient norm".into(), norm));
    }
    let grad_scale = if cfg.max_grad_norm > 0.0 {
        clip_coefficient(norm, cfg.max_grad_norm)
    } else {
        1.0
    };
    opt.begin_step();
    let mut by_name: std::collections::HashMap<String, Vec<f32>> = grads.into_iter().collect();
    model.visit_trainable(&mut |name, p| {
        if let Some(g) = by_name.remove(name) {
            opt.update(name, p, &g, grad_scale, lr);
        }
    });
    Ok((loss, norm))
}

fn check_output(run: &TrainRun) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(&run.out) == canon(&run.model_dir) {
        return Err(Error::Settings(vec![format!(
            "--out {} is the input model folder; choose another folder",
            run.out.display()
        )]));
    }
    if run.out.exists() && !run.resume && !run.overwrite {
        let non_empty = std::fs::read_dir(&run.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if non_empty {
            return Err(Error::Settings(vec![format!(
                "--out {} is not empty; pass --overwrite to replace its contents or --resume to continue",
                run.out.display()
            )]));
        }
    }
    Ok(())
}

/// Runs training end to end.
///
/// # Errors
/// Invalid settings or data (all problems listed), model errors, non-finite numbers (after
/// which the last good checkpoint stays on disk).
pub fn train(run: &TrainRun, obs: &mut dyn Observer) -> Result<TrainSummary> {
    let cfg = &run.config;
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(Error::Settings(problems));
    }
    check_output(run)?;
    let tokenizer = Tokenizer::load(&run.model_dir).ok();
    let dopts = DataOptions {
        seq_len: cfg.seq_len,
        packing: cfg.packing,
        train_on_prompt: cfg.train_on_prompt,
        skip_bad_records: cfg.skip_bad_records,
    };
    let ds = data::load(&run.data, tokenizer.as_ref(), &dopts)?;
    for (line, msg) in &ds.skipped {
        obs.event(Event::Message(&format!(
            "skipped {}:{line}: {msg}",
            run.data.display()
        )));
    }
    for (line, n) in &ds.truncated {
        obs.event(Event::Message(&format!(
            "truncated {}:{line}: {n} tokens cut to --seq-len {} (no packing)",
            run.data.display(),
            cfg.seq_len
        )));
    }
    let (train_seqs, eval_seqs) = match &run.eval_data {
        Some(p) => (
            ds.sequences.clone(),
            data::load(p, tokenizer.as_ref(), &dopts)?.sequences,
        ),
        None if cfg.eval_fraction > 0.0 => data::split(ds.sequences.clone(), cfg.eval_fraction),
        None => (ds.sequences.clone(), Vec::new()),
    };
    let per_step = cfg.batch_size * cfg.grad_accum;
    if train_seqs.len() < per_step {
        return Err(Error::Settings(vec![format!(
            "batch_size × grad_accum = {per_step} sequences per step, but the training data has only {} sequences of {} tokens",
            train_seqs.len(),
            cfg.seq_len
        )]));
    }
    let total = cfg
        .max_steps
        .unwrap_or((cfg.epochs * (train_seqs.len() / per_step)).max(1));
    let (mut model, lora) = build_model(&run.model_dir, cfg)?;
    if cfg.seq_len > model.config.max_position_embeddings {
        return Err(Error::Settings(vec![format!(
            "seq_len {} exceeds the model's max_position_embeddings {}",
            cfg.seq_len, model.config.max_position_embeddings
        )]));
    }
    model.ensure_positions(cfg.seq_len);
    for s in train_seqs.iter().chain(&eval_seqs) {
        model.check_ids(&s.input_ids)?;
    }
    let (w, st, act_ck, act_full) = memory_estimate(&mut model, cfg);
    let act = if cfg.checkpointing() {
        act_ck
    } else {
        act_full
    };
    let est = w + st + act;
    let memory = format!(
        "memory estimate: weights {w:.0} MiB + trainable/grads/AdamW {st:.0} MiB + activations {act:.0} MiB ({}) = {est:.0} MiB",
        if cfg.checkpointing() { "with checkpointing" } else { format!("without checkpointing; {act_ck:.0} MiB with").leak() }
    );
    if let Some(avail) = ops::available_mib() {
        if est > avail && !run.force {
            return Err(Error::Memory(format!(
                "{memory} exceeds the {avail:.0} MiB available. Try --gradient-checkpointing, a smaller --batch-size or --seq-len, or a 4-bit mode; --force starts anyway"
            )));
        }
    }
    let trainable = model.trainable_summary();
    let (trainable_params, total_params) = model.parameter_counts();
    std::fs::create_dir_all(&run.out).map_err(|source| crate::io::Error::Io {
        path: run.out.clone(),
        source,
    })?;
    let mut opt = AdamW::new(AdamWOptions {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    });
    let mut first = 0;
    let mut last_ckpt = "none (no checkpoint was written yet)".to_string();
    if run.resume {
        if let Some(dir) = checkpoint::latest(&run.out) {
            let st = checkpoint::load(&dir, &mut model, &mut opt)?;
            if st.seed != cfg.seed {
                return Err(Error::Checkpoint {
                    path: dir.display().to_string(),
                    msg: format!(
                        "was written with seed {}, this run has seed {}",
                        st.seed, cfg.seed
                    ),
                });
            }
            first = st.step;
            last_ckpt = dir.display().to_string();
            obs.event(Event::Message(&format!(
                "resuming from {} (step {first})",
                dir.display()
            )));
        }
    }
    let metrics_path = run.out.join("metrics.jsonl");
    let kept: Vec<String> = if first > 0 {
        std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= first)
            })
            .map(String::from)
            .collect()
    } else {
        Vec::new()
    };
    let mut train_curve: Vec<(usize, f64)> = Vec::new();
    let mut eval_curve: Vec<(usize, f64)> = Vec::new();
    for l in &kept {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
            let s = v["step"].as_u64().unwrap_or(0) as usize;
            if let Some(x) = v["loss"].as_f64() {
                train_curve.push((s, x));
            }
            if let Some(x) = v["eval_loss"].as_f64() {
                eval_curve.push((s, x));
            }
        }
    }
    let mut metrics =
        std::io::BufWriter::new(std::fs::File::create(&metrics_path).map_err(|source| {
            crate::io::Error::Io {
                path: metrics_path.clone(),
                source,
            }
        })?);
    for l in &kept {
        let _ = writeln!(metrics, "{l}");
    }
    let initial_eval = if !eval_seqs.is_empty() && first == 0 {
        let e = evaluate(&mut model, &eval_seqs, cfg.batch_size)?;
        eval_curve.push((0, e));
        let _ = writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": 0, "eval_loss": e})
        );
        Some(e)
    } else {
        eval_curve.first().map(|e| e.1)
    };
    obs.event(Event::Start {
        trainable: &trainable,
        memory: &memory,
        total,
        first,
    });
    let n = train_seqs.len();
    let t_start = Instant::now();
    let mut step_times = Vec::new();
    let mut final_loss = f64::NAN;
    let mut interrupted = false;
    let tokens_per_step = (per_step * cfg.seq_len) as f64;
    for step in first..total {
        if INTERRUPTED.load(Ordering::SeqCst) {
            let st = TrainerState {
                step,
                seed: cfg.seed,
                loss: final_loss,
            };
            let p = checkpoint::save(&run.out, &mut model, &opt, &st)?;
            obs.event(Event::Checkpoint(&p));
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        let mut batches = Vec::with_capacity(cfg.grad_accum);
        for k in 0..cfg.grad_accum {
            let idx: Vec<usize> = (0..cfg.batch_size)
                .map(|i| {
                    let g = (step * cfg.grad_accum + k) * cfg.batch_size + i;
                    order(n, cfg.seed, g / n)[g % n]
                })
                .collect();
            let (ids, labels) = make_batch(&train_seqs, &idx);
            batches.push((ids, labels, cfg.batch_size, cfg.seq_len));
        }
        let lr = cfg.schedule.lr(cfg.lr, step, cfg.warmup_steps, total);
        let (loss, norm) = optimizer_step(
            &mut model,
            &mut opt,
            &batches,
            lr,
            cfg,
            step + 1,
            &last_ckpt,
        )?;
        let dt = t0.elapsed().as_secs_f64();
        step_times.push(dt);
        final_loss = loss;
        train_curve.push((step + 1, loss));
        let done = step + 1;
        let eval_loss = if !eval_seqs.is_empty()
            && ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || done == total)
        {
            let e = evaluate(&mut model, &eval_seqs, cfg.batch_size)?;
            eval_curve.push((done, e));
            Some(e)
        } else {
            None
        };
        let report = StepReport {
            step: done,
            total,
            loss,
            lr,
            grad_norm: norm,
            tokens_per_s: tokens_per_step / dt,
            eval_loss,
        };
        if cfg.log_every > 0 && (done % cfg.log_every == 0 || eval_loss.is_some() || done == total)
        {
            let _ = writeln!(
                metrics,
                "{}",
                serde_json::to_string(&report).unwrap_or_default()
            );
            let _ = metrics.flush();
        }
        obs.event(Event::Step(&report));
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done < total {
            let st = TrainerState {
                step: done,
                seed: cfg.seed,
                loss,
            };
            let p = checkpoint::save(&run.out, &mut model, &opt, &st)?;
            last_ckpt = p.display().to_string();
            obs.event(Event::Checkpoint(&p));
        }
    }
    let _ = metrics.flush();
    drop(metrics);
    let train_seconds = t_start.elapsed().as_secs_f64();
    if !interrupted {
        write_outputs(run, &mut model, lora.as_ref(), &train_curve, &eval_curve)?;
    }
    drop(model);
    let mut sorted = step_times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let weight_bytes = (w * 1024.0 * 1024.0) as usize;
    let summary = TrainSummary {
        mode: cfg.mode.as_str().into(),
        steps: first + step_times.len(),
        trainable_params,
        total_params,
        weight_bytes,
        final_train_loss: final_loss,
        initial_eval_loss: initial_eval,
        final_eval_loss: eval_curve.last().filter(|e| e.0 > 0).map(|e| e.1),
        peak_rss_mib: ops::peak_rss_mib(),
        train_seconds,
        step_seconds: median,
        tokens_per_s: if median > 0.0 {
            tokens_per_step / median
        } else {
            0.0
        },
        train_curve,
        eval_curve,
        interrupted,
        skipped_records: ds.skipped.len(),
    };
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    crate::io::write_text(&run.out.join("summary.json"), &json)?;
    Ok(summary)
}

/// Writes the final adapter or model, tokenizer files, resolved config and loss plot.
fn write_outputs(
    run: &TrainRun,
    model: &mut Llama,
    lora: Option<&LoraConfig>,
    train_curve: &[(usize, f64)],
    eval_curve: &[(usize, f64)],
) -> Result<()> {
    let out = &run.out;
    match lora {
        Some(l) => adapters::save_adapter(model, out, l)?,
        None => crate::model::load::save(
            model,
            out,
            crate::model::load::SaveAs::Dense(crate::quant::Dtype::F32),
        )?,
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = run.model_dir.join(f);
        if src.exists() {
            let text = std::fs::read_to_string(&src).map_err(|source| crate::io::Error::Io {
                path: src.clone(),
                source,
            })?;
            crate::io::write_text(&out.join(f), &text)?;
        }
    }
    let toml = toml::to_string_pretty(&run.config).unwrap_or_default();
    crate::io::write_text(&out.join("train_config.toml"), &toml)?;
    let series = vec![
        plot::Series {
            label: "train".into(),
            points: train_curve.iter().map(|&(s, l)| (s as f64, l)).collect(),
        },
        plot::Series {
            label: "eval".into(),
            points: eval_curve.iter().map(|&(s, l)| (s as f64, l)).collect(),
        },
    ];
    let svg = plot::svg(
        &format!("{} loss", run.config.mode.as_str()),
        "step",
        "loss",
        &series,
    );
    crate::io::write_text(&out.join("loss.svg"), &svg)?;
    Ok(())
}
