//! Helpers shared by the integration tests that compare against reference fixtures.
// Each test crate includes this module and uses only some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qdora::io::Checkpoint;
use qdora::model::{Grads, Llama, StepOptions};
use qdora::ops::Rng;

/// Largest element-wise `|a − b|`; the lengths must agree.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A (batch, seq) i64 token tensor of a reference file as u32 ids, with its shape.
pub fn ids(r: &Checkpoint, key: &str) -> (Vec<u32>, usize, usize) {
    let t = r.get(key).unwrap();
    let v = t.to_i64().unwrap().into_iter().map(|x| x as u32).collect();
    (v, t.shape[0], t.shape[1])
}

/// Runs the binary: (success, stdout, stderr).
pub fn qdora(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qdora"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// `dir/d.jsonl`: 16 pre-tokenized records of 40 ids (steps of 7 mod 256) for short runs on
/// the tiny fixture model.
pub fn small_token_data(dir: &Path) -> PathBuf {
    let data = dir.join("d.jsonl");
    let mut text = String::new();
    for r in 0..16 {
        let ids: Vec<String> = (0..40)
            .map(|i| ((r * 5 + i * 7) % 256).to_string())
            .collect();
        text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
    }
    std::fs::write(&data, text).unwrap();
    data
}

/// The mean loss of one batch over its predicted tokens (labels shifted, -100 ignored) and the
/// gradients of that mean, as the PEFT fixtures hold them (no checkpointing, no dropout).
pub fn mean_loss_and_grads(
    m: &mut Llama,
    ids: &[u32],
    labels: &[i64],
    b: usize,
    t: usize,
) -> (f64, Grads) {
    let count = (0..b)
        .map(|bi| (1..t).filter(|&i| labels[bi * t + i] != -100).count())
        .sum::<usize>();
    let opts = StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0 / count as f32,
    };
    let (sum, n, grads) = m
        .forward_backward(ids, labels, b, t, &opts, &mut Rng::new(0))
        .unwrap();
    assert_eq!(n, count, "tokens the loss counted");
    (sum / n as f64, grads)
}
