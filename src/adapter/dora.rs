//! DoRA's weight norm (arXiv:2402.09353, PEFT `dora.py`): `‖W + s·B·A‖` per output row, computed
//! without forming the `out × in` matrix `W + sBA`:
//!
//! `‖W + sBA‖²_o = ‖W_o‖² + 2s·Σ_r B_or (W·Aᵀ)_or + s²·B_o (A·Aᵀ) B_oᵀ`
//!
//! `‖W‖²` is cached once (the base is frozen), `W·Aᵀ` is one pass over W with the forward kernel
//! (4-bit too), `A·Aᵀ` is `r × r`. All in f32, clamped at 0 against rounding, and guarded by
//! [`NORM_EPS`] so a zero row gives a zero scale instead of PEFT's NaN (PEFT issue #2049).
//!
//! Also DoRA's output-side passes over `(N, out)` buffers: the scale `k` applied to a layer's
//! output, PEFT's dropout form, and the gradients of the magnitude and of `k⊙dy`.

use rayon::prelude::*;

use super::base::BaseWeight;
use crate::ops::{self, uninit, Kept};

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

/// Rows per parallel work item in the element-wise passes over (N, out) buffers.
const ROWS: usize = 16;

/// DoRA's part of a layer's saved state.
pub(super) struct DoraSaved {
    /// (out) `k = m / ‖W + sBA‖`.
    pub k: Vec<f32>,
    /// (out) the detached norm.
    pub norm: Vec<f32>,
    /// (N, out) the term `k` multiplies (gradient of `m`), rounded to bf16 in a bf16 run.
    pub z: Kept,
    /// The base product also saw the dropped-out input (PEFT's form).
    pub base_dropout: bool,
}

impl DoraSaved {
    /// `(z, k)` where the layer's output is exactly `k⊙z` (no base dropout).
    pub fn output_factors(&self) -> Option<(&Kept, &[f32])> {
        (!self.base_dropout).then_some((&self.z, self.k.as_slice()))
    }
}

/// PEFT-form DoRA's output from its parts, in one pass: with `z = x_d·Wᵀ` (in) and
/// `v = s·u·Bᵀ`, `y += (k−1)⊙z + k⊙v` and `z += v` (out: the term `k` multiplies).
pub(super) fn combine_base_dropout(y: &mut [f32], z: &mut [f32], v: &[f32], k: &[f32]) {
    let out = k.len();
    y.par_chunks_mut(out * ROWS)
        .zip(z.par_chunks_mut(out * ROWS))
        .zip(v.par_chunks(out * ROWS))
        .for_each(|((yr, zr), vr)| {
            for ((y, z), v) in yr
                .chunks_mut(out)
                .zip(zr.chunks_mut(out))
                .zip(vr.chunks(out))
            {
                for ((y, z), (&v, &k)) in y.iter_mut().zip(z).zip(v.iter().zip(k)) {
                    let bt = *z;
                    *y += (k - 1.0) * bt + k * v;
                    *z = bt + v;
                }
            }
        });
}

/// DoRA's output-side gradients in one pass over `dy`: `k⊙dy` (N, out), `(k−1)⊙dy` when the
/// base saw the dropped-out input, and `dm = Σ_rows dy⊙z / ‖·‖` (out; partial sums per fixed
/// row block, added in order, so the result does not depend on thread scheduling). `z` is read
/// as it was kept: a bf16 `z` is widened in the same pass, not into a buffer of its own first.
pub(super) fn output_grads(
    dy: &[f32],
    d: DoraSaved,
    n: usize,
    out: usize,
) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
    let DoraSaved {
        k,
        norm,
        z,
        base_dropout,
    } = d;
    assert!(dy.len() == n * out && z.len() == n * out, "DoRA dy/z shape");
    let (kdy, partials) = match &z {
        Kept::F32(z) => scaled_with_sums(dy, z, &k, out, |v| v),
        Kept::Bf16(z) => scaled_with_sums(dy, z, &k, out, |v| v.to_f32()),
    };
    drop(z);
    let g1 = base_dropout.then(|| {
        let km1: Vec<f32> = k.iter().map(|k| k - 1.0).collect();
        scale_columns(dy, out, &km1)
    });
    let mut dm = ops::reduce_parts(&partials, out);
    for (v, nn) in dm.iter_mut().zip(&norm) {
        *v /= nn.max(NORM_EPS);
    }
    (kdy, g1, dm)
}

/// `k⊙dy` into a new buffer, and per block of [`ROWS`] rows the column sums of `dy⊙z`, `z`
/// widened to f32 by `widen` as it is read.
fn scaled_with_sums<Z: Copy + Sync>(
    dy: &[f32],
    z: &[Z],
    k: &[f32],
    out: usize,
    widen: impl Fn(Z) -> f32 + Sync,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let rows = dy.len() / out.max(1);
    assert!(z.len() == dy.len() && k.len() == out && rows * out == dy.len());
    uninit::new_rows_folded(
        rows,
        out,
        ROWS,
        || vec![0f32; out],
        |acc, i, row| {
            let (dy, z) = (&dy[i * out..][..out], &z[i * out..][..out]);
            // zipped, not indexed: the indexed loop kept its bounds checks and ran scalar
            let cols = acc.iter_mut().zip(dy.iter().zip(z).zip(k));
            row.fill(cols.map(|(a, ((&dy, &z), &k))| {
                *a += dy * widen(z);
                k * dy
            }))
        },
    )
}

/// `y[i, o] = c[o] · x[i, o]` for rows of `width` (DoRA's `k⊙z`, `(k−1)⊙dy`), in parallel,
/// into a new vector that is not zeroed first.
///
/// # Panics
/// If `c` does not have `width` factors or `x` is not a whole number of rows.
pub(super) fn scale_columns(x: &[f32], width: usize, c: &[f32]) -> Vec<f32> {
    assert_eq!(c.len(), width, "one factor per column");
    assert_eq!(x.len() % width.max(1), 0, "whole rows");
    let rows = x.len() / width.max(1);
    uninit::new_rows(rows, width, |i, row| {
        let xr = &x[i * width..(i + 1) * width];
        row.fill(xr.iter().zip(c).map(|(&x, &c)| c * x))
    })
}

/// `y[i, o] *= c[o]` for rows of `width` (DoRA's inference scale), in parallel.
pub(super) fn scale_columns_in_place(y: &mut [f32], width: usize, c: &[f32]) {
    y.par_chunks_mut(width.max(1) * ROWS).for_each(|rows| {
        for row in rows.chunks_mut(width.max(1)) {
            row.iter_mut().zip(c).for_each(|(v, kk)| *v *= kk);
        }
    });
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
