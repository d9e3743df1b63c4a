//! [`Attention`]: grouped-query causal self-attention with RoPE (HF `LlamaAttention`; Qwen2's
//! q/k/v biases and Qwen3's per-head q/k RMSNorm; Mistral's sliding window).
//!
//! Forward per batch row b and head h (group g = h / (H/Hkv)):
//! `S = Q_h·K_gᵀ/√Dh` (causal mask), `P = softmax(S)`, `O_h = P·V_g`, `y = o_proj(concat O)`.
//! Backward: `dV_g += Pᵀ·dO`, `dP = dO·V_gᵀ`, `dS = P⊙(dP − rowsum(dP⊙P))`,
//! `dQ_h = dS·K_g/√Dh`, `dK_g += dSᵀ·Q_h/√Dh`, then the inverse RoPE rotation and the
//! projections' backward. Shapes: x (N = B·T, D), q (N, H·Dh), k/v (N, Hkv·Dh).
//! The probabilities (B, H, T, T) are kept for backward, or, to save memory (with activation
//! checkpointing), only each row's softmax statistics (B·H·T pairs): the backward then
//! recomputes `P` one query block at a time, to the bit, in scratch that stays in cache (as
//! FlashAttention does), for one more `Q·Kᵀ` product.

use rayon::prelude::*;

use super::linear::{Linear, LinearGrads, LinearSaved};
use super::rms_norm::{RmsNorm, RmsNormSaved};
use super::rope::Rope;
use crate::ops::{self, Rng};

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
    qk_norm: Option<(Vec<f32>, RmsNormSaved, Vec<f32>, RmsNormSaved)>,
    /// (N, H·Dh) after RoPE.
    q: Vec<f32>,
    /// (N, Hkv·Dh) after RoPE.
    k: Vec<f32>,
    /// (N, Hkv·Dh).
    v: Vec<f32>,
    /// The probabilities or their statistics.
    probs: Probs,
    /// (N, H·Dh) input of o_proj.
    ctx: Vec<f32>,
    b: usize,
    t: usize,
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

/// Queries per block in the causal products: a block's keys end at its last query (128:
/// fewer, larger products than 64, which matters with AVX-512 kernels; 256 would skip nothing).
const QUERY_BLOCK: usize = 128;

/// What the forward keeps of the attention probabilities for backward.
enum Probs {
    /// (B·H, T, T) the probabilities themselves.
    Kept(Vec<f32>),
    /// (B·H·T) each probability row's softmax statistics (see [`ops::softmax_replay`]).
    Stats(Vec<[f32; 2]>),
}

/// How [`Attention::probabilities`] takes each row's softmax: fresh (writing the row's
/// statistics) or replayed from the statistics the forward wrote.
enum Softmax<'a> {
    Fresh(&'a mut [[f32; 2]]),
    Replay(&'a [[f32; 2]]),
}

struct Dims {
    h: usize,
    hkv: usize,
    dh: usize,
}

/// Lays per-(sequence, group) head results out as token rows: `(b·t, groups·heads·dh)` where
/// `part(bi·groups + g)` holds the `heads` heads of group `g` of sequence `bi`, each `t × dh`.
/// Sequences fill in parallel; every element is written once, with no zeroing pass first.
fn scatter_heads<'a>(
    b: usize,
    t: usize,
    dh: usize,
    groups: usize,
    heads: usize,
    part: impl Fn(usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    let width = groups * heads * dh;
    // SAFETY: each sequence's `t` rows are split into rows of `width`, and the loops over
    // `g < groups` and `gi < heads` write columns `(g·heads + gi)·dh ..+ dh`, i.e. all of them.
    unsafe {
        ops::filled(b * t * width, |dst| {
            dst.par_chunks_mut(t * width)
                .enumerate()
                .for_each(|(bi, rows)| {
                    for g in 0..groups {
                        let p = part(bi * groups + g);
                        assert_eq!(p.len(), heads * t * dh, "head part shape");
                        for (i, row) in rows.chunks_mut(width).enumerate() {
                            for gi in 0..heads {
                                let col = (g * heads + gi) * dh;
                                let src = &p[(gi * t + i) * dh..(gi * t + i + 1) * dh];
                                for (d, &v) in row[col..col + dh].iter_mut().zip(src) {
                                    d.write(v);
                                }
                            }
                        }
                    }
                })
        })
    }
}

impl Attention {
    fn dims(&self) -> Dims {
        Dims {
            h: self.num_heads,
            hkv: self.num_kv_heads,
            dh: self.head_dim,
        }
    }

    /// Probabilities of query rows `q0..q1` of head `hi` of sequence `bi` (query `i` at
    /// absolute position `pos0 + i`) over keys `0..tk`, into `sb` ((q1 − q0) × tk): one product
    /// `Q·Kᵀ` over the keys the block can see (causal; columns past them and outside a sliding
    /// window are set to 0), then the row softmax, fresh or replayed from saved statistics.
    /// Returns how many key columns (`kend`) the block spans.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        q: &[f32],
        k: &[f32],
        (bi, hi): (usize, usize),
        (tq, tk, pos0): (usize, usize, usize),
        (q0, q1): (usize, usize),
        sb: &mut [f32],
        softmax: Softmax<'_>,
    ) -> usize {
        let Dims { h, hkv, dh } = self.dims();
        let scale = 1.0 / (dh as f32).sqrt();
        let (qs, ks) = (h * dh, hkv * dh);
        let qo = bi * tq * qs + hi * dh;
        let ko = bi * tk * ks + (hi / (h / hkv)) * dh;
        let kend = (pos0 + q1).min(tk);
        let rows = q1 - q0;
        assert_eq!(sb.len(), rows * tk, "probability block shape");
        ops::gemm(
            rows,
            kend,
            dh,
            sb,
            tk,
            false,
            &q[qo + q0 * qs..],
            qs,
            1,
            &k[ko..],
            1,
            ks,
            1,
        );
        let mut softmax = softmax;
        for (i, row) in sb.chunks_mut(tk).enumerate() {
            let p = pos0 + q0 + i;
            let lo = self.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
            let hi_ = (p + 1).min(tk);
            row[..lo].fill(0.0);
            row[hi_..].fill(0.0);
            let live = &mut row[lo..hi_];
            match &mut softmax {
                Softmax::Fresh(st) => st[i] = ops::softmax_scaled(live, scale),
                Softmax::Replay(st) => ops::softmax_replay(live, scale, st[i]),
            }
        }
        kend
    }

    /// Scaled-dot-product attention for `b` sequences of `tq` queries over `tk` keys, where
    /// query `i` sits at absolute position `pos0 + i` and keys at `0..tk`. Returns the context
    /// (b·tq, H·Dh), each probability row's softmax statistics (b·H·tq) and, with
    /// `keep_probs`, the probabilities (b·H, tq, tk) (empty otherwise).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        tq: usize,
        tk: usize,
        pos0: usize,
        keep_probs: bool,
    ) -> (Vec<f32>, Vec<[f32; 2]>, Vec<f32>) {
        let Dims { h, hkv, dh } = self.dims();
        let ks = hkv * dh;
        let mut stats = vec![[0f32; 2]; b * h * tq];
        // One (batch row, head): its probabilities in `s`, the whole head's (`tq × tk`, kept)
        // or one query block's at a time (scratch); returns its context.
        let head = |bh: usize, st: &mut [[f32; 2]], s: &mut [f32]| -> Vec<f32> {
            let (bi, hi) = (bh / h, bh % h);
            let vo = bi * tk * ks + (hi / (h / hkv)) * dh;
            let whole = s.len() == tq * tk;
            let mut o = vec![0f32; tq * dh];
            for q0 in (0..tq).step_by(QUERY_BLOCK) {
                let q1 = (q0 + QUERY_BLOCK).min(tq);
                let sb = if whole {
                    &mut s[q0 * tk..q1 * tk]
                } else {
                    &mut s[..(q1 - q0) * tk]
                };
                let fresh = Softmax::Fresh(&mut st[q0..q1]);
                let kend = self.probabilities(q, k, (bi, hi), (tq, tk, pos0), (q0, q1), sb, fresh);
                ops::gemm(
                    q1 - q0,
                    dh,
                    kend,
                    &mut o[q0 * dh..],
                    dh,
                    false,
                    sb,
                    tk,
                    1,
                    &v[vo..],
                    ks,
                    1,
                    1,
                );
            }
            o
        };
        let mut probs = vec![0f32; if keep_probs { b * h * tq * tk } else { 0 }];
        let outs: Vec<Vec<f32>> = if keep_probs {
            stats
                .par_chunks_mut(tq)
                .zip(probs.par_chunks_mut(tq * tk))
                .enumerate()
                .map(|(bh, (st, s))| head(bh, st, s))
                .collect()
        } else {
            // scratch for one query block, reused across tasks
            stats
                .par_chunks_mut(tq)
                .enumerate()
                .map_init(
                    || vec![0f32; QUERY_BLOCK.min(tq) * tk],
                    |s, (bh, st)| head(bh, st, s),
                )
                .collect()
        };
        let ctx = scatter_heads(b, tq, dh, h, 1, |bh| &outs[bh]);
        (ctx, stats, probs)
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
        let Dims { h, hkv, dh } = self.dims();
        let (mut q, mut k, v, _) = self.project_qkv(x, n, &mut Rng::new(0), false);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let pos0 = cache.as_ref().map_or(0, |c| c.k.len() / (hkv * dh));
        rope.apply(&mut q, h, |i| pos0 + i % t, false);
        rope.apply(&mut k, hkv, |i| pos0 + i % t, false);
        let ctx = match cache {
            Some(c) => {
                assert_eq!(b, 1, "KV cache holds one sequence");
                c.k.extend_from_slice(&k);
                c.v.extend_from_slice(&v);
                let tk = c.k.len() / (hkv * dh);
                self.attend(&q, &c.k, &c.v, 1, t, tk, pos0, false).0
            }
            None => self.attend(&q, &k, &v, b, t, t, 0, false).0,
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
        let Dims { h, hkv, .. } = self.dims();
        let (mut q, mut k, v, lin) = self.project_qkv(x, n, rng, true);
        let [q_lin, k_lin, v_lin] = lin.expect("train projections save state");
        let qk_norm = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let (qq, sq) = qn.forward_train(&q);
                let (kk, sk) = kn.forward_train(&k);
                let pre_q = std::mem::replace(&mut q, qq);
                let pre_k = std::mem::replace(&mut k, kk);
                Some((pre_q, sq, pre_k, sk))
            }
            _ => None,
        };
        rope.apply(&mut q, h, |i| i % t, false);
        rope.apply(&mut k, hkv, |i| i % t, false);
        let (ctx, stats, kept) = self.attend(&q, &k, &v, b, t, t, 0, keep_probs);
        let probs = if keep_probs {
            Probs::Kept(kept)
        } else {
            Probs::Stats(stats)
        };
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
                v,
                probs,
                ctx,
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
        let Dims { h, hkv, dh } = self.dims();
        let group = h / hkv;
        let scale = 1.0 / (dh as f32).sqrt();
        let (qs, ks) = (h * dh, hkv * dh);
        let (dctx, o_grads) = self.o_proj.backward(o_lin, &ctx, dy, n);
        drop(ctx);
        // Per (batch row, kv group): dq for its heads, dk and dv of the group. Without kept
        // probabilities, each query block's are recomputed into scratch `p` (reused across
        // tasks).
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
            .into_par_iter()
            .map_init(
                || {
                    (
                        vec![0f32; QUERY_BLOCK.min(t) * t],
                        vec![0f32; QUERY_BLOCK.min(t) * t],
                    )
                },
                |(p, dp), bg| {
                    let (bi, g) = (bg / hkv, bg % hkv);
                    let ko = bi * t * ks + g * dh;
                    let mut dk = vec![0f32; t * dh];
                    let mut dv = vec![0f32; t * dh];
                    let mut dq = vec![0f32; group * t * dh];
                    for (gi, hi) in (g * group..(g + 1) * group).enumerate() {
                        let qo = bi * t * qs + hi * dh;
                        let head = (bi * h + hi) * t;
                        let dqh = &mut dq[gi * t * dh..(gi + 1) * t * dh];
                        for q0 in (0..t).step_by(QUERY_BLOCK) {
                            let q1 = (q0 + QUERY_BLOCK).min(t);
                            let rows = q1 - q0;
                            // query block q0..q1 sees keys 0..q1 (causal)
                            let kend = q1;
                            let pb: &[f32] = match &probs {
                                Probs::Kept(all) => &all[(head + q0) * t..(head + q1) * t],
                                Probs::Stats(st) => {
                                    let pb = &mut p[..rows * t];
                                    let st = Softmax::Replay(&st[head + q0..head + q1]);
                                    let blk = (q0, q1);
                                    self.probabilities(&q, &k, (bi, hi), (t, t, 0), blk, pb, st);
                                    pb
                                }
                            };
                            let dpb = &mut dp[..rows * t];
                            let dob = &dctx[qo + q0 * qs..];
                            // dV += Pᵀ·dO
                            ops::gemm(kend, dh, rows, &mut dv, dh, true, pb, 1, t, dob, qs, 1, 1);
                            // dP = dO·Vᵀ
                            ops::gemm(
                                rows,
                                kend,
                                dh,
                                dpb,
                                t,
                                false,
                                dob,
                                qs,
                                1,
                                &v[ko..],
                                1,
                                ks,
                                1,
                            );
                            for (pr, dr) in pb.chunks(t).zip(dpb.chunks_mut(t)) {
                                let (pr, dr) = (&pr[..kend], &mut dr[..kend]);
                                let dot = ops::dot(pr, dr);
                                for (d, &pp) in dr.iter_mut().zip(pr) {
                                    *d = pp * (*d - dot) * scale;
                                }
                            }
                            // dQ = dS·K, dK += dSᵀ·Q (scale folded into dS)
                            ops::gemm(
                                rows,
                                dh,
                                kend,
                                &mut dqh[q0 * dh..],
                                dh,
                                false,
                                dpb,
                                t,
                                1,
                                &k[ko..],
                                ks,
                                1,
                                1,
                            );
                            ops::gemm(
                                kend,
                                dh,
                                rows,
                                &mut dk,
                                dh,
                                true,
                                dpb,
                                1,
                                t,
                                &q[qo + q0 * qs..],
                                qs,
                                1,
                                1,
                            );
                        }
                    }
                    (dq, dk, dv)
                },
            )
            .collect();
        drop(probs);
        let mut dq = scatter_heads(b, t, dh, hkv, group, |bg| &parts[bg].0);
        let mut dk = scatter_heads(b, t, dh, hkv, 1, |bg| &parts[bg].1);
        let dv = scatter_heads(b, t, dh, hkv, 1, |bg| &parts[bg].2);
        drop(parts);
        rope.apply(&mut dq, h, |i| i % t, true);
        rope.apply(&mut dk, hkv, |i| i % t, true);
        let mut grads = AttentionGrads {
            o_proj: o_grads,
            ..Default::default()
        };
        if let (Some((pre_q, sq, pre_k, sk)), Some(qn), Some(kn)) =
            (qk_norm, &self.q_norm, &self.k_norm)
        {
            let (a, ga) = qn.backward(sq, &pre_q, &dq);
            let (c, gc) = kn.backward(sk, &pre_k, &dk);
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

    fn dense(out: usize, inp: usize, rng: &mut Rng) -> Linear {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.4).collect();
        let mut l = Linear::new(BaseWeight::Dense { w, out, inp }, None);
        l.train_weight = true;
        l
    }

    /// Backward from recomputed probabilities (statistics only) equals backward from kept
    /// probabilities to the bit, over several query blocks (one partial), grouped heads, and
    /// with a sliding window.
    #[test]
    fn recomputed_probabilities_give_the_kept_gradients_to_the_bit() {
        let (d, h, hkv, dh, b, t) = (16, 4, 2, 8, 2, QUERY_BLOCK * 2 + 37);
        for window in [None, Some(50)] {
            let mut rng = Rng::new(13);
            let attn = Attention {
                q_proj: dense(h * dh, d, &mut rng),
                k_proj: dense(hkv * dh, d, &mut rng),
                v_proj: dense(hkv * dh, d, &mut rng),
                o_proj: dense(d, h * dh, &mut rng),
                q_norm: None,
                k_norm: None,
                num_heads: h,
                num_kv_heads: hkv,
                head_dim: dh,
                sliding_window: window,
            };
            let mut rope = Rope::new(dh, 10000.0, RopeScaling::Default);
            rope.ensure(t);
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
