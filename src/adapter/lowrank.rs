//! The low-rank path's three thin products with the input-side dropout fused in, so the
//! dropped-out input `x_d` (as large as the layer input) is never materialised: each row of it
//! is rebuilt from `x` and the dropout's seed in a small per-thread buffer when needed.
//!
//! - [`xd_at`]: `u = x_d·Aᵀ` (N × R), forward.
//! - [`dut_xd`]: `dA = duᵀ·x_d` (R × in), backward.
//! - [`add_masked_du_a`]: `dx += dropoutᵀ(du·A [+ extra])` (N × in), backward.
//!
//! Without dropout `x_d = x` and the same functions apply. Work is split over fixed row blocks
//! and partial sums are added in block order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::dropout::Dropout;
use crate::ops;

/// Rows per parallel work item.
const ROWS: usize = 32;

/// Row `i` of `x_d` into `buf` (a copy of `x`'s row without dropout).
#[inline]
fn xd_row(x: &[f32], i: usize, inp: usize, drop: Option<&Dropout>, buf: &mut [f32]) {
    let row = &x[i * inp..(i + 1) * inp];
    match drop {
        Some(d) => d.apply_row(row, i, buf),
        None => buf.copy_from_slice(row),
    }
}

/// `u (n × r) = x_d · Aᵀ` for `x (n × inp)`, `A (r × inp)`.
pub fn xd_at(
    x: &[f32],
    n: usize,
    inp: usize,
    a: &[f32],
    r: usize,
    drop: Option<&Dropout>,
) -> Vec<f32> {
    let mut u = vec![0f32; n * r];
    u.par_chunks_mut(ROWS * r).enumerate().for_each(|(c, ub)| {
        let mut buf = vec![0f32; inp];
        for (k, urow) in ub.chunks_mut(r).enumerate() {
            xd_row(x, c * ROWS + k, inp, drop, &mut buf);
            for (j, v) in urow.iter_mut().enumerate() {
                *v = ops::dot(&buf, &a[j * inp..(j + 1) * inp]);
            }
        }
    });
    u
}

/// `dA (r × inp) = duᵀ · x_d` for `du (n × r)`, `x (n × inp)`.
pub fn dut_xd(
    du: &[f32],
    n: usize,
    r: usize,
    x: &[f32],
    inp: usize,
    drop: Option<&Dropout>,
) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(ROWS))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; r * inp];
            let mut buf = vec![0f32; inp];
            for i in c * ROWS..((c + 1) * ROWS).min(n) {
                xd_row(x, i, inp, drop, &mut buf);
                for (j, arow) in acc.chunks_mut(inp).enumerate() {
                    let g = du[i * r + j];
                    arow.iter_mut().zip(&buf).for_each(|(a, b)| *a += g * b);
                }
            }
            acc
        })
        .collect();
    let mut da = vec![0f32; r * inp];
    for b in &blocks {
        da.iter_mut().zip(b).for_each(|(a, v)| *a += v);
    }
    da
}

/// `dx (n × inp) += dropoutᵀ(du · A + extra)` for `du (n × r)`, `A (r × inp)` and an optional
/// `extra (n × inp)` that shares the dropout (DoRA's dropped-out base path).
#[allow(clippy::too_many_arguments)]
pub fn add_masked_du_a(
    du: &[f32],
    n: usize,
    r: usize,
    a: &[f32],
    inp: usize,
    extra: Option<&[f32]>,
    drop: Option<&Dropout>,
    dx: &mut [f32],
) {
    assert_eq!(dx.len(), n * inp, "dx shape");
    dx.par_chunks_mut(ROWS * inp)
        .enumerate()
        .for_each(|(c, dxb)| {
            let mut buf = vec![0f32; inp];
            for (k, dxr) in dxb.chunks_mut(inp).enumerate() {
                let i = c * ROWS + k;
                match extra {
                    Some(e) => buf.copy_from_slice(&e[i * inp..(i + 1) * inp]),
                    None => buf.fill(0.0),
                }
                for j in 0..r {
                    let g = du[i * r + j];
                    buf.iter_mut()
                        .zip(&a[j * inp..(j + 1) * inp])
                        .for_each(|(t, w)| *t += g * w);
                }
                match drop {
                    Some(d) => d.add_backward_row(&buf, i, dxr),
                    None => dxr.iter_mut().zip(&buf).for_each(|(d, t)| *d += t),
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;

    #[test]
    fn fused_products_equal_the_materialised_ones() {
        let (n, inp, r) = (70, 45, 3);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
        let a: Vec<f32> = (0..r * inp).map(|_| rng.normal()).collect();
        let du: Vec<f32> = (0..n * r).map(|_| rng.normal()).collect();
        let extra: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
        for drop in [None, Some(Dropout::new(0.25, 77))] {
            let xd = drop.map_or(x.clone(), |d| d.applied(&x));
            let u = xd_at(&x, n, inp, &a, r, drop.as_ref());
            let want = ops::matmul_nt(&xd, n, &a, r, inp);
            for (p, q) in u.iter().zip(&want) {
                assert!((p - q).abs() < 1e-4, "u {p} vs {q}");
            }
            let da = dut_xd(&du, n, r, &x, inp, drop.as_ref());
            let mut want = vec![0f32; r * inp];
            ops::matmul_tn_into(&du, r, &xd, inp, n, &mut want, false);
            for (p, q) in da.iter().zip(&want) {
                assert!((p - q).abs() < 1e-4, "dA {p} vs {q}");
            }
            for ex in [None, Some(&extra[..])] {
                let mut dx = vec![1f32; n * inp];
                add_masked_du_a(&du, n, r, &a, inp, ex, drop.as_ref(), &mut dx);
                let mut t = ex.map_or(vec![0f32; n * inp], |e| e.to_vec());
                ops::matmul_nn_into(&du, n, &a, r, inp, &mut t, true);
                let mut want = vec![1f32; n * inp];
                match drop {
                    Some(d) => d.add_backward(&t, &mut want),
                    None => want.iter_mut().zip(&t).for_each(|(w, v)| *w += v),
                }
                for (p, q) in dx.iter().zip(&want) {
                    assert!((p - q).abs() < 1e-4, "dx {p} vs {q}");
                }
            }
        }
    }
}
