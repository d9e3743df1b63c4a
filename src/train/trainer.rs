//! The training loop as a [`Trainer`]: [`setup`](Trainer::setup) (settings, data, the model
//! for the mode, the memory check), [`resume`](Trainer::resume) (the newest checkpoint),
//! [`start`](Trainer::start) (metrics file, first evaluation), [`step`](Trainer::step) (one
//! optimizer step: accumulate gradients over micro-batches, clip, AdamW, schedule; log,
//! evaluate, checkpoint), [`evaluate`](Trainer::evaluate), and [`finish`](Trainer::finish)
//! (the PEFT adapter or the full checkpoint with the tokenizer, resolved config and loss plot).
//! [`train`] runs them in order, stopping on non-finite numbers or Ctrl-C (after saving).
//!
//! Under MPI (`crate::dist`, N ranks) every rank runs the same loop on the same data order: a
//! step's global batch is N × `grad_accum` micro-batches, rank r computes micro-batches
//! `r·grad_accum ..`, their gradients are summed across ranks in rank order, and every rank
//! applies the same AdamW step. Dropout is keyed by the global micro-batch, so N ranks give the
//! numbers of one process with `grad_accum × N`. Evaluation is sharded and summed. Rank 0 alone
//! writes files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::batch::{Batch, DataOrder};
use super::build::build_model;
use super::checkpoint::{self, TrainerState};
use super::config::TrainConfig;
use super::data::{self, DataOptions, Sequence};
use super::error::{Error, Result};
use super::eval::{evaluate, evaluate_with};
use super::memory::MemoryEstimate;
use super::metrics::Metrics;
use super::optim::{clip_coefficient, global_norm, AdamW, AdamWOptions};
use super::plot;
use crate::adapter::LoraConfig;
use crate::dist;
use crate::model::adapters;
use crate::model::tokenizer::Tokenizer;
use crate::model::{Grads, Llama, StepOptions};
use crate::ops::Rng;

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
    /// Processes the run was spread over (MPI ranks; 1 for one process).
    #[serde(default = "one_rank")]
    pub ranks: usize,
    /// Seconds rank 0 spent summing across ranks (gradients, losses, evaluation; waiting for
    /// slower ranks included).
    #[serde(default)]
    pub allreduce_seconds: f64,
    /// What the frozen weights' products computed in (`f32` or `bf16`; runs from before the
    /// setting existed computed in f32).
    #[serde(default = "f32_name")]
    pub compute_dtype: String,
    /// The kernels they took (`gemm f32`, `bf16 avx512bf16`, ...).
    #[serde(default)]
    pub kernels: String,
}

fn one_rank() -> usize {
    1
}

fn f32_name() -> String {
    "f32".into()
}

/// The metrics line of the evaluation before the first step.
#[derive(serde::Serialize)]
struct InitialEval {
    step: usize,
    eval_loss: f64,
}

/// A training run in progress: the model, its optimizer, the data and the bookkeeping.
pub struct Trainer {
    run: TrainRun,
    model: Llama,
    lora: Option<LoraConfig>,
    opt: AdamW,
    train_seqs: Vec<Sequence>,
    eval_seqs: Vec<Sequence>,
    order: DataOrder,
    total: usize,
    /// Optimizer steps done (the next step is `done + 1`).
    done: usize,
    /// Where a run that fails now would resume from (named in errors).
    last_checkpoint: String,
    memory: MemoryEstimate,
    metrics: Option<Metrics>,
    skipped_records: usize,
    initial_eval: Option<f64>,
    step_times: Vec<f64>,
    final_loss: f64,
    t_start: Option<Instant>,
}

impl Trainer {
    /// Checks the settings, reads and tokenizes the data, builds the model for the mode and
    /// checks that the run fits in memory. Writes nothing yet.
    ///
    /// # Errors
    /// Invalid settings or data (all problems listed), model errors, an output folder that
    /// would lose work, an estimate above the available memory (unless `run.force`).
    pub fn setup(run: TrainRun, obs: &mut dyn Observer) -> Result<Self> {
        let cfg = &run.config;
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(Error::Settings(problems));
        }
        if dist::is_root() {
            check_output(&run)?;
        }
        let tokenizer = Tokenizer::load(&run.model_dir).ok();
        let dopts = DataOptions {
            seq_len: cfg.seq_len,
            packing: cfg.packing,
            train_on_prompt: cfg.train_on_prompt,
            skip_bad_records: cfg.skip_bad_records,
        };
        let ds = data::load(&run.data, tokenizer.as_ref(), &dopts)?;
        for (line, msg) in &ds.skipped {
            let text = format!("skipped {}:{line}: {msg}", run.data.display());
            obs.event(Event::Message(&text));
        }
        for (line, n) in &ds.truncated {
            let text = format!(
                "truncated {}:{line}: {n} tokens cut to --seq-len {} (no packing)",
                run.data.display(),
                cfg.seq_len
            );
            obs.event(Event::Message(&text));
        }
        let skipped_records = ds.skipped.len();
        let (train_seqs, eval_seqs) = match &run.eval_data {
            Some(p) => (
                ds.sequences,
                data::load(p, tokenizer.as_ref(), &dopts)?.sequences,
            ),
            None if cfg.eval_fraction > 0.0 => data::split(ds.sequences, cfg.eval_fraction),
            None => (ds.sequences, Vec::new()),
        };
        let per_step = cfg.batch_size * cfg.grad_accum * dist::size();
        if train_seqs.len() < per_step {
            return Err(Error::Settings(vec![format!(
                "batch_size × grad_accum × ranks = {per_step} sequences per step, but the training data has only {} sequences of {} tokens",
                train_seqs.len(),
                cfg.seq_len
            )]));
        }
        let total = cfg
            .max_steps
            .unwrap_or((cfg.epochs * (train_seqs.len() / per_step)).max(1));
        let (mut model, lora) = build_model(&run.model_dir, cfg)?;
        let compute = model.compute_dtype();
        tracing::info!(
            model = %run.model_dir.display(),
            mode = cfg.mode.as_str(),
            layers = model.layers.len(),
            compute = compute.name(),
            "model ready"
        );
        if cfg.compute_dtype != compute {
            let text = format!(
                "compute_dtype {} runs as {} here{}",
                cfg.compute_dtype.name(),
                compute.name(),
                if cfg.mode == super::config::Mode::Full {
                    " (full fine-tuning trains every weight, in f32)"
                } else {
                    " (this CPU has no AVX512_BF16)"
                }
            );
            obs.event(Event::Message(&text));
        }
        let text = format!("compute: {} ({})", compute.name(), compute.kernels());
        obs.event(Event::Message(&text));
        // what ran is what the saved config says
        let mut run = run;
        run.config.compute_dtype = compute;
        let cfg = &run.config;
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
        let memory = MemoryEstimate::of(&model, cfg);
        let ck = cfg.checkpointing();
        if let Some(avail) = crate::sys::available_mib() {
            if memory.total(ck) > avail && !run.force {
                return Err(Error::Memory(format!(
                    "{} exceeds the {avail:.0} MiB available. Try --gradient-checkpointing, a smaller --batch-size or --seq-len, or a 4-bit mode; --force starts anyway",
                    memory.describe(ck)
                )));
            }
        }
        let opt = AdamW::new(AdamWOptions {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        });
        let order = DataOrder::new(train_seqs.len(), cfg.seed);
        Ok(Trainer {
            run,
            model,
            lora,
            opt,
            train_seqs,
            eval_seqs,
            order,
            total,
            done: 0,
            last_checkpoint: "none (no checkpoint was written yet)".into(),
            memory,
            metrics: None,
            skipped_records,
            initial_eval: None,
            step_times: Vec::new(),
            final_loss: f64::NAN,
            t_start: None,
        })
    }

    /// With `run.resume`, loads the newest checkpoint in the output folder (the trainable
    /// tensors, AdamW's moments, the step); without one, starts at step 0.
    ///
    /// # Errors
    /// A checkpoint that does not fit the model, or was written with another seed.
    pub fn resume(&mut self, obs: &mut dyn Observer) -> Result<()> {
        if !self.run.resume {
            return Ok(());
        }
        let latest = checkpoint::latest(&self.run.out);
        // Every rank must resume from the same step (rank 0's folder, seen by all).
        let step = latest
            .as_deref()
            .and_then(|d| {
                d.file_name()?
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0usize);
        let mut root_step = [if dist::is_root() { step as f64 } else { 0.0 }];
        dist::sum_f64(&mut root_step);
        if dist::any(step as f64 != root_step[0]) {
            return Err(Error::Checkpoint {
                path: self.run.out.display().to_string(),
                msg: format!(
                    "the ranks see different checkpoints (rank {} sees step {step}, rank 0 step {}): --out must be a folder every rank sees",
                    dist::rank(),
                    root_step[0]
                ),
            });
        }
        let Some(dir) = latest else {
            return Ok(());
        };
        let st = checkpoint::load(&dir, &mut self.model, &mut self.opt)?;
        if st.seed != self.run.config.seed {
            return Err(Error::Checkpoint {
                path: dir.display().to_string(),
                msg: format!(
                    "was written with seed {}, this run has seed {}",
                    st.seed, self.run.config.seed
                ),
            });
        }
        if st.world_size != dist::size() {
            return Err(Error::Checkpoint {
                path: dir.display().to_string(),
                msg: format!(
                    "was written by a run of {} rank(s); resume it with mpirun -np {} (this run has {})",
                    st.world_size,
                    st.world_size,
                    dist::size()
                ),
            });
        }
        self.done = st.step;
        self.last_checkpoint = dir.display().to_string();
        let text = format!("resuming from {} (step {})", dir.display(), self.done);
        obs.event(Event::Message(&text));
        Ok(())
    }

    /// Creates the output folder and the metrics file (kept up to the resumed step), evaluates
    /// the untrained model when starting from step 0, and tells `obs` the run starts.
    ///
    /// # Errors
    /// The folder or file cannot be written; model errors.
    pub fn start(&mut self, obs: &mut dyn Observer) -> Result<()> {
        let mut metrics = if dist::is_root() {
            std::fs::create_dir_all(&self.run.out).map_err(|source| crate::io::Error::Io {
                path: self.run.out.clone(),
                source,
            })?;
            Some(Metrics::open(&self.run.out, self.done)?)
        } else {
            None
        };
        self.initial_eval = if !self.eval_seqs.is_empty() && self.done == 0 {
            let e = self.evaluate()?;
            if let Some(m) = &mut metrics {
                m.eval_curve.push((0, e));
                m.log(&InitialEval {
                    step: 0,
                    eval_loss: e,
                })?;
            }
            Some(e)
        } else {
            metrics
                .as_ref()
                .and_then(|m| m.eval_curve.first().map(|e| e.1))
        };
        self.metrics = metrics;
        let trainable = self.model.trainable_summary();
        let mut memory = self.memory.describe(self.run.config.checkpointing());
        if dist::size() > 1 {
            memory = format!("{memory} per rank ({} ranks)", dist::size());
        }
        obs.event(Event::Start {
            trainable: &trainable,
            memory: &memory,
            total: self.total,
            first: self.done,
        });
        self.t_start = Some(Instant::now());
        Ok(())
    }

    /// Steps in the run.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Optimizer steps done.
    pub fn done(&self) -> usize {
        self.done
    }

    /// The step's micro-batches, all ranks' (N × `grad_accum`), in the run's data order.
    fn batches(&mut self) -> Vec<Batch> {
        let cfg = &self.run.config;
        let per_step = cfg.grad_accum * dist::size();
        (0..per_step)
            .map(|k| {
                let idx: Vec<usize> = (0..cfg.batch_size)
                    .map(|i| {
                        let g = (self.done * per_step + k) * cfg.batch_size + i;
                        self.order.sample(g)
                    })
                    .collect();
                Batch::gather(&self.train_seqs, &idx)
            })
            .collect()
    }

    /// One optimizer step, then what the schedule asks at its end: an evaluation, a metrics
    /// line, a checkpoint.
    ///
    /// # Errors
    /// A non-finite loss or gradient (naming the step, the tensor and the last checkpoint);
    /// model and file errors.
    pub fn step(&mut self, obs: &mut dyn Observer) -> Result<StepReport> {
        let t0 = Instant::now();
        let batches = self.batches();
        let cfg = &self.run.config;
        let lr = cfg
            .schedule
            .lr(cfg.lr, self.done, cfg.warmup_steps, self.total);
        let (loss, norm) = optimizer_step(
            &mut self.model,
            &mut self.opt,
            &batches,
            cfg,
            (self.done + 1, lr),
        )
        .map_err(|e| e.with_last_checkpoint(&self.last_checkpoint))?;
        let dt = t0.elapsed().as_secs_f64();
        self.step_times.push(dt);
        self.final_loss = loss;
        self.done += 1;
        let done = self.done;
        let cfg = &self.run.config;
        let eval_due =
            (cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every)) || done == self.total;
        let eval_loss = if !self.eval_seqs.is_empty() && eval_due {
            Some(self.evaluate()?)
        } else {
            None
        };
        let cfg = &self.run.config;
        let tokens_per_step = tokens_per_step(cfg);
        let report = StepReport {
            step: done,
            total: self.total,
            loss,
            lr,
            grad_norm: norm,
            tokens_per_s: tokens_per_step / dt,
            eval_loss,
        };
        let log_due = cfg.log_every > 0
            && (done.is_multiple_of(cfg.log_every) || eval_loss.is_some() || done == self.total);
        let save_due =
            cfg.save_every > 0 && done.is_multiple_of(cfg.save_every) && done < self.total;
        if let Some(m) = &mut self.metrics {
            m.train_curve.push((done, loss));
            if let Some(e) = eval_loss {
                m.eval_curve.push((done, e));
            }
            if log_due {
                m.log(&report)?;
                m.flush()?;
            }
        }
        obs.event(Event::Step(&report));
        if save_due {
            let p = self.save_checkpoint(loss)?;
            obs.event(Event::Checkpoint(&p));
        }
        Ok(report)
    }

    /// Writes `checkpoint-<done>` (atomically) and remembers it as the one to resume from.
    ///
    /// # Errors
    /// The checkpoint cannot be written.
    pub fn save_checkpoint(&mut self, loss: f64) -> Result<PathBuf> {
        let st = TrainerState {
            step: self.done,
            seed: self.run.config.seed,
            loss,
            world_size: dist::size(),
        };
        let p = if dist::is_root() {
            let p = checkpoint::save(&self.run.out, &self.model, &self.opt, &st)?;
            tracing::info!(path = %p.display(), step = self.done, "checkpoint written");
            p
        } else {
            self.run.out.join(checkpoint::dir_name(self.done))
        };
        self.last_checkpoint = p.display().to_string();
        Ok(p)
    }

    /// Mean loss over the evaluation data.
    ///
    /// # Errors
    /// Model errors.
    pub fn evaluate(&mut self) -> Result<f64> {
        let bs = self.run.config.batch_size;
        if dist::size() == 1 {
            return evaluate(&mut self.model, &self.eval_seqs, bs);
        }
        // Rank r evaluates the r-th contiguous share; sums and counts are added across ranks.
        let (n, r, len) = (dist::size(), dist::rank(), self.eval_seqs.len());
        let share = &self.eval_seqs[r * len / n..(r + 1) * len / n];
        let (sum, count) = evaluate_with(&mut self.model, share, bs, &mut |_| {})?;
        let mut v = [sum, count as f64];
        dist::sum_f64(&mut v);
        Ok(v[0] / v[1].max(1.0))
    }

    /// Ends the run: unless it was interrupted, writes the adapter (or the full model), the
    /// tokenizer files, `train_config.toml` and `loss.svg`; then `summary.json`.
    ///
    /// # Errors
    /// Files that cannot be written.
    pub fn finish(mut self, interrupted: bool) -> Result<TrainSummary> {
        if self.t_start.is_none() {
            return Err(Error::Settings(vec![
                "finish called before start (no metrics file)".into(),
            ]));
        }
        let mut metrics = self.metrics.take();
        let train_seconds = self.t_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
        // Only rank 0 holds the metrics file, and writes.
        if let Some(m) = &mut metrics {
            m.flush()?;
            if !interrupted {
                write_outputs(&self.run, &self.model, self.lora.as_ref(), m)?;
            }
        }
        let (trainable_params, total_params) = self.model.parameter_counts();
        drop(self.model);
        let cfg = &self.run.config;
        let tokens_per_step = tokens_per_step(cfg);
        let mut sorted = self.step_times.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        let (train_curve, eval_curve) = metrics
            .map(|m| (m.train_curve, m.eval_curve))
            .unwrap_or_default();
        let summary = TrainSummary {
            mode: cfg.mode.as_str().into(),
            steps: self.done,
            trainable_params,
            total_params,
            weight_bytes: (self.memory.weights * 1024.0 * 1024.0) as usize,
            final_train_loss: self.final_loss,
            initial_eval_loss: self.initial_eval,
            final_eval_loss: eval_curve.last().filter(|e| e.0 > 0).map(|e| e.1),
            peak_rss_mib: crate::sys::peak_rss_mib(),
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
            skipped_records: self.skipped_records,
            ranks: dist::size(),
            allreduce_seconds: dist::sum_seconds(),
            compute_dtype: cfg.compute_dtype.name().into(),
            kernels: cfg.compute_dtype.kernels(),
        };
        if dist::is_root() {
            let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
            crate::io::write_text(&self.run.out.join("summary.json"), &json)?;
        }
        Ok(summary)
    }
}

/// Runs training end to end: setup, resume, start, steps (a checkpoint and a clean stop on
/// Ctrl-C), finish.
///
/// # Errors
/// Invalid settings or data (all problems listed), model errors, non-finite numbers (after
/// which the last good checkpoint stays on disk).
pub fn train(run: &TrainRun, obs: &mut dyn Observer) -> Result<TrainSummary> {
    let mut t = Trainer::setup(run.clone(), obs)?;
    t.resume(obs)?;
    t.start(obs)?;
    let mut interrupted = false;
    while t.done() < t.total() {
        if dist::any(crate::sys::interrupted()) {
            let p = t.save_checkpoint(t.final_loss)?;
            obs.event(Event::Checkpoint(&p));
            interrupted = true;
            break;
        }
        t.step(obs)?;
    }
    t.finish(interrupted)
}

/// Accumulates `src` into `dst` tensor by tensor (the same ids in the same order every
/// micro-batch).
fn accumulate(dst: &mut Grads, src: Grads) {
    if dst.is_empty() {
        *dst = src;
        return;
    }
    for ((dn, d), (sn, s)) in dst.iter_mut().zip(src) {
        assert_eq!(*dn, sn, "micro-batches produced gradients in another order");
        crate::ops::add_assign(d, &s);
    }
}

/// One optimizer step of `model` on `batches` (the step's micro-batches, all ranks') as step
/// `step` (1-based) at learning rate `lr`: returns (mean loss, gradient norm before clipping).
/// This rank computes its `batches.len() / N` micro-batches (dropout keyed by each one's index
/// in the step); gradients and losses are summed across ranks before clipping and AdamW.
///
/// # Errors
/// [`Error::NonFinite`] naming the loss or the first gradient at fault (its
/// `last_checkpoint` left for the caller, [`Error::with_last_checkpoint`]); model errors.
pub fn optimizer_step(
    model: &mut Llama,
    opt: &mut AdamW,
    batches: &[Batch],
    cfg: &TrainConfig,
    (step, lr): (usize, f32),
) -> Result<(f64, f64)> {
    let total_labels: usize = batches.iter().map(Batch::label_count).sum();
    let opts = StepOptions {
        gradient_checkpointing: cfg.checkpointing(),
        grad_scale: 1.0 / total_labels.max(1) as f32,
    };
    let mut grads: Grads = Vec::new();
    let mut loss_sum = 0.0;
    let base = Rng::new(cfg.seed).fork(1_000_000 + step as u64);
    let per_rank = batches.len() / dist::size();
    let first = dist::rank() * per_rank;
    for (k, batch) in batches.iter().enumerate().skip(first).take(per_rank) {
        let mut rng = base.fork(k as u64);
        let (ids, labels) = (&batch.ids, &batch.labels);
        let (s, _, g) = model.forward_backward(ids, labels, batch.b, batch.t, &opts, &mut rng)?;
        loss_sum += s;
        accumulate(&mut grads, g);
    }
    if dist::size() > 1 {
        loss_sum = sum_across_ranks(&mut grads, loss_sum);
    }
    let loss = loss_sum / total_labels.max(1) as f64;
    let non_finite = |what: String, value: f64| Error::NonFinite {
        step,
        what,
        value,
        last_checkpoint: String::new(),
    };
    if !loss.is_finite() {
        return Err(non_finite("loss".into(), loss));
    }
    // A NaN or Inf anywhere makes the global norm non-finite; only then look for the culprit.
    let norm = global_norm(&grads);
    if !norm.is_finite() {
        if let Some((id, g)) = grads.iter().find(|(_, g)| g.iter().any(|v| !v.is_finite())) {
            let v = g
                .iter()
                .find(|v| !v.is_finite())
                .copied()
                .unwrap_or(f32::NAN);
            return Err(non_finite(format!("gradient of {}", id.key()), v as f64));
        }
        return Err(non_finite("gradient norm".into(), norm));
    }
    let grad_scale = if cfg.max_grad_norm > 0.0 {
        clip_coefficient(norm, cfg.max_grad_norm)
    } else {
        1.0
    };
    opt.begin_step();
    for (id, g) in grads {
        opt.update(id, model.param_mut(id), (&g, grad_scale), lr);
    }
    Ok((loss, norm))
}

/// Sums the gradients (one flat buffer, one collective) and the loss across ranks.
fn sum_across_ranks(grads: &mut Grads, loss_sum: f64) -> f64 {
    let mut flat: Vec<f32> = Vec::with_capacity(grads.iter().map(|(_, g)| g.len()).sum());
    for (_, g) in grads.iter() {
        flat.extend_from_slice(g);
    }
    dist::sum_f32(&mut flat);
    let mut at = 0;
    for (_, g) in grads.iter_mut() {
        let n = g.len();
        g.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    let mut l = [loss_sum];
    dist::sum_f64(&mut l);
    l[0]
}

/// Token positions in one optimizer step, all ranks' micro-batches.
fn tokens_per_step(cfg: &TrainConfig) -> f64 {
    (cfg.batch_size * cfg.grad_accum * cfg.seq_len * dist::size()) as f64
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

/// Writes the final adapter or model, tokenizer files, resolved config and loss plot.
fn write_outputs(
    run: &TrainRun,
    model: &Llama,
    lora: Option<&LoraConfig>,
    metrics: &Metrics,
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
            points: metrics
                .train_curve
                .iter()
                .map(|&(s, l)| (s as f64, l))
                .collect(),
        },
        plot::Series {
            label: "eval".into(),
            points: metrics
                .eval_curve
                .iter()
                .map(|&(s, l)| (s as f64, l))
                .collect(),
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
