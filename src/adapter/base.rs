//! [`BaseWeight`]: the frozen weight an adapter wraps, dense (f32) or 4-bit (NF4/FP4). It offers
//! exactly the products a LoRA-family layer needs and never a gradient for itself.

use std::borrow::Cow;

use crate::ops;
use crate::ops::lowrank::{self, Input};
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

    /// [`backward_input`](Self::backward_input) of two gradients, `(dy·W, dy2·W)`: a 4-bit
    /// weight is dequantized once for both.
    pub fn backward_input2(&self, dy: &[f32], dy2: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        match self {
            BaseWeight::Dense { .. } => (self.backward_input(dy, n), self.backward_input(dy2, n)),
            BaseWeight::Quant(q) => q.matmul2(dy, dy2, n),
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
            // each row of W read once, dotted with A's rows held in cache (the LoRA forward's
            // `x·Aᵀ` kernel, without dropout); a gemm call with r = 8 columns re-packed all of
            // W: ≈ 3.3 GB/s of W with gemm's AVX-512 kernels, 9–12 GB/s with its AVX2 ones
            BaseWeight::Dense { w, out, inp } => {
                let rows = Input {
                    x: w,
                    n: *out,
                    inp: *inp,
                    mask: None,
                };
                lowrank::xd_at(rows, a, r)
            }
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

    /// [`forward_and_times_at`](Self::forward_and_times_at) plus `x2·Wᵀ` for a second input of
    /// `n` rows (PEFT-form DoRA's dropped-out input): `(x·Wᵀ, x2·Wᵀ, W·Aᵀ)`. A 4-bit weight is
    /// dequantized once for all three: A's rows ride under `x2`'s (give `x2` room for them to
    /// spare a copy).
    pub fn forward_pair_and_times_at(
        &self,
        x: &[f32],
        n: usize,
        mut x2: Vec<f32>,
        a: &[f32],
        r: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        match self {
            BaseWeight::Dense { .. } => {
                let (y, wat) = self.forward_and_times_at(x, n, a, r);
                (y, self.forward(&x2, n), wat)
            }
            BaseWeight::Quant(q) => {
                let out = q.rows();
                assert_eq!(x2.len(), n * q.cols(), "x2 shape");
                x2.extend_from_slice(&a[..r * q.cols()]);
                let (y, mut y2) = q.matmul_t2(x, n, &x2, n + r);
                let awt = y2.split_off(n * out);
                (y, y2, transpose(&awt, r, out))
            }
        }
    }
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

    /// `times_at` on a dense weight against a plain f64 sum, over ranks that leave a partial
    /// group of eight rows of A and widths that leave a partial group of eight columns.
    #[test]
    fn dense_weight_times_at_matches_naive() {
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
