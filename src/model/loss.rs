//! The LM head with causal-LM cross-entropy, chunked: logits are formed for at most
//! [`CHUNK_ROWS`] (or [`LEAN_CHUNK_ROWS`]) positions at a time and only for positions that
//! carry a label, so the `(N, V)` logits matrix never exists during training.
//!
//! Loss as transformers computes it: position `i` predicts `labels[i + 1]` of the same sequence,
//! `-100` is ignored, the mean is over counted positions. Gradient of the summed loss w.r.t. the
//! logits of a row is `softmax − onehot`; `dh = dlogits·W`, `dW = dlogitsᵀ·h`.

use rayon::prelude::*;

use crate::adapter::BaseWeight;
use crate::ops::{self, Accum, MatMut, MatRef, Par};

/// Label value that is not predicted (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;
/// Positions per logits chunk: with 512 rows the head's products ran at 270 (`x·Wᵀ`) and 282
/// (`dlogits·W`) GFLOP/s against 231 and 264 with 256 rows (AVX-512 kernels, 32000 × 1024
/// head), for 64 MiB of logits at a time.
pub const CHUNK_ROWS: usize = 512;
/// Positions per logits chunk where memory comes first (training with activation
/// checkpointing): half the logits buffer of [`CHUNK_ROWS`].
pub const LEAN_CHUNK_ROWS: usize = 256;

/// Targets per position after the causal shift: `target[b·T + i] = labels[b·T + i + 1]`, the last
/// position of each sequence ignored.
pub fn shift_labels(labels: &[i64], b: usize, t: usize) -> Vec<i64> {
    let mut out = vec![IGNORE_INDEX; b * t];
    for bi in 0..b {
        for i in 0..t.saturating_sub(1) {
            out[bi * t + i] = labels[bi * t + i + 1];
        }
    }
    out
}

/// Result of [`head_loss`].
pub struct HeadLoss {
    /// Sum of the per-position losses (f64).
    pub loss_sum: f64,
    /// Number of positions counted.
    pub count: usize,
    /// (N, D) gradient w.r.t. the head input, of `grad_scale · loss_sum`.
    pub d_hidden: Vec<f32>,
    /// (V, D) gradient of the head weight, when asked for.
    pub d_weight: Option<Vec<f32>>,
}

/// Cross-entropy of `head(h)` against `targets` (already shifted), with gradients scaled by
/// `grad_scale` when `backward` is set, forming logits for `chunk_rows` positions at a time
/// ([`CHUNK_ROWS`] or [`LEAN_CHUNK_ROWS`]). The loss and `d_hidden` do not depend on the chunk
/// size, nor does the weight gradient between multiples of [`LEAN_CHUNK_ROWS`].
///
/// # Panics
/// If a target is outside the vocabulary (validated earlier by the model).
pub fn head_loss(
    h: &[f32],
    head: &BaseWeight,
    targets: &[i64],
    grad_scale: f32,
    backward: bool,
    weight_grad: bool,
    chunk_rows: usize,
) -> HeadLoss {
    let d = head.in_features();
    let v = head.out_features();
    let rows: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i] != IGNORE_INDEX)
        .collect();
    let mut d_hidden = if backward {
        vec![0f32; h.len()]
    } else {
        Vec::new()
    };
    let mut d_weight = (backward && weight_grad).then(|| vec![0f32; v * d]);
    let mut loss_sum = 0f64;
    for (ci, chunk) in rows.chunks(chunk_rows.max(1)).enumerate() {
        let c = chunk.len();
        let mut x = vec![0f32; c * d];
        for (k, &r) in chunk.iter().enumerate() {
            x[k * d..(k + 1) * d].copy_from_slice(&h[r * d..(r + 1) * d]);
        }
        let mut logits = head.forward(&x, c);
        let losses: Vec<f64> = logits
            .par_chunks_mut(v)
            .zip(chunk.par_iter())
            .map(|(row, &r)| {
                let tgt = targets[r] as usize;
                assert!(tgt < v, "target {tgt} outside vocabulary {v}");
                let target_logit = row[tgt];
                let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                // exp(x − max) in place (f32, vectorized), summed with 8 accumulators.
                row.iter_mut().for_each(|x| *x = ops::exp_neg(*x - mx));
                let sum = ops::sum(row);
                let loss = (mx - target_logit) as f64 + (sum as f64).ln();
                if backward {
                    let f = grad_scale / sum;
                    row.iter_mut().for_each(|x| *x *= f);
                    row[tgt] -= grad_scale;
                }
                loss
            })
            .collect();
        // row by row, so the sum does not depend on the chunk size
        loss_sum = losses.iter().fold(loss_sum, |acc, l| acc + l);
        if backward {
            let dx = head.backward_input(&logits, c);
            for (k, &r) in chunk.iter().enumerate() {
                d_hidden[r * d..(r + 1) * d].copy_from_slice(&dx[k * d..(k + 1) * d]);
            }
            if let Some(dw) = &mut d_weight {
                // Summed per block of LEAN_CHUNK_ROWS positions, in order, whatever the chunk:
                // the same bits with either chunk size (with or without checkpointing). The
                // first block writes: accumulating onto the fresh zeroed buffer made gemm read
                // every untouched page first (a read fault, then a copy-on-write fault), 1.1 s
                // instead of 0.3 s for a 32000×1024 head.
                let blocks = logits
                    .chunks(LEAN_CHUNK_ROWS * v)
                    .zip(x.chunks(LEAN_CHUNK_ROWS * d));
                for (bi, (lb, xb)) in blocks.enumerate() {
                    let rows = xb.len() / d;
                    let acc = if ci > 0 || bi > 0 {
                        Accum::Add
                    } else {
                        Accum::Write
                    };
                    let (lm, xm) = (MatRef::new(lb, rows, v), MatRef::new(xb, rows, d));
                    ops::gemm(MatMut::new(dw, v, d), acc, lm.t(), xm, 1.0, Par::All);
                }
            }
        }
    }
    HeadLoss {
        loss_sum,
        count: rows.len(),
        d_hidden,
        d_weight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;

    /// A random dense (v × d) head and (n × d) input.
    fn head_and_input(n: usize, d: usize, v: usize, seed: u64) -> (BaseWeight, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let w: Vec<f32> = (0..v * d).map(|_| rng.normal()).collect();
        let h: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        (BaseWeight::Dense { w, out: v, inp: d }, h)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (n, d, v) = (4, 3, 5);
        let (head, h) = head_and_input(n, d, v, 2);
        let targets = vec![1, IGNORE_INDEX, 4, 0];
        // chunks of 2 rows: the head's weight gradient is written, then added to
        let r = head_loss(&h, &head, &targets, 1.0, true, true, 2);
        assert_eq!(r.count, 3);
        let eps = 1e-2;
        for i in 0..h.len() {
            let mut p = h.clone();
            p[i] += eps;
            let lp = head_loss(&p, &head, &targets, 1.0, false, false, CHUNK_ROWS).loss_sum;
            p[i] -= 2.0 * eps;
            let lm = head_loss(&p, &head, &targets, 1.0, false, false, CHUNK_ROWS).loss_sum;
            let num = (lp - lm) / (2.0 * eps as f64);
            assert!(
                (num - r.d_hidden[i] as f64).abs() < 1e-2,
                "{num} vs {}",
                r.d_hidden[i]
            );
        }
        let dw = r.d_weight.unwrap();
        for i in 0..v * d {
            let mut hw = head.clone();
            if let BaseWeight::Dense { w, .. } = &mut hw {
                w[i] += eps;
            }
            let lp = head_loss(&h, &hw, &targets, 1.0, false, false, CHUNK_ROWS).loss_sum;
            if let BaseWeight::Dense { w, .. } = &mut hw {
                w[i] -= 2.0 * eps;
            }
            let lm = head_loss(&h, &hw, &targets, 1.0, false, false, CHUNK_ROWS).loss_sum;
            assert!(((lp - lm) / (2.0 * eps as f64) - dw[i] as f64).abs() < 1e-2);
        }
    }

    /// The head's weight gradient is summed per block of [`LEAN_CHUNK_ROWS`] positions, so
    /// the two chunk sizes training uses (with and without checkpointing) give the same bits.
    #[test]
    fn weight_gradient_is_the_same_for_both_chunk_sizes() {
        let (n, d, v) = (2 * LEAN_CHUNK_ROWS + 37, 6, 9);
        let (head, h) = head_and_input(n, d, v, 5);
        let targets: Vec<i64> = (0..n as i64).map(|i| i % v as i64).collect();
        let lean = head_loss(&h, &head, &targets, 0.5, true, true, LEAN_CHUNK_ROWS);
        let wide = head_loss(&h, &head, &targets, 0.5, true, true, CHUNK_ROWS);
        assert_eq!(lean.d_weight, wide.d_weight);
        assert_eq!(lean.d_hidden, wide.d_hidden);
        assert_eq!(lean.loss_sum.to_bits(), wide.loss_sum.to_bits());
    }

    /// Chunks split rows only: the loss and `d_hidden` are the same to the bit for any chunk
    /// size.
    #[test]
    fn chunk_size_changes_nothing() {
        let (n, d, v) = (7, 5, 11);
        let (head, h) = head_and_input(n, d, v, 4);
        let targets = vec![1, 3, IGNORE_INDEX, 10, 0, 2, 9];
        let whole = head_loss(&h, &head, &targets, 0.5, true, false, CHUNK_ROWS);
        for rows in [1, 2, 4, LEAN_CHUNK_ROWS] {
            let r = head_loss(&h, &head, &targets, 0.5, true, false, rows);
            assert_eq!(
                r.loss_sum.to_bits(),
                whole.loss_sum.to_bits(),
                "{rows} rows"
            );
            assert_eq!(r.d_hidden, whole.d_hidden, "{rows} rows");
        }
    }

    #[test]
    fn shift_ignores_last_position() {
        assert_eq!(
            shift_labels(&[5, 6, 7, 8], 2, 2),
            vec![6, IGNORE_INDEX, 8, IGNORE_INDEX]
        );
    }
}
