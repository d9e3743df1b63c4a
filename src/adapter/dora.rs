//! DoRA's weight norm (arXiv:2402.09353, PEFT `dora.py`): `‖W + s·B·A‖` per output row, computed
//! without forming the `out × in` matrix `W + sBA`:
//!
//! `‖W + sBA‖²_o = ‖W_o‖² + 2s·Σ_r B_or (W·Aᵀ)_or + s²·B_o (A·Aᵀ) B_oᵀ`
//!
//! `‖W‖²` is cached once (the base is frozen), `W·Aᵀ` is one pass over W with the forward kernel
//! (4-bit too), `A·Aᵀ` is `r × r`. All in f32, clamped at 0 against rounding, and guarded by
//! [`NORM_EPS`] so a zero row gives a zero scale instead of PEFT's NaN (PEFT issue #2049).

use super::base::BaseWeight;
use crate::ops;

/// Smallest norm divided by: rows of `W + sBA` that are exactly zero get `k = m / NORM_EPS`,
/// which is 0 when `m` is 0 (their initial value), instead of NaN.
pub const NORM_EPS: f32 = 1e-12;

/// `‖W + s·B·A‖` per row, given the cached `‖W‖²` per row. `a: (r × in)`, `b: (out × r)`.
pub fn weight_norm(
    base: &BaseWeight,
    w_norm_sq: &[f32],
    a: &[f32],
    b: &[f32],
    r: usize,
    scaling: f32,
) -> Vec<f32> {
    weight_norm_with(&base.times_at(a, r), w_norm_sq, a, b, r, scaling)
}

/// [`weight_norm`] from a given `W·Aᵀ (out × r)` (computed alongside the forward product).
pub fn weight_norm_with(
    wat: &[f32],
    w_norm_sq: &[f32],
    a: &[f32],
    b: &[f32],
    r: usize,
    scaling: f32,
) -> Vec<f32> {
    let out = w_norm_sq.len();
    let inp = a.len() / r.max(1);
    let aat = ops::matmul_nt(a, r, a, r, inp); // (r × r)
    (0..out)
        .map(|o| {
            let bo = &b[o * r..(o + 1) * r];
            let cross: f32 = bo
                .iter()
                .zip(&wat[o * r..(o + 1) * r])
                .map(|(x, y)| x * y)
                .sum();
            let mut ba2 = 0f32;
            for i in 0..r {
                let row: f32 = (0..r).map(|j| aat[i * r + j] * bo[j]).sum();
                ba2 += bo[i] * row;
            }
            let n2 = w_norm_sq[o] + 2.0 * scaling * cross + scaling * scaling * ba2;
            n2.max(0.0).sqrt()
        })
        .collect()
}

/// `k = m / max(norm, NORM_EPS)`: DoRA's per-row output scale (norm detached).
pub fn magnitude_scale(magnitude: &[f32], norm: &[f32]) -> Vec<f32> {
    magnitude
        .iter()
        .zip(norm)
        .map(|(m, n)| m / n.max(NORM_EPS))
        .collect()
}

/// The dense reference: `‖W + s·B·A‖` per row by forming the matrix (tests and merge).
pub fn weight_norm_dense(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    scaling: f32,
) -> Vec<f32> {
    let ba = ops::matmul_nn(b, out, a, r, inp);
    (0..out)
        .map(|o| {
            (0..inp)
                .map(|i| {
                    let v = w[o * inp + i] + scaling * ba[o * inp + i];
                    v * v
                })
                .sum::<f32>()
                .sqrt()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factored_norm_equals_dense_norm_and_zero_rows_are_safe() {
        let (out, inp, r) = (6, 10, 3);
        let mut rng = ops::Rng::new(5);
        let mut w: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
        w[2 * inp..3 * inp].fill(0.0); // a zero row
        let a: Vec<f32> = (0..r * inp).map(|_| rng.normal() * 0.3).collect();
        let mut b: Vec<f32> = (0..out * r).map(|_| rng.normal() * 0.3).collect();
        b[2 * r..3 * r].fill(0.0);
        let base = BaseWeight::Dense {
            w: w.clone(),
            out,
            inp,
        };
        let got = weight_norm(&base, &base.row_norms_sq(), &a, &b, r, 2.0);
        let want = weight_norm_dense(&w, &a, &b, out, inp, r, 2.0);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.max(1.0), "{g} vs {w}");
        }
        assert_eq!(got[2], 0.0);
        let k = magnitude_scale(&[0.0; 6], &got);
        assert!(k.iter().all(|v| v.is_finite()));
    }
}
