//! [`Mlp`]: the SwiGLU feed-forward, `y = down(silu(gate(x)) ⊙ up(x))` (HF `LlamaMLP`).
//!
//! Backward with `a = silu(g)`, `σ = sigmoid(g)`: `dh = down.backward(dy)`,
//! `dg = dh ⊙ u ⊙ σ(1 + g(1 − σ))`, `du = dh ⊙ a`, `dx = gate.backward(dg) + up.backward(du)`.
//! Shapes: x (N, D), g/u/h (N, F).

use super::linear::{Linear, LinearGrads, LinearSaved};
use crate::ops::Rng;

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
    /// (N, F) up output.
    u: Vec<f32>,
    /// (N, F) input of down_proj.
    h: Vec<f32>,
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

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Mlp {
    /// Inference.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut g = self.gate_proj.forward(x, n);
        let u = self.up_proj.forward(x, n);
        for (a, b) in g.iter_mut().zip(&u) {
            *a = silu(*a) * b;
        }
        self.down_proj.forward(&g, n)
    }

    /// Training forward.
    pub fn forward_train(&self, x: &[f32], n: usize, rng: &mut Rng) -> (Vec<f32>, MlpSaved) {
        let (g, gate) = self.gate_proj.forward_train(x, n, rng);
        let (u, up) = self.up_proj.forward_train(x, n, rng);
        let h: Vec<f32> = g.iter().zip(&u).map(|(a, b)| silu(*a) * b).collect();
        let (y, down) = self.down_proj.forward_train(&h, n, rng);
        (
            y,
            MlpSaved {
                gate,
                up,
                down,
                g,
                u,
                h,
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
            h,
        } = saved;
        let (dh, gd) = self.down_proj.backward(down, &h, dy, n);
        drop(h);
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + (-g[i]).exp());
            let a = g[i] * s;
            du[i] = dh[i] * a;
            dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
        let (mut dx, gg) = self.gate_proj.backward(gate, x, &dg, n);
        let (dxu, gu) = self.up_proj.backward(up, x, &du, n);
        for (a, b) in dx.iter_mut().zip(&dxu) {
            *a += b;
        }
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
