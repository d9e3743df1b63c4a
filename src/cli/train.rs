//! `qdora train`: settings from defaults, `--config` TOML and flags; a progress bar; a summary;
//! optionally a sample generation with the new adapter.

use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::TrainArgs;
use crate::train::{self, Event, Mode, Observer, TrainConfig, TrainOverrides, TrainRun};

struct Bar {
    bar: Option<ProgressBar>,
}

impl Observer for Bar {
    fn event(&mut self, e: Event<'_>) {
        // Under MPI, rank 0 alone speaks.
        if !crate::dist::is_root() {
            return;
        }
        match e {
            Event::Start {
                trainable,
                memory,
                total,
                first,
            } => {
                eprintln!("{trainable}\n{memory}");
                let bar = ProgressBar::new(total as u64);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_position(first as u64);
                self.bar = Some(bar);
            }
            Event::Step(r) => {
                if let Some(b) = &self.bar {
                    let eval = r
                        .eval_loss
                        .map(|e| format!(" eval {e:.4}"))
                        .unwrap_or_default();
                    b.set_message(format!(
                        "loss {:.4}{eval} lr {:.2e} {:.0} tok/s",
                        r.loss, r.lr, r.tokens_per_s
                    ));
                    b.set_position(r.step as u64);
                    if r.eval_loss.is_some() {
                        b.println(format!("step {} train loss {:.4}{eval}", r.step, r.loss));
                    }
                }
            }
            Event::Checkpoint(p) => match &self.bar {
                Some(b) => b.println(format!("checkpoint {}", p.display())),
                None => eprintln!("checkpoint {}", p.display()),
            },
            Event::Message(m) => match &self.bar {
                Some(b) => b.println(m),
                None => eprintln!("{m}"),
            },
        }
    }
}

/// Settings of the bundled demo (no --model, --data or --config): QDoRA on stories260K with
/// tinyshakespeare, sized to finish in about a minute on two cores.
pub fn demo_config() -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        max_steps: Some(150),
        batch_size: 8,
        seq_len: 256,
        eval_every: 25,
        ..TrainConfig::default()
    }
}

fn is_demo(a: &TrainArgs) -> bool {
    a.model.is_none() && a.data.is_none() && a.config.is_none()
}

/// Resolves settings: defaults (or the demo's) < TOML file < flags.
fn resolve(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = if is_demo(a) {
        demo_config()
    } else {
        TrainConfig::default()
    };
    let file = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<TrainOverrides>(&text)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => TrainOverrides::default(),
    };
    let mut flags = a.settings.clone();
    if a.no_gradient_checkpointing {
        flags.gradient_checkpointing = Some(Some(false));
    }
    if a.no_packing {
        flags.packing = Some(false);
    }
    if a.eval_data.is_some() {
        flags.eval_fraction = Some(0.0);
    }
    flags.or(file).apply_to(&mut c);
    Ok(c)
}

/// Runs `qdora train`.
pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let config = resolve(&a)?;
    let demo = is_demo(&a);
    if demo {
        eprintln!(
            "no --model/--data: {} demo on the bundled stories260K with tinyshakespeare (lr {}, {} steps, batch {} x {})",
            config.mode.as_str(),
            config.lr,
            config.max_steps.unwrap_or(0),
            config.batch_size,
            config.seq_len
        );
    }
    let model_dir = super::model_dir(a.model.clone())?;
    let data = match &a.data {
        Some(d) => d.clone(),
        None => crate::embedded::tinyshakespeare()
            .context("writing the bundled tinyshakespeare text")?,
    };
    crate::sys::install_interrupt_handler();
    let run = TrainRun {
        model_dir: model_dir.clone(),
        data,
        eval_data: a.eval_data.clone(),
        out: a.out.clone(),
        config,
        resume: a.resume,
        overwrite: a.overwrite,
        force: a.force,
    };
    let mut obs = Bar { bar: None };
    let s = train::train(&run, &mut obs)
        .with_context(|| format!("training {} in {}", model_dir.display(), a.out.display()))?;
    if let Some(b) = &obs.bar {
        b.finish_and_clear();
    }
    if !crate::dist::is_root() {
        return Ok(ExitCode::SUCCESS);
    }
    if s.interrupted {
        eprintln!(
            "interrupted at step {}: checkpoint saved in {}; continue with --resume",
            s.steps,
            a.out.display()
        );
        return Ok(ExitCode::from(130));
    }
    let ranks = if s.ranks > 1 {
        format!(
            " | {} ranks (peak RSS of rank 0; all-reduce {:.2} s, {:.1}% of the run)",
            s.ranks,
            s.allreduce_seconds,
            100.0 * s.allreduce_seconds / s.train_seconds.max(1e-9)
        )
    } else {
        String::new()
    };
    println!(
        "mode {} | {} steps in {:.1} s | {:.0} tokens/s | peak RSS {:.0} MiB{ranks}",
        s.mode, s.steps, s.train_seconds, s.tokens_per_s, s.peak_rss_mib
    );
    println!(
        "trainable {} of {} ({:.2}%)",
        crate::model::llama::thousands(s.trainable_params),
        crate::model::llama::thousands(s.total_params),
        100.0 * s.trainable_params as f64 / s.total_params.max(1) as f64
    );
    match (s.initial_eval_loss, s.final_eval_loss) {
        (Some(a0), Some(a1)) => println!(
            "eval loss {a0:.4} -> {a1:.4} (perplexity {:.2} -> {:.2}); final train loss {:.4}",
            a0.exp(),
            a1.exp(),
            s.final_train_loss
        ),
        _ => println!("final train loss {:.4}", s.final_train_loss),
    }
    println!("wrote {}", a.out.display());
    let sample = a
        .sample_prompt
        .clone()
        .or_else(|| demo.then(|| "ROMEO:".to_string()));
    if let Some(prompt) = &sample {
        let is_full = run.config.mode == Mode::Full;
        let gen = super::args::GenerateArgs {
            model: super::args::ModelArgs {
                model: Some(if is_full { a.out.clone() } else { model_dir }),
                adapter: (!is_full).then(|| a.out.clone()),
            },
            compute_dtype: Some(run.config.compute_dtype),
            prompt: prompt.clone(),
            chat: false,
            max_new_tokens: a.sample_tokens,
            temperature: a.sample_temperature,
            top_k: 40,
            top_p: 1.0,
            seed: run.config.seed,
        };
        println!("--- sample ---");
        super::infer::generate(gen)?;
    }
    Ok(ExitCode::SUCCESS)
}
