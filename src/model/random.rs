//! Random-initialised models from a config (benchmark presets), with 4-bit linears quantized one
//! tensor at a time so a 7B-shaped model never exists in f32.

use rayon::prelude::*;

use super::config::LlamaConfig;
use super::layers::{Attention, Block, Linear, Mlp, RmsNorm};
use super::llama::Llama;
use crate::adapter::BaseWeight;
use crate::ops::Rng;
use crate::quant::{Dtype, QuantizeOptions, QuantizedWeight};

/// Names [`preset`] knows.
pub const PRESETS: [&str; 4] = [
    "llama-tiny-512",
    "llama-small-1024",
    "llama-1024-8l",
    "llama2-7b",
];

/// Named shapes used by benchmarks.
pub fn preset(name: &str) -> Option<LlamaConfig> {
    let (d, f, l, h, kv, v) = match name {
        "llama-tiny-512" => (512, 1376, 8, 8, 8, 32000),
        "llama-small-1024" => (1024, 2816, 12, 16, 16, 32000),
        "llama-1024-8l" => (1024, 2816, 8, 16, 16, 32000),
        "llama2-7b" => (4096, 11008, 32, 32, 32, 32000),
        _ => return None,
    };
    let json = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{d},"intermediate_size":{f},"num_hidden_layers":{l},
        "num_attention_heads":{h},"num_key_value_heads":{kv},"vocab_size":{v},"rms_norm_eps":1e-5,
        "max_position_embeddings":4096,"tie_word_embeddings":false,"rope_theta":10000.0,"bos_token_id":1,"eos_token_id":2}}"#
    );
    LlamaConfig::from_json(&json, name).ok()
}

/// Uniform values with standard deviation `std` (fast; fine for speed benchmarks).
fn fill(n: usize, std: f32, rng: &Rng) -> Vec<f32> {
    let a = std * 3f32.sqrt();
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r = rng.fork(i as u64);
        for x in c.iter_mut() {
            *x = (r.uniform() * 2.0 - 1.0) * a;
        }
    });
    v
}

/// A model with random weights (std 0.02, norms 1); `quantize` stores decoder linears 4-bit.
///
/// # Panics
/// Never for valid configs (quantization settings are checked by the caller).
pub fn random_model(config: LlamaConfig, quantize: Option<QuantizeOptions>, seed: u64) -> Llama {
    let c = &config;
    let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let root = Rng::new(seed);
    let mut k = 0u64;
    let mut next = || {
        k += 1;
        root.fork(k)
    };
    let mut lin = |out: usize, inp: usize| {
        let w = fill(out * inp, 0.02, &next());
        let weight = match quantize {
            Some(o) => BaseWeight::Quant(
                QuantizedWeight::quantize(&w, &[out, inp], Dtype::F32, o)
                    .expect("valid quantization options"),
            ),
            None => BaseWeight::Dense { w, out, inp },
        };
        Linear::new(weight, None)
    };
    let mut layers = Vec::new();
    for _ in 0..c.num_hidden_layers {
        layers.push(Block {
            input_layernorm: RmsNorm::new(vec![1.0; d], c.rms_norm_eps),
            self_attn: Attention {
                q_proj: lin(q, d),
                k_proj: lin(kv, d),
                v_proj: lin(kv, d),
                o_proj: lin(d, q),
                q_norm: None,
                k_norm: None,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                sliding_window: None,
            },
            post_attention_layernorm: RmsNorm::new(vec![1.0; d], c.rms_norm_eps),
            mlp: Mlp {
                gate_proj: lin(f, d),
                up_proj: lin(f, d),
                down_proj: lin(d, f),
            },
        });
    }
    let embed = fill(v * d, 0.02, &next());
    let head = fill(v * d, 0.02, &next());
    let norm = RmsNorm::new(vec![1.0; d], c.rms_norm_eps);
    Llama::assemble(config, embed, layers, norm, Some(head), 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed preset has the shape its name promises, and its matmul parameter count
    /// (the N of MFU) is the one benchmarks report.
    #[test]
    fn every_listed_preset_has_its_shape() {
        for (name, (d, f, layers, heads, n)) in PRESETS.iter().zip([
            (
                512,
                1376,
                8,
                8,
                8 * (4 * 512 * 512 + 3 * 512 * 1376) + 512 * 32000,
            ),
            (1024, 2816, 12, 16, 186_908_672),
            (
                1024,
                2816,
                8,
                16,
                8 * (4 * 1024 * 1024 + 3 * 1024 * 2816) + 1024 * 32000,
            ),
            (4096, 11008, 32, 32, 6_607_077_376),
        ]) {
            let c = preset(name).unwrap_or_else(|| panic!("{name}"));
            let got = (
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads,
            );
            assert_eq!(got, (d, f, layers, heads), "{name}");
            assert_eq!(
                (c.num_key_value_heads, c.head_dim),
                (heads, d / heads),
                "{name}"
            );
            assert_eq!(
                (c.vocab_size, c.tie_word_embeddings),
                (32000, false),
                "{name}"
            );
            assert_eq!(c.matmul_params(), n, "{name}");
        }
        assert!(preset("stories260K").is_none());
    }
}
