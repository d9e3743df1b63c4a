//! Helpers shared by the integration tests that compare against reference fixtures.
// Each test crate includes this module and uses only some of it.
#![allow(dead_code)]

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
