//! llama.cpp's names for what a Llama-family model holds: architecture strings, hyperparameter
//! keys, tensor names, and the layout changes its converter makes (q/k row permutation for the
//! `llama` architecture, Llama 3 RoPE scaling as per-frequency factors).

use crate::gguf::Value;
use crate::model::config::RopeScaling;
use crate::model::{Arch, LlamaConfig, Proj};

/// `general.architecture`: Mistral runs as `llama` in llama.cpp.
pub(super) fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    }
}

/// The head count by which a projection's rows are permuted for llama.cpp, if they are: its RoPE
/// for `llama` is the interleaved (GPT-J) form, so its converter permutes q and k rows out of
/// Hugging Face's rotate-half order. Qwen runs NeoX RoPE, Hugging Face's own order.
pub(super) fn rope_permute_heads(c: &LlamaConfig, p: Proj) -> Option<usize> {
    match (c.arch, p) {
        (Arch::Llama | Arch::Mistral, Proj::QProj) => Some(c.num_attention_heads),
        (Arch::Llama | Arch::Mistral, Proj::KProj) => Some(c.num_key_value_heads),
        _ => None,
    }
}

/// The tensor name of a linear inside `blk.N.`.
pub(super) fn tensor_base(p: Proj) -> &'static str {
    match p {
        Proj::QProj => "attn_q",
        Proj::KProj => "attn_k",
        Proj::VProj => "attn_v",
        Proj::OProj => "attn_output",
        Proj::GateProj => "ffn_gate",
        Proj::UpProj => "ffn_up",
        Proj::DownProj => "ffn_down",
    }
}

/// Rows of a q or k projection (or its bias) reordered per head from rotate-half pairs
/// `(j, j + Dh/2)` to interleaved pairs `(2j, 2j + 1)`: within each head, output row
/// `2j + k` takes input row `k·Dh/2 + j` (the converter's `reshape(h, 2, Dh/2, …)
/// .swapaxes(1, 2)`).
pub(super) fn permute_rope_rows(x: &[f32], heads: usize, shape: &[usize]) -> Vec<f32> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let dh = rows / heads;
    let half = dh / 2;
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for j in 0..half {
            for k in 0..2 {
                let src = h * dh + k * half + j;
                let dst = h * dh + 2 * j + k;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&x[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3.1 RoPE scaling as llama.cpp takes it: one factor per frequency (`rope_freqs`),
/// computed in f32 as its converter does.
pub(super) fn llama3_rope_factors(c: &LlamaConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = c.rope_scaling
    else {
        return None;
    };
    let dim = c.head_dim;
    let low_wavelen = old / low_freq_factor;
    let high_wavelen = old / high_freq_factor;
    let factors = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / c.rope_theta.powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

/// `general.*` and the architecture's hyperparameters, in the converter's order.
pub(super) fn model_metadata(c: &LlamaConfig, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let arch = arch_name(c.arch);
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::Str(arch.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        (k("block_count"), u(c.num_hidden_layers)),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_attention_heads)),
        (k("attention.head_count_kv"), u(c.num_key_value_heads)),
    ];
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        m.push((k("rope.scaling.type"), Value::Str("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor)));
    }
    m.push((k("rope.freq_base"), Value::F32(c.rope_theta)));
    m.push((
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps),
    ));
    if c.raw.get("head_dim").is_some_and(|v| !v.is_null()) {
        m.push((k("attention.key_length"), u(c.head_dim)));
        m.push((k("attention.value_length"), u(c.head_dim)));
    }
    m.push(("general.file_type".into(), Value::U32(file_type)));
    if arch == "llama" {
        m.push((k("vocab_size"), u(c.vocab_size)));
        m.push((k("rope.dimension_count"), u(c.head_dim)));
    }
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_each_heads_halves() {
        // 2 heads of Dh 4, one column: rows [a0 a1 b0 b1 | c0 c1 d0 d1] (halves a|b, c|d)
        let x = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0];
        let y = permute_rope_rows(&x, 2, &[8]);
        assert_eq!(y, [0.0, 10.0, 1.0, 11.0, 20.0, 30.0, 21.0, 31.0]);
    }
}
