//! Random-initialised models from a config (benchmark presets), with 4-bit linears quantized one
//! tensor at a time so a 7B-shaped model never exists in f32.

use half::bf16;
use rayon::prelude::*;

use super::config::LlamaConfig;
use super::layers::{Attention, Block, Linear, Mlp, RmsNorm};
use super::llama::Llama;
use crate::adapter::BaseWeight;
use crate::ops::bf16::ComputeDtype;
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

/// `n` values uniform in ±std·√3 (std `std`), each chunk of 2¹⁶ from its own fork of `rng`
/// (the same values whatever the thread count), stored as `as_t` makes them.
fn fill_as<T: Copy + Default + Send>(n: usize, std: f32, rng: &Rng, as_t: fn(f32) -> T) -> Vec<T> {
    let a = std * 3f32.sqrt();
    let mut v = vec![T::default(); n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r = rng.fork(i as u64);
        for x in c.iter_mut() {
            *x = as_t((r.uniform() * 2.0 - 1.0) * a);
        }
    });
    v
}

fn fill(n: usize, std: f32, rng: &Rng) -> Vec<f32> {
    fill_as(n, std, rng, |x| x)
}

/// A dense `out × in` weight of [`fill`]'s values, held for `compute` (bf16: rounded as made).
fn dense(out: usize, inp: usize, rng: &Rng, compute: ComputeDtype) -> BaseWeight {
    if compute.is_bf16() {
        BaseWeight::DenseBf16 {
            w: fill_as(out * inp, 0.02, rng, bf16::from_f32),
            out,
            inp,
        }
    } else {
        BaseWeight::Dense {
            w: fill(out * inp, 0.02, rng),
            out,
            inp,
        }
    }
}

/// A model with random weights (std 0.02, norms 1); `quantize` stores decoder linears 4-bit;
/// `compute` is what the weights compute in (bf16: dense weights made in bf16, the same values
/// as [`Llama::set_compute_dtype`] on an f32 model gives, without the f32 model ever existing).
///
/// # Panics
/// Never for valid configs (quantization settings are checked by the caller).
pub fn random_model(
    config: LlamaConfig,
    quantize: Option<QuantizeOptions>,
    seed: u64,
    compute: ComputeDtype,
) -> Llama {
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
        let rng = next();
        let mut weight = match quantize {
            Some(o) => BaseWeight::Quant(
                QuantizedWeight::quantize(&fill(out * inp, 0.02, &rng), &[out, inp], Dtype::F32, o)
                    .expect("valid quantization options"),
            ),
            None => dense(out, inp, &rng, compute),
        };
        weight.set_compute_dtype(compute);
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
    let embed = dense(v, d, &next(), compute);
    let head = dense(v, d, &next(), compute);
    let norm = RmsNorm::new(vec![1.0; d], c.rms_norm_eps);
    Llama::assemble(config, embed, layers, norm, Some(head), 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proj;

    /// A model made for bf16 holds exactly what an f32 model converted to bf16 holds, dense
    /// or 4-bit, so a benchmark's bf16 run starts from the same weights as its f32 run.
    #[test]
    fn a_bf16_model_is_the_f32_model_rounded() {
        let c = preset("llama-tiny-512").unwrap();
        for q in [None, Some(QuantizeOptions::default())] {
            let mut want = random_model(c.clone(), q, 3, ComputeDtype::F32);
            want.set_compute_dtype(ComputeDtype::Bf16);
            let got = random_model(c.clone(), q, 3, ComputeDtype::Bf16);
            assert_eq!(got.compute_dtype(), ComputeDtype::Bf16);
            let pairs = [
                (&got.embed_tokens, &want.embed_tokens),
                (got.head(), want.head()),
                (
                    &got.layers[1].linear(Proj::DownProj).weight,
                    &want.layers[1].linear(Proj::DownProj).weight,
                ),
            ];
            for (g, w) in pairs {
                assert_eq!(g.compute_dtype(), w.compute_dtype());
                assert_eq!(g.to_f32(), w.to_f32());
            }
        }
    }

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
