//! [`LlamaConfig`]: the fields of a Hugging Face `config.json` that the Llama family
//! (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) needs,
//! with transformers' defaults, v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`)
//! RoPE settings, and a clear error for anything unsupported.

use std::path::Path;

use serde_json::Value;

use super::error::{Error, Result};

/// The architecture family, from `architectures[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3/3.x.
    Llama,
    /// Mistral (Llama layout, optional sliding window).
    Mistral,
    /// Qwen2: q/k/v biases.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k.
    Qwen3,
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// Scaling factor.
        factor: f32,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// Context length of the original model.
        original_max_position_embeddings: f32,
    },
}

/// A Llama-family model configuration.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Architecture family.
    pub arch: Arch,
    /// The `architectures[0]` string.
    pub architecture: String,
    /// D.
    pub hidden_size: usize,
    /// F.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// H.
    pub num_attention_heads: usize,
    /// Hkv.
    pub num_key_value_heads: usize,
    /// Dh.
    pub head_dim: usize,
    /// V.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// lm_head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o (Llama `attention_bias`); Qwen2 has q/k/v bias only.
    pub attention_bias: bool,
    /// Bias on gate/up/down.
    pub mlp_bias: bool,
    /// Maximum positions.
    pub max_position_embeddings: usize,
    /// Mistral sliding window (None = full causal attention).
    pub sliding_window: Option<usize>,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids.
    pub eos_token_ids: Vec<u32>,
    /// The raw JSON (kept to write it back, e.g. with a quantization_config).
    pub raw: Value,
}

impl LlamaConfig {
    /// Reads `<dir>/config.json`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file and key.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| crate::io::Error::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses config JSON text; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::Config`].
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let err = |field: &str, msg: String| Error::Config {
            path: path.to_string(),
            field: field.to_string(),
            msg,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err("<file>", format!("invalid JSON: {e}")))?;
        let architecture = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(String::from)
            .or_else(|| {
                v.get("model_type")
                    .and_then(|m| m.as_str())
                    .map(|m| match m {
                        "mistral" => "MistralForCausalLM".to_string(),
                        "qwen2" => "Qwen2ForCausalLM".to_string(),
                        "qwen3" => "Qwen3ForCausalLM".to_string(),
                        _ => "LlamaForCausalLM".to_string(),
                    })
            })
            .ok_or_else(|| err("architectures", "missing (and no model_type)".into()))?;
        let arch = match architecture.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(err(
                    "architectures",
                    format!(
                        "{other} is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
                    ),
                ))
            }
        };
        let usize_field = |k: &str| -> Result<usize> {
            v.get(k)
                .ok_or_else(|| err(k, "missing".into()))?
                .as_u64()
                .filter(|&x| x > 0)
                .map(|x| x as usize)
                .ok_or_else(|| err(k, format!("expected a positive integer, found {}", v[k])))
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| err(k, format!("expected a positive integer, found {x}"))),
            }
        };
        let f32_field = |k: &str, default: f32| -> Result<f32> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| err(k, format!("expected a number, found {x}"))),
            }
        };
        let bool_field = |k: &str, default: bool| -> Result<bool> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| err(k, format!("expected true/false, found {x}"))),
            }
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match opt_usize("head_dim")? {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(err(
                        "hidden_size",
                        format!("{hidden_size} is not divisible by num_attention_heads {num_attention_heads} and head_dim is not given"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(err("head_dim", format!("{head_dim} must be even for RoPE")));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(err(
                    "hidden_act",
                    format!("{act} is not supported (only silu)"),
                ));
            }
        }
        if let Some(tp) = v.get("pretraining_tp").and_then(|a| a.as_u64()) {
            if tp != 1 {
                return Err(err(
                    "pretraining_tp",
                    format!("{tp} is not supported (only 1)"),
                ));
            }
        }
        // RoPE: v5 `rope_parameters`, else v4 `rope_theta` + `rope_scaling`.
        let rope = v
            .get("rope_parameters")
            .filter(|r| r.is_object())
            .or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .map(|t| t as f32)
            .unwrap_or(f32_field("rope_theta", 10000.0)?);
        let rope_scaling = match rope {
            None => RopeScaling::Default,
            Some(r) => {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                let f = |k: &str| -> Result<f32> {
                    r.get(k)
                        .and_then(|x| x.as_f64())
                        .map(|x| x as f32)
                        .ok_or_else(|| {
                            err(
                                &format!("rope_parameters.{k}"),
                                "missing or not a number".into(),
                            )
                        })
                };
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear {
                        factor: f("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(err(
                            "rope_parameters.rope_type",
                            format!(
                                "{other} is not supported (supported: default, linear, llama3)"
                            ),
                        ))
                    }
                }
            }
        };
        let default_bias = arch == Arch::Qwen2;
        let eos_token_ids = token_ids(v.get("eos_token_id"));
        let sliding_window = if arch == Arch::Mistral {
            opt_usize("sliding_window")?
        } else if bool_field("use_sliding_window", false)? {
            return Err(err(
                "use_sliding_window",
                "sliding-window attention is only supported for Mistral".into(),
            ));
        } else {
            None
        };
        Ok(Self {
            arch,
            architecture,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: f32_field("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: bool_field("tie_word_embeddings", false)?,
            attention_bias: bool_field("attention_bias", default_bias)?,
            mlp_bias: bool_field("mlp_bias", false)?,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(2048),
            sliding_window,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
            eos_token_ids,
            raw: v,
        })
    }

    /// Whether q/k/v carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2 || self.attention_bias
    }

    /// Whether o_proj carries a bias (Llama `attention_bias`; never for Qwen2).
    pub fn o_bias(&self) -> bool {
        self.arch != Arch::Qwen2 && self.attention_bias
    }

    /// Number of parameters in all matmuls of one forward (decoder linears and the LM head).
    pub fn matmul_params(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size;
        per_layer * self.num_hidden_layers + d * self.vocab_size
    }
}

/// Token ids given as one integer or a list (`eos_token_id` in config.json and
/// generation_config.json); anything else gives none.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_architecture_is_named() {
        let e = LlamaConfig::from_json(r#"{"architectures": ["GPT2LMHeadModel"]}"#, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.json") && e.contains("GPT2LMHeadModel"), "{e}");
    }

    #[test]
    fn v4_rope_scaling_llama3_parses() {
        let c = LlamaConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4,"vocab_size":10,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
            "c",
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn missing_field_is_named() {
        let e = LlamaConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64}"#,
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
    }
}
