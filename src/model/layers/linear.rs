//! [`Linear`]: `y = x·Wᵀ + b`, with the frozen or trainable base weight (dense or 4-bit), an
//! optional bias, and an optional LoRA/DoRA adapter (PEFT's `lora.Linear` / `lora.bnb.Linear4bit`).
//!
//! Gradients: `dx = dy·W (+ adapter)`, `dW = dyᵀ·x` (full fine-tuning only), `db = Σ_rows dy`.
//! Shapes: x (N, in), y (N, out).

use rayon::prelude::*;

use crate::adapter::{BaseWeight, LoraAdapter, LoraGrads, LoraSaved};
use crate::ops::bf16::ComputeDtype;
use crate::ops::{self, Kept, Rng};

/// A Linear layer.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `weight`: (out, in).
    pub weight: BaseWeight,
    /// `bias`: (out).
    pub bias: Option<Vec<f32>>,
    /// LoRA/DoRA adapter, if this module is targeted.
    pub adapter: Option<LoraAdapter>,
    /// Full fine-tuning: the (dense) weight is trained.
    pub train_weight: bool,
    /// The bias is trained (`bias="all"`/`"lora_only"`, or full fine-tuning).
    pub train_bias: bool,
}

/// Saved by [`Linear::forward_train`] (the input `x` itself is kept by the caller).
pub struct LinearSaved {
    lora: Option<LoraSaved>,
}

impl LinearSaved {
    /// Keeps the saved activations as a run computing in `c` saves them (see [`Kept`]);
    /// returns the bytes they hold.
    pub fn keep_in(&mut self, c: ComputeDtype) -> usize {
        self.lora.as_mut().map_or(0, |l| l.keep_in(c))
    }
}

/// Gradients of a Linear's trainable tensors.
#[derive(Debug, Clone, Default)]
pub struct LinearGrads {
    /// (out, in), full fine-tuning only.
    pub d_weight: Option<Vec<f32>>,
    /// (out), when the bias trains.
    pub d_bias: Option<Vec<f32>>,
    /// Adapter gradients.
    pub lora: Option<LoraGrads>,
}

impl Linear {
    /// A frozen layer without adapter.
    pub fn new(weight: BaseWeight, bias: Option<Vec<f32>>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
            train_weight: false,
            train_bias: false,
        }
    }

    /// What the frozen weight's products compute in (and so how activations around them are
    /// kept for backward).
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.weight.compute_dtype()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.out_features()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.in_features()
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            let out = b.len();
            y.par_chunks_mut(out * 16).for_each(|rows| {
                for row in rows.chunks_mut(out) {
                    row.iter_mut().zip(b).for_each(|(v, bb)| *v += bb);
                }
            });
        }
    }

    /// Inference: `y (N, out)`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = match &self.adapter {
            Some(a) => a.forward(&self.weight, x, n),
            None => self.weight.forward(x, n),
        };
        self.add_bias(&mut y);
        y
    }

    /// Training forward.
    pub fn forward_train(&self, x: &[f32], n: usize, rng: &mut Rng) -> (Vec<f32>, LinearSaved) {
        let (mut y, lora) = match &self.adapter {
            Some(a) => {
                let (y, s) = a.forward_train(&self.weight, x, n, rng);
                (y, Some(s))
            }
            None => (self.weight.forward(x, n), None),
        };
        self.add_bias(&mut y);
        (y, LinearSaved { lora })
    }

    /// [`forward_train`](Self::forward_train) for a caller that can take the output as factors:
    /// `None` in place of `y` where [`output_factors`](Self::output_factors) holds it, which
    /// then is never formed.
    pub fn forward_train_factored(
        &self,
        x: &[f32],
        n: usize,
        rng: &mut Rng,
    ) -> (Option<Vec<f32>>, LinearSaved) {
        match (&self.adapter, &self.bias) {
            (Some(a), None) => {
                let (y, s) = a.forward_train_factored(&self.weight, x, n, rng);
                (y, LinearSaved { lora: Some(s) })
            }
            _ => {
                let (y, s) = self.forward_train(x, n, rng);
                (Some(y), s)
            }
        }
    }

    /// The output of [`forward_train`](Self::forward_train) as factors its saved state already
    /// holds: `(z, k)` with `y[i, o] = k[o]·z[i, o]` (DoRA without base dropout, no bias).
    pub fn output_factors<'a>(&self, saved: &'a LinearSaved) -> Option<(&'a Kept, &'a [f32])> {
        if self.bias.is_some() {
            return None;
        }
        saved.lora.as_ref()?.output_factors()
    }

    /// What backward needs, without computing the output (the last product of a recomputed
    /// block); draws from `rng` as [`forward_train`](Self::forward_train) does.
    pub fn saved_only(&self, x: &[f32], n: usize, rng: &mut Rng) -> LinearSaved {
        LinearSaved {
            lora: self
                .adapter
                .as_ref()
                .map(|a| a.saved_only(&self.weight, x, n, rng)),
        }
    }

    /// Backward: `dx (N, in)` and the gradients. `x` is the input given to `forward_train`.
    pub fn backward(
        &self,
        saved: LinearSaved,
        x: &[f32],
        dy: &[f32],
        n: usize,
    ) -> (Vec<f32>, LinearGrads) {
        let (dx, grads) = self.backward_with(saved, x, dy, n, true);
        (dx.expect("the input gradient was asked for"), grads)
    }

    /// The gradients alone, the same numbers [`backward`](Self::backward) gives, without the
    /// input gradient and the products `dy·W` that form it (for a layer whose `dx` nobody
    /// reads).
    pub fn param_grads(&self, saved: LinearSaved, x: &[f32], dy: &[f32], n: usize) -> LinearGrads {
        self.backward_with(saved, x, dy, n, false).1
    }

    fn backward_with(
        &self,
        saved: LinearSaved,
        x: &[f32],
        dy: &[f32],
        n: usize,
        want_dx: bool,
    ) -> (Option<Vec<f32>>, LinearGrads) {
        let (out, inp) = (self.out_features(), self.in_features());
        let mut grads = LinearGrads::default();
        if self.train_bias {
            grads.d_bias = Some(column_sums(dy, out));
        }
        if self.train_weight {
            grads.d_weight = Some(ops::matmul_tn(dy, out, x, inp, n));
        }
        let dx = match (&self.adapter, saved.lora) {
            (Some(a), Some(s)) if want_dx => {
                let (dx, g) = a.backward(s, &self.weight, x, dy, n);
                grads.lora = Some(g);
                Some(dx)
            }
            (Some(a), Some(s)) => {
                grads.lora = Some(a.param_grads(s, &self.weight, x, dy, n));
                None
            }
            _ => want_dx.then(|| self.weight.backward_input(dy, n)),
        };
        (dx, grads)
    }
}

/// `Σ_rows m` of a row-major (N, cols) matrix (bias gradients).
fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let mut s = vec![0f32; cols];
    for row in m.chunks(cols) {
        s.iter_mut().zip(row).for_each(|(g, v)| *g += v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_finetune_gradients_match_finite_differences() {
        let (out, inp, n) = (3, 4, 2);
        let mut rng = Rng::new(3);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
        let mut l = Linear::new(
            BaseWeight::Dense { w, out, inp },
            Some(vec![0.1, -0.2, 0.3]),
        );
        l.train_weight = true;
        l.train_bias = true;
        let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
        let c: Vec<f32> = (0..n * out).map(|i| i as f32 - 2.0).collect();
        let loss = |l: &Linear, x: &[f32]| -> f64 {
            l.forward(x, n)
                .iter()
                .zip(&c)
                .map(|(y, c)| (y * c) as f64)
                .sum()
        };
        let (y, saved) = l.forward_train(&x, n, &mut Rng::new(0));
        assert_eq!(y, l.forward(&x, n));
        let (dx, g) = l.backward(saved, &x, &c, n);
        let h = 1e-2;
        let dw = g.d_weight.unwrap();
        for i in 0..out * inp {
            let mut p = l.clone();
            if let BaseWeight::Dense { w, .. } = &mut p.weight {
                w[i] += h;
            }
            let lp = loss(&p, &x);
            if let BaseWeight::Dense { w, .. } = &mut p.weight {
                w[i] -= 2.0 * h;
            }
            let lm = loss(&p, &x);
            assert!(((lp - lm) / (2.0 * h as f64) - dw[i] as f64).abs() < 1e-2);
        }
        let db = g.d_bias.unwrap();
        assert_eq!(db, vec![-2.0 + 1.0, -1.0 + 2.0, 0.0 + 3.0]);
        for i in 0..n * inp {
            let mut xp = x.clone();
            xp[i] += h;
            let lp = loss(&l, &xp);
            xp[i] -= 2.0 * h;
            let lm = loss(&l, &xp);
            assert!(((lp - lm) / (2.0 * h as f64) - dx[i] as f64).abs() < 1e-2);
        }
    }
}
