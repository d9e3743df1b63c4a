//! [`Llama`]: the decoder stack (`embed_tokens` → blocks → `norm` → `lm_head`) with inference
//! (full logits, KV-cached decoding, hidden states), evaluation loss, and the training step
//! `forward_backward` that mirrors the forward in reverse, and the walk over what trains
//! ([`Llama::trainable`], [`Llama::param`], [`Llama::param_mut`]) that gradients, the optimizer,
//! checkpoints, adapter files and parameter counts all go through (see `params.rs`).

use super::config::LlamaConfig;
use super::error::{Error, Result};
use super::layers::{Block, BlockGrads, BlockSaved, Keep, KvCache, LinearGrads, RmsNorm, Rope};
use super::loss::{self, HeadLoss};
use super::params::{ParamId, Proj};
use crate::adapter::BaseWeight;
use crate::ops::bf16::ComputeDtype;
use crate::ops::Rng;

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The configuration.
    pub config: LlamaConfig,
    /// `model.embed_tokens.weight`: (V, D).
    pub embed_tokens: BaseWeight,
    /// Whether the embedding trains (full fine-tuning or `modules_to_save`).
    pub train_embed_tokens: bool,
    /// `model.layers.{i}`.
    pub layers: Vec<Block>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head.weight`: (V, D); `None` when tied to the embedding.
    pub lm_head: Option<BaseWeight>,
    /// Whether the head trains.
    pub train_lm_head: bool,
    /// RoPE tables.
    pub rope: Rope,
}

/// Gradients of one step, tagged with the tensor they belong to, in the order the backward
/// produced them (the last layer first).
pub type Grads = Vec<(ParamId, Vec<f32>)>;

/// Options of one training step.
#[derive(Debug, Clone)]
pub struct StepOptions {
    /// Recompute each block's activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
    /// Multiplies every gradient (e.g. 1 / tokens of the whole accumulated batch).
    pub grad_scale: f32,
}

/// Appends a linear's gradients as `(ParamId, gradient)` pairs.
fn push_linear(out: &mut Grads, layer: usize, proj: Proj, g: LinearGrads) {
    if let Some(w) = g.d_weight {
        out.push((ParamId::Weight(layer, proj), w));
    }
    if let Some(b) = g.d_bias {
        out.push((ParamId::Bias(layer, proj), b));
    }
    if let Some(l) = g.lora {
        out.extend(
            l.into_params()
                .map(|(p, g)| (ParamId::Adapter(layer, proj, p), g)),
        );
    }
}

/// Appends a block's gradients as `(ParamId, gradient)` pairs.
fn push_block(out: &mut Grads, i: usize, g: BlockGrads) {
    let (a, m) = (g.self_attn, g.mlp);
    let norms = [
        (ParamId::InputLayernorm(i), g.input_layernorm),
        (
            ParamId::PostAttentionLayernorm(i),
            g.post_attention_layernorm,
        ),
        (ParamId::QNorm(i), a.q_norm),
        (ParamId::KNorm(i), a.k_norm),
    ];
    out.extend(norms.into_iter().filter_map(|(id, g)| g.map(|g| (id, g))));
    for (proj, lg) in [
        (Proj::QProj, a.q_proj),
        (Proj::KProj, a.k_proj),
        (Proj::VProj, a.v_proj),
        (Proj::OProj, a.o_proj),
        (Proj::GateProj, m.gate_proj),
        (Proj::UpProj, m.up_proj),
        (Proj::DownProj, m.down_proj),
    ] {
        push_linear(out, i, proj, lg);
    }
}

impl Llama {
    /// Puts a model together from its weights (frozen; RoPE tables for `rope_len` positions).
    /// The embedding and head are dense `(vocab, hidden)`; `lm_head = None` ties the head to
    /// the embedding.
    ///
    /// # Panics
    /// If the embedding or head is not `(vocab, hidden)`.
    pub fn assemble(
        config: LlamaConfig,
        embed_tokens: BaseWeight,
        layers: Vec<Block>,
        norm: RmsNorm,
        lm_head: Option<BaseWeight>,
        rope_len: usize,
    ) -> Self {
        let (v, d) = (config.vocab_size, config.hidden_size);
        for w in std::iter::once(&embed_tokens).chain(&lm_head) {
            assert_eq!(
                (w.out_features(), w.in_features()),
                (v, d),
                "embedding shape"
            );
            assert!(!w.is_quantized(), "a 4-bit embedding or head");
        }
        let mut rope = Rope::new(config.head_dim, config.rope_theta, config.rope_scaling);
        rope.ensure(rope_len);
        Self {
            embed_tokens,
            train_embed_tokens: false,
            layers,
            norm,
            lm_head,
            train_lm_head: false,
            rope,
            config,
        }
    }

    /// Makes every frozen weight compute in `c` (resolved; see
    /// [`BaseWeight::set_compute_dtype`]): the blocks' linears that do not train, and the
    /// embedding and head unless they train. Trained weights stay f32 (full fine-tuning keeps
    /// f32 compute). Call it before attaching or loading adapters, so that DoRA's magnitude and
    /// its cached `‖W‖²` come from the values the products use.
    pub fn set_compute_dtype(&mut self, c: ComputeDtype) {
        for layer in &mut self.layers {
            for p in Proj::ALL {
                let l = layer.linear_mut(p);
                if !l.train_weight {
                    l.weight.set_compute_dtype(c);
                }
            }
        }
        let tied = self.lm_head.is_none();
        let head_trains = self.train_lm_head && !tied;
        if !(self.train_embed_tokens || tied && self.train_lm_head) {
            self.embed_tokens.set_compute_dtype(c);
        }
        if let Some(h) = self.lm_head.as_mut().filter(|_| !head_trains) {
            h.set_compute_dtype(c);
        }
    }

    /// What the model's frozen products compute in: bf16 when any frozen weight does.
    pub fn compute_dtype(&self) -> ComputeDtype {
        let bf16 = self
            .layers
            .iter()
            .flat_map(|l| Proj::ALL.map(|p| l.linear(p).weight.compute_dtype()))
            .chain(std::iter::once(self.head().compute_dtype()))
            .any(|c| c.is_bf16());
        if bf16 {
            ComputeDtype::Bf16
        } else {
            ComputeDtype::F32
        }
    }

    /// The head weight: `lm_head`, or the embedding when tied.
    pub fn head(&self) -> &BaseWeight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Bytes of the blocks' linear weights as stored (4-bit or dense).
    pub fn linear_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| Proj::ALL.map(|p| l.linear(p).weight.stored_bytes()))
            .sum()
    }

    /// Bytes of every matmul weight as stored: the blocks' linears and the head. One decoded
    /// token reads all of them, so this over the decode time is the weight bandwidth.
    pub fn matmul_weight_bytes(&self) -> usize {
        self.linear_weight_bytes() + self.head().stored_bytes()
    }

    /// Makes sure RoPE tables cover `len` positions.
    pub fn ensure_positions(&mut self, len: usize) {
        self.rope.ensure(len);
    }

    /// Checks token ids against the vocabulary.
    ///
    /// # Errors
    /// [`Error::Input`] naming the first bad id and its position.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        if let Some(i) = ids.iter().position(|&t| t as usize >= v) {
            return Err(Error::Input(format!(
                "token id {} at position {i} is outside the vocabulary (size {v})",
                ids[i]
            )));
        }
        Ok(())
    }

    fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let d = self.config.hidden_size;
        let mut x = Vec::with_capacity(ids.len() * d);
        for &t in ids {
            let t = t as usize;
            x.extend_from_slice(&self.embed_tokens.dense_rows(t, t + 1));
        }
        x
    }

    fn check_len(&self, ids: &[u32], b: usize, t: usize) -> Result<()> {
        if ids.len() != b * t {
            return Err(Error::Input(format!(
                "{} ids for batch {b} × seq {t}",
                ids.len()
            )));
        }
        self.check_ids(ids)
    }

    /// Hidden states: the embeddings, each block's output, and the final norm's output
    /// (transformers' `output_hidden_states`, last one after the norm).
    ///
    /// # Errors
    /// Bad ids.
    pub fn hidden_states(&mut self, ids: &[u32], b: usize, t: usize) -> Result<Vec<Vec<f32>>> {
        self.check_len(ids, b, t)?;
        self.rope.ensure(t);
        let mut hs = vec![self.embed(ids)];
        for layer in &self.layers {
            let x = layer.forward(
                hs.last().map(|v| v.as_slice()).unwrap_or(&[]),
                b,
                t,
                &self.rope,
                None,
            );
            hs.push(x);
        }
        let last = hs.pop().unwrap_or_default();
        hs.push(self.norm.forward(&last));
        Ok(hs)
    }

    /// Logits (B·T, V) for every position.
    ///
    /// # Errors
    /// Bad ids.
    pub fn logits(&mut self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let hs = self.hidden_states(ids, b, t)?;
        let h = hs.last().map(|v| v.as_slice()).unwrap_or(&[]);
        Ok(self.head().forward(h, b * t))
    }

    /// Fresh KV caches, one per layer.
    pub fn new_cache(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.layers.len()]
    }

    /// Decodes `ids` (one sequence) after what `cache` holds; returns the last position's logits.
    ///
    /// # Errors
    /// Bad ids, or a context longer than `max_position_embeddings`.
    pub fn forward_cached(&mut self, ids: &[u32], cache: &mut [KvCache]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let d = self.config.hidden_size;
        let kvd = self.config.num_key_value_heads * self.config.head_dim;
        let past = cache.first().map_or(0, |c| c.k.len() / kvd);
        let t = ids.len();
        if past + t > self.config.max_position_embeddings.max(1) {
            return Err(Error::Input(format!(
                "context of {} tokens exceeds max_position_embeddings {}",
                past + t,
                self.config.max_position_embeddings
            )));
        }
        self.rope.ensure(past + t);
        let mut x = self.embed(ids);
        for (layer, c) in self.layers.iter().zip(cache.iter_mut()) {
            x = layer.forward(&x, 1, t, &self.rope, Some(c));
        }
        let last = self.norm.forward(&x[(t - 1) * d..]);
        Ok(self.head().forward(&last, 1))
    }

    /// Evaluation loss: (sum of token losses, number of tokens) for labels (B·T, -100 ignored).
    ///
    /// # Errors
    /// Bad ids or labels.
    pub fn loss(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        b: usize,
        t: usize,
    ) -> Result<(f64, usize)> {
        self.check_labels(labels, b, t)?;
        let hs = self.hidden_states(ids, b, t)?;
        let h = hs.last().map(|v| v.as_slice()).unwrap_or(&[]);
        let targets = loss::shift_labels(labels, b, t);
        let r = loss::head_loss(
            h,
            self.head(),
            &targets,
            1.0,
            false,
            false,
            loss::CHUNK_ROWS,
        );
        Ok((r.loss_sum, r.count))
    }

    fn check_labels(&self, labels: &[i64], b: usize, t: usize) -> Result<()> {
        if labels.len() != b * t {
            return Err(Error::Input(format!(
                "{} labels for batch {b} × seq {t}",
                labels.len()
            )));
        }
        let v = self.config.vocab_size as i64;
        if let Some(i) = labels
            .iter()
            .position(|&l| l != loss::IGNORE_INDEX && !(0..v).contains(&l))
        {
            return Err(Error::Input(format!(
                "label {} at position {i} is neither -100 nor inside the vocabulary (size {v})",
                labels[i]
            )));
        }
        Ok(())
    }

    /// One training forward and backward: returns (loss sum, counted tokens, gradients of
    /// `grad_scale · loss sum`). No gradient is computed for a frozen tensor.
    ///
    /// # Errors
    /// Bad ids or labels.
    pub fn forward_backward(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        b: usize,
        t: usize,
        opts: &StepOptions,
        rng: &mut Rng,
    ) -> Result<(f64, usize, Grads)> {
        self.check_len(ids, b, t)?;
        self.check_labels(labels, b, t)?;
        self.rope.ensure(t);
        let mut x = self.embed(ids);
        let mut saved: Vec<BlockSaved> = Vec::with_capacity(self.layers.len());
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let r = rng.fork(i as u64 + 1);
            // The last block's backward follows at once: recomputing it would cost a forward
            // and save nothing, since backward rebuilds the same activations anyway.
            // Checkpointing saves memory everywhere, attention probabilities included.
            let keep = match (opts.gradient_checkpointing, i < last) {
                (false, _) => Keep::All,
                (true, true) => Keep::Input,
                (true, false) => Keep::AllButProbs,
            };
            let (y, s) = layer.forward_train(x, b, t, &self.rope, r, keep);
            saved.push(s);
            x = y;
        }
        rng.next_u64();
        let (h, norm_saved) = self.norm.forward_train(&x);
        let targets = loss::shift_labels(labels, b, t);
        let HeadLoss {
            loss_sum,
            count,
            d_hidden,
            d_weight,
        } = loss::head_loss(
            &h,
            self.head(),
            &targets,
            opts.grad_scale,
            true,
            self.train_lm_head,
            if opts.gradient_checkpointing {
                loss::LEAN_CHUNK_ROWS
            } else {
                loss::CHUNK_ROWS
            },
        );
        drop(h);
        let mut grads: Grads = Vec::new();
        let (mut dx, d_norm) = self.norm.backward(norm_saved, &x, &d_hidden);
        drop(x);
        if let Some(w) = d_norm {
            grads.push((ParamId::Norm, w));
        }
        for (i, (layer, s)) in self.layers.iter().zip(saved).enumerate().rev() {
            // The first layer's input gradient feeds only the embedding's: with the embedding
            // frozen nobody reads it, and its projections' dy·W products are skipped (as
            // autograd skips them for an input that does not require grad).
            let need_dx = i > 0 || self.train_embed_tokens;
            let (d, g) = layer.backward(s, &dx, &self.rope, need_dx);
            dx = d.unwrap_or_default();
            push_block(&mut grads, i, g);
        }
        let tied = self.lm_head.is_none();
        let mut d_embed = self.train_embed_tokens.then(|| {
            let d = self.config.hidden_size;
            let mut g = vec![0f32; self.config.vocab_size * d];
            for (k, &id) in ids.iter().enumerate() {
                let row = &mut g[id as usize * d..(id as usize + 1) * d];
                for (a, b) in row.iter_mut().zip(&dx[k * d..(k + 1) * d]) {
                    *a += b;
                }
            }
            g
        });
        if let Some(dw) = d_weight {
            match (&mut d_embed, tied) {
                (Some(de), true) => crate::ops::add_assign(de, &dw),
                (None, true) => grads.push((ParamId::EmbedTokens, dw)),
                (_, false) => grads.push((ParamId::LmHead, dw)),
            }
        }
        if let Some(de) = d_embed {
            grads.push((ParamId::EmbedTokens, de));
        }
        Ok((loss_sum, count, grads))
    }

    /// Every tensor that trains, in one fixed order (embedding, layers, norm, head): the one list
    /// the optimizer, checkpoints, adapter files and counts walk. The gradients of
    /// [`forward_backward`](Self::forward_backward) carry exactly these ids.
    pub fn trainable(&self) -> Vec<ParamId> {
        let mut ids = Vec::new();
        let tied = self.lm_head.is_none();
        if self.embed_is_dense() && (self.train_embed_tokens || (tied && self.train_lm_head)) {
            ids.push(ParamId::EmbedTokens);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.input_layernorm.train {
                ids.push(ParamId::InputLayernorm(i));
            }
            if layer.post_attention_layernorm.train {
                ids.push(ParamId::PostAttentionLayernorm(i));
            }
            if layer.self_attn.q_norm.as_ref().is_some_and(|n| n.train) {
                ids.push(ParamId::QNorm(i));
            }
            if layer.self_attn.k_norm.as_ref().is_some_and(|n| n.train) {
                ids.push(ParamId::KNorm(i));
            }
            for p in Proj::ALL {
                let l = layer.linear(p);
                if l.train_weight && matches!(l.weight, BaseWeight::Dense { .. }) {
                    ids.push(ParamId::Weight(i, p));
                }
                if l.train_bias && l.bias.is_some() {
                    ids.push(ParamId::Bias(i, p));
                }
                if let Some(a) = &l.adapter {
                    ids.extend(a.params().iter().map(|&ap| ParamId::Adapter(i, p, ap)));
                }
            }
        }
        if self.norm.train {
            ids.push(ParamId::Norm);
        }
        if !tied && self.train_lm_head && matches!(self.lm_head, Some(BaseWeight::Dense { .. })) {
            ids.push(ParamId::LmHead);
        }
        ids
    }

    fn embed_is_dense(&self) -> bool {
        matches!(self.embed_tokens, BaseWeight::Dense { .. })
    }

    /// The tensor `id` names.
    ///
    /// # Panics
    /// If the model has no such tensor (an id not from [`trainable`](Self::trainable)).
    #[track_caller]
    pub fn param(&self, id: ParamId) -> &[f32] {
        fn dense(w: &BaseWeight) -> Option<&[f32]> {
            match w {
                BaseWeight::Dense { w, .. } => Some(w),
                BaseWeight::DenseBf16 { .. } | BaseWeight::Quant(_) => None,
            }
        }
        let t = match id {
            ParamId::EmbedTokens => dense(&self.embed_tokens),
            ParamId::InputLayernorm(i) => Some(&self.layers[i].input_layernorm.weight[..]),
            ParamId::PostAttentionLayernorm(i) => {
                Some(&self.layers[i].post_attention_layernorm.weight[..])
            }
            ParamId::QNorm(i) => self.layers[i]
                .self_attn
                .q_norm
                .as_ref()
                .map(|n| &n.weight[..]),
            ParamId::KNorm(i) => self.layers[i]
                .self_attn
                .k_norm
                .as_ref()
                .map(|n| &n.weight[..]),
            ParamId::Weight(i, p) => dense(&self.layers[i].linear(p).weight),
            ParamId::Bias(i, p) => self.layers[i].linear(p).bias.as_deref(),
            ParamId::Adapter(i, p, a) => {
                let ad = self.layers[i].linear(p).adapter.as_ref();
                ad.and_then(|ad| ad.param(a))
            }
            ParamId::Norm => Some(&self.norm.weight[..]),
            ParamId::LmHead => self.lm_head.as_ref().and_then(dense),
        };
        t.unwrap_or_else(|| panic!("the model has no tensor {}", id.key()))
    }

    /// The tensor `id` names, to change (an adapter's cached values are dropped first).
    ///
    /// # Panics
    /// If the model has no such tensor (an id not from [`trainable`](Self::trainable)).
    #[track_caller]
    pub fn param_mut(&mut self, id: ParamId) -> &mut [f32] {
        fn dense(w: &mut BaseWeight) -> Option<&mut [f32]> {
            match w {
                BaseWeight::Dense { w, .. } => Some(w),
                BaseWeight::DenseBf16 { .. } | BaseWeight::Quant(_) => None,
            }
        }
        let t = match id {
            ParamId::EmbedTokens => dense(&mut self.embed_tokens),
            ParamId::InputLayernorm(i) => Some(&mut self.layers[i].input_layernorm.weight[..]),
            ParamId::PostAttentionLayernorm(i) => {
                Some(&mut self.layers[i].post_attention_layernorm.weight[..])
            }
            ParamId::QNorm(i) => {
                let n = self.layers[i].self_attn.q_norm.as_mut();
                n.map(|n| &mut n.weight[..])
            }
            ParamId::KNorm(i) => {
                let n = self.layers[i].self_attn.k_norm.as_mut();
                n.map(|n| &mut n.weight[..])
            }
            ParamId::Weight(i, p) => dense(&mut self.layers[i].linear_mut(p).weight),
            ParamId::Bias(i, p) => self.layers[i].linear_mut(p).bias.as_deref_mut(),
            ParamId::Adapter(i, p, a) => {
                let ad = self.layers[i].linear_mut(p).adapter.as_mut();
                ad.and_then(|ad| ad.param_mut(a))
            }
            ParamId::Norm => Some(&mut self.norm.weight[..]),
            ParamId::LmHead => self.lm_head.as_mut().and_then(dense),
        };
        t.unwrap_or_else(|| panic!("the model has no tensor {}", id.key()))
    }

    /// (trainable, all) parameter counts, 4-bit weights at their logical size (as PEFT's
    /// `print_trainable_parameters`).
    pub fn parameter_counts(&self) -> (usize, usize) {
        let trainable = self
            .trainable()
            .iter()
            .map(|&id| self.param(id).len())
            .sum();
        let size = |w: &BaseWeight| w.out_features() * w.in_features();
        let mut all = size(&self.embed_tokens) + self.lm_head.as_ref().map_or(0, size);
        all += self.norm.weight.len();
        for layer in &self.layers {
            all += layer.input_layernorm.weight.len() + layer.post_attention_layernorm.weight.len();
            let qk = [&layer.self_attn.q_norm, &layer.self_attn.k_norm];
            all += qk
                .iter()
                .flat_map(|n| n.iter())
                .map(|n| n.weight.len())
                .sum::<usize>();
            for p in Proj::ALL {
                let l = layer.linear(p);
                all += size(&l.weight) + l.bias.as_ref().map_or(0, Vec::len);
                all += l.adapter.as_ref().map_or(0, |a| a.num_params());
            }
        }
        (trainable, all)
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_summary(&self) -> String {
        let (t, a) = self.parameter_counts();
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(t),
            thousands(a),
            100.0 * t as f64 / a.max(1) as f64
        )
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
