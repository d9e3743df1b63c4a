//! [`LoraAdapter`]: the trainable part of a LoRA or DoRA layer, as PEFT ≥ 0.14 computes it
//! (spec §2–3, PEFT `lora/layer.py`, `lora/dora.py`, `lora/variants.py`).
//!
//! With `u = x_d·Aᵀ` (`x_d` = dropout(x) in training, x otherwise), `s` the scaling and
//! `y_b = x·Wᵀ` the base output without bias, the adapter adds `delta` to `y_b + bias`:
//!
//! - LoRA: `delta = s·u·Bᵀ`.
//! - DoRA, eval or no dropout: `delta = (k−1)⊙y_b + k⊙s·u·Bᵀ`, i.e. `y = k⊙x(W+sBA)ᵀ + b`.
//! - DoRA, training with dropout: `delta = (k−1)⊙(x_d·Wᵀ) + k⊙s·u·Bᵀ`.
//!
//! where `k = m / ‖W + s·B·A‖_row` with the norm detached (`dora.rs`).
//!
//! Gradients (the base weight never gets one): with `dv = s·(g⊙dy)` (`g = k` for DoRA, 1 for
//! LoRA): `dB = dvᵀ·u`, `du = dv·B`, `dA = duᵀ·x_d`, `dx_d = du·A`; DoRA adds
//! `dm = Σ_rows dy⊙z / ‖·‖` with `z` the term `k` multiplies, and routes `k⊙dy` (no dropout) or
//! `(k−1)⊙dy` through the dropped-out base path (dropout).

use std::sync::OnceLock;

use super::base::BaseWeight;
use super::config::InitLoraWeights;
use super::dora;
use crate::ops::{self, Rng};

/// LoRA or DoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// Low-rank update only.
    Lora,
    /// Low-rank update plus a trainable magnitude per output row.
    Dora,
}

/// The trainable adapter of one Linear layer. Field names follow PEFT's keys.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_A.weight`: (R, in).
    pub lora_a: Vec<f32>,
    /// `lora_B.weight`: (out, R).
    pub lora_b: Vec<f32>,
    /// `lora_magnitude_vector`: (out), DoRA only.
    pub lora_magnitude_vector: Option<Vec<f32>>,
    /// Rank R.
    pub r: usize,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// `lora_alpha / r` (or `/ √r`).
    pub scaling: f32,
    /// `lora_dropout` probability.
    pub dropout: f32,
    /// `‖W‖²` per row of the frozen base (DoRA), computed once.
    w_norm_sq: Option<Vec<f32>>,
    /// DoRA's `k` for inference, computed on first use after the weights last changed.
    eval_scale: OnceLock<Vec<f32>>,
}

/// What [`LoraAdapter::backward`] needs from the forward pass.
pub struct LoraSaved {
    /// (N, in) dropped-out input; `None` when no dropout was applied (then `x` is used).
    x_d: Option<Vec<f32>>,
    /// (N, in) dropout keep mask.
    keep: Option<Vec<bool>>,
    /// (N, R) `x_d · Aᵀ`.
    u: Vec<f32>,
    /// DoRA only: `k` (out), the detached norm (out), and `z` (N, out), the term `k` scales.
    dora: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

/// Gradients of the adapter's trainable tensors.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    /// (R, in)
    pub d_lora_a: Vec<f32>,
    /// (out, R)
    pub d_lora_b: Vec<f32>,
    /// (out), DoRA only.
    pub d_lora_magnitude_vector: Option<Vec<f32>>,
}

/// What the base path of the layer must use as its output gradient after the adapter's
/// backward: `dy` itself, or DoRA's `k⊙dy`.
pub enum BaseGrad {
    /// Use the layer's `dy`.
    Same,
    /// Use this instead (N, out).
    Scaled(Vec<f32>),
}

impl LoraAdapter {
    /// A fresh adapter for `base`, initialised as PEFT does (`init`), with DoRA's magnitude set
    /// to `‖W + s·B·A‖` per row.
    pub fn new(
        base: &BaseWeight,
        kind: AdapterKind,
        r: usize,
        scaling: f32,
        dropout: f32,
        init: InitLoraWeights,
        rng: &mut Rng,
    ) -> Self {
        let (out, inp) = (base.out_features(), base.in_features());
        let bound_a = 1.0 / (inp as f32).sqrt();
        let lora_a: Vec<f32> = match init {
            InitLoraWeights::Gaussian => (0..r * inp).map(|_| rng.normal() / r as f32).collect(),
            _ => (0..r * inp)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound_a)
                .collect(),
        };
        let lora_b = match init {
            InitLoraWeights::Random => {
                let bound_b = 1.0 / (r as f32).sqrt();
                (0..out * r)
                    .map(|_| (rng.uniform() * 2.0 - 1.0) * bound_b)
                    .collect()
            }
            _ => vec![0f32; out * r],
        };
        let mut a = Self::from_weights(base, lora_a, lora_b, None, r, scaling, dropout, kind);
        if kind == AdapterKind::Dora {
            a.lora_magnitude_vector = Some(a.weight_norm(base));
        }
        a
    }

    /// An adapter from given weights (e.g. loaded from a file). `magnitude` is required for DoRA
    /// (`kind` decides whether the `‖W‖²` cache is built).
    ///
    /// # Panics
    /// If the lengths do not match `r` and the base's shape.
    #[allow(clippy::too_many_arguments)]
    pub fn from_weights(
        base: &BaseWeight,
        lora_a: Vec<f32>,
        lora_b: Vec<f32>,
        magnitude: Option<Vec<f32>>,
        r: usize,
        scaling: f32,
        dropout: f32,
        kind: AdapterKind,
    ) -> Self {
        let (out, inp) = (base.out_features(), base.in_features());
        assert_eq!(lora_a.len(), r * inp, "lora_A length");
        assert_eq!(lora_b.len(), out * r, "lora_B length");
        if let Some(m) = &magnitude {
            assert_eq!(m.len(), out, "magnitude length");
        }
        Self {
            lora_a,
            lora_b,
            lora_magnitude_vector: magnitude,
            r,
            in_features: inp,
            out_features: out,
            scaling,
            dropout,
            w_norm_sq: (kind == AdapterKind::Dora).then(|| base.row_norms_sq()),
            eval_scale: OnceLock::new(),
        }
    }

    /// LoRA or DoRA.
    pub fn kind(&self) -> AdapterKind {
        if self.w_norm_sq.is_some() {
            AdapterKind::Dora
        } else {
            AdapterKind::Lora
        }
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.lora_a.len()
            + self.lora_b.len()
            + self.lora_magnitude_vector.as_ref().map_or(0, |m| m.len())
    }

    /// Forgets cached values derived from the weights; call after changing them.
    pub fn weights_changed(&mut self) {
        self.eval_scale = OnceLock::new();
    }

    /// `‖W + s·B·A‖` per row (DoRA's detached norm).
    pub fn weight_norm(&self, base: &BaseWeight) -> Vec<f32> {
        let w2 = match &self.w_norm_sq {
            Some(w) => std::borrow::Cow::Borrowed(w),
            None => std::borrow::Cow::Owned(base.row_norms_sq()),
        };
        dora::weight_norm(base, &w2, &self.lora_a, &self.lora_b, self.r, self.scaling)
    }

    fn scale(&self, base: &BaseWeight) -> Option<Vec<f32>> {
        let m = self.lora_magnitude_vector.as_ref()?;
        Some(dora::magnitude_scale(m, &self.weight_norm(base)))
    }

    /// Inference: the delta to add to `y_b = x·Wᵀ` (N, out), no dropout, DoRA scale cached.
    pub fn forward(&self, base: &BaseWeight, x: &[f32], y_b: &[f32], n: usize) -> Vec<f32> {
        let u = ops::matmul_nt(x, n, &self.lora_a, self.r, self.in_features);
        let mut v = ops::matmul_nt(&u, n, &self.lora_b, self.out_features, self.r);
        let s = self.scaling;
        match &self.lora_magnitude_vector {
            None => v.iter_mut().for_each(|e| *e *= s),
            Some(_) => {
                let k = self
                    .eval_scale
                    .get_or_init(|| self.scale(base).unwrap_or_default());
                let out = self.out_features;
                for (row_v, row_b) in v.chunks_mut(out).zip(y_b.chunks(out)) {
                    for ((e, &b), &kk) in row_v.iter_mut().zip(row_b).zip(k) {
                        *e = (kk - 1.0) * b + kk * (*e * s);
                    }
                }
            }
        }
        v
    }

    /// Training forward: the delta (N, out) and what backward needs. Dropout draws from `rng`
    /// when `dropout > 0`.
    pub fn forward_train(
        &self,
        base: &BaseWeight,
        x: &[f32],
        y_b: &[f32],
        n: usize,
        rng: &mut Rng,
    ) -> (Vec<f32>, LoraSaved) {
        let (inp, out, r, s) = (self.in_features, self.out_features, self.r, self.scaling);
        let (x_d, keep) = if self.dropout > 0.0 {
            let p = self.dropout;
            let inv = 1.0 / (1.0 - p);
            let keep: Vec<bool> = (0..x.len()).map(|_| rng.uniform() >= p).collect();
            let xd: Vec<f32> = x
                .iter()
                .zip(&keep)
                .map(|(&v, &k)| if k { v * inv } else { 0.0 })
                .collect();
            (Some(xd), Some(keep))
        } else {
            (None, None)
        };
        let xin = x_d.as_deref().unwrap_or(x);
        let u = ops::matmul_nt(xin, n, &self.lora_a, r, inp);
        let mut v = ops::matmul_nt(&u, n, &self.lora_b, out, r);
        let dora = match &self.lora_magnitude_vector {
            None => {
                v.iter_mut().for_each(|e| *e *= s);
                None
            }
            Some(m) => {
                let norm = self.weight_norm(base);
                let k = dora::magnitude_scale(m, &norm);
                // The base term k multiplies: y_b itself, or the dropped-out base product.
                let b_term = match &x_d {
                    None => std::borrow::Cow::Borrowed(y_b),
                    Some(xd) => std::borrow::Cow::Owned(base.forward(xd, n)),
                };
                let mut z = vec![0f32; n * out];
                for i in 0..n {
                    for o in 0..out {
                        let idx = i * out + o;
                        let bt = b_term[idx];
                        let sv = v[idx] * s;
                        z[idx] = bt + sv;
                        v[idx] = (k[o] - 1.0) * bt + k[o] * sv;
                    }
                }
                Some((k, norm, z))
            }
        };
        (v, LoraSaved { x_d, keep, u, dora })
    }

    /// Backward: gradients of A, B (and m), the adapter's share of `dx` (N, in), and what the
    /// base path must use as its output gradient. `x` is the layer input given to forward.
    pub fn backward(
        &self,
        saved: LoraSaved,
        base: &BaseWeight,
        x: &[f32],
        dy: &[f32],
        n: usize,
    ) -> (Vec<f32>, BaseGrad, LoraGrads) {
        let (inp, out, r, s) = (self.in_features, self.out_features, self.r, self.scaling);
        let xin = saved.x_d.as_deref().unwrap_or(x);
        let dropout = saved.x_d.is_some();
        // dv = s·(k⊙dy) for DoRA, s·dy for LoRA.
        let mut dv = dy.to_vec();
        let mut d_m = None;
        let mut base_grad = BaseGrad::Same;
        let mut dx = vec![0f32; n * inp];
        if let Some((k, norm, z)) = &saved.dora {
            let mut dm = vec![0f32; out];
            for i in 0..n {
                for o in 0..out {
                    dm[o] += dy[i * out + o] * z[i * out + o];
                }
            }
            for (g, nn) in dm.iter_mut().zip(norm) {
                *g /= nn.max(dora::NORM_EPS);
            }
            d_m = Some(dm);
            for row in dv.chunks_mut(out) {
                for (e, kk) in row.iter_mut().zip(k) {
                    *e *= kk;
                }
            }
            if dropout {
                // (k−1)⊙dy through the dropped-out base product, into dx_d.
                let mut g = dy.to_vec();
                for row in g.chunks_mut(out) {
                    for (e, kk) in row.iter_mut().zip(k) {
                        *e *= kk - 1.0;
                    }
                }
                base.backward_input(&g, n, &mut dx, false);
            } else {
                base_grad = BaseGrad::Scaled(dv.clone());
            }
        }
        dv.iter_mut().for_each(|e| *e *= s);
        let mut d_lora_b = vec![0f32; out * r];
        ops::matmul_tn_into(&dv, out, &saved.u, r, n, &mut d_lora_b, false);
        let du = ops::matmul_nn(&dv, n, &self.lora_b, out, r);
        let mut d_lora_a = vec![0f32; r * inp];
        ops::matmul_tn_into(&du, r, xin, inp, n, &mut d_lora_a, false);
        ops::matmul_nn_into(
            &du,
            n,
            &self.lora_a,
            r,
            inp,
            &mut dx,
            dropout && saved.dora.is_some(),
        );
        if let Some(keep) = &saved.keep {
            let inv = 1.0 / (1.0 - self.dropout);
            for (d, &k) in dx.iter_mut().zip(keep) {
                *d = if k { *d * inv } else { 0.0 };
            }
        }
        (
            dx,
            base_grad,
            LoraGrads {
                d_lora_a,
                d_lora_b,
                d_lora_magnitude_vector: d_m,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(kind: AdapterKind, dropout: f32) -> (BaseWeight, LoraAdapter, Vec<f32>, usize) {
        let (out, inp, r, n) = (5, 8, 2, 3);
        let mut rng = Rng::new(1);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.5).collect();
        let base = BaseWeight::Dense { w, out, inp };
        let mut a = LoraAdapter::new(
            &base,
            kind,
            r,
            1.5,
            dropout,
            InitLoraWeights::Random,
            &mut rng,
        );
        if let Some(m) = &mut a.lora_magnitude_vector {
            for (i, v) in m.iter_mut().enumerate() {
                *v *= 1.0 + 0.1 * i as f32;
            }
        }
        let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
        (base, a, x, n)
    }

    /// Loss = Σ c ⊙ (y_b + delta) with fixed c; compares analytic and central-difference grads.
    fn grad_check(kind: AdapterKind, dropout: f32) {
        let (base, a, x, n) = setup(kind, dropout);
        let out = a.out_features;
        let c: Vec<f32> = (0..n * out)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let loss = |ad: &LoraAdapter, x: &[f32]| -> f64 {
            let y_b = base.forward(x, n);
            let (d, _) = ad.forward_train(&base, x, &y_b, n, &mut Rng::new(9));
            y_b.iter()
                .zip(&d)
                .zip(&c)
                .map(|((b, d), c)| ((b + d) * c) as f64)
                .sum()
        };
        let y_b = base.forward(&x, n);
        let (_, saved) = a.forward_train(&base, &x, &y_b, n, &mut Rng::new(9));
        let (dx_extra, bg, g) = a.backward(saved, &base, &x, &c, n);
        let mut dx = dx_extra.clone();
        let gb = match &bg {
            BaseGrad::Same => c.clone(),
            BaseGrad::Scaled(v) => v.clone(),
        };
        base.backward_input(&gb, n, &mut dx, true);
        let h = 1e-2f32;
        let norm0 = a.weight_norm(&base);
        // DoRA's norm is detached: when A or B move, rescale m so that k = m/‖W+sBA‖ stays put.
        let detach = |p: &mut LoraAdapter| {
            let nn = p.weight_norm(&base);
            if let Some(m) = &mut p.lora_magnitude_vector {
                let m0 = a.lora_magnitude_vector.as_ref().unwrap();
                for o in 0..m.len() {
                    m[o] = m0[o] / norm0[o] * nn[o];
                }
            }
        };
        let check = |name: &str,
                     analytic: &[f32],
                     get: &dyn Fn(&mut LoraAdapter, &mut Vec<f32>) -> *mut f32,
                     len: usize| {
            for i in 0..len {
                let (mut p, mut xp) = (a.clone(), x.clone());
                let ptr = get(&mut p, &mut xp);
                // SAFETY: ptr points into p or xp, alive here.
                unsafe { *ptr.add(i) += h };
                if name != "m" {
                    detach(&mut p);
                }
                p.weights_changed();
                let lp = loss(&p, &xp);
                unsafe { *ptr.add(i) -= 2.0 * h };
                if name != "m" {
                    detach(&mut p);
                }
                p.weights_changed();
                let lm = loss(&p, &xp);
                let num = (lp - lm) / (2.0 * h as f64);
                assert!(
                    (num - analytic[i] as f64).abs() < 2e-2 * (1.0 + num.abs()),
                    "{name}[{i}]: numeric {num} analytic {}",
                    analytic[i]
                );
            }
        };
        check(
            "A",
            &g.d_lora_a,
            &|p, _| p.lora_a.as_mut_ptr(),
            a.lora_a.len(),
        );
        check(
            "B",
            &g.d_lora_b,
            &|p, _| p.lora_b.as_mut_ptr(),
            a.lora_b.len(),
        );
        if let Some(dm) = &g.d_lora_magnitude_vector {
            check(
                "m",
                dm,
                &|p, _| p.lora_magnitude_vector.as_mut().unwrap().as_mut_ptr(),
                out,
            );
        }
        check("x", &dx, &|_, xp| xp.as_mut_ptr(), x.len());
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        grad_check(AdapterKind::Lora, 0.0);
        grad_check(AdapterKind::Lora, 0.3);
    }

    #[test]
    fn dora_gradients_match_finite_differences() {
        grad_check(AdapterKind::Dora, 0.0);
        grad_check(AdapterKind::Dora, 0.3);
    }

    #[test]
    fn forward_equals_forward_train_without_dropout_and_dora_init_equals_lora() {
        for kind in [AdapterKind::Lora, AdapterKind::Dora] {
            let (base, a, x, n) = setup(kind, 0.0);
            let y_b = base.forward(&x, n);
            let f = a.forward(&base, &x, &y_b, n);
            let (t, _) = a.forward_train(&base, &x, &y_b, n, &mut Rng::new(0));
            assert_eq!(f, t);
        }
        // DoRA with m = ‖W + sBA‖ (fresh init) equals LoRA (PEFT test_4bit_dora_inference).
        let (base, a, x, n) = setup(AdapterKind::Lora, 0.0);
        let m = a.weight_norm(&base);
        let d = LoraAdapter::from_weights(
            &base,
            a.lora_a.clone(),
            a.lora_b.clone(),
            Some(m),
            a.r,
            a.scaling,
            0.0,
            AdapterKind::Dora,
        );
        let y_b = base.forward(&x, n);
        let l = a.forward(&base, &x, &y_b, n);
        let dd = d.forward(&base, &x, &y_b, n);
        for (p, q) in l.iter().zip(&dd) {
            assert!((p - q).abs() < 1e-5);
        }
    }

    #[test]
    fn dropout_keeps_the_expected_fraction() {
        let (base, a, _, _) = setup(AdapterKind::Lora, 0.25);
        let n = 400;
        let x = vec![1.0f32; n * a.in_features];
        let y_b = base.forward(&x, n);
        let (_, saved) = a.forward_train(&base, &x, &y_b, n, &mut Rng::new(3));
        let keep = saved.keep.unwrap();
        let frac = keep.iter().filter(|&&k| k).count() as f64 / keep.len() as f64;
        assert!((frac - 0.75).abs() < 0.02, "kept {frac}");
        let xd = saved.x_d.unwrap();
        let mean = xd.iter().map(|&v| v as f64).sum::<f64>() / xd.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "inverted dropout mean {mean}");
    }
}
