//! `qdora compare`: trains each mode (and rank) in its own `qdora train` process, so that peak
//! memory is measured per mode, with the same data order, seed, steps and schedule; then writes
//! `compare.md`, `compare.json` and the eval-loss plot(s).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

use super::args::CompareArgs;
use crate::model::tokenizer::Tokenizer;
use crate::model::{load, BaseStorage, LoadOptions};
use crate::train::compare::{curves_svg, markdown, rank_svg, CompareRow};
use crate::train::data::{self, DataOptions};
use crate::train::{evaluate, Mode, TrainConfig, TrainSummary, PRESET_PREFIX};

/// Synthetic pre-tokenized data for random presets (speed and memory columns only).
fn synthetic_data(path: &Path, vocab: usize, records: usize, len: usize, seed: u64) -> Result<()> {
    let mut rng = crate::ops::Rng::new(seed);
    let mut s = String::new();
    for _ in 0..records {
        let ids: Vec<String> = (0..len)
            .map(|_| (rng.next_u64() % vocab as u64).to_string())
            .collect();
        s.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
    }
    crate::io::write_text(path, &s)?;
    Ok(())
}

/// Runs `qdora compare`.
pub fn run(a: CompareArgs) -> Result<ExitCode> {
    let (modes, ranks) = (a.modes.clone(), a.r.clone());
    if ranks.is_empty() || modes.is_empty() {
        anyhow::bail!("--modes and --r need at least one value each");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (model, data): (PathBuf, PathBuf) = match &a.preset {
        Some(p) => {
            let c =
                crate::model::random::preset(p).with_context(|| format!("unknown preset {p}"))?;
            let data = match &a.data {
                Some(d) => d.clone(),
                None => {
                    let d = a.out.join("synthetic.jsonl");
                    let records = (a.steps + 2) * a.batch_size + 8;
                    synthetic_data(&d, c.vocab_size, records, a.seq_len, a.seed)?;
                    d
                }
            };
            (PathBuf::from(format!("{PRESET_PREFIX}{p}")), data)
        }
        None => (
            super::model_dir(a.model.clone())?,
            match &a.data {
                Some(d) => d.clone(),
                None => crate::embedded::tinyshakespeare()?,
            },
        ),
    };
    let exe = std::env::current_exe().context("locating the qdora binary")?;
    let mut rows = Vec::new();
    for &r in &ranks {
        for &mode in &modes {
            if mode == Mode::Full && r != ranks[0] {
                continue;
            }
            let name = if mode == Mode::Full {
                "full".to_string()
            } else {
                format!("{}-r{r}", mode.as_str())
            };
            let out = a.out.join(&name);
            let alpha = a.lora_alpha.unwrap_or(4.0 * r as f64);
            let lr = if mode == Mode::Full { a.full_lr } else { a.lr };
            let mut cmd = Command::new(&exe);
            cmd.arg("train")
                .arg("--model")
                .arg(&model)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&out)
                .args([
                    "--mode",
                    mode.as_str(),
                    "--overwrite",
                    "--schedule",
                    "cosine",
                ])
                .arg(format!("--r={r}"))
                .arg(format!("--lora-alpha={alpha}"))
                .arg(format!("--lr={lr}"))
                .arg(format!("--max-steps={}", a.steps))
                .arg(format!("--batch-size={}", a.batch_size))
                .arg(format!("--seq-len={}", a.seq_len))
                .arg(format!("--seed={}", a.seed))
                .arg(format!("--eval-every={}", a.eval_every))
                .arg(format!("--lora-dropout={}", a.lora_dropout))
                .arg(format!("--compute-dtype={}", a.compute_dtype.name()));
            if let Some(e) = &a.eval_data {
                cmd.arg("--eval-data").arg(e);
            }
            eprintln!("== {name}");
            let st = cmd
                .status()
                .with_context(|| format!("running {}", exe.display()))?;
            if !st.success() {
                anyhow::bail!("training {name} failed ({st})");
            }
            let text = std::fs::read_to_string(out.join("summary.json"))
                .with_context(|| format!("reading {}/summary.json", out.display()))?;
            let s: TrainSummary = serde_json::from_str(&text)?;
            rows.push(CompareRow::from_summary(
                &s,
                if mode == Mode::Full { 0 } else { r },
            ));
        }
    }
    // The base model's eval loss on the same held-out data, dense and NF4.
    let (base_dense, base_nf4) = if a.preset.is_none() {
        let tok = Tokenizer::load(&model).ok();
        let dopts = DataOptions {
            seq_len: a.seq_len,
            packing: true,
            train_on_prompt: false,
            skip_bad_records: false,
        };
        let eval_seqs = match &a.eval_data {
            Some(e) => data::load(e, tok.as_ref(), &dopts)?.sequences,
            None => {
                data::split(
                    data::load(&data, tok.as_ref(), &dopts)?.sequences,
                    TrainConfig::default().eval_fraction,
                )
                .1
            }
        };
        let ev = |storage| -> Result<f64> {
            let mut m = load(
                &model,
                &LoadOptions {
                    storage,
                    ..Default::default()
                },
            )?;
            m.ensure_positions(a.seq_len);
            Ok(evaluate(&mut m, &eval_seqs, a.batch_size)?)
        };
        (
            Some(ev(BaseStorage::Dense)?),
            Some(ev(BaseStorage::Quantize(Default::default()))?),
        )
    } else {
        (None, None)
    };
    let table = markdown(&rows, base_dense, base_nf4);
    crate::io::write_text(&a.out.join("compare.md"), &table)?;
    crate::io::write_text(
        &a.out.join("compare.json"),
        &serde_json::to_string_pretty(&rows)?,
    )?;
    let title = format!("eval loss, {} steps", a.steps);
    crate::io::write_text(&a.out.join("eval_loss.svg"), &curves_svg(&rows, &title))?;
    if ranks.len() > 1 {
        crate::io::write_text(
            &a.out.join("rank_sweep.svg"),
            &rank_svg(&rows, "final eval loss by rank"),
        )?;
    }
    println!("{table}");
    println!(
        "wrote {}/compare.md, compare.json, eval_loss.svg",
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
