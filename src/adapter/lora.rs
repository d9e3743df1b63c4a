//! [`LoraAdapter`]: the trainable part of a LoRA or DoRA layer, as PEFT ≥ 0.14 computes it
//! (spec §2–3, PEFT `lora/layer.py`, `lora/dora.py`, `lora/variants.py`).
//!
//! The adapter owns its layer's products (bias excluded, the Linear adds it): with
//! `u = x_d·Aᵀ` (`x_d` = dropout(x) in training, x otherwise), `s` the scaling and
//! `y_b = x·Wᵀ` the frozen base product:
//!
//! - LoRA: `y = y_b + s·u·Bᵀ`.
//! - DoRA, eval or no dropout: `y = k⊙(y_b + s·u·Bᵀ)`, i.e. `y = k⊙x(W+sBA)ᵀ`.
//! - DoRA, training with dropout, PEFT's form ([`DoraDropout::Peft`]):
//!   `y = y_b + (k−1)⊙(x_d·Wᵀ) + k⊙s·u·Bᵀ`; torchtune's form ([`DoraDropout::LoraOnly`]):
//!   `y = k⊙(y_b + s·u·Bᵀ)`.
//!
//! where `k = m / ‖W + s·B·A‖_row` with the norm detached (`dora.rs`).
//!
//! Gradients (the base weight never gets one): with `g = k⊙dy` for DoRA, `dy` for LoRA:
//! `dB = s·gᵀ·u`, `du = s·g·B`, `dA = duᵀ·x_d`, `dx = (base) + dropoutᵀ(du·A)`; DoRA adds
//! `dm = Σ_rows dy⊙z / ‖·‖` with `z` the term `k` multiplies, and routes `k⊙dy` through the
//! base (no base dropout) or `dy` through the base and `(k−1)⊙dy` through the dropped-out base
//! product (PEFT's form). Dropout masks come from [`Dropout`]'s seed and are never stored; the
//! thin products with the mask inside are in `lowrank.rs`.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::base::BaseWeight;
use super::config::InitLoraWeights;
use super::dora;
use super::dropout::Dropout;
use super::lowrank;
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
    /// Where DoRA applies the dropout in training.
    pub dora_dropout: DoraDropout,
    /// `‖W‖²` per row of the frozen base (DoRA), computed once.
    w_norm_sq: Option<Vec<f32>>,
    /// DoRA's `k` for inference, computed on first use after the weights last changed.
    eval_scale: OnceLock<Vec<f32>>,
}

/// Where DoRA applies `lora_dropout` during training (LoRA has one place only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DoraDropout {
    /// PEFT: `y = base(x) + (k−1)⊙base(x_d) + k⊙s·x_d·AᵀBᵀ`. The magnitude rescaling of the
    /// base output sees the dropped-out input, so training pays a second base product in
    /// forward and in backward.
    #[default]
    Peft,
    /// torchtune's `DoRALinear`: dropout on the low-rank path only,
    /// `y = k⊙(base(x) + s·x_d·AᵀBᵀ)`; no second base product. Same parameters, same adapter
    /// file, same inference; a different regulariser during training.
    LoraOnly,
}

impl DoraDropout {
    /// Parses `peft` or `lora-only`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "peft" => Some(Self::Peft),
            "lora-only" => Some(Self::LoraOnly),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Peft => "peft",
            Self::LoraOnly => "lora-only",
        }
    }
}

/// What [`LoraAdapter::backward`] needs from the forward pass.
pub struct LoraSaved {
    /// The dropout applied to the adapter's input (its mask is regenerated, never stored).
    dropout: Option<Dropout>,
    /// (N, R) `x_d · Aᵀ`.
    u: Vec<f32>,
    /// DoRA only.
    dora: Option<DoraSaved>,
}

/// DoRA's saved state.
struct DoraSaved {
    /// (out) `k = m / ‖W + sBA‖`.
    k: Vec<f32>,
    /// (out) the detached norm.
    norm: Vec<f32>,
    /// (N, out) the term `k` multiplies (gradient of `m`).
    z: Vec<f32>,
    /// The base product also saw the dropped-out input (PEFT's form).
    base_dropout: bool,
}

impl LoraSaved {
    /// DoRA without base dropout: the layer's output is `y[i, o] = k[o]·z[i, o]` exactly, and
    /// this state holds both; returns `(z, k)` so that a caller which keeps `y` for its own
    /// backward (the MLP's gate and up outputs) can rebuild it from here instead of holding
    /// the same numbers twice. `None` for LoRA and PEFT-form DoRA.
    pub fn output_factors(&self) -> Option<(&[f32], &[f32])> {
        self.dora
            .as_ref()
            .filter(|d| !d.base_dropout)
            .map(|d| (d.z.as_slice(), d.k.as_slice()))
    }
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

/// Rows per parallel work item in the element-wise passes over (N, out) buffers.
const ROWS: usize = 16;

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
            dora_dropout: DoraDropout::default(),
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

    /// Inference: `y (N, out) = x·Wᵀ` adapted (no bias, no dropout; DoRA's scale cached).
    pub fn forward(&self, base: &BaseWeight, x: &[f32], n: usize) -> Vec<f32> {
        let (inp, out, r, s) = (self.in_features, self.out_features, self.r, self.scaling);
        let mut y = base.forward(x, n);
        let u = lowrank::xd_at(x, n, inp, &self.lora_a, r, None);
        gemm_acc_ubt(&mut y, &u, &self.lora_b, n, out, r, s);
        if self.lora_magnitude_vector.is_some() {
            let k = self
                .eval_scale
                .get_or_init(|| self.scale(base).unwrap_or_default());
            y.par_chunks_mut(out * ROWS).for_each(|rows| {
                for row in rows.chunks_mut(out) {
                    row.iter_mut().zip(k).for_each(|(v, kk)| *v *= kk);
                }
            });
        }
        y
    }

    /// The dropout of this call (its seed drawn from `rng` when `dropout > 0`) and
    /// `u = x_d·Aᵀ (N, R)`.
    fn low_rank_input(&self, x: &[f32], n: usize, rng: &mut Rng) -> (Option<Dropout>, Vec<f32>) {
        let (inp, r) = (self.in_features, self.r);
        let dropout = self.draw_dropout(rng);
        let u = lowrank::xd_at(x, n, inp, &self.lora_a, r, dropout.as_ref());
        (dropout, u)
    }

    /// The dropout of this call, its seed drawn from `rng` when `dropout > 0`.
    fn draw_dropout(&self, rng: &mut Rng) -> Option<Dropout> {
        (self.dropout > 0.0).then(|| Dropout::new(self.dropout, rng.next_u64()))
    }

    /// Training forward: `y (N, out)` (no bias) and what backward needs. A dropout mask seed
    /// is drawn from `rng` when `dropout > 0`.
    pub fn forward_train(
        &self,
        base: &BaseWeight,
        x: &[f32],
        n: usize,
        rng: &mut Rng,
    ) -> (Vec<f32>, LoraSaved) {
        let (Some(y), saved) = self.train_forward(base, x, n, rng, false) else {
            unreachable!("the output is formed unless factors are asked for")
        };
        (y, saved)
    }

    /// [`forward_train`](Self::forward_train) for a caller that can take the output as
    /// factors: `None` in place of `y` where the saved state holds it as `(z, k)`
    /// ([`LoraSaved::output_factors`]), and `k⊙z` is never written.
    pub fn forward_train_factored(
        &self,
        base: &BaseWeight,
        x: &[f32],
        n: usize,
        rng: &mut Rng,
    ) -> (Option<Vec<f32>>, LoraSaved) {
        self.train_forward(base, x, n, rng, true)
    }

    fn train_forward(
        &self,
        base: &BaseWeight,
        x: &[f32],
        n: usize,
        rng: &mut Rng,
        factored: bool,
    ) -> (Option<Vec<f32>>, LoraSaved) {
        let (out, r, s) = (self.out_features, self.r, self.scaling);
        let dora = self.lora_magnitude_vector.is_some() && self.w_norm_sq.is_some();
        let dropout = self.draw_dropout(rng);
        // PEFT's form of DoRA multiplies the dropped-out input by W as well: it is built here
        // (with room for A's rows, see below) and `u` taken from it, without a second mask.
        let base_dropout = dora && self.dora_dropout == DoraDropout::Peft && dropout.is_some();
        let xd = dropout.as_ref().filter(|_| base_dropout).map(|d| {
            let inp = self.in_features;
            let mut xd = Vec::with_capacity((n + r) * inp);
            xd.resize(n * inp, 0.0);
            d.apply(x, &mut xd);
            xd
        });
        let u = match &xd {
            Some(xd) => lowrank::xd_at(xd, n, self.in_features, &self.lora_a, r, None),
            None => lowrank::xd_at(x, n, self.in_features, &self.lora_a, r, dropout.as_ref()),
        };
        let (Some(m), Some(w2)) = (&self.lora_magnitude_vector, &self.w_norm_sq) else {
            let mut y = base.forward(x, n);
            gemm_acc_ubt(&mut y, &u, &self.lora_b, n, out, r, s);
            return (
                Some(y),
                LoraSaved {
                    dropout,
                    u,
                    dora: None,
                },
            );
        };
        // `x_d·Wᵀ` (PEFT's form) from the same pass over the weight as `x·Wᵀ` and `W·Aᵀ`.
        let (mut y, xd_wt, wat) = match xd {
            Some(xd) => {
                let (y, xd_wt, wat) = base.forward_pair_and_times_at(x, n, xd, &self.lora_a, r);
                (y, Some(xd_wt), wat)
            }
            None => {
                let (y, wat) = base.forward_and_times_at(x, n, &self.lora_a, r);
                (y, None, wat)
            }
        };
        let norm = dora::weight_norm_with(&wat, w2, &self.lora_a, &self.lora_b, r, s);
        let k = dora::magnitude_scale(m, &norm);
        let z = if let Some(mut z) = xd_wt {
            // z = x_d·Wᵀ + s·u·Bᵀ;  y = x·Wᵀ + (k−1)⊙(x_d·Wᵀ) + k⊙(s·u·Bᵀ).
            let mut v = vec![0f32; n * out];
            gemm_acc_ubt(&mut v, &u, &self.lora_b, n, out, r, s);
            y.par_chunks_mut(out * ROWS)
                .zip(z.par_chunks_mut(out * ROWS))
                .zip(v.par_chunks(out * ROWS))
                .for_each(|((yr, zr), vr)| {
                    for ((y, z), v) in yr
                        .chunks_mut(out)
                        .zip(zr.chunks_mut(out))
                        .zip(vr.chunks(out))
                    {
                        for ((y, z), (&v, &k)) in y.iter_mut().zip(z).zip(v.iter().zip(&k)) {
                            let bt = *z;
                            *y += (k - 1.0) * bt + k * v;
                            *z = bt + v;
                        }
                    }
                });
            z
        } else {
            // z = x·Wᵀ + s·u·Bᵀ (built in y's buffer);  y = k⊙z, unless the caller takes
            // the factors.
            gemm_acc_ubt(&mut y, &u, &self.lora_b, n, out, r, s);
            let z = std::mem::take(&mut y);
            if !factored {
                y = scale_columns(&z, out, &k);
            }
            z
        };
        let y = (!factored || base_dropout).then_some(y);
        let dora = DoraSaved {
            k,
            norm,
            z,
            base_dropout,
        };
        (
            y,
            LoraSaved {
                dropout,
                u,
                dora: Some(dora),
            },
        )
    }

    /// What [`backward`](Self::backward) needs, without the output (activation checkpointing
    /// recomputes a layer whose output nobody reads): LoRA skips the base product; DoRA needs
    /// it for `z`. Draws from `rng` exactly as [`forward_train`](Self::forward_train) does.
    pub fn saved_only(&self, base: &BaseWeight, x: &[f32], n: usize, rng: &mut Rng) -> LoraSaved {
        if self.lora_magnitude_vector.is_some() {
            return self.train_forward(base, x, n, rng, true).1;
        }
        let (dropout, u) = self.low_rank_input(x, n, rng);
        LoraSaved {
            dropout,
            u,
            dora: None,
        }
    }

    /// Backward: `dx (N, in)` through base and adapter, and the adapter's gradients (the base
    /// weight never gets one). `x` is the layer input given to forward.
    pub fn backward(
        &self,
        saved: LoraSaved,
        base: &BaseWeight,
        x: &[f32],
        dy: &[f32],
        n: usize,
    ) -> (Vec<f32>, LoraGrads) {
        let (dx, grads) = self.backward_with(saved, base, x, dy, n, true);
        (dx.expect("the input gradient was asked for"), grads)
    }

    /// The adapter's gradients alone, the same numbers [`backward`](Self::backward) gives, for
    /// a layer whose input gradient nobody reads (the first decoder layer's projections when
    /// the embedding is frozen): the base products `dy·W` are skipped.
    pub fn param_grads(
        &self,
        saved: LoraSaved,
        base: &BaseWeight,
        x: &[f32],
        dy: &[f32],
        n: usize,
    ) -> LoraGrads {
        self.backward_with(saved, base, x, dy, n, false).1
    }

    fn backward_with(
        &self,
        saved: LoraSaved,
        base: &BaseWeight,
        x: &[f32],
        dy: &[f32],
        n: usize,
        want_dx: bool,
    ) -> (Option<Vec<f32>>, LoraGrads) {
        let (inp, out, r, s) = (self.in_features, self.out_features, self.r, self.scaling);
        let LoraSaved { dropout, u, dora } = saved;
        // g: the output gradient of the low-rank path before `s` (k⊙dy for DoRA, dy for LoRA).
        let mut d_m = None;
        let mut kdy = None;
        let mut km1dy = None;
        let mut base_dropout = false;
        if let Some(d) = dora {
            base_dropout = d.base_dropout;
            let (g, g1, dm) = dora_output_grads(dy, d, n, out);
            d_m = Some(dm);
            kdy = Some(g);
            km1dy = g1;
        }
        // dB = s·gᵀ·u, du = s·g·B.
        let g: &[f32] = kdy.as_deref().unwrap_or(dy);
        let (d_lora_b, du) = lowrank::grad_b_and_du(g, n, out, &u, &self.lora_b, r, s);
        // The base takes dy (LoRA, PEFT-form DoRA, which frees k⊙dy here) or k⊙dy (DoRA
        // without base dropout).
        if base_dropout {
            kdy = None;
        }
        let base_dy: &[f32] = kdy.as_deref().unwrap_or(dy);
        // The base's input gradient, and PEFT-form DoRA's `((k−1)⊙dy)·W` through the
        // dropped-out base path from the same pass over the weight.
        let (mut dx, extra) = match (&km1dy, want_dx) {
            (_, false) => (None, None),
            (None, true) => (Some(base.backward_input(base_dy, n)), None),
            (Some(g1), true) => {
                let (dx, extra) = base.backward_input2(base_dy, g1, n);
                (Some(dx), Some(extra))
            }
        };
        drop((kdy, km1dy));
        // dA = duᵀ·x_d;  dx += dropoutᵀ(du·A [+ ((k−1)⊙dy)·W]).
        let d_lora_a = lowrank::grad_a_and_dx(
            &du,
            n,
            r,
            x,
            &self.lora_a,
            inp,
            extra.as_deref(),
            dropout.as_ref(),
            dx.as_deref_mut(),
        );
        (
            dx,
            LoraGrads {
                d_lora_a,
                d_lora_b,
                d_lora_magnitude_vector: d_m,
            },
        )
    }
}

/// `y (n×out) += s · u (n×r) · Bᵀ` for `B (out×r)`, in one gemm (the scale rides along).
fn gemm_acc_ubt(y: &mut [f32], u: &[f32], b: &[f32], n: usize, out: usize, r: usize, s: f32) {
    ops::gemm_scaled(n, out, r, y, out, true, u, r, 1, b, 1, r, s, ops::threads());
}

/// DoRA's output-side gradients in one pass over `dy`: `k⊙dy` (N, out), written over `z` once
/// each element of `z` has been read (no new buffer), `(k−1)⊙dy` when the base saw the
/// dropped-out input, and `dm = Σ_rows dy⊙z / ‖·‖` (out; partial sums per fixed row block,
/// added in order, so the result does not depend on thread scheduling).
fn dora_output_grads(
    dy: &[f32],
    d: DoraSaved,
    n: usize,
    out: usize,
) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
    let DoraSaved {
        k,
        norm,
        mut z,
        base_dropout,
    } = d;
    assert!(dy.len() == n * out && z.len() == n * out, "DoRA dy/z shape");
    let block = out * ROWS;
    let partials: Vec<Vec<f32>> = z
        .par_chunks_mut(block)
        .zip(dy.par_chunks(block))
        .map(|(zr, dr)| {
            let mut acc = vec![0f32; out];
            for (z, dy) in zr.chunks_mut(out).zip(dr.chunks(out)) {
                // zipped, not indexed: the indexed loop kept its bounds checks and ran scalar
                for ((a, z), (&dy, &k)) in acc.iter_mut().zip(z).zip(dy.iter().zip(&k)) {
                    *a += dy * *z;
                    *z = k * dy;
                }
            }
            acc
        })
        .collect();
    let g1 = base_dropout.then(|| {
        let km1: Vec<f32> = k.iter().map(|k| k - 1.0).collect();
        scale_columns(dy, out, &km1)
    });
    let mut dm = ops::reduce_parts(&partials, out);
    for (v, nn) in dm.iter_mut().zip(&norm) {
        *v /= nn.max(dora::NORM_EPS);
    }
    (z, g1, dm)
}

/// `y[i, o] = c[o] · x[i, o]` for rows of `width` (DoRA's `k⊙z`, `(k−1)⊙dy`), in parallel,
/// into a new vector that is not zeroed first.
fn scale_columns(x: &[f32], width: usize, c: &[f32]) -> Vec<f32> {
    assert_eq!(c.len(), width, "one factor per column");
    assert_eq!(x.len() % width.max(1), 0, "whole rows");
    // SAFETY: the row blocks of the output pair with those of `x` (same length), and every
    // element of each row is written.
    unsafe {
        ops::filled(x.len(), |y| {
            y.par_chunks_mut(width * ROWS)
                .zip(x.par_chunks(width * ROWS))
                .for_each(|(yr, xr)| {
                    for (y, x) in yr.chunks_mut(width).zip(xr.chunks(width)) {
                        for (y, (&x, &c)) in y.iter_mut().zip(x.iter().zip(c)) {
                            y.write(c * x);
                        }
                    }
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(kind: AdapterKind, dropout: f32) -> (BaseWeight, LoraAdapter, Vec<f32>, usize) {
        setup_on(kind, dropout, false)
    }

    /// [`setup`] on a dense or an NF4 base (the 4-bit kernels share tiles between products).
    fn setup_on(
        kind: AdapterKind,
        dropout: f32,
        quantized: bool,
    ) -> (BaseWeight, LoraAdapter, Vec<f32>, usize) {
        let (out, inp, r, n) = (5, 8, 2, 3);
        let mut rng = Rng::new(1);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.5).collect();
        let base = if quantized {
            let opts = crate::quant::QuantizeOptions::default();
            let q = crate::quant::QuantizedWeight::quantize(
                &w,
                &[out, inp],
                crate::quant::Dtype::F32,
                opts,
            );
            BaseWeight::Quant(q.expect("5×8 quantizes"))
        } else {
            BaseWeight::Dense { w, out, inp }
        };
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

    /// Loss = Σ c ⊙ y with fixed c; compares analytic and central-difference grads.
    fn grad_check(kind: AdapterKind, dropout: f32, where_: DoraDropout) {
        grad_check_on(kind, dropout, where_, false);
    }

    fn grad_check_on(kind: AdapterKind, dropout: f32, where_: DoraDropout, quantized: bool) {
        let (base, mut a, x, n) = setup_on(kind, dropout, quantized);
        a.dora_dropout = where_;
        let a = a;
        let out = a.out_features;
        let c: Vec<f32> = (0..n * out)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let loss = |ad: &LoraAdapter, x: &[f32]| -> f64 {
            let (y, _) = ad.forward_train(&base, x, n, &mut Rng::new(9));
            y.iter().zip(&c).map(|(y, c)| (y * c) as f64).sum()
        };
        let (_, saved) = a.forward_train(&base, &x, n, &mut Rng::new(9));
        let (dx, g) = a.backward(saved, &base, &x, &c, n);
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
        grad_check(AdapterKind::Lora, 0.0, DoraDropout::Peft);
        grad_check(AdapterKind::Lora, 0.3, DoraDropout::Peft);
    }

    #[test]
    fn dora_gradients_match_finite_differences() {
        for where_ in [DoraDropout::Peft, DoraDropout::LoraOnly] {
            grad_check(AdapterKind::Dora, 0.0, where_);
            grad_check(AdapterKind::Dora, 0.3, where_);
        }
    }

    /// QDoRA: on a 4-bit base, PEFT's form takes `x·Wᵀ`, `x_d·Wᵀ` and `W·Aᵀ` from one pass of
    /// dequantized tiles, and `dy·W` with `((k−1)⊙dy)·W` from another.
    #[test]
    fn dora_on_a_4bit_base_gradients_match_finite_differences() {
        for where_ in [DoraDropout::Peft, DoraDropout::LoraOnly] {
            grad_check_on(AdapterKind::Dora, 0.3, where_, true);
        }
        grad_check_on(AdapterKind::Lora, 0.3, DoraDropout::Peft, true);
    }

    /// The two DoRA dropout placements are the formulas they claim, checked against a direct
    /// evaluation with the same mask.
    #[test]
    fn dora_dropout_forms() {
        let (base, mut a, x, n) = setup(AdapterKind::Dora, 0.3);
        let (out, r, s) = (a.out_features, a.r, a.scaling);
        let seed = Rng::new(4).next_u64();
        let x_d = Dropout::new(0.3, seed).applied(&x);
        let k = dora::magnitude_scale(
            a.lora_magnitude_vector.as_ref().unwrap(),
            &a.weight_norm(&base),
        );
        let lowrank = {
            let u = ops::matmul_nt(&x_d, n, &a.lora_a, r, a.in_features);
            ops::matmul_nt(&u, n, &a.lora_b, out, r)
        };
        let (yb, ybd) = (base.forward(&x, n), base.forward(&x_d, n));
        for (where_, want) in [
            (
                DoraDropout::Peft,
                (0..n * out)
                    .map(|i| yb[i] + (k[i % out] - 1.0) * ybd[i] + k[i % out] * s * lowrank[i])
                    .collect::<Vec<_>>(),
            ),
            (
                DoraDropout::LoraOnly,
                (0..n * out)
                    .map(|i| k[i % out] * (yb[i] + s * lowrank[i]))
                    .collect(),
            ),
        ] {
            a.dora_dropout = where_;
            let (y, _) = a.forward_train(&base, &x, n, &mut Rng::new(4));
            for (p, q) in y.iter().zip(&want) {
                assert!((p - q).abs() < 1e-5, "{where_:?}: {p} vs {q}");
            }
        }
    }

    /// `output_factors` hands back `(z, k)` with `k[o]·z[i, o]` the forward's output to the
    /// bit where that holds (DoRA without base dropout), and nothing where it does not.
    #[test]
    fn output_factors_rebuild_the_output_exactly() {
        for (kind, p, where_, exact) in [
            (AdapterKind::Dora, 0.3, DoraDropout::LoraOnly, true),
            (AdapterKind::Dora, 0.0, DoraDropout::Peft, true),
            (AdapterKind::Dora, 0.3, DoraDropout::Peft, false),
            (AdapterKind::Lora, 0.3, DoraDropout::LoraOnly, false),
        ] {
            let (base, mut a, x, n) = setup(kind, p);
            a.dora_dropout = where_;
            let (y, saved) = a.forward_train(&base, &x, n, &mut Rng::new(5));
            // The factored forward forms the output exactly where the factors are not kept.
            let (yf, _) = a.forward_train_factored(&base, &x, n, &mut Rng::new(5));
            match yf {
                Some(yf) => assert!(!exact && yf == y, "{kind:?} {p} {where_:?}"),
                None => assert!(exact, "{kind:?} {p} {where_:?}: no output, no factors"),
            }
            let Some((z, k)) = saved.output_factors() else {
                assert!(!exact, "{kind:?} {p} {where_:?}: no factors");
                continue;
            };
            assert!(exact, "{kind:?} {p} {where_:?}: factors where y ≠ k⊙z");
            let out = a.out_features;
            assert_eq!(z.len(), y.len());
            for (i, (&y, &z)) in y.iter().zip(z).enumerate() {
                assert_eq!(y.to_bits(), (k[i % out] * z).to_bits(), "element {i}");
            }
        }
    }

    #[test]
    fn forward_equals_forward_train_without_dropout_and_dora_init_equals_lora() {
        for kind in [AdapterKind::Lora, AdapterKind::Dora] {
            let (base, a, x, n) = setup(kind, 0.0);
            let f = a.forward(&base, &x, n);
            let (t, _) = a.forward_train(&base, &x, n, &mut Rng::new(0));
            for (p, q) in f.iter().zip(&t) {
                assert!((p - q).abs() < 1e-6);
            }
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
        let l = a.forward(&base, &x, n);
        let dd = d.forward(&base, &x, n);
        for (p, q) in l.iter().zip(&dd) {
            assert!((p - q).abs() < 1e-5);
        }
    }
}
