//! The low-rank path's thin products as fused, register-blocked kernels. The dropped-out input
//! `x_d` (as large as the layer input) is never materialised: each strip of 8 elements is
//! rebuilt from `x` and the dropout's seed in registers, where it is needed.
//!
//! - [`xd_at`]: `u = x_d·Aᵀ` (N × R), forward.
//! - [`grad_b_and_du`]: `dB = s·gᵀ·u` and `du = s·g·B` in one pass over the output gradient.
//! - [`grad_a_and_dx`]: `dA = duᵀ·x_d` and `dx += dropoutᵀ(du·A [+ extra])` in one pass over
//!   the input and its gradient.
//!
//! gemm runs these shapes (one side 8 wide) at 30–80 GFLOP/s, with a separate pass per product
//! and per mask; here each element is loaded once and meets one or two fused multiply-adds per
//! 8 ranks. Ranks go in groups of 8 (zero-padded), columns in strips of 8 lanes. Work is split
//! over fixed row blocks and partial sums are added in block order, so results do not depend on
//! the thread count.

use rayon::prelude::*;

use super::lanes::{prefetch, F8};
use super::mask::KeepMask;
use super::par::reduce_parts;

/// Rows per parallel work item (fixed, so partial sums and results do not depend on the thread
/// count). 128 rather than 32: each block's partial `dA` / `dB` is zeroed and summed once, and at
/// 32 rows that overhead doubled the output-side kernel's time (0.62 → 0.30 ms per 1M elements).
const ROWS: usize = 128;
/// Lanes per strip, and ranks per group.
const L: usize = 8;
/// Rows that [`grad_a_and_dx`] walks together down each 8-column strip before moving along them.
/// Walking a strip down all [`ROWS`] rows of a block touched a new 4 KiB page at every row, out
/// of the prefetchers' reach: a step's 84 calls took 0.16 s, and 16-row groups cut the kernel's
/// time on operands fresh from memory about in half (docs/PERFORMANCE.md).
const GROUP: usize = 16;
/// How far along its row [`grad_a_and_dx`] asks for each row's next lines (elements: sixteen
/// strips, 512 bytes). Sixteen rows 4 KiB or more apart are more streams than the hardware
/// prefetchers follow: without the hint the kernel waited on the loads of `x` and `dx` (perf
/// annotate); with it a 1024 × 1024 call took 0.69 ms on two Zen 4 cores instead of 0.75, and
/// 4 or 8 strips ahead read the same within noise.
const AHEAD: usize = 16 * L;

/// Dropout factors of elements `e0..e0 + 8` (all 1 without dropout).
#[inline(always)]
fn factors(mask: Option<&KeepMask>, e0: usize) -> F8 {
    match mask {
        Some(m) => m.factors8(e0),
        None => F8::splat(1.0),
    }
}

/// `m (rows × cols)` with its columns zero-padded to `cols8` (borrowed when already that wide).
fn pad_cols(m: &[f32], rows: usize, cols: usize, cols8: usize) -> std::borrow::Cow<'_, [f32]> {
    if cols == cols8 {
        return std::borrow::Cow::Borrowed(&m[..rows * cols]);
    }
    let mut p = vec![0f32; rows * cols8];
    for (d, s) in p.chunks_mut(cols8).zip(m.chunks(cols.max(1))) {
        d[..cols].copy_from_slice(s);
    }
    std::borrow::Cow::Owned(p)
}

/// `m (rows × cols)` with zero rows appended up to `rows8`.
fn pad_rows(m: &[f32], rows: usize, rows8: usize, cols: usize) -> std::borrow::Cow<'_, [f32]> {
    if rows == rows8 {
        return std::borrow::Cow::Borrowed(&m[..rows * cols]);
    }
    let mut p = vec![0f32; rows8 * cols];
    p[..rows * cols].copy_from_slice(&m[..rows * cols]);
    std::borrow::Cow::Owned(p)
}

/// A layer input `x (n × inp)` as the low-rank path sees it: `x_d = x ⊙ mask` when a dropout
/// mask is given (never materialised), `x` otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// (n × inp) the input.
    pub x: &'a [f32],
    /// Rows.
    pub n: usize,
    /// Input features.
    pub inp: usize,
    /// The dropout's keep mask over the elements of `x`.
    pub mask: Option<&'a KeepMask>,
}

/// `u (n × r) = x_d · Aᵀ` for `A (r × inp)`.
pub fn xd_at(input: Input<'_>, a: &[f32], r: usize) -> Vec<f32> {
    let Input { x, n, inp, mask } = input;
    let r8 = r.div_ceil(L) * L;
    let a = pad_rows(a, r, r8, inp);
    let mut u = vec![0f32; n * r];
    u.par_chunks_mut(ROWS * r.max(1))
        .enumerate()
        .for_each(|(blk, ub)| {
            for (k, urow) in ub.chunks_mut(r).enumerate() {
                let i = blk * ROWS + k;
                let xr = &x[i * inp..(i + 1) * inp];
                for j0 in (0..r8).step_by(L) {
                    let ag = &a[j0 * inp..(j0 + L) * inp];
                    let mut acc = [F8::zero(); L];
                    let full = inp / L * L;
                    for c in (0..full).step_by(L) {
                        // SAFETY: c + 8 ≤ inp, the length of `xr` and of each of the 8 rows
                        // of `ag` (sliced above).
                        unsafe {
                            let xd = F8::load_ptr(xr.as_ptr().add(c)) * factors(mask, i * inp + c);
                            for (j, acc) in acc.iter_mut().enumerate() {
                                *acc = acc.fma(xd, F8::load_ptr(ag.as_ptr().add(j * inp + c)));
                            }
                        }
                    }
                    if full < inp {
                        let (c, w) = (full, inp - full);
                        let xd = F8::load_partial(&xr[c..], w) * factors(mask, i * inp + c);
                        for (j, acc) in acc.iter_mut().enumerate() {
                            *acc = acc.fma(xd, F8::load_partial(&ag[j * inp + c..], w));
                        }
                    }
                    for (j, acc) in acc.iter().enumerate().take(r - j0) {
                        urow[j0 + j] = acc.sum();
                    }
                }
            }
        });
    u
}

/// `dB (out × r) = s·gᵀ·u` and `du (n × r) = s·g·B` for `g (n × out)`, `u (n × r)`,
/// `B (out × r)`: one pass over `g`.
pub fn grad_b_and_du(
    g: &[f32],
    n: usize,
    out: usize,
    u: &[f32],
    b: &[f32],
    r: usize,
    s: f32,
) -> (Vec<f32>, Vec<f32>) {
    let r8 = r.div_ceil(L) * L;
    let (b, u) = (pad_cols(b, out, r, r8), pad_cols(u, n, r, r8));
    let mut du = vec![0f32; n * r8];
    let parts: Vec<Vec<f32>> = du
        .par_chunks_mut(ROWS * r8.max(1))
        .enumerate()
        .map(|(blk, dub)| {
            let mut db = vec![0f32; out * r8];
            let i0 = blk * ROWS;
            let rows = dub.len() / r8.max(1);
            let side = OutputSide {
                g,
                out,
                u: &u,
                b: &b,
                r8,
                s,
            };
            let mut k = 0;
            while k < rows {
                // 4 rows share each load and store of B's and dB's row
                if rows - k >= 4 {
                    side.rows::<4>(i0 + k, &mut db, &mut dub[k * r8..]);
                    k += 4;
                } else {
                    side.rows::<1>(i0 + k, &mut db, &mut dub[k * r8..]);
                    k += 1;
                }
            }
            db
        })
        .collect();
    let db = reduce_parts(&parts, out * r8);
    let unpad = |m: Vec<f32>, rows: usize| -> Vec<f32> {
        if r == r8 {
            m
        } else {
            m.chunks(r8)
                .take(rows)
                .flat_map(|c| c[..r].to_vec())
                .collect()
        }
    };
    (unpad(db, out), unpad(du, n))
}

/// The operands of [`grad_b_and_du`] with the rank padded to `r8`.
struct OutputSide<'a> {
    /// (n × out) output gradient.
    g: &'a [f32],
    out: usize,
    /// (n × r8) `u`, padded.
    u: &'a [f32],
    /// (out × r8) B, padded.
    b: &'a [f32],
    r8: usize,
    s: f32,
}

impl OutputSide<'_> {
    /// Rows `i0..i0 + M`: `dB += s·g_rowsᵀ·u_rows` into `db`, their `du` into `du_rows`.
    #[inline(always)]
    fn rows<const M: usize>(&self, i0: usize, db: &mut [f32], du_rows: &mut [f32]) {
        let OutputSide {
            g,
            out,
            u,
            b,
            r8,
            s,
        } = *self;
        let gr: [&[f32]; M] = std::array::from_fn(|m| &g[(i0 + m) * out..(i0 + m + 1) * out]);
        for j0 in (0..r8).step_by(L) {
            let uv: [F8; M] =
                std::array::from_fn(|m| F8::load(&u[(i0 + m) * r8 + j0..]) * F8::splat(s));
            let mut acc = [F8::zero(); M];
            assert!(b.len() >= out * r8 && db.len() >= out * r8);
            for o in 0..out {
                // SAFETY: o·r8 + j0 + 8 ≤ out·r8 ≤ the lengths of `b` and `db` (asserted above);
                // `gr[m]` has `out` elements.
                unsafe {
                    let bv = F8::load_ptr(b.as_ptr().add(o * r8 + j0));
                    let dbo = db.as_mut_ptr().add(o * r8 + j0);
                    let mut dbv = F8::load_ptr(dbo);
                    for m in 0..M {
                        let gv = F8::splat(*gr[m].get_unchecked(o));
                        acc[m] = acc[m].fma(gv, bv);
                        dbv = dbv.fma(gv, uv[m]);
                    }
                    dbv.store_ptr(dbo);
                }
            }
            for m in 0..M {
                (acc[m] * F8::splat(s)).store(&mut du_rows[m * r8 + j0..m * r8 + j0 + L]);
            }
        }
    }
}

/// `dA (r × inp) = duᵀ · x_d` and, when `dx` is given, `dx (n × inp) += dropoutᵀ(du · A + extra)`
/// for `du (n × r)`, `A (r × inp)` and an optional `extra (n × inp)` that shares
/// the dropout (DoRA's dropped-out base path): one pass over `x`, `dx` (and `extra`). Without
/// `dx` (nobody reads the layer's input gradient) only `dA` is formed.
pub fn grad_a_and_dx(
    input: Input<'_>,
    du: &[f32],
    a: &[f32],
    r: usize,
    extra: Option<&[f32]>,
    dx: Option<&mut [f32]>,
) -> Vec<f32> {
    let Input { x, n, inp, mask } = input;
    assert!(dx.as_ref().is_none_or(|d| d.len() == n * inp), "dx shape");
    assert!(x.len() >= n * inp, "x shape");
    assert!(extra.is_none_or(|e| e.len() >= n * inp), "extra shape");
    let r8 = r.div_ceil(L) * L;
    let (du, a) = (pad_cols(du, n, r, r8), pad_rows(a, r, r8, inp));
    let row_len = ROWS * inp.max(1);
    // One work item per fixed block of rows, with that block of `dx` when there is one.
    let blocks: Vec<(usize, Option<&mut [f32]>)> = match dx {
        Some(dx) => dx.chunks_mut(row_len).map(|b| (b.len(), Some(b))).collect(),
        None => (0..n.div_ceil(ROWS))
            .map(|blk| ((n - blk * ROWS).min(ROWS) * inp, None))
            .collect(),
    };
    let side = InputSide {
        x,
        inp,
        mask,
        du: &du,
        a: &a,
        r8,
        extra,
    };
    let parts: Vec<Vec<f32>> = blocks
        .into_par_iter()
        .enumerate()
        .map(|(blk, (len, mut dxb))| {
            let i0 = blk * ROWS;
            let rows = len / inp.max(1);
            let mut da = vec![0f32; r8 * inp];
            for g0 in (0..rows).step_by(GROUP) {
                let group = i0 + g0..i0 + (g0 + GROUP).min(rows);
                for c in (0..inp).step_by(L) {
                    for j0 in (0..r8).step_by(L) {
                        side.strip(group.clone(), i0, (c, j0), &mut da, dxb.as_deref_mut());
                    }
                }
            }
            da
        })
        .collect();
    reduce_parts(&parts, r * inp)
}

/// The operands of [`grad_a_and_dx`] with the rank padded to `r8`.
struct InputSide<'a> {
    /// (n × inp) the layer input.
    x: &'a [f32],
    inp: usize,
    mask: Option<&'a KeepMask>,
    /// (n × r8) `du`, padded.
    du: &'a [f32],
    /// (r8 × inp) A, padded.
    a: &'a [f32],
    r8: usize,
    /// (n × inp) added to `du·A` before the dropout, when given.
    extra: Option<&'a [f32]>,
}

impl InputSide<'_> {
    /// Rows `group` down the strip of columns `c..c + 8` (fewer at the end), ranks
    /// `j0..j0 + 8`: their `duᵀ·x_d` added into `da` in row order, and, with `dxb` (the rows
    /// of `dx` from `i0` on), their `dropoutᵀ(du·A + extra)` added into it.
    #[inline(always)]
    fn strip(
        &self,
        group: std::ops::Range<usize>,
        i0: usize,
        (c, j0): (usize, usize),
        da: &mut [f32],
        mut dxb: Option<&mut [f32]>,
    ) {
        let InputSide {
            x,
            inp,
            mask,
            du,
            a,
            r8,
            extra,
        } = *self;
        let w = (inp - c).min(L);
        let av: [F8; L] = std::array::from_fn(|j| F8::load_partial(&a[(j0 + j) * inp + c..], w));
        let mut acc: [F8; L] =
            std::array::from_fn(|j| F8::load_partial(&da[(j0 + j) * inp + c..], w));
        for i in group {
            let k = i - i0;
            let f = factors(mask, i * inp + c);
            let d: &[f32; L] = du[i * r8 + j0..i * r8 + j0 + L]
                .try_into()
                .expect("8 ranks");
            if w == L {
                // the lines this row needs sixteen strips on (hints, never dereferenced)
                prefetch(x.as_ptr().wrapping_add(i * inp + c + AHEAD));
                if let Some(dxb) = dxb.as_deref() {
                    prefetch(dxb.as_ptr().wrapping_add(k * inp + c + AHEAD));
                }
                if let Some(e) = extra.filter(|_| j0 == 0) {
                    prefetch(e.as_ptr().wrapping_add(i * inp + c + AHEAD));
                }
            }
            let Some(dxb) = dxb.as_deref_mut() else {
                let xd = F8::load_partial(&x[i * inp + c..], w) * f;
                for j in 0..L {
                    acc[j] = acc[j].fma(F8::splat(d[j]), xd);
                }
                continue;
            };
            if w == L {
                // SAFETY: c + 8 ≤ inp, so row i of `x` / `extra` and row k of `dxb` (each
                // `inp` long, asserted by `grad_a_and_dx`) hold the strip.
                unsafe {
                    let xd = F8::load_ptr(x.as_ptr().add(i * inp + c)) * f;
                    let mut t = match extra {
                        Some(e) if j0 == 0 => F8::load_ptr(e.as_ptr().add(i * inp + c)),
                        _ => F8::zero(),
                    };
                    for j in 0..L {
                        let dj = F8::splat(d[j]);
                        acc[j] = acc[j].fma(dj, xd);
                        t = t.fma(dj, av[j]);
                    }
                    let p = dxb.as_mut_ptr().add(k * inp + c);
                    F8::load_ptr(p).fma(t, f).store_ptr(p);
                }
                continue;
            }
            let xd = F8::load_partial(&x[i * inp + c..], w) * f;
            let mut t = match extra {
                Some(e) if j0 == 0 => F8::load_partial(&e[i * inp + c..], w),
                _ => F8::zero(),
            };
            for j in 0..L {
                let dj = F8::splat(d[j]);
                acc[j] = acc[j].fma(dj, xd);
                t = t.fma(dj, av[j]);
            }
            (t * f).add_to(&mut dxb[k * inp + c..], w);
        }
        for (j, acc) in acc.iter().enumerate() {
            let row = &mut da[(j0 + j) * inp + c..];
            if w == L {
                acc.store(row);
            } else {
                row[..w].copy_from_slice(&acc.to_array()[..w]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{self, Accum, MatMut, MatRef, Par, Rng};

    #[test]
    fn fused_products_equal_the_materialised_ones() {
        // ranks below, at and above one group of 8; a width that ends in a partial strip
        for r in [3, 8, 11] {
            fused_products_for(70, 45, r);
        }
        // three row blocks, the last one partial (two 16-row groups and a partial one; 70 rows
        // above end in a partial group too)
        fused_products_for(2 * ROWS + 44, 45, 8);
    }

    #[test]
    fn output_side_gradients_equal_the_gemm_ones() {
        let (n, out, s) = (70, 37, 0.75f32);
        for r in [3, 8, 11] {
            let mut rng = Rng::new(6);
            let g: Vec<f32> = (0..n * out).map(|_| rng.normal()).collect();
            let u: Vec<f32> = (0..n * r).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.normal()).collect();
            let (db, du) = grad_b_and_du(&g, n, out, &u, &b, r, s);
            let want_db = ops::matmul_tn(&g, out, &u, r, n);
            let want_du = ops::matmul_nn(&g, n, &b, out, r);
            assert_eq!((db.len(), du.len()), (out * r, n * r));
            for (p, q) in db.iter().zip(&want_db) {
                assert!((p - s * q).abs() < 1e-4, "dB {p} vs {}", s * q);
            }
            for (p, q) in du.iter().zip(&want_du) {
                assert!((p - s * q).abs() < 1e-4, "du {p} vs {}", s * q);
            }
        }
    }

    fn fused_products_for(n: usize, inp: usize, r: usize) {
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
        let a: Vec<f32> = (0..r * inp).map(|_| rng.normal()).collect();
        let du: Vec<f32> = (0..n * r).map(|_| rng.normal()).collect();
        let extra: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
        for mask in [None, Some(KeepMask::new(0.25, 77))] {
            let xd: Vec<f32> = match &mask {
                Some(m) => x.iter().enumerate().map(|(e, v)| v * m.factor(e)).collect(),
                None => x.clone(),
            };
            let input = Input {
                x: &x,
                n,
                inp,
                mask: mask.as_ref(),
            };
            let u = xd_at(input, &a, r);
            let want = ops::matmul_nt(&xd, n, &a, r, inp);
            for (p, q) in u.iter().zip(&want) {
                assert!((p - q).abs() < 1e-4, "u {p} vs {q}");
            }
            let want_da = ops::matmul_tn(&du, r, &xd, inp, n);
            for ex in [None, Some(&extra[..])] {
                let mut dx = vec![1f32; n * inp];
                let da = grad_a_and_dx(input, &du, &a, r, ex, Some(&mut dx));
                for (p, q) in da.iter().zip(&want_da) {
                    assert!((p - q).abs() < 1e-4, "dA {p} vs {q}");
                }
                // without dx: the same dA, to the bit (same strips, same order)
                let da_only = grad_a_and_dx(input, &du, &a, r, ex, None);
                assert_eq!(da_only, da, "dA without dx");
                let mut t = ex.map_or(vec![0f32; n * inp], |e| e.to_vec());
                // t += du·A
                ops::gemm(
                    MatMut::new(&mut t, n, inp),
                    Accum::Add,
                    MatRef::new(&du, n, r),
                    MatRef::new(&a, r, inp),
                    1.0,
                    Par::All,
                );
                let mut want = vec![1f32; n * inp];
                for (e, (w, v)) in want.iter_mut().zip(&t).enumerate() {
                    *w += v * mask.as_ref().map_or(1.0, |m| m.factor(e));
                }
                for (p, q) in dx.iter().zip(&want) {
                    assert!((p - q).abs() < 1e-4, "dx {p} vs {q}");
                }
            }
        }
    }
}
