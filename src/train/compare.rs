//! The five-mode comparison: rows built from each run's `summary.json`, rendered as a Markdown
//! table, a JSON list and SVG plots (eval-loss curves; final eval loss against rank).

use serde::Serialize;

use super::plot::{self, Series};
use super::trainer::TrainSummary;

/// One row of the comparison (one mode at one rank).
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    /// Mode.
    pub mode: String,
    /// LoRA rank (0 for full fine-tuning).
    pub r: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Trainable parameters as % of the model.
    pub trainable_pct: f64,
    /// Base weights as stored (MiB).
    pub weight_mib: f64,
    /// Peak resident memory of the training process (MiB).
    pub peak_rss_mib: f64,
    /// Median seconds per step.
    pub step_s: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Final eval loss.
    pub eval_loss: Option<f64>,
    /// exp(eval loss).
    pub perplexity: Option<f64>,
    /// Final train loss.
    pub train_loss: f64,
    /// (step, eval loss).
    pub eval_curve: Vec<(usize, f64)>,
    /// What the frozen weights' products computed in (`f32`, `bf16`).
    pub compute_dtype: String,
}

impl CompareRow {
    /// A row from a run summary.
    pub fn from_summary(s: &TrainSummary, r: usize) -> Self {
        Self {
            mode: s.mode.clone(),
            r,
            trainable_params: s.trainable_params,
            trainable_pct: 100.0 * s.trainable_params as f64 / s.total_params.max(1) as f64,
            weight_mib: s.weight_bytes as f64 / (1024.0 * 1024.0),
            peak_rss_mib: s.peak_rss_mib,
            step_s: s.step_seconds,
            tokens_per_s: s.tokens_per_s,
            eval_loss: s.final_eval_loss,
            perplexity: s.final_eval_loss.map(f64::exp),
            train_loss: s.final_train_loss,
            eval_curve: s.eval_curve.clone(),
            compute_dtype: s.compute_dtype.clone(),
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The Markdown table, with the base model's eval loss (dense and NF4) as reference lines.
pub fn markdown(rows: &[CompareRow], base_dense: Option<f64>, base_nf4: Option<f64>) -> String {
    let mut s = String::from(
        "| mode | compute | r | trainable params | trainable % | weights as stored (MiB) | peak RSS (MiB) | s/step | tokens/s | eval loss | eval ppl |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.2} | {:.0} | {:.3} | {:.0} | {} | {} |\n",
            r.mode,
            r.compute_dtype,
            if r.mode == "full" {
                "–".to_string()
            } else {
                r.r.to_string()
            },
            crate::model::llama::thousands(r.trainable_params),
            r.trainable_pct,
            r.weight_mib,
            r.peak_rss_mib,
            r.step_s,
            r.tokens_per_s,
            opt(r.eval_loss, 4),
            opt(r.perplexity, 2),
        ));
    }
    if base_dense.is_some() || base_nf4.is_some() {
        s.push_str(&format!(
            "\nBase model before training: eval loss {} (dense f32), {} (NF4 + double quant).\n",
            opt(base_dense, 4),
            opt(base_nf4, 4)
        ));
    }
    s
}

/// Eval-loss curves of every row in one SVG.
pub fn curves_svg(rows: &[CompareRow], title: &str) -> String {
    let series: Vec<Series> = rows
        .iter()
        .map(|r| Series {
            label: if r.mode == "full" {
                "full".into()
            } else {
                format!("{} r={}", r.mode, r.r)
            },
            points: r.eval_curve.iter().map(|&(s, l)| (s as f64, l)).collect(),
        })
        .collect();
    plot::svg(title, "step", "eval loss", &series)
}

/// Final eval loss against rank, one line per mode.
pub fn rank_svg(rows: &[CompareRow], title: &str) -> String {
    let mut modes: Vec<String> = rows.iter().map(|r| r.mode.clone()).collect();
    modes.dedup();
    let series: Vec<Series> = modes
        .iter()
        .map(|m| Series {
            label: m.clone(),
            points: rows
                .iter()
                .filter(|r| &r.mode == m)
                .filter_map(|r| r.eval_loss.map(|e| ((r.r as f64).log2(), e)))
                .collect(),
        })
        .collect();
    plot::svg(title, "log2(rank)", "final eval loss", &series)
}
