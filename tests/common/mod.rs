//! Helpers shared by the integration tests that compare against reference fixtures.
// Each test crate includes this module and uses only some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qdora::io::Checkpoint;

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
