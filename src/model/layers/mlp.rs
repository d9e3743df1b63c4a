//! [`Mlp`]: the SwiGLU feed-forward, `y = down(silu(gate(x)) ⊙ up(x))` (HF `LlamaMLP`).
//!
//! Backward with `a = silu(g)`, `σ = sigmoid(g)`: `dh = down.backward(dy)`,
//! `dg = dh ⊙ u ⊙ σ(1 + g(1 − σ))`, `du = dh ⊙ a`, `dx = gate.backward(dg) + up.backward(du)`.
//! Shapes: x (N, D), g/u/h (N, F).

use rayon::prelude::*;

use super::linear::{Linear, LinearGrads, LinearSaved};
use crate::ops::{self, Rng};

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
    /// (N, F) gate pre-activation.
    g: Vec<f32>,
    /// (N, F) up output. (down_proj's input `silu(g)⊙u` is recomputed in backward.)
    u: Vec<f32>,
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

/// `h = silu(g) ⊙ u`, in parallel.
fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "gate and up lengths");
    // SAFETY: the chunks of `g` and `u` cover the buffer, and each element is written.
    unsafe {
        ops::filled(g.len(), |h| {
            h.par_chunks_mut(ops::PAR_CHUNK)
                .zip(
                    g.par_chunks(ops::PAR_CHUNK)
                        .zip(u.par_chunks(ops::PAR_CHUNK)),
                )
                .for_each(|(h, (g, u))| {
                    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                        h.write(g * ops::sigmoid(g) * u);
                    }
                })
        })
    }
}

impl Mlp {
    /// Inference.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let g = self.gate_proj.forward(x, n);
        let u = self.up_proj.forward(x, n);
        self.down_proj.forward(&swiglu(&g, &u), n)
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
        let (g, gate) = self.gate_proj.forward_train(x, n, rng);
        let (u, up) = self.up_proj.forward_train(x, n, rng);
        let h = swiglu(&g, &u);
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
                g,
                u,
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
        let h = swiglu(&g, &u);
        let (dh, gd) = self.down_proj.backward(down, &h, dy, n);
        drop(h);
        // dg and du overwrite g and u (no longer needed): two (N, F) buffers fewer at the peak.
        let (mut dg, mut du) = (g, u);
        let c = ops::PAR_CHUNK;
        dg.par_chunks_mut(c)
            .zip(du.par_chunks_mut(c))
            .zip(dh.par_chunks(c))
            .for_each(|((g, u), dh)| {
                for i in 0..g.len() {
                    let (gi, ui) = (g[i], u[i]);
                    let s = ops::sigmoid(gi);
                    u[i] = dh[i] * gi * s;
                    g[i] = dh[i] * ui * s * (1.0 + gi * (1.0 - s));
                }
            });
        drop(dh);
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
