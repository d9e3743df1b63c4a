//! [`Attention`]: grouped-query causal self-attention with RoPE (HF `LlamaAttention`; Qwen2's
//! q/k/v biases and Qwen3's per-head q/k RMSNorm; Mistral's sliding window): the projections,
//! norms and rotations around the attention core, which is a kernel (`ops::attention`).
//!
//! Forward: `q, k, v = x·Wqᵀ, x·Wkᵀ, x·Wvᵀ` (then the q/k norms), RoPE on q and k, the core
//! `O = softmax(Q·Kᵀ/√Dh)·V` per head, `y = o_proj(O)`. Backward mirrors it: `o_proj`, the
//! core's `dQ, dK, dV`, the inverse rotation, the norms, and the projections' backward.
//! Shapes: x (N = B·T, D), q (N, H·Dh), k/v (N, Hkv·Dh). With activation checkpointing the
//! core keeps each probability row's softmax statistics instead of the probabilities.

use super::linear::{Linear, LinearGrads, LinearSaved};
use super::rms_norm::{RmsNorm, RmsNormSaved};
use super::rope::Rope;
use crate::ops::attention::{self as core, Heads, Probs, Span};
use crate::ops::bf16::ComputeDtype;
use crate::ops::{self, Kept, Rng};

/// Self-attention block of one decoder layer. Fields are named after checkpoint keys.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `q_proj`: (H·Dh, D).
    pub q_proj: Linear,
    /// `k_proj`: (Hkv·Dh, D).
    pub k_proj: Linear,
    /// `v_proj`: (Hkv·Dh, D).
    pub v_proj: Linear,
    /// `o_proj`: (D, H·Dh).
    pub o_proj: Linear,
    /// Qwen3 `q_norm` over Dh.
    pub q_norm: Option<RmsNorm>,
    /// Qwen3 `k_norm` over Dh.
    pub k_norm: Option<RmsNorm>,
    /// H.
    pub num_heads: usize,
    /// Hkv.
    pub num_kv_heads: usize,
    /// Dh.
    pub head_dim: usize,
    /// Mistral sliding window.
    pub sliding_window: Option<usize>,
}

/// Keys and values of earlier positions (one sequence), for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// (P, Hkv·Dh) keys after RoPE.
    pub k: Vec<f32>,
    /// (P, Hkv·Dh) values.
    pub v: Vec<f32>,
}

/// Saved for backward.
pub struct AttentionSaved {
    q_lin: LinearSaved,
    k_lin: LinearSaved,
    v_lin: LinearSaved,
    o_lin: LinearSaved,
    /// Qwen3: pre-norm q and k (N, H·Dh), (N, Hkv·Dh) and their norm state.
    qk_norm: Option<(Kept, RmsNormSaved, Kept, RmsNormSaved)>,
    /// (N, H·Dh) after RoPE, f32.
    q: Vec<f32>,
    /// (N, Hkv·Dh) after RoPE, f32.
    k: Vec<f32>,
    /// (N, Hkv·Dh).
    v: Kept,
    /// The probabilities (f32, as softmax computes them) or their statistics.
    probs: Probs,
    /// (N, H·Dh) input of o_proj.
    ctx: Kept,
    b: usize,
    t: usize,
}

impl AttentionSaved {
    /// Keeps the saved activations as a run computing in `c` saves them (see [`Kept`]): `v`,
    /// o_proj's input, the kept probabilities and the adapters' state. `q` and `k` stay f32:
    /// backward may replay the softmax from its statistics, which holds only for the scores
    /// the forward took (the f32 `q·kᵀ`). Returns the bytes those activations hold.
    pub fn keep_in(&mut self, c: ComputeDtype) -> usize {
        let lins: usize = [
            &mut self.q_lin,
            &mut self.k_lin,
            &mut self.v_lin,
            &mut self.o_lin,
        ]
        .into_iter()
        .map(|l| l.keep_in(c))
        .sum();
        let qk = 4 * (self.q.len() + self.k.len());
        let v_ctx = self.v.keep_in(c) + self.ctx.keep_in(c) + self.probs.keep_in(c);
        let norms = self
            .qk_norm
            .as_mut()
            .map_or(0, |(q, _, k, _)| q.keep_in(c) + k.keep_in(c));
        lins + qk + v_ctx + norms
    }
}

/// Gradients of the attention block's trainable tensors.
#[derive(Debug, Clone, Default)]
pub struct AttentionGrads {
    /// q_proj.
    pub q_proj: LinearGrads,
    /// k_proj.
    pub k_proj: LinearGrads,
    /// v_proj.
    pub v_proj: LinearGrads,
    /// o_proj.
    pub o_proj: LinearGrads,
    /// q_norm weight (full fine-tuning).
    pub q_norm: Option<Vec<f32>>,
    /// k_norm weight (full fine-tuning).
    pub k_norm: Option<Vec<f32>>,
}

impl Attention {
    /// What the core's products compute in: the projections' (one block computes in one
    /// dtype).
    fn compute_dtype(&self) -> ComputeDtype {
        self.q_proj.compute_dtype()
    }

    /// The heads the core kernel works on.
    fn heads(&self) -> Heads {
        Heads {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            window: self.sliding_window,
        }
    }

    fn project_qkv(
        &self,
        x: &[f32],
        n: usize,
        rng: &mut Rng,
        train: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<[LinearSaved; 3]>) {
        if train {
            let (q, sq) = self.q_proj.forward_train(x, n, rng);
            let (k, sk) = self.k_proj.forward_train(x, n, rng);
            let (v, sv) = self.v_proj.forward_train(x, n, rng);
            (q, k, v, Some([sq, sk, sv]))
        } else {
            (
                self.q_proj.forward(x, n),
                self.k_proj.forward(x, n),
                self.v_proj.forward(x, n),
                None,
            )
        }
    }

    /// Inference over `b` sequences of `t` new tokens. With a cache (b must be 1), the new
    /// tokens follow the cached positions and their keys/values are appended.
    ///
    /// # Panics
    /// If a cache is given with `b != 1`.
    pub fn forward(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &Rope,
        cache: Option<&mut KvCache>,
    ) -> Vec<f32> {
        let n = b * t;
        let Heads {
            heads: h,
            kv_heads: hkv,
            head_dim: dh,
            ..
        } = self.heads();
        let (mut q, mut k, v, _) = self.project_qkv(x, n, &mut Rng::new(0), false);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let pos0 = cache.as_ref().map_or(0, |c| c.k.len() / (hkv * dh));
        let cd = self.compute_dtype();
        rope.apply(&mut q, h, |i| pos0 + i % t, false);
        rope.apply(&mut k, hkv, |i| pos0 + i % t, false);
        let ctx = match cache {
            Some(c) => {
                assert_eq!(b, 1, "KV cache holds one sequence");
                c.k.extend_from_slice(&k);
                c.v.extend_from_slice(&v);
                let tk = c.k.len() / (hkv * dh);
                let span = Span {
                    b: 1,
                    tq: t,
                    tk,
                    pos0,
                };
                core::forward(&self.heads(), (&q, &c.k, &c.v), span, false, cd).0
            }
            None => {
                let span = Span::square(b, t);
                core::forward(&self.heads(), (&q, &k, &v), span, false, cd).0
            }
        };
        self.o_proj.forward(&ctx, n)
    }

    /// Training forward. With `keep_probs` the probabilities are saved for backward (fastest);
    /// without, their softmax statistics only (16 MiB a layer less at 4×256 tokens and 16
    /// heads) and backward recomputes them.
    pub fn forward_train(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &Rope,
        rng: &mut Rng,
        keep_probs: bool,
    ) -> (Vec<f32>, AttentionSaved) {
        let n = b * t;
        let Heads {
            heads: h,
            kv_heads: hkv,
            ..
        } = self.heads();
        let (mut q, mut k, v, lin) = self.project_qkv(x, n, rng, true);
        let [q_lin, k_lin, v_lin] = lin.expect("train projections save state");
        let qk_norm = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let (qq, sq) = qn.forward_train(&q);
                let (kk, sk) = kn.forward_train(&k);
                let pre_q = std::mem::replace(&mut q, qq);
                let pre_k = std::mem::replace(&mut k, kk);
                Some((pre_q.into(), sq, pre_k.into(), sk))
            }
            _ => None,
        };
        rope.apply(&mut q, h, |i| i % t, false);
        rope.apply(&mut k, hkv, |i| i % t, false);
        let span = Span::square(b, t);
        let c = self.compute_dtype();
        let (ctx, probs) = core::forward(&self.heads(), (&q, &k, &v), span, keep_probs, c);
        let (y, o_lin) = self.o_proj.forward_train(&ctx, n, rng);
        (
            y,
            AttentionSaved {
                q_lin,
                k_lin,
                v_lin,
                o_lin,
                qk_norm,
                q,
                k,
                v: v.into(),
                probs,
                ctx: ctx.into(),
                b,
                t,
            },
        )
    }

    /// Backward: `dx` (N, D) and gradients. `x` is the input given to `forward_train`. Without
    /// `need_dx` the input gradient is `None` and the projections' `dy·W` products behind it
    /// are skipped.
    pub fn backward(
        &self,
        saved: AttentionSaved,
        x: &[f32],
        dy: &[f32],
        rope: &Rope,
        need_dx: bool,
    ) -> (Option<Vec<f32>>, AttentionGrads) {
        let AttentionSaved {
            q_lin,
            k_lin,
            v_lin,
            o_lin,
            qk_norm,
            q,
            k,
            v,
            probs,
            ctx,
            b,
            t,
        } = saved;
        let n = b * t;
        let hd = self.heads();
        let (dctx, o_grads) = self.o_proj.backward(o_lin, &ctx.f32(), dy, n);
        drop(ctx);
        let c = self.compute_dtype();
        let (mut dq, mut dk, dv) = core::backward(&hd, (&q, &k, &v), &probs, &dctx, (b, t), c);
        drop((q, k, v));
        let (h, hkv) = (hd.heads, hd.kv_heads);
        drop(probs);
        rope.apply(&mut dq, h, |i| i % t, true);
        rope.apply(&mut dk, hkv, |i| i % t, true);
        let mut grads = AttentionGrads {
            o_proj: o_grads,
            ..Default::default()
        };
        if let (Some((pre_q, sq, pre_k, sk)), Some(qn), Some(kn)) =
            (qk_norm, &self.q_norm, &self.k_norm)
        {
            let (a, ga) = qn.backward(sq, &pre_q.f32(), &dq);
            let (c, gc) = kn.backward(sk, &pre_k.f32(), &dk);
            dq = a;
            dk = c;
            grads.q_norm = ga;
            grads.k_norm = gc;
        }
        if !need_dx {
            grads.q_proj = self.q_proj.param_grads(q_lin, x, &dq, n);
            grads.k_proj = self.k_proj.param_grads(k_lin, x, &dk, n);
            grads.v_proj = self.v_proj.param_grads(v_lin, x, &dv, n);
            return (None, grads);
        }
        let (mut dx, gq) = self.q_proj.backward(q_lin, x, &dq, n);
        let (dxk, gk) = self.k_proj.backward(k_lin, x, &dk, n);
        let (dxv, gv) = self.v_proj.backward(v_lin, x, &dv, n);
        ops::add_assign(&mut dx, &dxk);
        ops::add_assign(&mut dx, &dxv);
        grads.q_proj = gq;
        grads.k_proj = gk;
        grads.v_proj = gv;
        (Some(dx), grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::BaseWeight;
    use crate::model::config::RopeScaling;
    use crate::ops::attention::QUERY_BLOCK;

    fn dense(out: usize, inp: usize, rng: &mut Rng) -> Linear {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.4).collect();
        let mut l = Linear::new(BaseWeight::Dense { w, out, inp }, None);
        l.train_weight = true;
        l
    }

    /// Attention over width `d` with 4 heads of 8 in 2 groups, dense trainable projections,
    /// and RoPE tables for `t` positions.
    fn grouped(d: usize, t: usize, window: Option<usize>, rng: &mut Rng) -> (Attention, Rope) {
        let (h, hkv, dh) = (4, 2, 8);
        let attn = Attention {
            q_proj: dense(h * dh, d, rng),
            k_proj: dense(hkv * dh, d, rng),
            v_proj: dense(hkv * dh, d, rng),
            o_proj: dense(d, h * dh, rng),
            q_norm: None,
            k_norm: None,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: dh,
            sliding_window: window,
        };
        let mut rope = Rope::new(dh, 10000.0, RopeScaling::Default);
        rope.ensure(t);
        (attn, rope)
    }

    /// Plain f64 attention (HF Llama's formulas, no blocks, no shared buffers) over dense
    /// projections without bias: `y` (b·t, d) for `x` (b·t, d).
    fn plain(attn: &Attention, x: &[f64], b: usize, t: usize) -> Vec<f64> {
        let (h, hkv, dh) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let w = |l: &Linear| match &l.weight {
            BaseWeight::Dense { w, out, inp } => (w.clone(), *out, *inp),
            _ => unreachable!("dense test weights"),
        };
        let proj = |l: &Linear, x: &[f64]| {
            let (w, out, inp) = w(l);
            let n = x.len() / inp;
            let mut y = vec![0f64; n * out];
            for i in 0..n {
                for o in 0..out {
                    y[i * out + o] = (0..inp)
                        .map(|j| x[i * inp + j] * w[o * inp + j] as f64)
                        .sum();
                }
            }
            y
        };
        let rope = |v: &mut [f64], heads: usize| {
            let half = dh / 2;
            for (row, chunk) in v.chunks_mut(heads * dh).enumerate() {
                let pos = (row % t) as f64;
                for hd in chunk.chunks_mut(dh) {
                    for i in 0..half {
                        let ang = pos / 10000f64.powf((2 * i) as f64 / dh as f64);
                        let (a, c) = (hd[i], hd[i + half]);
                        hd[i] = a * ang.cos() - c * ang.sin();
                        hd[i + half] = c * ang.cos() + a * ang.sin();
                    }
                }
            }
        };
        let (mut q, mut k, v) = (
            proj(&attn.q_proj, x),
            proj(&attn.k_proj, x),
            proj(&attn.v_proj, x),
        );
        rope(&mut q, h);
        rope(&mut k, hkv);
        let mut ctx = vec![0f64; b * t * h * dh];
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / hkv);
                for i in 0..t {
                    let qi = &q[(bi * t + i) * h * dh + hi * dh..][..dh];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kj = &k[(bi * t + j) * hkv * dh + g * dh..][..dh];
                            qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>() / (dh as f64).sqrt()
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        let vj = &v[(bi * t + j) * hkv * dh + g * dh..][..dh];
                        let out = &mut ctx[(bi * t + i) * h * dh + hi * dh..][..dh];
                        for (o, vv) in out.iter_mut().zip(vj) {
                            *o += ej / z * vv;
                        }
                    }
                }
            }
        }
        proj(&attn.o_proj, &ctx)
    }

    /// The blocked, parallel forward (heads written straight into their columns) equals a
    /// plain f64 attention, and its backward — input gradient and every projection's weight
    /// gradient — equals central differences of that plain attention; over two sequences, two
    /// query blocks (one partial), grouped heads, with probabilities kept and recomputed.
    #[test]
    fn matches_a_plain_attention_and_its_finite_differences() {
        let (d, b, t) = (16, 2, QUERY_BLOCK + 37);
        let mut rng = Rng::new(21);
        let (mut attn, rope) = grouped(d, t, None, &mut rng);
        let x: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
        let r: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        // the scalar checked: L = Σ y ⊙ r, so dL/dy = r
        let loss = |a: &Attention, x: &[f64]| -> f64 {
            plain(a, x, b, t)
                .iter()
                .zip(&r)
                .map(|(y, &r)| y * r as f64)
                .sum()
        };
        let want = plain(&attn, &x64, b, t);
        for keep in [true, false] {
            let (y, saved) = attn.forward_train(&x, b, t, &rope, &mut Rng::new(1), keep);
            for (i, (&got, &w)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "y[{i}] {got} vs {w}"
                );
            }
            let (dx, g) = attn.backward(saved, &x, &r, &rope, true);
            let dx = dx.expect("dx asked for");
            let eps = 1e-3;
            let close = |name: &str, got: f32, num: f64| {
                let tol = 1e-3 * (1.0 + num.abs());
                assert!(
                    (got as f64 - num).abs() < tol,
                    "{name} (keep {keep}): {got} vs {num}"
                );
            };
            // inputs of both sequences, in the first and the second query block
            for &(bi, i, j) in &[
                (0, 3, 1),
                (0, QUERY_BLOCK + 20, 7),
                (1, 0, 0),
                (1, t - 1, 15),
            ] {
                let at = (bi * t + i) * d + j;
                let (mut xp, mut xm) = (x64.clone(), x64.clone());
                xp[at] += eps;
                xm[at] -= eps;
                let num = (loss(&attn, &xp) - loss(&attn, &xm)) / (2.0 * eps);
                close(&format!("dx[{at}]"), dx[at], num);
            }
            let grads = [g.q_proj, g.k_proj, g.v_proj, g.o_proj];
            for (p, lg) in grads.iter().enumerate() {
                let dw = lg.d_weight.as_ref().expect("dense weights train");
                for idx in [0, dw.len() / 2 + 3, dw.len() - 1] {
                    let bump = |a: &mut Attention, by: f32| {
                        let l = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
                        let l = l.into_iter().nth(p).expect("four projections");
                        if let BaseWeight::Dense { w, .. } = &mut l.weight {
                            w[idx] += by;
                        }
                    };
                    // f32 weights: a step that is exact in f32, measured in f64
                    let h32 = 1.0 / 512.0f32;
                    bump(&mut attn, h32);
                    let lp = loss(&attn, &x64);
                    bump(&mut attn, -2.0 * h32);
                    let lm = loss(&attn, &x64);
                    bump(&mut attn, h32);
                    let num = (lp - lm) / (2.0 * h32 as f64);
                    close(&format!("projection {p} d_weight[{idx}]"), dw[idx], num);
                }
            }
        }
    }

    /// Backward from recomputed probabilities (statistics only) equals backward from kept
    /// probabilities to the bit, over several query blocks (one partial), grouped heads, and
    /// with a sliding window.
    #[test]
    fn recomputed_probabilities_give_the_kept_gradients_to_the_bit() {
        let (d, b, t) = (16, 2, QUERY_BLOCK * 2 + 37);
        for window in [None, Some(50)] {
            let mut rng = Rng::new(13);
            let (attn, rope) = grouped(d, t, window, &mut rng);
            let x: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let run = |keep: bool| {
                let (y, saved) = attn.forward_train(&x, b, t, &rope, &mut Rng::new(1), keep);
                assert_eq!(matches!(saved.probs, Probs::Kept(_)), keep);
                let (dx, g) = attn.backward(saved, &x, &dy, &rope, true);
                let mut all = vec![bits(&y), bits(&dx.expect("dx asked for"))];
                for l in [g.q_proj, g.k_proj, g.v_proj, g.o_proj] {
                    all.push(bits(&l.d_weight.expect("dense weights train")));
                }
                all
            };
            assert_eq!(run(true), run(false), "window {window:?}");
        }
    }
}
