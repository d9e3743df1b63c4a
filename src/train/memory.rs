//! [`MemoryEstimate`]: what a training run will hold, worked out before the first step so that
//! a run that cannot fit stops with the settings to change instead of being killed halfway.

use super::config::TrainConfig;
use crate::adapter::DoraDropout;
use crate::model::{loss, Llama};

/// A run's memory, in MiB, by what holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The base weights as stored (4-bit linears at their packed size).
    pub weights: f64,
    /// Trainable tensors, their gradients and AdamW's two moments (4 × 4 bytes a value).
    pub states: f64,
    /// Activations with activation checkpointing.
    pub activations_checkpointed: f64,
    /// Activations without.
    pub activations_full: f64,
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

impl MemoryEstimate {
    /// The estimate for training `model` with `cfg`.
    pub fn of(model: &Llama, cfg: &TrainConfig) -> Self {
        let (trainable, _) = model.parameter_counts();
        let c = &model.config;
        let weights = (model.embed_tokens.stored_bytes()
            + model.lm_head.as_ref().map_or(0, |h| h.stored_bytes())
            + model.linear_weight_bytes()) as f64;
        let states = trainable as f64 * 4.0 * 4.0; // param + grad + m + v
        let n = (cfg.batch_size * cfg.seq_len) as f64;
        let (d, f) = (c.hidden_size as f64, c.intermediate_size as f64);
        let q = (c.num_attention_heads * c.head_dim) as f64;
        let kv = (c.num_key_value_heads * c.head_dim) as f64;
        // attention keeps its probabilities; with checkpointing the last block keeps two softmax
        // statistics per probability row instead, and a recomputed block its probabilities
        let rows = (cfg.batch_size * c.num_attention_heads * cfg.seq_len) as f64;
        let (probs, stats) = (rows * cfg.seq_len as f64, rows * 2.0);
        // DoRA keeps each adapted layer's pre-scale output `z` for the magnitude's gradient
        // (dropout masks are regenerated from a seed, never stored); where the output is
        // exactly `k⊙z` (no dropout on the base path), the MLP rebuilds gate/up outputs from it
        // instead of keeping them.
        let dora_z = if cfg.mode.dora() {
            n * (q + 2.0 * kv + 2.0 * d + 2.0 * f)
        } else {
            0.0
        };
        let factors = cfg.mode.dora()
            && (cfg.dora_dropout == DoraDropout::LoraOnly || cfg.lora_dropout == 0.0);
        let mlp_kept = if factors { 0.0 } else { 2.0 * n * f };
        // saved activations take 2 bytes a value where the blocks compute in bf16 (q, k, the
        // softmax statistics and checkpointed inputs stay f32)
        let kept_bytes = match model.layers.first().map(|l| l.compute_dtype().is_bf16()) {
            Some(true) => 2.0,
            _ => 4.0,
        };
        let per_block =
            kept_bytes * (5.0 * n * d + n * (q + kv) + mlp_kept + dora_z) + 4.0 * n * (q + kv);
        let (block_full, block_lean) = (per_block + kept_bytes * probs, per_block + 4.0 * stats);
        let layers = c.num_hidden_layers as f64;
        // one chunk of logits (the head forms them `CHUNK_ROWS` positions at a time, or
        // `LEAN_CHUNK_ROWS` with checkpointing)
        let head = |rows: usize| 4.0 * (rows as f64 * c.vocab_size as f64 + 2.0 * n * d);
        let full = block_full * layers + head(loss::CHUNK_ROWS);
        let ckpt = 4.0 * n * d * layers + block_lean + block_full + head(loss::LEAN_CHUNK_ROWS);
        MemoryEstimate {
            weights: mib(weights),
            states: mib(states),
            activations_checkpointed: mib(ckpt),
            activations_full: mib(full),
        }
    }

    /// The activations of a run with or without checkpointing.
    pub fn activations(&self, checkpointing: bool) -> f64 {
        if checkpointing {
            self.activations_checkpointed
        } else {
            self.activations_full
        }
    }

    /// Everything a run with or without checkpointing holds.
    pub fn total(&self, checkpointing: bool) -> f64 {
        self.weights + self.states + self.activations(checkpointing)
    }

    /// The one-line summary printed before the first step.
    pub fn describe(&self, checkpointing: bool) -> String {
        let act = self.activations(checkpointing);
        let how = if checkpointing {
            "with checkpointing".to_string()
        } else {
            format!(
                "without checkpointing; {:.0} MiB with",
                self.activations_checkpointed
            )
        };
        format!(
            "memory estimate: weights {:.0} MiB + trainable/grads/AdamW {:.0} MiB + activations {act:.0} MiB ({how}) = {:.0} MiB",
            self.weights,
            self.states,
            self.total(checkpointing)
        )
    }
}
