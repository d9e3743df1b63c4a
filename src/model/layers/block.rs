//! [`Block`]: one decoder layer, `h = x + attn(norm1(x))`, `y = h + mlp(norm2(h))`, with optional
//! activation checkpointing (save only `x` and the dropout RNG, recompute in backward).
//!
//! Backward mirrors forward: `dh = dy + norm2ᵀ(mlpᵀ(dy))`, `dx = dh + norm1ᵀ(attnᵀ(dh))`.

use super::attention::{Attention, AttentionGrads, AttentionSaved, KvCache};
use super::linear::Linear;
use super::mlp::{Mlp, MlpGrads, MlpSaved};
use super::rms_norm::{RmsNorm, RmsNormSaved};
use super::rope::Rope;
use crate::model::params::Proj;
use crate::ops::bf16::ComputeDtype;
use crate::ops::{self, Kept, Rng};

/// A decoder layer. Fields are named after checkpoint keys.
#[derive(Debug, Clone)]
pub struct Block {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `self_attn`.
    pub self_attn: Attention,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// `mlp`.
    pub mlp: Mlp,
}

/// Everything backward needs, or (checkpointed) just enough to recompute it.
pub enum BlockSaved {
    /// All activations.
    Full(Box<FullSaved>),
    /// Activation checkpointing: the input (N, D) and the RNG the forward used.
    Checkpointed {
        /// (N, D) block input.
        x: Vec<f32>,
        /// RNG state at the start of the forward (dropout masks are redrawn identically).
        rng: Rng,
        /// Batch rows.
        b: usize,
        /// Tokens per row.
        t: usize,
    },
}

/// All activations of one block: f32, or bf16 where the block computes in bf16 (see
/// [`Kept`]; the norms' statistics, attention's softmax statistics, `q` and `k` stay f32).
pub struct FullSaved {
    /// (N, D) block input.
    x: Kept,
    n1: RmsNormSaved,
    /// (N, D) norm1 output (attention input).
    a_in: Kept,
    attn: AttentionSaved,
    /// (N, D) residual after attention.
    h: Kept,
    n2: RmsNormSaved,
    /// (N, D) norm2 output (MLP input).
    m_in: Kept,
    mlp: MlpSaved,
    n: usize,
}

impl FullSaved {
    /// Keeps every saved activation as a run computing in `c` saves it; returns the bytes
    /// they hold (not counting the norms' statistics).
    fn keep_in(&mut self, c: ComputeDtype) -> usize {
        let own: usize = [&mut self.x, &mut self.a_in, &mut self.h, &mut self.m_in]
            .into_iter()
            .map(|v| v.keep_in(c))
            .sum();
        own + self.attn.keep_in(c) + self.mlp.keep_in(c)
    }
}

/// Gradients of a block's trainable tensors.
#[derive(Debug, Clone, Default)]
pub struct BlockGrads {
    /// input_layernorm weight (full fine-tuning).
    pub input_layernorm: Option<Vec<f32>>,
    /// Attention.
    pub self_attn: AttentionGrads,
    /// post_attention_layernorm weight (full fine-tuning).
    pub post_attention_layernorm: Option<Vec<f32>>,
    /// MLP.
    pub mlp: MlpGrads,
}

/// What [`Block::forward_train`] keeps for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every activation backward reads, attention probabilities included (fastest).
    All,
    /// All but the attention probabilities, which backward recomputes from their softmax
    /// statistics (one more `Q·Kᵀ` product for B·H·T² floats less).
    AllButProbs,
    /// Only the input and RNG (activation checkpointing): backward recomputes the block's
    /// forward, attention probabilities included (one block's at a time, each used at once, so
    /// they never coexist with another block's activations).
    Input,
}

/// Which training forward [`Block::forward_full`] runs.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// The step's forward: the output is formed; attention keeps its probabilities or not.
    Forward {
        /// Keep attention's probabilities (else their statistics).
        keep_probs: bool,
    },
    /// Backward's recomputation of a checkpointed block: no output, probabilities kept (one
    /// block's at a time, used at once).
    Recompute,
}

impl Block {
    /// One of the block's seven linears.
    pub fn linear(&self, p: Proj) -> &Linear {
        match p {
            Proj::QProj => &self.self_attn.q_proj,
            Proj::KProj => &self.self_attn.k_proj,
            Proj::VProj => &self.self_attn.v_proj,
            Proj::OProj => &self.self_attn.o_proj,
            Proj::GateProj => &self.mlp.gate_proj,
            Proj::UpProj => &self.mlp.up_proj,
            Proj::DownProj => &self.mlp.down_proj,
        }
    }

    /// One of the block's seven linears, to change.
    pub fn linear_mut(&mut self, p: Proj) -> &mut Linear {
        match p {
            Proj::QProj => &mut self.self_attn.q_proj,
            Proj::KProj => &mut self.self_attn.k_proj,
            Proj::VProj => &mut self.self_attn.v_proj,
            Proj::OProj => &mut self.self_attn.o_proj,
            Proj::GateProj => &mut self.mlp.gate_proj,
            Proj::UpProj => &mut self.mlp.up_proj,
            Proj::DownProj => &mut self.mlp.down_proj,
        }
    }

    /// What the block's frozen products compute in, and so what its saved activations are
    /// kept in: the projections share one dtype (`Llama::set_compute_dtype` sets them
    /// together), and a trained weight is always f32.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.self_attn.q_proj.compute_dtype()
    }

    /// Inference, optionally extending a KV cache.
    pub fn forward(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &Rope,
        cache: Option<&mut KvCache>,
    ) -> Vec<f32> {
        let n = b * t;
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), b, t, rope, cache);
        let mut h = a;
        ops::add_assign(&mut h, x);
        let mut y = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h), n);
        ops::add_assign(&mut y, &h);
        y
    }

    /// The training forward keeping every activation backward reads (in f32, as computed);
    /// `pass` says whether the output is wanted and whether attention keeps its probabilities.
    fn forward_full(
        &self,
        x: Vec<f32>,
        (b, t): (usize, usize),
        rope: &Rope,
        rng: &mut Rng,
        pass: Pass,
    ) -> (Vec<f32>, FullSaved) {
        let n = b * t;
        let (need_output, keep_probs) = match pass {
            Pass::Forward { keep_probs } => (true, keep_probs),
            Pass::Recompute => (false, true),
        };
        let (a_in, n1) = self.input_layernorm.forward_train(&x);
        let (a, attn) = self
            .self_attn
            .forward_train(&a_in, b, t, rope, rng, keep_probs);
        let mut h = a;
        ops::add_assign(&mut h, &x);
        let (m_in, n2) = self.post_attention_layernorm.forward_train(&h);
        let (mut y, mlp) = self.mlp.forward_train(&m_in, n, rng, need_output);
        if need_output {
            ops::add_assign(&mut y, &h);
        }
        (
            y,
            FullSaved {
                x: x.into(),
                n1,
                a_in: a_in.into(),
                attn,
                h: h.into(),
                n2,
                m_in: m_in.into(),
                mlp,
                n,
            },
        )
    }

    /// Training forward, keeping what `keep` says.
    pub fn forward_train(
        &self,
        x: Vec<f32>,
        b: usize,
        t: usize,
        rope: &Rope,
        rng: Rng,
        keep: Keep,
    ) -> (Vec<f32>, BlockSaved) {
        let mut r = rng.clone();
        let pass = Pass::Forward {
            keep_probs: keep == Keep::All,
        };
        let (y, mut full) = self.forward_full(x, (b, t), rope, &mut r, pass);
        if keep == Keep::Input {
            (
                y,
                BlockSaved::Checkpointed {
                    x: full.x.into_f32(),
                    rng,
                    b,
                    t,
                },
            )
        } else {
            full.keep_in(self.compute_dtype());
            (y, BlockSaved::Full(Box::new(full)))
        }
    }

    /// Backward: `dx` and gradients (recomputing the forward first when checkpointed). Without
    /// `need_dx` (the first layer under a frozen embedding) `dx` is `None` and the attention
    /// projections' `dy·W` products behind it are skipped, unless `input_layernorm` trains and
    /// needs them for its own gradient.
    pub fn backward(
        &self,
        saved: BlockSaved,
        dy: &[f32],
        rope: &Rope,
        need_dx: bool,
    ) -> (Option<Vec<f32>>, BlockGrads) {
        let full = match saved {
            BlockSaved::Full(f) => *f,
            BlockSaved::Checkpointed { x, mut rng, b, t } => {
                // kept as the forward would have kept them: the same gradients to the bit
                // with or without checkpointing
                let mut full = self
                    .forward_full(x, (b, t), rope, &mut rng, Pass::Recompute)
                    .1;
                full.keep_in(self.compute_dtype());
                full
            }
        };
        let FullSaved {
            x,
            n1,
            a_in,
            attn,
            h,
            n2,
            m_in,
            mlp,
            n,
        } = full;
        let (dm_in, g_mlp) = self.mlp.backward(mlp, &m_in.f32(), dy, n);
        drop(m_in);
        let (dh_norm, g_n2) = self.post_attention_layernorm.backward(n2, &h.f32(), &dm_in);
        drop(h);
        let mut dh = dh_norm;
        ops::add_assign(&mut dh, dy);
        let need_da = need_dx || self.input_layernorm.train;
        let (da_in, g_attn) = self
            .self_attn
            .backward(attn, &a_in.f32(), &dh, rope, need_da);
        drop(a_in);
        let (mut dx, mut g_n1) = (None, None);
        if let Some(da_in) = da_in {
            let (mut d, g) = self.input_layernorm.backward(n1, &x.f32(), &da_in);
            ops::add_assign(&mut d, &dh);
            g_n1 = g;
            dx = need_dx.then_some(d);
        }
        (
            dx,
            BlockGrads {
                input_layernorm: g_n1,
                self_attn: g_attn,
                post_attention_layernorm: g_n2,
                mlp: g_mlp,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{
        AdapterKind, AdapterOptions, BaseWeight, DoraDropout, InitLoraWeights, LoraAdapter,
    };
    use crate::model::config::RopeScaling;
    use crate::model::layers::linear::LinearGrads;
    use crate::model::params::Proj;

    fn adapted(out: usize, inp: usize, kind: AdapterKind, rng: &mut Rng) -> Linear {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.3).collect();
        let weight = BaseWeight::Dense { w, out, inp };
        let opts = AdapterOptions {
            kind,
            r: 2,
            scaling: 2.0,
            dropout: 0.2,
            dora_dropout: DoraDropout::Peft,
        };
        let a = LoraAdapter::new(&weight, &opts, InitLoraWeights::Random, rng);
        let mut l = Linear::new(weight, None);
        l.adapter = Some(a);
        l
    }

    fn block(kind: AdapterKind, rng: &mut Rng) -> Block {
        let (d, h, dh, f) = (8, 2, 4, 12);
        let norm =
            |rng: &mut Rng| RmsNorm::new((0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect(), 1e-5);
        Block {
            input_layernorm: norm(rng),
            self_attn: Attention {
                q_proj: adapted(h * dh, d, kind, rng),
                k_proj: adapted(h * dh, d, kind, rng),
                v_proj: adapted(h * dh, d, kind, rng),
                o_proj: adapted(d, h * dh, kind, rng),
                q_norm: None,
                k_norm: None,
                num_heads: h,
                num_kv_heads: h,
                head_dim: dh,
                sliding_window: None,
            },
            post_attention_layernorm: norm(rng),
            mlp: Mlp {
                gate_proj: adapted(f, d, kind, rng),
                up_proj: adapted(f, d, kind, rng),
                down_proj: adapted(d, f, kind, rng),
            },
        }
    }

    /// A block computing in bf16 keeps its saved activations in bf16: half the bytes of the
    /// f32 one's for the block input, norm outputs, residual, `v`, context, attention's
    /// probabilities, DoRA's `z` of each projection, and the MLP's gate/up outputs where not
    /// held as factors; `q` and `k` stay
    /// f32 (a softmax replayed from its statistics needs the forward's scores). Its
    /// gradients, from the rounded activations, stay within bf16's reach of the f32 ones
    /// (2⁻⁸ relative per value, a few of them through each product: 3 % of the norm),
    /// and are not the f32 ones (the rounding took place).
    #[test]
    fn a_bf16_block_keeps_its_activations_in_half_the_bytes() {
        let (b, t, d, qd, f) = (2, 5, 8, 8, 12);
        let n = b * t;
        for kind in [AdapterKind::Lora, AdapterKind::Dora] {
            let mut rng = Rng::new(23);
            let f32_blk = block(kind, &mut rng);
            let mut bf16_blk = f32_blk.clone();
            for p in Proj::ALL {
                bf16_blk
                    .linear_mut(p)
                    .weight
                    .set_compute_dtype(ComputeDtype::Bf16);
            }
            assert_eq!(bf16_blk.compute_dtype(), ComputeDtype::Bf16);
            let mut rope = Rope::new(4, 10000.0, RopeScaling::Default);
            rope.ensure(t);
            let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
            let pass = Pass::Forward { keep_probs: true };
            let bytes = |blk: &Block, c: ComputeDtype| {
                let (_, mut full) =
                    blk.forward_full(x.clone(), (b, t), &rope, &mut Rng::new(9), pass);
                full.keep_in(c)
            };
            // 4 (N, D) block tensors, v and ctx, the probabilities, g and u (PEFT-form DoRA with dropout holds
            // no factors); DoRA: z of every projection; and q, k in f32
            // (the probabilities: 2 heads of t × t per sequence)
            let mut rounded = n * (4 * d + 2 * qd + 2 * f) + b * 2 * t * t;
            if kind == AdapterKind::Dora {
                rounded += n * (3 * qd + d + 2 * f + d);
            }
            let qk = 4 * n * 2 * qd;
            assert_eq!(
                bytes(&f32_blk, ComputeDtype::F32),
                4 * rounded + qk,
                "{kind:?}"
            );
            assert_eq!(
                bytes(&bf16_blk, ComputeDtype::F32),
                4 * rounded + qk,
                "{kind:?}"
            );
            assert_eq!(
                bytes(&bf16_blk, ComputeDtype::Bf16),
                2 * rounded + qk,
                "{kind:?}"
            );
            // the same bf16 weights, activations kept in f32 or in bf16
            let grads = |c: ComputeDtype| {
                let (_, mut full) =
                    bf16_blk.forward_full(x.clone(), (b, t), &rope, &mut Rng::new(9), pass);
                full.keep_in(c);
                bf16_blk.backward(BlockSaved::Full(Box::new(full)), &dy, &rope, true)
            };
            let (dx32, g32) = grads(ComputeDtype::F32);
            let (dx16, g16) = grads(ComputeDtype::Bf16);
            let rel = |a: &[f32], b: &[f32]| {
                let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
                (diff / norm).sqrt()
            };
            let (dx32, dx16) = (dx32.expect("dx"), dx16.expect("dx"));
            let r = rel(&dx32, &dx16);
            assert!(r > 0.0 && r < 0.03, "{kind:?}: dx moved by {r:e}");
            for (a, c) in bits(&g32.mlp.up_proj).iter().zip(bits(&g16.mlp.up_proj)) {
                let (a, c): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&v| f32::from_bits(v)).collect(),
                    c.iter().map(|&v| f32::from_bits(v)).collect(),
                );
                let r = rel(&a, &c);
                assert!(
                    r > 0.0 && r < 0.03,
                    "{kind:?}: up_proj gradient moved by {r:e}"
                );
            }
        }
    }

    fn bits(g: &LinearGrads) -> Vec<Vec<u32>> {
        let l = g.lora.as_ref().expect("adapter gradients");
        let b = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut all = vec![b(&l.d_lora_a), b(&l.d_lora_b)];
        if let Some(m) = &l.d_lora_magnitude_vector {
            all.push(b(m));
        }
        all
    }

    /// A block asked for no input gradient (the first layer under a frozen embedding) skips
    /// the attention projections' `dy·W` products and gives the same adapter gradients to the
    /// bit, for LoRA and for DoRA with dropout on the base path (whose `dx` has an extra term);
    /// a training `input_layernorm` still gets its gradient, the same one.
    #[test]
    fn no_input_gradient_changes_no_parameter_gradient() {
        let (b, t, d) = (2, 5, 8);
        for kind in [AdapterKind::Lora, AdapterKind::Dora] {
            for norm_trains in [false, true] {
                let mut rng = Rng::new(17);
                let mut blk = block(kind, &mut rng);
                blk.input_layernorm.train = norm_trains;
                let mut rope = Rope::new(4, 10000.0, RopeScaling::Default);
                rope.ensure(t);
                let x: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
                let dy: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
                let run = |need_dx: bool| {
                    let (_, saved) =
                        blk.forward_train(x.clone(), b, t, &rope, Rng::new(9), Keep::All);
                    blk.backward(saved, &dy, &rope, need_dx)
                };
                let (dx, full) = run(true);
                assert_eq!(dx.map(|v| v.len()), Some(b * t * d));
                let (none, part) = run(false);
                assert!(none.is_none(), "{kind:?}: no dx asked for");
                let a = &full.self_attn;
                let p = &part.self_attn;
                for (x, y) in [
                    (&a.q_proj, &p.q_proj),
                    (&a.k_proj, &p.k_proj),
                    (&a.v_proj, &p.v_proj),
                    (&a.o_proj, &p.o_proj),
                    (&full.mlp.gate_proj, &part.mlp.gate_proj),
                    (&full.mlp.up_proj, &part.mlp.up_proj),
                    (&full.mlp.down_proj, &part.mlp.down_proj),
                ] {
                    assert_eq!(bits(x), bits(y), "{kind:?}");
                }
                assert_eq!(full.input_layernorm.is_some(), norm_trains);
                assert_eq!(full.input_layernorm, part.input_layernorm, "{kind:?}");
            }
        }
    }
}
