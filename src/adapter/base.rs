//! [`BaseWeight`]: the frozen weight an adapter wraps, dense (f32 or bf16) or 4-bit (NF4/FP4).
//! It offers exactly the products a LoRA-family layer needs and never a gradient for itself.
//! A bf16 or bf16-computing 4-bit weight takes its input and output-gradient products in bf16
//! (f32 sums); `W·Aᵀ` and the row norms behind DoRA's weight norm stay f32 on the weight's
//! values, as PEFT computes the norm in the adapter's f32.

use std::borrow::Cow;

use half::bf16;

use crate::ops;
use crate::ops::bf16::{dropped, Bf16Ref, ComputeDtype, PairRows};
use crate::ops::lowrank::{self, Input};
use crate::ops::mask::KeepMask;
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
    /// Dense bf16, row-major `(out, in)`: a frozen weight of a bf16-compute run (half the
    /// memory; its products take bf16 operands).
    DenseBf16 {
        /// The weight data.
        w: Vec<bf16>,
        /// Output features.
        out: usize,
        /// Input features.
        inp: usize,
    },
    /// bitsandbytes 4-bit (computing in its own `compute_dtype`).
    Quant(QuantizedWeight),
}

impl BaseWeight {
    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            BaseWeight::Dense { out, .. } | BaseWeight::DenseBf16 { out, .. } => *out,
            BaseWeight::Quant(q) => q.rows(),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            BaseWeight::Dense { inp, .. } | BaseWeight::DenseBf16 { inp, .. } => *inp,
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
            BaseWeight::DenseBf16 { w, .. } => w.len() * 2,
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

    /// What the products compute in: bf16 for bf16 weights, the 4-bit weight's own choice,
    /// f32 for f32 weights.
    pub fn compute_dtype(&self) -> ComputeDtype {
        match self {
            BaseWeight::Dense { .. } => ComputeDtype::F32,
            BaseWeight::DenseBf16 { .. } => ComputeDtype::Bf16,
            BaseWeight::Quant(q) => q.compute_dtype(),
        }
    }

    /// Makes a frozen weight compute in `c` (resolved): a dense weight is stored in bf16 for
    /// bf16 (rounded to nearest even) and back in f32 for f32 (exactly); a 4-bit weight keeps
    /// its codes and changes its compute dtype.
    pub fn set_compute_dtype(&mut self, c: ComputeDtype) {
        let bf16 = c.is_bf16();
        match self {
            BaseWeight::Dense { w, out, inp } if bf16 => {
                *self = BaseWeight::DenseBf16 {
                    w: ops::bf16::round_slice(w),
                    out: *out,
                    inp: *inp,
                }
            }
            BaseWeight::DenseBf16 { w, out, inp } if !bf16 => {
                *self = BaseWeight::Dense {
                    w: ops::bf16::widen_slice(w),
                    out: *out,
                    inp: *inp,
                }
            }
            BaseWeight::Quant(q) => q.set_compute_dtype(c),
            _ => {}
        }
    }

    /// `y (n × out) = x (n × in) · Wᵀ`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self {
            BaseWeight::Dense { w, out, inp } => ops::matmul_nt(x, n, w, *out, *inp),
            BaseWeight::DenseBf16 { w, out, inp } => ops::bf16::matmul_nt(x, n, w, *out, *inp),
            BaseWeight::Quant(q) => q.matmul_t(x, n),
        }
    }

    /// `dx (n × in) = dy (n × out) · W`.
    pub fn backward_input(&self, dy: &[f32], n: usize) -> Vec<f32> {
        match self {
            BaseWeight::Dense { w, out, inp } => ops::matmul_nn(dy, n, w, *out, *inp),
            BaseWeight::DenseBf16 { w, out, inp } => ops::bf16::matmul_nn(dy, n, w, *out, *inp),
            BaseWeight::Quant(q) => q.matmul(dy, n),
        }
    }

    /// [`backward_input`](Self::backward_input) of two gradients, `(dy·W, dy2·W)`: a 4-bit
    /// weight is dequantized once for both.
    pub fn backward_input2(&self, dy: &[f32], dy2: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        match self {
            BaseWeight::Quant(q) => q.matmul2(dy, dy2, n),
            _ => (self.backward_input(dy, n), self.backward_input(dy2, n)),
        }
    }

    /// Whether PEFT-form DoRA's second base product is taken at the dropped elements only
    /// ([`forward_dropped`](Self::forward_dropped), [`backward_input_dropped`](Self::backward_input_dropped)):
    /// a weight computing in bf16 where those passes pay; else it is a second dense product.
    pub fn takes_dropped_passes(&self) -> bool {
        self.compute_dtype().is_bf16() && dropped::pays()
    }

    /// `x_d·Wᵀ` for `x_d = dropout(x)` under `mask`, given `y = x·Wᵀ`: `y` less the dropped
    /// elements' product, scaled (see [`ops::bf16::dropped::forward`]).
    ///
    /// # Panics
    /// If the weight computes in f32 (its products take the dense route), or the lengths do
    /// not match `n`.
    pub fn forward_dropped(&self, x: &[f32], y: &[f32], n: usize, mask: &KeepMask) -> Vec<f32> {
        self.with_pairs(true, |wt| dropped::forward(x, y, n, wt, mask))
    }

    /// `dy·W + c·M⊙(g·W)` under `mask` (`c` its keep factor): PEFT-form DoRA's input gradient
    /// through `y` and through `x_d`, from one dense product of `dy + c·g` (built in `g`) and
    /// the second term at the dropped elements (see [`ops::bf16::dropped::backward`]).
    ///
    /// # Panics
    /// As [`forward_dropped`](Self::forward_dropped).
    pub fn backward_input_dropped(
        &self,
        dy: &[f32],
        g: &mut [f32],
        n: usize,
        mask: &KeepMask,
    ) -> Vec<f32> {
        self.with_pairs(false, |w| {
            dropped::backward(dy, g, n, w, mask, |a| self.backward_input(a, n))
        })
    }

    /// Runs `f` on `W` or, `transposed`, `Wᵀ` as a bf16 pair operand.
    fn with_pairs<T>(&self, transposed: bool, f: impl FnOnce(&dyn PairRows) -> T) -> T {
        match self {
            BaseWeight::DenseBf16 { w, out, inp } => {
                let w = Bf16Ref::new(w, *out, *inp);
                f(&if transposed { w.t() } else { w })
            }
            BaseWeight::Quant(q) if q.compute_dtype().is_bf16() => f(&q.bf16_pairs(transposed)),
            _ => panic!("the dropped-element passes are for weights computing in bf16"),
        }
    }

    /// The weight as f32 (dequantized and rounded to the stored dtype for 4-bit, as PEFT's
    /// `dequantize_module_weight` returns it). Borrowed for f32 weights.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            BaseWeight::Dense { w, .. } => Cow::Borrowed(w),
            BaseWeight::DenseBf16 { w, .. } => Cow::Owned(ops::bf16::widen_slice(w)),
            BaseWeight::Quant(q) => Cow::Owned(q.dequantize_as_stored()),
        }
    }

    /// Rows `r0..r1` of W as f32 (a dense weight's values; embeddings).
    ///
    /// # Panics
    /// For a 4-bit weight, or rows outside the weight.
    pub fn dense_rows(&self, r0: usize, r1: usize) -> Cow<'_, [f32]> {
        let inp = self.in_features();
        match self {
            BaseWeight::Dense { w, .. } => Cow::Borrowed(&w[r0 * inp..r1 * inp]),
            BaseWeight::DenseBf16 { w, .. } => {
                Cow::Owned(w[r0 * inp..r1 * inp].iter().map(|v| v.to_f32()).collect())
            }
            BaseWeight::Quant(_) => panic!("dense_rows of a 4-bit weight"),
        }
    }

    /// Squared L2 norm of every row, in f32 (one streaming pass; for 4-bit, tile by tile).
    pub fn row_norms_sq(&self) -> Vec<f32> {
        let inp = self.in_features();
        let sq = |row: &[f32]| row.iter().map(|v| v * v).sum::<f32>();
        match self {
            BaseWeight::Dense { w, .. } => w.chunks(inp.max(1)).map(sq).collect(),
            BaseWeight::DenseBf16 { w, .. } => w
                .chunks(inp.max(1))
                .map(|row| row.iter().map(|v| v.to_f32() * v.to_f32()).sum::<f32>())
                .collect(),
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
            // in f32 on blocks of rows widened from bf16
            BaseWeight::DenseBf16 { w, out, inp } => {
                let mut t = Vec::with_capacity(out * r);
                for rows in w.chunks((TIMES_AT_ROWS * *inp).max(1)) {
                    let x = ops::bf16::widen_slice(rows);
                    let n = rows.len() / (*inp).max(1);
                    t.extend(lowrank::xd_at(
                        Input {
                            x: &x,
                            n,
                            inp: *inp,
                            mask: None,
                        },
                        a,
                        r,
                    ));
                }
                t
            }
            // (A · Wᵀ)ᵀ: A·Wᵀ (r × out) with the 4-bit forward kernel in f32, then transposed.
            BaseWeight::Quant(q) => transpose(&q.matmul_t_f32(a, r), r, q.rows()),
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
            BaseWeight::Quant(q) if !q.compute_dtype().is_bf16() => {
                let (y, awt) = q.matmul_t2(x, n, a, r);
                (y, transpose(&awt, r, q.rows()))
            }
            _ => (self.forward(x, n), self.times_at(a, r)),
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
            BaseWeight::Quant(q) if !q.compute_dtype().is_bf16() => {
                let out = q.rows();
                assert_eq!(x2.len(), n * q.cols(), "x2 shape");
                x2.extend_from_slice(&a[..r * q.cols()]);
                let (y, mut y2) = q.matmul_t2(x, n, &x2, n + r);
                let awt = y2.split_off(n * out);
                (y, y2, transpose(&awt, r, out))
            }
            // bf16: both inputs in one product (the weight decoded or widened once), the
            // norm's W·Aᵀ apart in f32
            _ if self.compute_dtype().is_bf16() => {
                let out = self.out_features();
                let mut xx = Vec::with_capacity(x.len() + x2.len());
                xx.extend_from_slice(x);
                xx.extend_from_slice(&x2);
                drop(x2);
                let mut y = self.forward(&xx, 2 * n);
                drop(xx);
                let y2 = y.split_off(n * out);
                // y is kept for backward: give back the half y2 was copied from
                y.shrink_to_fit();
                (y, y2, self.times_at(a, r))
            }
            _ => {
                let (y, wat) = self.forward_and_times_at(x, n, a, r);
                (y, self.forward(&x2, n), wat)
            }
        }
    }
}

/// Rows of a bf16 weight widened at a time for `W·Aᵀ`.
const TIMES_AT_ROWS: usize = 256;

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
    use crate::quant::{Dtype, QuantizeOptions};

    /// `|got − want| ≤ (k + 3)·2⁻²³·Σ|terms|` per element, `want` summed in f64 over bf16
    /// operands (the bound of `ops::bf16`'s tests).
    fn assert_bf16_product(
        got: &[f32],
        x: &[f32],
        w: &[f32],
        (n, out, inp): (usize, usize, usize),
        what: &str,
    ) {
        let r = |v: f32| ops::bf16::from_bits(ops::bf16::to_bits(v)) as f64;
        let gamma = (inp + 3) as f64 * f32::EPSILON as f64;
        for i in 0..n {
            for o in 0..out {
                let (want, mag) = (0..inp)
                    .map(|j| r(x[i * inp + j]) * r(w[o * inp + j]))
                    .fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                let g = got[i * out + o] as f64;
                assert!(
                    (g - want).abs() <= gamma * mag,
                    "{what} ({i}, {o}): {g} vs {want}"
                );
            }
        }
    }

    /// Wᵀ of a row-major `out × in` matrix.
    fn transpose(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
        (0..inp * out)
            .map(|t| w[(t % out) * inp + t / out])
            .collect()
    }

    /// A dense weight set to bf16 holds the rounded values, computes both products on them
    /// (f32 sums), keeps `W·Aᵀ` and the row norms in f32 on those values, and goes back to f32
    /// exactly. A 4-bit weight set to bf16 computes on its dequantized values rounded to bf16
    /// (beyond the decoding rows) and keeps the f32 `W·Aᵀ` of the f32 route, to the bit.
    #[test]
    fn bf16_compute_uses_the_rounded_weights() {
        let (out, inp, r) = (24, 128, 3);
        let mut rng = Rng::new(8);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
        let a: Vec<f32> = (0..r * inp).map(|_| rng.normal()).collect();
        let rounded = ops::bf16::widen_slice(&ops::bf16::round_slice(&w));
        let mut dense = BaseWeight::Dense {
            w: w.clone(),
            out,
            inp,
        };
        dense.set_compute_dtype(ComputeDtype::Bf16);
        assert_eq!(dense.compute_dtype(), ComputeDtype::Bf16);
        assert_eq!(dense.stored_bytes(), out * inp * 2);
        assert_eq!(dense.to_f32().as_ref(), &rounded[..]);
        let exact = BaseWeight::Dense {
            w: rounded.clone(),
            out,
            inp,
        };
        assert_eq!(dense.times_at(&a, r), exact.times_at(&a, r));
        assert_eq!(dense.row_norms_sq(), exact.row_norms_sq());
        let q = QuantizedWeight::quantize(&w, &[out, inp], Dtype::F32, QuantizeOptions::default())
            .unwrap();
        let deq = q.dequantize_as_stored();
        let mut quant = BaseWeight::Quant(q.clone());
        quant.set_compute_dtype(ComputeDtype::Bf16);
        assert_eq!(quant.compute_dtype(), ComputeDtype::Bf16);
        assert_eq!(quant.times_at(&a, r), BaseWeight::Quant(q).times_at(&a, r));
        for n in [2, 20] {
            let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * out).map(|_| rng.normal()).collect();
            let y = dense.forward(&x, n);
            assert_bf16_product(&y, &x, &rounded, (n, out, inp), "dense forward");
            let dx = dense.backward_input(&dy, n);
            let rt = transpose(&rounded, out, inp);
            assert_bf16_product(&dx, &dy, &rt, (n, inp, out), "dense backward");
            if n > crate::quant::gemv::MAX_ROWS {
                let y = quant.forward(&x, n);
                assert_bf16_product(&y, &x, &deq, (n, out, inp), "4-bit forward");
            }
            let dx = quant.backward_input(&dy, n);
            let dt = transpose(&deq, out, inp);
            assert_bf16_product(&dx, &dy, &dt, (n, inp, out), "4-bit backward");
            // PEFT-form DoRA's pair of inputs, taken in one product
            let x2: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
            for (w, vals, what) in [(&dense, &rounded, "dense"), (&quant, &deq, "4-bit")] {
                if what == "4-bit" && n <= crate::quant::gemv::MAX_ROWS {
                    continue;
                }
                let (y, y2, wat) = w.forward_pair_and_times_at(&x, n, x2.clone(), &a, r);
                assert_bf16_product(&y, &x, vals, (n, out, inp), what);
                assert_bf16_product(&y2, &x2, vals, (n, out, inp), what);
                assert_eq!(wat, w.times_at(&a, r), "{what}");
            }
        }
        dense.set_compute_dtype(ComputeDtype::F32);
        assert!(matches!(&dense, BaseWeight::Dense { w, .. } if *w == rounded));
    }

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
