//! [`LlamaConfig`]: the fields of a Hugging Face `config.json` that the Llama family
//! (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) needs,
//! with transformers' defaults, v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`)
//! RoPE settings, and a clear error naming the field for anything wrong or unsupported. The
//! file is deserialized with serde (the field path of a type error from `serde_path_to_error`),
//! then validated.

use std::path::Path;

use serde::Deserialize;
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

/// `config.json` as written, before validation: the fields qdora reads, in the types
/// transformers writes them. Unknown fields are ignored (kept in [`LlamaConfig::raw`]).
#[derive(Debug, Deserialize)]
struct ConfigFile {
    hidden_size: u64,
    intermediate_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    #[serde(default)]
    num_key_value_heads: Option<u64>,
    #[serde(default)]
    head_dim: Option<u64>,
    vocab_size: u64,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers v5.
    #[serde(default)]
    rope_parameters: Option<Value>,
    /// transformers v4.
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    max_position_embeddings: Option<u64>,
    #[serde(default)]
    sliding_window: Option<u64>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<TokenIds>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    pretraining_tp: Option<u64>,
}

/// A token id field: one id or a list (`eos_token_id`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// RoPE settings: transformers v5's `rope_parameters` or v4's `rope_scaling` (plus the
/// top-level `rope_theta`).
#[derive(Debug, Default, Deserialize)]
struct RopeParams {
    #[serde(default)]
    rope_type: Option<String>,
    /// v4's older name of `rope_type`.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default)]
    low_freq_factor: Option<f64>,
    #[serde(default)]
    high_freq_factor: Option<f64>,
    #[serde(default)]
    original_max_position_embeddings: Option<f64>,
}

/// The fields every config must give.
const REQUIRED: [&str; 5] = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
];

/// Which model a config describes: `architectures[0]`, else `model_type`.
#[derive(Debug, Deserialize)]
struct Architecture {
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    model_type: Option<String>,
}

impl Architecture {
    /// The family and the architecture's class name; unknown ones are errors.
    fn resolve(&self, err: &dyn Fn(&str, String) -> Error) -> Result<(Arch, String)> {
        let architecture = match self.architectures.as_ref().and_then(|a| a.first()) {
            Some(a) => a.clone(),
            None => {
                let mt = self
                    .model_type
                    .as_deref()
                    .ok_or_else(|| err("architectures", "missing (and no model_type)".into()))?;
                let (_, class) = MODEL_TYPES.iter().find(|(t, _)| *t == mt).ok_or_else(|| {
                    err(
                        "model_type",
                        format!(
                            "{mt} is not supported (supported: {})",
                            MODEL_TYPES.map(|(t, _)| t).join(", ")
                        ),
                    )
                })?;
                class.to_string()
            }
        };
        let arch = match architecture.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(err(
                    "architectures",
                    format!(
                        "{other} is not supported (supported: {})",
                        MODEL_TYPES.map(|(_, c)| c).join(", ")
                    ),
                ))
            }
        };
        Ok((arch, architecture))
    }
}

/// `model_type` → the architecture's class name, for configs without `architectures`.
const MODEL_TYPES: [(&str, &str); 4] = [
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
];

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

    /// Parses config JSON text (deserialized, then validated); `path` names the file in
    /// errors.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field: a missing field, a wrong type, an unsupported
    /// architecture, model type or option, values that do not fit together.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let err = |field: &str, msg: String| Error::Config {
            path: path.to_string(),
            field: field.to_string(),
            msg,
        };
        let raw: Value =
            serde_json::from_str(text).map_err(|e| err("<file>", format!("invalid JSON: {e}")))?;
        let obj = raw
            .as_object()
            .ok_or_else(|| err("<file>", "not a JSON object".into()))?;
        // The architecture first: a model qdora cannot run is named as such, whatever else
        // its config holds.
        let head: Architecture = serde_path_to_error::deserialize(&raw)
            .map_err(|e| err(&e.path().to_string(), e.into_inner().to_string()))?;
        let (arch, architecture) = head.resolve(&err)?;
        let missing: Vec<&str> = REQUIRED
            .into_iter()
            .filter(|k| obj.get(*k).is_none_or(Value::is_null))
            .collect();
        if !missing.is_empty() {
            return Err(err(&missing.join(", "), "missing".into()));
        }
        let f: ConfigFile = serde_path_to_error::deserialize(&raw).map_err(|e| {
            let field = e.path().to_string();
            let msg = e.into_inner().to_string();
            // a missing field is reported at the top level: name it from the message
            match msg
                .split('`')
                .nth(1)
                .filter(|_| msg.starts_with("missing field"))
            {
                Some(missing) => err(missing, "missing".into()),
                None => err(&field, msg),
            }
        })?;
        Self::validate(f, (arch, architecture), raw, &err)
    }

    /// Checks what the types alone cannot, applies transformers' defaults, and resolves the
    /// architecture and RoPE settings.
    fn validate(
        f: ConfigFile,
        (arch, architecture): (Arch, String),
        raw: Value,
        err: &dyn Fn(&str, String) -> Error,
    ) -> Result<Self> {
        let positive = |k: &str, v: u64| -> Result<usize> {
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| err(k, format!("expected a positive integer, found {v}")))
        };
        let opt_positive = |k: &str, v: Option<u64>| -> Result<Option<usize>> {
            v.map(|v| positive(k, v)).transpose()
        };
        let hidden_size = positive("hidden_size", f.hidden_size)?;
        let num_attention_heads = positive("num_attention_heads", f.num_attention_heads)?;
        let num_key_value_heads = opt_positive("num_key_value_heads", f.num_key_value_heads)?
            .unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match opt_positive("head_dim", f.head_dim)? {
            Some(h) => h,
            None if hidden_size % num_attention_heads != 0 => {
                return Err(err(
                    "hidden_size",
                    format!("{hidden_size} is not divisible by num_attention_heads {num_attention_heads} and head_dim is not given"),
                ))
            }
            None => hidden_size / num_attention_heads,
        };
        if head_dim % 2 != 0 {
            return Err(err("head_dim", format!("{head_dim} must be even for RoPE")));
        }
        if let Some(act) = f.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(err(
                "hidden_act",
                format!("{act} is not supported (only silu)"),
            ));
        }
        if let Some(tp) = f.pretraining_tp.filter(|&tp| tp != 1) {
            return Err(err(
                "pretraining_tp",
                format!("{tp} is not supported (only 1)"),
            ));
        }
        // RoPE: v5 `rope_parameters`, else v4 `rope_theta` + `rope_scaling`.
        let (rope_field, rope) = match (&f.rope_parameters, &f.rope_scaling) {
            (Some(p @ Value::Object(_)), _) => ("rope_parameters", Some(p)),
            (_, Some(p @ Value::Object(_))) => ("rope_scaling", Some(p)),
            _ => ("rope_parameters", None),
        };
        let rope: RopeParams = match rope {
            Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
                err(
                    &format!("{rope_field}.{}", e.path()),
                    e.into_inner().to_string(),
                )
            })?,
            None => RopeParams::default(),
        };
        let rope_theta = rope.rope_theta.or(f.rope_theta).unwrap_or(10000.0) as f32;
        let need = |k: &str, v: Option<f64>| -> Result<f32> {
            v.map(|v| v as f32).ok_or_else(|| {
                err(
                    &format!("rope_parameters.{k}"),
                    "missing or not a number".into(),
                )
            })
        };
        let rope_scaling = match rope.rope_type.or(rope.kind).as_deref().unwrap_or("default") {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: need("factor", rope.factor)?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor", rope.factor)?,
                low_freq_factor: need("low_freq_factor", rope.low_freq_factor)?,
                high_freq_factor: need("high_freq_factor", rope.high_freq_factor)?,
                original_max_position_embeddings: need(
                    "original_max_position_embeddings",
                    rope.original_max_position_embeddings,
                )?,
            },
            other => {
                return Err(err(
                    "rope_parameters.rope_type",
                    format!("{other} is not supported (supported: default, linear, llama3)"),
                ))
            }
        };
        let sliding_window = if arch == Arch::Mistral {
            opt_positive("sliding_window", f.sliding_window)?
        } else if f.use_sliding_window == Some(true) {
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
            intermediate_size: positive("intermediate_size", f.intermediate_size)?,
            num_hidden_layers: positive("num_hidden_layers", f.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: positive("vocab_size", f.vocab_size)?,
            rms_norm_eps: f.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.tie_word_embeddings.unwrap_or(false),
            attention_bias: f.attention_bias.unwrap_or(arch == Arch::Qwen2),
            mlp_bias: f.mlp_bias.unwrap_or(false),
            max_position_embeddings: opt_positive(
                "max_position_embeddings",
                f.max_position_embeddings,
            )?
            .unwrap_or(2048),
            sliding_window,
            bos_token_id: f.bos_token_id.and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: f.eos_token_id.map(|t| t.to_vec()).unwrap_or_default(),
            raw,
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
    fn model_type_without_architectures_must_be_known() {
        let base = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
            "num_attention_heads":4,"vocab_size":10"#;
        let c = LlamaConfig::from_json(&format!(r#"{{"model_type":"qwen2",{base}}}"#), "c")
            .expect("qwen2 is known");
        assert_eq!(c.arch, Arch::Qwen2);
        let e = LlamaConfig::from_json(&format!(r#"{{"model_type":"gpt_neox",{base}}}"#), "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type") && e.contains("gpt_neox"), "{e}");
        let e = LlamaConfig::from_json(&format!("{{{base}}}"), "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("architectures"), "{e}");
    }

    #[test]
    fn a_wrong_type_or_value_names_its_field() {
        let with = |extra: &str| {
            LlamaConfig::from_json(
                &format!(
                    r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
                    "num_hidden_layers":1,"num_attention_heads":4,"vocab_size":10{extra}}}"#
                ),
                "c.json",
            )
        };
        for (extra, field) in [
            (r#","rms_norm_eps":"tiny""#, "rms_norm_eps"),
            (r#","num_key_value_heads":0"#, "num_key_value_heads"),
            (
                r#","rope_scaling":{"rope_type":"llama3","factor":"8"}"#,
                "rope_scaling.factor",
            ),
            (r#","rope_parameters":{"rope_type":"yarn"}"#, "rope_type"),
            (r#","hidden_act":"gelu""#, "hidden_act"),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains("c.json") && e.contains(field), "{extra}: {e}");
        }
        let c = with(r#","eos_token_id":[2,7],"bos_token_id":null,"sliding_window":null"#)
            .expect("valid");
        assert_eq!((c.eos_token_ids, c.bos_token_id), (vec![2, 7], None));
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
