//! [`Mlp`]: the SwiGLU feed-forward, `y = down(silu(gate(x)) ⊙ up(x))` (HF `LlamaMLP`).
//!
//! Backward with `a = silu(g)`, `σ = sigmoid(g)`: `dh = down.backward(dy)`,
//! `dg = dh ⊙ u ⊙ σ(1 + g(1 − σ))`, `du = dh ⊙ a`, `dx = gate.backward(dg) + up.backward(du)`.
//! Shapes: x (N, D), g/u/h (N, F).

use std::borrow::Cow;

use rayon::prelude::*;

use super::linear::{Linear, LinearGrads, LinearSaved};
use crate::ops::bf16::ComputeDtype;
use crate::ops::{self, uninit, Kept, Rng};

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `gate_proj`: (F, D).
    pub gate_proj: Linear,
    /// `up_proj`: (F, D).
    pub up_proj: Linear,
    /// `down_proj`: (D, F).
    pub down_proj: Linear,
}

/// Saved for backward.
pub struct MlpSaved {
    gate: LinearSaved,
    up: LinearSaved,
    down: LinearSaved,
    /// (N, F) gate pre-activation; `None` where gate_proj's saved state rebuilds it
    /// ([`Linear::output_factors`]: DoRA holds `z` and `k` with `g = k⊙z` anyway).
    g: Option<Kept>,
    /// (N, F) up output, the same way. (down_proj's input `silu(g)⊙u` is recomputed in
    /// backward.)
    u: Option<Kept>,
}

impl MlpSaved {
    /// Keeps the saved activations as a run computing in `c` saves them (see [`Kept`]);
    /// returns the bytes they hold.
    pub fn keep_in(&mut self, c: ComputeDtype) -> usize {
        let lins: usize = [&mut self.gate, &mut self.up, &mut self.down]
            .into_iter()
            .map(|l| l.keep_in(c))
            .sum();
        let kept: usize = [&mut self.g, &mut self.u]
            .into_iter()
            .flatten()
            .map(|v| v.keep_in(c))
            .sum();
        lins + kept
    }
}

/// An (N, F) activation as columns-scaled values `v[i, c]·k[c]`: the saved activation itself
/// with `k` all ones (`x·1 = x` exactly), or DoRA's `(z, k)` factors of it.
#[derive(Clone, Copy)]
struct Scaled<'a> {
    v: &'a [f32],
    k: &'a [f32],
}

/// An (N, F) activation in f32 as [`Scaled`] reads it: `v` lent by the caller or widened from
/// the factor DoRA kept in bf16.
struct Held<'a> {
    v: Cow<'a, [f32]>,
    k: &'a [f32],
}

impl<'a> Held<'a> {
    /// The activation itself when `kept` (with `k` = `ones`), else `lin`'s factors.
    fn of(
        kept: &'a Option<Vec<f32>>,
        lin: &Linear,
        saved: &'a LinearSaved,
        ones: &'a [f32],
    ) -> Self {
        match kept {
            Some(v) => Held {
                v: Cow::Borrowed(v),
                k: ones,
            },
            None => {
                let (z, k) = lin
                    .output_factors(saved)
                    .expect("an MLP activation not kept is held as factors");
                Held { v: z.f32(), k }
            }
        }
    }

    fn scaled(&self) -> Scaled<'_> {
        Scaled {
            v: &self.v,
            k: self.k,
        }
    }
}

/// Gradients of the MLP's trainable tensors.
#[derive(Debug, Clone, Default)]
pub struct MlpGrads {
    /// gate_proj.
    pub gate_proj: LinearGrads,
    /// up_proj.
    pub up_proj: LinearGrads,
    /// down_proj.
    pub down_proj: LinearGrads,
}

/// Rows of width F per parallel work item in the in-place pass over `g` and `u`.
const ROWS: usize = 16;

/// `h = silu(g) ⊙ u`, in parallel, rows of `f`.
fn swiglu(g: &[f32], u: &[f32], f: usize) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "gate and up lengths");
    uninit::new_rows(g.len() / f.max(1), f, |i, row| {
        let (g, u) = (&g[i * f..(i + 1) * f], &u[i * f..(i + 1) * f]);
        row.fill(g.iter().zip(u).map(|(&g, &u)| g * ops::sigmoid(g) * u))
    })
}

/// `h = silu(g) ⊙ u` with `g`, `u` given as scaled values (kept activations, or DoRA's
/// factors in the training forward and backward's recomputation): the same numbers as
/// [`swiglu`] on the rebuilt activations.
fn swiglu_scaled(g: Scaled<'_>, u: Scaled<'_>, f: usize) -> Vec<f32> {
    assert!(
        g.v.len() == u.v.len() && g.k.len() == f && u.k.len() == f,
        "gate and up shapes"
    );
    uninit::new_rows(g.v.len() / f.max(1), f, |i, row| {
        let (gv, uv) = (&g.v[i * f..(i + 1) * f], &u.v[i * f..(i + 1) * f]);
        // zipped, not indexed: no bounds checks, so the loop vectorizes
        let gs = gv.iter().zip(g.k);
        let us = uv.iter().zip(u.k);
        row.fill(gs.zip(us).map(|((&gv, &gk), (&uv, &uk))| {
            let (gi, ui) = (gv * gk, uv * uk);
            gi * ops::sigmoid(gi) * ui
        }))
    })
}

/// SwiGLU's backward from `dh`: `(dg, du)` with `dg = dh ⊙ u ⊙ σ(1 + g(1 − σ))`,
/// `du = dh ⊙ silu(g)`, `σ = sigmoid(g)`.
#[inline(always)]
fn swiglu_grads(gi: f32, ui: f32, dh: f32) -> (f32, f32) {
    let s = ops::sigmoid(gi);
    (dh * ui * s * (1.0 + gi * (1.0 - s)), dh * gi * s)
}

/// [`swiglu_grads`] over scaled activations: `dg` written over `dh` (each element read
/// first), `du` into a new buffer.
fn swiglu_grads_scaled(
    g: Scaled<'_>,
    u: Scaled<'_>,
    mut dh: Vec<f32>,
    f: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        g.v.len() == dh.len() && u.v.len() == dh.len(),
        "gate, up and dh lengths"
    );
    let du = uninit::new_rows_with(&mut dh, f, |i, dg, row| {
        let (gv, uv) = (&g.v[i * f..(i + 1) * f], &u.v[i * f..(i + 1) * f]);
        let gs = gv.iter().zip(g.k);
        let us = uv.iter().zip(u.k);
        row.fill(
            dg.iter_mut()
                .zip(gs.zip(us))
                .map(|(dg, ((&gv, &gk), (&uv, &uk)))| {
                    let (a, b) = swiglu_grads(gv * gk, uv * uk, *dg);
                    *dg = a;
                    b
                }),
        )
    });
    (dh, du)
}

impl Mlp {
    /// Inference.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let g = self.gate_proj.forward(x, n);
        let u = self.up_proj.forward(x, n);
        self.down_proj
            .forward(&swiglu(&g, &u, self.gate_proj.out_features()), n)
    }

    /// Training forward. Without `need_output` (recomputation for backward) the output is
    /// empty and down_proj's product is skipped where its backward does not need it.
    pub fn forward_train(
        &self,
        x: &[f32],
        n: usize,
        rng: &mut Rng,
        need_output: bool,
    ) -> (Vec<f32>, MlpSaved) {
        // g and u are formed only where the adapters do not hold them as factors.
        let (g, gate) = self.gate_proj.forward_train_factored(x, n, rng);
        let (u, up) = self.up_proj.forward_train_factored(x, n, rng);
        let ones = vec![1f32; self.gate_proj.out_features()];
        let h = swiglu_scaled(
            Held::of(&g, &self.gate_proj, &gate, &ones).scaled(),
            Held::of(&u, &self.up_proj, &up, &ones).scaled(),
            ones.len(),
        );
        let (y, down) = if need_output {
            self.down_proj.forward_train(&h, n, rng)
        } else {
            (Vec::new(), self.down_proj.saved_only(&h, n, rng))
        };
        (
            y,
            MlpSaved {
                gate,
                up,
                down,
                g: g.map(Kept::from),
                u: u.map(Kept::from),
            },
        )
    }

    /// Backward: `dx` and gradients. `x` is the input given to `forward_train`.
    pub fn backward(
        &self,
        saved: MlpSaved,
        x: &[f32],
        dy: &[f32],
        n: usize,
    ) -> (Vec<f32>, MlpGrads) {
        let MlpSaved {
            gate,
            up,
            down,
            g,
            u,
        } = saved;
        let f = self.gate_proj.out_features();
        let ones = vec![1f32; f];
        let (g, u) = (g.map(Kept::into_f32), u.map(Kept::into_f32));
        let h = swiglu_scaled(
            Held::of(&g, &self.gate_proj, &gate, &ones).scaled(),
            Held::of(&u, &self.up_proj, &up, &ones).scaled(),
            f,
        );
        let (dh, gd) = self.down_proj.backward(down, &h, dy, n);
        drop(h);
        let (dg, du) = match (g, u) {
            // dg and du overwrite g and u (no longer needed): two (N, F) buffers fewer at the
            // peak.
            (Some(mut dg), Some(mut du)) => {
                dg.par_chunks_mut(f * ROWS)
                    .zip(du.par_chunks_mut(f * ROWS))
                    .zip(dh.par_chunks(f * ROWS))
                    .for_each(|((g, u), dh)| {
                        for ((g, u), &dh) in g.iter_mut().zip(u.iter_mut()).zip(dh) {
                            (*g, *u) = swiglu_grads(*g, *u, dh);
                        }
                    });
                (dg, du)
            }
            // Held as factors (they stay for the adapters' backward): dg over dh, du new.
            (g, u) => {
                let gs = Held::of(&g, &self.gate_proj, &gate, &ones);
                let us = Held::of(&u, &self.up_proj, &up, &ones);
                swiglu_grads_scaled(gs.scaled(), us.scaled(), dh, f)
            }
        };
        let (mut dx, gg) = self.gate_proj.backward(gate, x, &dg, n);
        drop(dg);
        let (dxu, gu) = self.up_proj.backward(up, x, &du, n);
        ops::add_assign(&mut dx, &dxu);
        (
            dx,
            MlpGrads {
                gate_proj: gg,
                up_proj: gu,
                down_proj: gd,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{
        AdapterKind, AdapterOptions, AdapterParam, BaseWeight, DoraDropout, InitLoraWeights,
        LoraAdapter,
    };

    fn dora_linear(out: usize, inp: usize, rng: &mut Rng) -> Linear {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.3).collect();
        let weight = BaseWeight::Dense { w, out, inp };
        let opts = AdapterOptions {
            kind: AdapterKind::Dora,
            r: 2,
            scaling: 2.0,
            dropout: 0.3,
            dora_dropout: DoraDropout::LoraOnly,
        };
        let mut a = LoraAdapter::new(&weight, &opts, InitLoraWeights::Random, rng);
        // Away from init (where m = ‖W + sBA‖ makes every k exactly 1).
        let m = a.param_mut(AdapterParam::Magnitude).expect("DoRA");
        for (i, m) in m.iter_mut().enumerate() {
            *m *= 1.0 + 0.07 * (i % 5) as f32;
        }
        let mut l = Linear::new(weight, None);
        l.adapter = Some(a);
        l
    }

    /// With DoRA (dropout on the low-rank path only) on gate and up, the MLP keeps their
    /// outputs as the adapters' `(z, k)` factors instead of a copy; forward, `dx` and every
    /// gradient must be those of the path that keeps `g` and `u`, to the bit (a zero bias on
    /// gate and up turns the factors off: `y + 0 = y`).
    #[test]
    fn dora_factors_give_the_kept_activations_results_to_the_bit() {
        let (d, f, n) = (6, 10, 5);
        let mut rng = Rng::new(21);
        let factored = Mlp {
            gate_proj: dora_linear(f, d, &mut rng),
            up_proj: dora_linear(f, d, &mut rng),
            down_proj: dora_linear(d, f, &mut rng),
        };
        let mut kept = factored.clone();
        kept.gate_proj.bias = Some(vec![0.0; f]);
        kept.up_proj.bias = Some(vec![0.0; f]);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        let dy: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut results = Vec::new();
        for (mlp, factors) in [(&factored, true), (&kept, false)] {
            let (y, saved) = mlp.forward_train(&x, n, &mut Rng::new(3), true);
            assert_eq!(
                saved.g.is_none(),
                factors,
                "gate output kept as factors: {factors}"
            );
            assert_eq!(saved.u.is_none(), factors);
            let (dx, g) = mlp.backward(saved, &x, &dy, n);
            let mut all = vec![bits(&y), bits(&dx)];
            for l in [g.gate_proj, g.up_proj, g.down_proj] {
                let l = l.lora.expect("adapter gradients");
                all.push(bits(&l.d_lora_a));
                all.push(bits(&l.d_lora_b));
                all.push(bits(
                    &l.d_lora_magnitude_vector.expect("DoRA magnitude gradient"),
                ));
            }
            results.push(all);
        }
        assert_eq!(results[0], results[1]);
    }
}
