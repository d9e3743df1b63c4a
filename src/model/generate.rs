//! Token generation with a KV cache: greedy (temperature 0) or sampling with temperature,
//! top-k and top-p, streaming each new token to a callback.

use super::error::Result;
use super::llama::Llama;
use crate::ops::Rng;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Stop when one of these is produced.
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
        }
    }
}

/// Picks the next token from logits.
pub fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut Rng) -> u32 {
    if opts.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    let mx = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - mx) / opts.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p as f64 {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let u = rng.uniform() as f64;
    let mut acc = 0.0;
    for (k, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[k] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// Generates after `prompt`, calling `on_token` for each new id; returns the new ids.
///
/// # Errors
/// Bad ids or a context beyond the model's maximum.
pub fn generate(
    model: &mut Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut rng = Rng::new(opts.seed);
    let mut logits = model.forward_cached(prompt, &mut cache)?;
    let mut out = Vec::new();
    let room = model
        .config
        .max_position_embeddings
        .saturating_sub(prompt.len());
    for _ in 0..opts.max_new_tokens.min(room) {
        let next = sample(&logits, opts, &mut rng);
        if opts.stop_ids.contains(&next) {
            break;
        }
        out.push(next);
        on_token(next);
        if out.len() == opts.max_new_tokens.min(room) {
            break;
        }
        logits = model.forward_cached(&[next], &mut cache)?;
    }
    Ok(out)
}
