//! AdamW with decoupled weight decay exactly as `torch.optim.AdamW` (fp32 states), and global
//! gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`. Moments are kept by
//! [`ParamId`], the registry's name of each trainable tensor.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::model::ParamId;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWOptions {
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments of one tensor.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

/// AdamW state for the trainable tensors.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Settings.
    pub opts: AdamWOptions,
    /// Steps taken.
    pub step: u64,
    /// Moments by tensor.
    pub state: BTreeMap<ParamId, Moments>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(opts: AdamWOptions) -> Self {
        Self {
            opts,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Starts a step (increments the counter used for bias correction).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Updates `param` with `grad · grad_scale` at learning rate `lr`.
    ///
    /// `grad_scale` is gradient clipping's coefficient ([`clip_coefficient`]), applied here as
    /// the gradient is read rather than in a pass of its own over every gradient: that pass
    /// was the first write to the embedding gradient's untouched (zero) pages and cost a page
    /// fault per page (0.48 s of a full fine-tuning step). `g · 1.0` is `g`, and `g · c` is
    /// what `clip_grad_norm_` would have stored, so the update is the same to the bit.
    ///
    /// # Panics
    /// If `param` and `grad` lengths differ.
    pub fn update(
        &mut self,
        id: ParamId,
        param: &mut [f32],
        (grad, grad_scale): (&[f32], f32),
        lr: f32,
    ) {
        assert_eq!(
            param.len(),
            grad.len(),
            "{}: parameter and gradient lengths",
            id.key()
        );
        let o = self.opts;
        let st = self.state.entry(id).or_insert_with(|| Moments {
            m: vec![0.0; param.len()],
            v: vec![0.0; param.len()],
        });
        let t = self.step as i32;
        let bc1 = 1.0 - o.beta1.powi(t);
        let bc2 = 1.0 - o.beta2.powi(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        // Element-wise, so chunks update in parallel with identical results.
        const CHUNK: usize = 1 << 15;
        param
            .par_chunks_mut(CHUNK)
            .zip(st.m.par_chunks_mut(CHUNK))
            .zip(st.v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let g = g[i] * grad_scale;
                    p[i] *= 1.0 - lr * o.weight_decay;
                    m[i] = m[i] * o.beta1 + (1.0 - o.beta1) * g;
                    v[i] = v[i] * o.beta2 + (1.0 - o.beta2) * g * g;
                    let denom = v[i].sqrt() / bc2_sqrt + o.eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
    }
}

/// Global L2 norm of all gradients (f64 accumulation), summed tensor by tensor in the order
/// given.
pub fn global_norm(grads: &[(ParamId, Vec<f32>)]) -> f64 {
    // Partial sums over fixed chunks, added in order: parallel, yet the same on any thread count.
    let chunk = 1 << 16;
    grads
        .iter()
        .map(|(_, g)| {
            g.par_chunks(chunk)
                .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
                .collect::<Vec<f64>>()
                .iter()
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Gradient clipping's coefficient as `torch.nn.utils.clip_grad_norm_` computes it:
/// `max_norm / (norm + 1e-6)` clamped to 1, with `norm` the global norm before clipping.
/// [`AdamW::update`] multiplies each gradient by it as it reads it.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ParamId = ParamId::Norm;

    #[test]
    fn matches_torch_adamw_two_steps() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p=[1.0, -2.0],
        // grads [0.5, -1.0] then [0.25, 0.5]: p = [0.799, -1.798], then [0.625..., -1.776...].
        let mut o = AdamW::new(AdamWOptions {
            weight_decay: 0.01,
            ..Default::default()
        });
        let mut p = vec![1.0f32, -2.0];
        o.begin_step();
        o.update(P, &mut p, (&[0.5, -1.0], 1.0), 0.1);
        assert!(
            (p[0] - 0.899).abs() < 1e-5 && (p[1] + 1.898).abs() < 1e-5,
            "{p:?}"
        );
        o.begin_step();
        o.update(P, &mut p, (&[0.25, 0.5], 1.0), 0.1);
        // second step by hand: m=[0.425,-0.85]·… computed with the same formulas in f64
        let want0 = {
            let p1 = 0.899f64 * (1.0 - 0.001);
            let m = 0.9 * 0.05 + 0.1 * 0.25;
            let v: f64 = 0.999 * 0.00025 + 0.001 * 0.0625;
            let denom = v.sqrt() / (1.0f64 - 0.999f64.powi(2)).sqrt() + 1e-8;
            p1 - 0.1 / (1.0 - 0.81) * m / denom
        };
        assert!((p[0] as f64 - want0).abs() < 1e-5, "{} vs {want0}", p[0]);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let g = vec![(P, vec![3.0f32, 4.0])];
        let norm = global_norm(&g);
        assert!((norm - 5.0).abs() < 1e-9);
        let c = clip_coefficient(norm, 1.0);
        assert!((c as f64 - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        assert_eq!(clip_coefficient(norm, 10.0), 1.0);
    }

    #[test]
    fn scaled_update_equals_update_of_scaled_gradient() {
        let mut rng = crate::ops::Rng::new(3);
        let g: Vec<f32> = (0..1000).map(|_| rng.normal()).collect();
        let p0: Vec<f32> = (0..1000).map(|_| rng.normal()).collect();
        let c = clip_coefficient(7.3, 1.0);
        let scaled: Vec<f32> = g.iter().map(|v| v * c).collect();
        let (mut a, mut b) = (
            AdamW::new(AdamWOptions::default()),
            AdamW::new(AdamWOptions::default()),
        );
        let (mut pa, mut pb) = (p0.clone(), p0);
        for _ in 0..2 {
            a.begin_step();
            b.begin_step();
            a.update(P, &mut pa, (&g, c), 1e-3);
            b.update(P, &mut pb, (&scaled, 1.0), 1e-3);
        }
        assert_eq!(pa, pb);
    }
}
