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
//! thin products with the mask inside are `ops::lowrank`'s.
//!
//! The weights are private: they change only through [`LoraAdapter::param_mut`], which also
//! drops DoRA's cached inference scale, so that cache can never be stale.

use std::sync::OnceLock;

use super::base::BaseWeight;
use super::config::InitLoraWeights;
use super::dora::{self, DoraSaved};
use super::dropout::Dropout;
use crate::ops::bf16::ComputeDtype;
use crate::ops::lowrank::{self, Input};
use crate::ops::{self, Accum, Kept, MatMut, MatRef, Par, Rng};

/// LoRA or DoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// Low-rank update only.
    Lora,
    /// Low-rank update plus a trainable magnitude per output row.
    Dora,
}

/// Where DoRA applies `lora_dropout` during training (LoRA has one place only).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
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
    /// The name used in settings and flags (`peft`, `lora-only`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Peft => "peft",
            Self::LoraOnly => "lora-only",
        }
    }
}

/// One trainable tensor of an adapter, by PEFT's key suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdapterParam {
    /// `lora_A.weight`: (R, in).
    LoraA,
    /// `lora_B.weight`: (out, R).
    LoraB,
    /// `lora_magnitude_vector`: (out), DoRA only.
    Magnitude,
}

/// How an adapter is built: its kind, rank, scaling and dropout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterOptions {
    /// LoRA or DoRA.
    pub kind: AdapterKind,
    /// Rank R.
    pub r: usize,
    /// `lora_alpha / r` (or `/ √r`).
    pub scaling: f32,
    /// `lora_dropout` probability.
    pub dropout: f32,
    /// Where DoRA applies the dropout in training.
    pub dora_dropout: DoraDropout,
}

/// An adapter's weights as a file holds them.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    /// `lora_A.weight`: (R, in).
    pub lora_a: Vec<f32>,
    /// `lora_B.weight`: (out, R).
    pub lora_b: Vec<f32>,
    /// `lora_magnitude_vector`: (out), DoRA only.
    pub magnitude: Option<Vec<f32>>,
}

/// The low-rank pair both kinds share, with its shape and hyper-parameters.
#[derive(Debug, Clone)]
struct LowRank {
    /// (R, in)
    lora_a: Vec<f32>,
    /// (out, R)
    lora_b: Vec<f32>,
    r: usize,
    in_features: usize,
    out_features: usize,
    scaling: f32,
    dropout: f32,
}

/// LoRA: `y = x·Wᵀ + s·x_d·AᵀBᵀ`.
#[derive(Debug, Clone)]
pub struct Lora {
    low: LowRank,
}

/// DoRA: LoRA's pair plus a magnitude per output row, `y = k⊙x(W + sBA)ᵀ` with
/// `k = m/‖W + sBA‖_row`.
#[derive(Debug, Clone)]
pub struct Dora {
    low: LowRank,
    /// (out) `lora_magnitude_vector`.
    magnitude: Vec<f32>,
    /// (out) `‖W‖²` per row of the frozen base, computed once.
    w_norm_sq: Vec<f32>,
    /// Where the dropout goes in training.
    dropout_form: DoraDropout,
    /// (out) `k` for inference, computed on first use after the weights last changed.
    eval_scale: OnceLock<Vec<f32>>,
}

/// The trainable adapter of one Linear layer.
#[derive(Debug, Clone)]
pub enum LoraAdapter {
    /// A LoRA adapter.
    Lora(Lora),
    /// A DoRA adapter.
    Dora(Dora),
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

impl LoraSaved {
    /// DoRA without base dropout: the layer's output is `y[i, o] = k[o]·z[i, o]` exactly, and
    /// this state holds both; returns `(z, k)` so that a caller which keeps `y` for its own
    /// backward (the MLP's gate and up outputs) can rebuild it from here instead of holding
    /// the same numbers twice. `None` for LoRA and PEFT-form DoRA.
    pub fn output_factors(&self) -> Option<(&Kept, &[f32])> {
        self.dora.as_ref().and_then(DoraSaved::output_factors)
    }

    /// Keeps the saved activation (DoRA's `z`) as a run computing in `c` saves it: bf16 for
    /// bf16. `u` (N, R) stays f32: it is small and feeds only f32 adapter products. Returns
    /// the bytes `z` holds.
    pub fn keep_in(&mut self, c: ComputeDtype) -> usize {
        self.dora.as_mut().map_or(0, |d| d.z.keep_in(c))
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

impl LoraGrads {
    /// The gradients by tensor, in [`LoraAdapter::params`] order.
    pub fn into_params(self) -> impl Iterator<Item = (AdapterParam, Vec<f32>)> {
        [
            (AdapterParam::LoraA, Some(self.d_lora_a)),
            (AdapterParam::LoraB, Some(self.d_lora_b)),
            (AdapterParam::Magnitude, self.d_lora_magnitude_vector),
        ]
        .into_iter()
        .filter_map(|(p, g)| g.map(|g| (p, g)))
    }
}

impl LoraAdapter {
    /// A fresh adapter for `base`, initialised as PEFT does (`init`), with DoRA's magnitude set
    /// to `‖W + s·B·A‖` per row.
    pub fn new(
        base: &BaseWeight,
        opts: &AdapterOptions,
        init: InitLoraWeights,
        rng: &mut Rng,
    ) -> Self {
        let (out, inp, r) = (base.out_features(), base.in_features(), opts.r);
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
        let low = LowRank::new(base, opts, lora_a, lora_b);
        match opts.kind {
            AdapterKind::Lora => LoraAdapter::Lora(Lora { low }),
            AdapterKind::Dora => {
                let w_norm_sq = base.row_norms_sq();
                let magnitude = dora::weight_norm(
                    base,
                    &w_norm_sq,
                    &low.lora_a,
                    &low.lora_b,
                    low.r,
                    low.scaling,
                );
                LoraAdapter::Dora(Dora::new(low, magnitude, w_norm_sq, opts.dora_dropout))
            }
        }
    }

    /// An adapter from given weights (e.g. loaded from a file).
    ///
    /// # Panics
    /// If the lengths do not match the rank and the base's shape, or a DoRA adapter comes
    /// without its magnitude (or a LoRA one with one).
    pub fn from_weights(base: &BaseWeight, opts: &AdapterOptions, w: AdapterWeights) -> Self {
        let low = LowRank::new(base, opts, w.lora_a, w.lora_b);
        match (opts.kind, w.magnitude) {
            (AdapterKind::Lora, None) => LoraAdapter::Lora(Lora { low }),
            (AdapterKind::Dora, Some(m)) => {
                assert_eq!(m.len(), low.out_features, "magnitude length");
                let w2 = base.row_norms_sq();
                LoraAdapter::Dora(Dora::new(low, m, w2, opts.dora_dropout))
            }
            (kind, m) => panic!(
                "a {kind:?} adapter {} a magnitude vector",
                if m.is_some() { "with" } else { "without" }
            ),
        }
    }

    fn low(&self) -> &LowRank {
        match self {
            LoraAdapter::Lora(l) => &l.low,
            LoraAdapter::Dora(d) => &d.low,
        }
    }

    fn dora(&self) -> Option<&Dora> {
        match self {
            LoraAdapter::Lora(_) => None,
            LoraAdapter::Dora(d) => Some(d),
        }
    }

    /// LoRA or DoRA.
    pub fn kind(&self) -> AdapterKind {
        match self {
            LoraAdapter::Lora(_) => AdapterKind::Lora,
            LoraAdapter::Dora(_) => AdapterKind::Dora,
        }
    }

    /// Rank R.
    pub fn r(&self) -> usize {
        self.low().r
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.low().in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.low().out_features
    }

    /// `lora_alpha / r` (or `/ √r`).
    pub fn scaling(&self) -> f32 {
        self.low().scaling
    }

    /// `lora_A.weight`: (R, in).
    pub fn lora_a(&self) -> &[f32] {
        &self.low().lora_a
    }

    /// `lora_B.weight`: (out, R).
    pub fn lora_b(&self) -> &[f32] {
        &self.low().lora_b
    }

    /// `lora_magnitude_vector`: (out), DoRA only.
    pub fn magnitude(&self) -> Option<&[f32]> {
        self.dora().map(|d| d.magnitude.as_slice())
    }

    /// Where DoRA applies the dropout in training (`None` for LoRA).
    pub fn dora_dropout(&self) -> Option<DoraDropout> {
        self.dora().map(|d| d.dropout_form)
    }

    /// Sets where DoRA applies the dropout in training (no effect on LoRA).
    pub fn set_dora_dropout(&mut self, form: DoraDropout) {
        if let LoraAdapter::Dora(d) = self {
            d.dropout_form = form;
        }
    }

    /// The trainable tensors this adapter has, in a fixed order.
    pub fn params(&self) -> &'static [AdapterParam] {
        match self {
            LoraAdapter::Lora(_) => &[AdapterParam::LoraA, AdapterParam::LoraB],
            LoraAdapter::Dora(_) => &[
                AdapterParam::LoraA,
                AdapterParam::LoraB,
                AdapterParam::Magnitude,
            ],
        }
    }

    /// One trainable tensor (`None`: a magnitude asked of LoRA).
    pub fn param(&self, p: AdapterParam) -> Option<&[f32]> {
        match p {
            AdapterParam::LoraA => Some(self.lora_a()),
            AdapterParam::LoraB => Some(self.lora_b()),
            AdapterParam::Magnitude => self.magnitude(),
        }
    }

    /// One trainable tensor, to change. Drops DoRA's cached inference scale first: the next
    /// forward after the borrow ends recomputes it from the new weights.
    pub fn param_mut(&mut self, p: AdapterParam) -> Option<&mut [f32]> {
        match self {
            LoraAdapter::Lora(l) => match p {
                AdapterParam::LoraA => Some(&mut l.low.lora_a),
                AdapterParam::LoraB => Some(&mut l.low.lora_b),
                AdapterParam::Magnitude => None,
            },
            LoraAdapter::Dora(d) => {
                d.eval_scale = OnceLock::new();
                Some(match p {
                    AdapterParam::LoraA => &mut d.low.lora_a,
                    AdapterParam::LoraB => &mut d.low.lora_b,
                    AdapterParam::Magnitude => &mut d.magnitude,
                })
            }
        }
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.params()
            .iter()
            .filter_map(|&p| self.param(p))
            .map(<[f32]>::len)
            .sum()
    }

    /// `‖W + s·B·A‖` per row (DoRA's detached norm; for LoRA, from a fresh `‖W‖²`).
    pub fn weight_norm(&self, base: &BaseWeight) -> Vec<f32> {
        let low = self.low();
        let w2 = match self.dora() {
            Some(d) => std::borrow::Cow::Borrowed(&d.w_norm_sq),
            None => std::borrow::Cow::Owned(base.row_norms_sq()),
        };
        dora::weight_norm(base, &w2, &low.lora_a, &low.lora_b, low.r, low.scaling)
    }

    /// Inference: `y (N, out) = x·Wᵀ` adapted (no bias, no dropout; DoRA's scale cached).
    pub fn forward(&self, base: &BaseWeight, x: &[f32], n: usize) -> Vec<f32> {
        let low = self.low();
        let out = low.out_features;
        let mut y = base.forward(x, n);
        let u = low.xd_at(x, n, None);
        low.add_ubt(&mut y, &u, n);
        if let Some(d) = self.dora() {
            let k = d
                .eval_scale
                .get_or_init(|| dora::magnitude_scale(&d.magnitude, &self.weight_norm(base)));
            dora::scale_columns_in_place(&mut y, out, k);
        }
        y
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
        let low = self.low();
        let (inp, out, r) = (low.in_features, low.out_features, low.r);
        let dropout = low.draw_dropout(rng);
        let Some(d) = self.dora() else {
            let u = low.xd_at(x, n, dropout.as_ref());
            let mut y = base.forward(x, n);
            low.add_ubt(&mut y, &u, n);
            let saved = LoraSaved {
                dropout,
                u,
                dora: None,
            };
            return (Some(y), saved);
        };
        // PEFT's form of DoRA multiplies the dropped-out input by W as well: it is built here
        // (with room for A's rows, see below) and `u` taken from it, without a second mask.
        let base_dropout = d.dropout_form == DoraDropout::Peft && dropout.is_some();
        // In bf16 where it pays, `x_d·Wᵀ` is `x·Wᵀ` less the dropped elements' product.
        let sparse = base_dropout && base.takes_dropped_passes();
        let xd = dropout
            .as_ref()
            .filter(|_| base_dropout && !sparse)
            .map(|dr| {
                let mut xd = Vec::with_capacity((n + r) * inp);
                xd.resize(n * inp, 0.0);
                dr.apply(x, &mut xd);
                xd
            });
        let u = match &xd {
            Some(xd) => low.xd_at(xd, n, None),
            None => low.xd_at(x, n, dropout.as_ref()),
        };
        // `x_d·Wᵀ` (PEFT's form) from the same pass over the weight as `x·Wᵀ` and `W·Aᵀ`.
        let (mut y, xd_wt, wat) = match (xd, &dropout) {
            (Some(xd), _) => {
                let (y, xd_wt, wat) = base.forward_pair_and_times_at(x, n, xd, &low.lora_a, r);
                (y, Some(xd_wt), wat)
            }
            (None, Some(dr)) if sparse => {
                let (y, wat) = base.forward_and_times_at(x, n, &low.lora_a, r);
                let xd_wt = base.forward_dropped(x, &y, n, &dr.mask());
                (y, Some(xd_wt), wat)
            }
            _ => {
                let (y, wat) = base.forward_and_times_at(x, n, &low.lora_a, r);
                (y, None, wat)
            }
        };
        let norm =
            dora::weight_norm_with(&wat, &d.w_norm_sq, &low.lora_a, &low.lora_b, r, low.scaling);
        let k = dora::magnitude_scale(&d.magnitude, &norm);
        let z = if let Some(mut z) = xd_wt {
            // z = x_d·Wᵀ + s·u·Bᵀ;  y = x·Wᵀ + (k−1)⊙(x_d·Wᵀ) + k⊙(s·u·Bᵀ).
            let mut v = vec![0f32; n * out];
            low.add_ubt(&mut v, &u, n);
            dora::combine_base_dropout(&mut y, &mut z, &v, &k);
            z
        } else {
            // z = x·Wᵀ + s·u·Bᵀ (built in y's buffer);  y = k⊙z, unless the caller takes
            // the factors.
            low.add_ubt(&mut y, &u, n);
            let z = std::mem::take(&mut y);
            if !factored {
                y = dora::scale_columns(&z, out, &k);
            }
            z
        };
        let y = (!factored || base_dropout).then_some(y);
        let saved = DoraSaved {
            k,
            norm,
            z: z.into(),
            base_dropout,
        };
        (
            y,
            LoraSaved {
                dropout,
                u,
                dora: Some(saved),
            },
        )
    }

    /// What [`backward`](Self::backward) needs, without the output (activation checkpointing
    /// recomputes a layer whose output nobody reads): LoRA skips the base product; DoRA needs
    /// it for `z`. Draws from `rng` exactly as [`forward_train`](Self::forward_train) does.
    pub fn saved_only(&self, base: &BaseWeight, x: &[f32], n: usize, rng: &mut Rng) -> LoraSaved {
        if self.dora().is_some() {
            return self.train_forward(base, x, n, rng, true).1;
        }
        let low = self.low();
        let dropout = low.draw_dropout(rng);
        let u = low.xd_at(x, n, dropout.as_ref());
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
        let (dx, grads) = self.backward_with(saved, base, (x, dy, n), true);
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
        self.backward_with(saved, base, (x, dy, n), false).1
    }

    fn backward_with(
        &self,
        saved: LoraSaved,
        base: &BaseWeight,
        (x, dy, n): (&[f32], &[f32], usize),
        want_dx: bool,
    ) -> (Option<Vec<f32>>, LoraGrads) {
        let low = self.low();
        let (inp, out, r, s) = (low.in_features, low.out_features, low.r, low.scaling);
        let LoraSaved { dropout, u, dora } = saved;
        // g: the output gradient of the low-rank path before `s` (k⊙dy for DoRA, dy for LoRA).
        let mut d_m = None;
        let mut kdy = None;
        let mut km1dy = None;
        let mut base_dropout = false;
        if let Some(d) = dora {
            base_dropout = d.base_dropout;
            let (g, g1, dm) = dora::output_grads(dy, d, n, out);
            d_m = Some(dm);
            kdy = Some(g);
            km1dy = g1;
        }
        // dB = s·gᵀ·u, du = s·g·B.
        let g: &[f32] = kdy.as_deref().unwrap_or(dy);
        let (d_lora_b, du) = lowrank::grad_b_and_du(g, n, out, &u, &low.lora_b, r, s);
        // The base takes dy (LoRA, PEFT-form DoRA, which frees k⊙dy here) or k⊙dy (DoRA
        // without base dropout).
        if base_dropout {
            kdy = None;
        }
        let base_dy: &[f32] = kdy.as_deref().unwrap_or(dy);
        // The base's input gradient, and PEFT-form DoRA's `((k−1)⊙dy)·W` through the
        // dropped-out base path from the same pass over the weight.
        let (mut dx, extra) = match (km1dy.as_mut(), &dropout, want_dx) {
            (_, _, false) => (None, None),
            (None, _, true) => (Some(base.backward_input(base_dy, n)), None),
            // in bf16 where it pays, both from one dense product (of `dy + c·g1`, built in g1)
            // and the second term at the dropped elements
            (Some(g1), Some(dr), true) if base.takes_dropped_passes() => {
                let dx = base.backward_input_dropped(base_dy, g1, n, &dr.mask());
                (Some(dx), None)
            }
            (Some(g1), _, true) => {
                let (dx, extra) = base.backward_input2(base_dy, g1, n);
                (Some(dx), Some(extra))
            }
        };
        drop((kdy, km1dy));
        // dA = duᵀ·x_d;  dx += dropoutᵀ(du·A [+ ((k−1)⊙dy)·W]).
        let mask = dropout.as_ref().map(Dropout::mask);
        let input = Input {
            x,
            n,
            inp,
            mask: mask.as_ref(),
        };
        let d_lora_a = lowrank::grad_a_and_dx(
            input,
            &du,
            &low.lora_a,
            r,
            extra.as_deref(),
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

impl LowRank {
    /// # Panics
    /// If the lengths do not match the rank and the base's shape.
    fn new(base: &BaseWeight, opts: &AdapterOptions, lora_a: Vec<f32>, lora_b: Vec<f32>) -> Self {
        let (out, inp, r) = (base.out_features(), base.in_features(), opts.r);
        assert_eq!(lora_a.len(), r * inp, "lora_A length");
        assert_eq!(lora_b.len(), out * r, "lora_B length");
        LowRank {
            lora_a,
            lora_b,
            r,
            in_features: inp,
            out_features: out,
            scaling: opts.scaling,
            dropout: opts.dropout,
        }
    }

    /// The dropout of this call, its seed drawn from `rng` when `dropout > 0`.
    fn draw_dropout(&self, rng: &mut Rng) -> Option<Dropout> {
        (self.dropout > 0.0).then(|| Dropout::new(self.dropout, rng.next_u64()))
    }

    /// `u (N, R) = x_d·Aᵀ`, with `x_d` dropped out by `dropout` when given.
    fn xd_at(&self, x: &[f32], n: usize, dropout: Option<&Dropout>) -> Vec<f32> {
        let mask = dropout.map(Dropout::mask);
        let input = Input {
            x,
            n,
            inp: self.in_features,
            mask: mask.as_ref(),
        };
        lowrank::xd_at(input, &self.lora_a, self.r)
    }

    /// `y (n×out) += s · u (n×r) · Bᵀ` in one gemm (the scale rides along).
    fn add_ubt(&self, y: &mut [f32], u: &[f32], n: usize) {
        let (out, r) = (self.out_features, self.r);
        let b = MatRef::new(&self.lora_b, out, r);
        let dst = MatMut::new(y, n, out);
        ops::gemm(
            dst,
            Accum::Add,
            MatRef::new(u, n, r),
            b.t(),
            self.scaling,
            Par::All,
        );
    }
}

impl Dora {
    fn new(low: LowRank, magnitude: Vec<f32>, w_norm_sq: Vec<f32>, form: DoraDropout) -> Self {
        Dora {
            low,
            magnitude,
            w_norm_sq,
            dropout_form: form,
            eval_scale: OnceLock::new(),
        }
    }
}

#[cfg(test)]
mod tests;
