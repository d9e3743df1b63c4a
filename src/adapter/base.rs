//! [`BaseWeight`]: the frozen weight an adapter wraps, dense (f32) or 4-bit (NF4/FP4). It offers
//! exactly the products a LoRA-family layer needs and never a gradient for itself.

use std::borrow::Cow;

use crate::ops::{self, lanes::F8};
use crate::quant::QuantizedWeight;

/// A Linear layer's weight `W (out × in)`, frozen for adapter training.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing would add an indirection per matmul
pub enum BaseWeight {
    /// Dense f32, row-major `(out, in)`.
    Dense {
        /// The weight data.
        w: Vec<f32>,
        /// Output features.
        out: usize,
        /// Input features.
        inp: usize,
    },
    /// bitsandbytes 4-bit.
    Quant(QuantizedWeight),
}

impl BaseWeight {
    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            BaseWeight::Dense { out, .. } => *out,
            BaseWeight::Quant(q) => q.rows(),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            BaseWeight::Dense { inp, .. } => *inp,
            BaseWeight::Quant(q) => q.cols(),
        }
    }

    /// Whether the weight is stored 4-bit.
    pub fn is_quantized(&self) -> bool {
        matches!(self, BaseWeight::Quant(_))
    }

    /// Bytes the weight occupies as stored.
    pub fn stored_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense { w, .. } => w.len() * 4,
            BaseWeight::Quant(q) => {
                q.packed.len()
                    + q.absmax.len()
                        * if matches!(q.absmax, crate::quant::Absmax::Plain(_)) {
                            4
                        } else {
                            1
                        }
            }
        }
    }

    /// `y (n × out) = x (n × in) · Wᵀ`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self {
            BaseWeight::Dense { w, out, inp } => ops::matmul_nt(x, n, w, *out, *inp),
            BaseWeight::Quant(q) => q.matmul_t(x, n),
        }
    }

    /// `dx (n × in) = dy (n × out) · W`.
    pub fn backward_input(&self, dy: &[f32], n: usize) -> Vec<f32> {
        match self {
            BaseWeight::Dense { w, out, inp } => ops::matmul_nn(dy, n, w, *out, *inp),
            BaseWeight::Quant(q) => q.matmul(dy, n),
        }
    }

    /// The weight as f32 (dequantized and rounded to the stored dtype for 4-bit, as PEFT's
    /// `dequantize_module_weight` returns it). Borrowed for dense weights.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            BaseWeight::Dense { w, .. } => Cow::Borrowed(w),
            BaseWeight::Quant(q) => Cow::Owned(q.dequantize_as_stored()),
        }
    }

    /// Squared L2 norm of every row, in f32 (one streaming pass; for 4-bit, tile by tile).
    pub fn row_norms_sq(&self) -> Vec<f32> {
        let inp = self.in_features();
        let sq = |row: &[f32]| row.iter().map(|v| v * v).sum::<f32>();
        match self {
            BaseWeight::Dense { w, .. } => w.chunks(inp.max(1)).map(sq).collect(),
            BaseWeight::Quant(q) => {
                let rows = q.rows();
                let mut out = Vec::with_capacity(rows);
                let tile = 256;
                let mut buf = vec![0f32; tile.min(rows) * inp];
                for r0 in (0..rows).step_by(tile) {
                    let r1 = (r0 + tile).min(rows);
                    let b = &mut buf[..(r1 - r0) * inp];
                    q.dequantize_rows(r0, r1, b);
                    for v in b.iter_mut() {
                        *v = q.dtype.round(*v);
                    }
                    out.extend(b.chunks(inp.max(1)).map(sq));
                }
                out
            }
        }
    }

    /// `W · Aᵀ (out × r)` for `A (r × in)`: used for the DoRA norm without forming `W + sBA`.
    pub fn times_at(&self, a: &[f32], r: usize) -> Vec<f32> {
        match self {
            BaseWeight::Dense { w, out, inp } => dense_times_at(w, *out, *inp, a, r),
            // (A · Wᵀ)ᵀ: A·Wᵀ (r × out) with the 4-bit forward kernel, then transposed (small).
            BaseWeight::Quant(_) => transpose(&self.forward(a, r), r, self.out_features()),
        }
    }

    /// [`forward`](Self::forward) and [`times_at`](Self::times_at) together: a 4-bit weight is
    /// dequantized once for both.
    pub fn forward_and_times_at(
        &self,
        x: &[f32],
        n: usize,
        a: &[f32],
        r: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        match self {
            BaseWeight::Dense { .. } => (self.forward(x, n), self.times_at(a, r)),
            BaseWeight::Quant(q) => {
                let (y, awt) = q.matmul_t2(x, n, a, r);
                (y, transpose(&awt, r, q.rows()))
            }
        }
    }
}

/// `W · Aᵀ (out × r)` for a dense `W (out × in)`: each row of W is read once from memory and
/// dotted with eight rows of `A` at a time (A stays in cache), rows in parallel. A gemm call
/// here (r = 8 columns) re-packed all of W: ≈ 3.3 GB/s of W with gemm's AVX-512 kernels,
/// 9–12 GB/s with its AVX2 ones, against 15–26 GB/s for this pass (in = 1024).
fn dense_times_at(w: &[f32], out: usize, inp: usize, a: &[f32], r: usize) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(w.len() == out * inp && a.len() == r * inp, "W·Aᵀ shapes");
    let mut t = vec![0f32; out * r];
    if r == 0 || inp == 0 {
        return t;
    }
    // A padded to whole groups of eight rows (zeros), so the inner kernel has no remainder
    let groups = r.div_ceil(8);
    let mut ap = vec![0f32; groups * 8 * inp];
    ap[..r * inp].copy_from_slice(a);
    t.par_chunks_mut(16 * r)
        .zip(w.par_chunks(16 * inp))
        .for_each(|(tb, wb)| {
            for (tr, wr) in tb.chunks_mut(r).zip(wb.chunks(inp)) {
                for g in 0..groups {
                    let dots = dot_rows8(wr, &ap[g * 8 * inp..(g + 1) * 8 * inp]);
                    let k0 = g * 8;
                    let kn = (r - k0).min(8);
                    tr[k0..k0 + kn].copy_from_slice(&dots[..kn]);
                }
            }
        });
    t
}

/// The dot products of `w (in)` with each of the eight rows of `a (8 × in)`.
#[inline(always)]
fn dot_rows8(w: &[f32], a: &[f32]) -> [f32; 8] {
    let inp = w.len();
    assert_eq!(a.len(), 8 * inp, "eight rows of A");
    let whole = inp / 8 * 8;
    let mut acc = [F8::zero(); 8];
    for i0 in (0..whole).step_by(8) {
        // SAFETY: i0 + 8 ≤ whole ≤ inp, so w[i0..i0 + 8] and a[k·inp + i0..+ 8] are in bounds.
        unsafe {
            let wv = F8::load_ptr(w.as_ptr().add(i0));
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = acc.fma(wv, F8::load_ptr(a.as_ptr().add(k * inp + i0)));
            }
        }
    }
    if whole < inp {
        let len = inp - whole;
        let wv = F8::load_partial(&w[whole..], len);
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = acc.fma(wv, F8::load_partial(&a[k * inp + whole..], len));
        }
    }
    acc.map(F8::sum)
}

/// `(r × out)` → `(out × r)`.
fn transpose(awt: &[f32], r: usize, out: usize) -> Vec<f32> {
    let mut t = vec![0f32; out * r];
    for k in 0..r {
        for o in 0..out {
            t[o * r + k] = awt[k * out + o];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;

    /// The dense `W·Aᵀ` kernel against a plain f64 sum, over ranks that leave a partial group
    /// of eight rows of A and widths that leave a partial group of eight columns.
    #[test]
    fn dense_times_at_matches_naive() {
        let mut rng = Rng::new(3);
        for (out, inp, r) in [(37, 20, 3), (16, 64, 8), (33, 131, 13), (5, 7, 16)] {
            let w: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
            let a: Vec<f32> = (0..r * inp).map(|_| rng.normal()).collect();
            let t = BaseWeight::Dense {
                w: w.clone(),
                out,
                inp,
            }
            .times_at(&a, r);
            assert_eq!(t.len(), out * r);
            for o in 0..out {
                for k in 0..r {
                    let want: f64 = (0..inp)
                        .map(|i| w[o * inp + i] as f64 * a[k * inp + i] as f64)
                        .sum();
                    let got = t[o * r + k] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "({o}, {k}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
