//! [`LoraConfig`]: PEFT's `adapter_config.json` (spec §1), read and written with every field PEFT
//! writes, unknown fields kept on round trip, and the module-matching rules of PEFT 0.21
//! (`target_modules`, `exclude_modules`, `layers_to_transform`, `rank_pattern`, `alpha_pattern`).

use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{Error, Result};

/// `target_modules`: a list of names (exact or `.name` suffix), a regex (full match), or
/// `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A list of module names or suffixes.
    List(Vec<String>),
    /// A regular expression matched against the whole module path (or `all-linear`).
    Regex(String),
}

/// `bias`: which biases are trained and saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias is trained.
    #[default]
    None,
    /// Every bias of the model is trained.
    All,
    /// Only the biases of targeted layers are trained.
    #[value(name = "lora_only")]
    LoraOnly,
}

/// How fresh adapter weights are initialised (`init_lora_weights`). In qdora's settings the
/// values are the strings `"true"`, `"gaussian"` and `"false"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
pub enum InitLoraWeights {
    /// `true`: A kaiming-uniform (U(±1/√in)), B = 0: the adapter starts as a no-op.
    #[default]
    #[serde(rename = "true")]
    #[value(name = "true")]
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B = 0.
    #[serde(rename = "gaussian")]
    Gaussian,
    /// `false`: A and B both random (nn.Linear default): not a no-op, for tests.
    #[serde(rename = "false")]
    #[value(name = "false")]
    Random,
}

impl InitLoraWeights {
    /// The value PEFT writes in `adapter_config.json` (`true`, `false` or `"gaussian"`).
    pub fn to_json(self) -> Value {
        match self {
            InitLoraWeights::Default => Value::Bool(true),
            InitLoraWeights::Random => Value::Bool(false),
            InitLoraWeights::Gaussian => Value::String("gaussian".into()),
        }
    }
}

/// PEFT's `LoraConfig`, field names as in `adapter_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Must be `"LORA"`.
    pub peft_type: String,
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Modules to adapt; `None` means PEFT's default for the model type.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Which biases train.
    #[serde(default)]
    pub bias: Bias,
    /// Scaling α/√r instead of α/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output row.
    #[serde(default)]
    pub use_dora: bool,
    /// `true`, `false` or a method name.
    #[serde(default = "default_init")]
    pub init_lora_weights: Value,
    /// Layer indices to adapt.
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    /// Name(s) of the layer list in module paths (e.g. `layers`).
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    /// Per-module rank overrides, `{pattern: r}`, first match wins.
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    /// Modules trained in full and saved (`embed_tokens`, `lm_head`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// True for (in, out) weights (GPT-2 Conv1D); never for Llama.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// The base model's name or path.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// `CAUSAL_LM` etc.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Set to true in saved files.
    #[serde(default)]
    pub inference_mode: bool,
    /// A bias on lora_B (not supported with DoRA; we support neither).
    #[serde(default)]
    pub lora_bias: bool,
    /// Every other field PEFT writes (kept verbatim on round trip).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_init() -> Value {
    Value::Bool(true)
}

/// Fields PEFT 0.21 writes that qdora does not interpret, with their defaults.
const PASSIVE_DEFAULTS: &[(&str, &str)] = &[
    ("alora_invocation_tokens", "null"),
    ("arrow_config", "null"),
    ("auto_mapping", "null"),
    ("corda_config", "null"),
    ("ensure_weight_tying", "false"),
    ("eva_config", "null"),
    ("kasa_config", "null"),
    ("layer_replication", "null"),
    ("loftq_config", "{}"),
    ("lora_ga_config", "null"),
    ("megatron_config", "null"),
    ("megatron_core", "\"megatron.core\""),
    ("monteclora_config", "null"),
    ("peft_version", "\"0.21.2\""),
    ("qalora_group_size", "16"),
    ("revision", "null"),
    ("target_parameters", "null"),
    ("trainable_token_indices", "null"),
    ("use_bdlora", "null"),
    ("use_qalora", "false"),
    ("velora_config", "null"),
];

impl Default for LoraConfig {
    fn default() -> Self {
        let mut extra = Map::new();
        for (k, v) in PASSIVE_DEFAULTS {
            extra.insert((*k).into(), serde_json::from_str(v).unwrap_or(Value::Null));
        }
        Self {
            peft_type: "LORA".into(),
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            bias: Bias::None,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: Value::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            modules_to_save: None,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            task_type: Some("CAUSAL_LM".into()),
            inference_mode: false,
            lora_bias: false,
            extra,
        }
    }
}

/// Rank, alpha and scaling resolved for one module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// Rank after `rank_pattern`.
    pub r: usize,
    /// Alpha after `alpha_pattern`.
    pub lora_alpha: f64,
    /// `alpha/r` or `alpha/√r`, as f32 (torch multiplies f32 tensors by it as f32).
    pub scaling: f32,
}

impl LoraConfig {
    /// Parses `adapter_config.json` text; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field for a missing/incorrect `peft_type`, a bad type, or an
    /// unsupported option (`fan_in_fan_out`, `lora_bias`, an unknown `init_lora_weights`).
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let cfg_err = |field: &str, msg: String| Error::Config {
            path: path.to_string(),
            field: field.to_string(),
            msg,
        };
        let v: Value = serde_json::from_str(text)
            .map_err(|e| cfg_err("<file>", format!("invalid JSON: {e}")))?;
        match v.get("peft_type") {
            Some(Value::String(s)) if s == "LORA" => {}
            Some(other) => {
                return Err(cfg_err(
                    "peft_type",
                    format!("expected \"LORA\", found {other}"),
                ))
            }
            None => return Err(cfg_err("peft_type", "missing".into())),
        }
        let cfg: LoraConfig = serde_json::from_value(v).map_err(|e| {
            let msg = e.to_string();
            let field = msg
                .split('`')
                .nth(1)
                .map(String::from)
                .unwrap_or_else(|| "<file>".into());
            cfg_err(&field, msg)
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads `<dir>/adapter_config.json`.
    ///
    /// # Errors
    /// As [`from_json`](Self::from_json), plus I/O errors naming the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| crate::io::Error::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Checks the values that PEFT would reject or that qdora does not implement.
    ///
    /// # Errors
    /// [`Error::Config`].
    pub fn validate(&self, path: &str) -> Result<()> {
        let err = |field: &str, msg: String| {
            Err(Error::Config {
                path: path.to_string(),
                field: field.to_string(),
                msg,
            })
        };
        if self.r == 0 {
            return err("r", "must be > 0".into());
        }
        if !self.lora_alpha.is_finite() {
            return err("lora_alpha", format!("{} is not finite", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err(
                "lora_dropout",
                format!("{} is outside [0, 1)", self.lora_dropout),
            );
        }
        if self.fan_in_fan_out {
            return err(
                "fan_in_fan_out",
                "true is for GPT-2 Conv1D weights; Llama-family Linear weights are (out, in)"
                    .into(),
            );
        }
        if self.lora_bias {
            return err("lora_bias", "a bias on lora_B is not supported".into());
        }
        self.init()
            .map_err(|msg| Error::Config {
                path: path.to_string(),
                field: "init_lora_weights".into(),
                msg,
            })
            .map(|_| ())?;
        for (field, map) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            for (k, v) in map {
                if Regex::new(&format!("^(.*\\.)?({k})$")).is_err() {
                    return err(field, format!("pattern {k:?} is not a valid regex"));
                }
                if !v.is_number() {
                    return err(field, format!("value for {k:?} is not a number"));
                }
            }
        }
        if self.layers_to_transform.is_some() {
            if let Some(TargetModules::Regex(_)) = &self.target_modules {
                return err(
                    "layers_to_transform",
                    "cannot be used when target_modules is a regex string".into(),
                );
            }
        }
        Ok(())
    }

    /// The initialisation method.
    ///
    /// # Errors
    /// A message for methods qdora does not implement (pissa, loftq, eva, …).
    pub fn init(&self) -> std::result::Result<InitLoraWeights, String> {
        match &self.init_lora_weights {
            Value::Bool(true) => Ok(InitLoraWeights::Default),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(s) if s == "gaussian" => Ok(InitLoraWeights::Gaussian),
            other => Err(format!(
                "{other} is not supported (supported: true, false, \"gaussian\")"
            )),
        }
    }

    /// The config as PEFT writes it: every field, keys sorted, 2-space indent,
    /// `inference_mode: true`.
    pub fn to_json(&self) -> String {
        let mut c = self.clone();
        c.inference_mode = true;
        for (k, v) in PASSIVE_DEFAULTS {
            c.extra
                .entry((*k).to_string())
                .or_insert_with(|| serde_json::from_str(v).unwrap_or(Value::Null));
        }
        let mut v = serde_json::to_value(&c).unwrap_or(Value::Null);
        // PEFT users write integer alphas; keep them integers in the file.
        if c.lora_alpha.fract() == 0.0 && c.lora_alpha.abs() < 1e15 {
            v["lora_alpha"] = Value::from(c.lora_alpha as i64);
        }
        let sorted = sort_keys(v);
        serde_json::to_string_pretty(&sorted).unwrap_or_default()
    }

    /// Decides whether module `path` (e.g. `model.layers.0.self_attn.q_proj`) is adapted.
    /// `is_output_layer` tells `all-linear` which module to skip; `default_targets` is PEFT's
    /// per-model default when `target_modules` is `None`.
    pub fn is_target(&self, path: &str, is_output_layer: bool, default_targets: &[&str]) -> bool {
        if let Some(ex) = &self.exclude_modules {
            if matches_modules(ex, path) {
                return false;
            }
        }
        if let Some(saved) = &self.modules_to_save {
            if saved
                .iter()
                .any(|s| path == s || path.ends_with(&format!(".{s}")))
            {
                return false;
            }
        }
        let hit = match &self.target_modules {
            None => default_targets
                .iter()
                .any(|t| path == *t || path.ends_with(&format!(".{t}"))),
            Some(TargetModules::Regex(s)) if s.eq_ignore_ascii_case("all-linear") => {
                !is_output_layer
            }
            Some(t) => matches_modules(t, path),
        };
        if !hit {
            return false;
        }
        match (&self.layers_to_transform, &self.target_modules) {
            (Some(layers), Some(TargetModules::List(_)) | None) => {
                let wanted: Vec<i64> = match layers {
                    Value::Number(n) => n.as_i64().into_iter().collect(),
                    Value::Array(a) => a.iter().filter_map(|v| v.as_i64()).collect(),
                    _ => vec![],
                };
                match layer_index(path, self.layers_pattern.as_ref()) {
                    Some(i) => wanted.contains(&i),
                    None => false,
                }
            }
            _ => true,
        }
    }

    /// Rank, alpha and scaling for module `path` after `rank_pattern` / `alpha_pattern`.
    pub fn resolve(&self, path: &str) -> Resolved {
        let pick = |map: &Map<String, Value>| {
            map.iter().find_map(|(p, v)| {
                let re = Regex::new(&format!("^(.*\\.)?({p})$")).ok()?;
                if re.is_match(path) {
                    v.as_f64()
                } else {
                    None
                }
            })
        };
        let r = pick(&self.rank_pattern)
            .map(|v| v as usize)
            .unwrap_or(self.r);
        let lora_alpha = pick(&self.alpha_pattern).unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora {
            lora_alpha / (r as f64).sqrt()
        } else {
            lora_alpha / r as f64
        };
        Resolved {
            r,
            lora_alpha,
            scaling: scaling as f32,
        }
    }
}

fn matches_modules(t: &TargetModules, path: &str) -> bool {
    match t {
        TargetModules::List(list) => list
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}"))),
        TargetModules::Regex(re) => Regex::new(&format!("^(?:{re})$"))
            .map(|r| r.is_match(path))
            .unwrap_or(false),
    }
}

/// PEFT's layer index: the first numbered path segment, or the one after `layers_pattern`.
fn layer_index(path: &str, pattern: Option<&Value>) -> Option<i64> {
    let patterns: Vec<String> = match pattern {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    let key = path;
    if patterns.is_empty() {
        let re = Regex::new(r"^.*?\.[^.]*\.(\d+)\.").ok()?;
        return re.captures(key).and_then(|c| c[1].parse().ok());
    }
    patterns.iter().find_map(|p| {
        let re = Regex::new(&format!(r"^.*?\.{}\.(\d+)\.", regex::escape(p))).ok()?;
        re.captures(key).and_then(|c| c[1].parse().ok())
    })
}

fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::new();
            for (k, v) in entries {
                out.insert(k, sort_keys(v));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_targets_match_suffix_and_layers() {
        let mut c = LoraConfig {
            target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
            ..Default::default()
        };
        assert!(c.is_target("model.layers.0.self_attn.q_proj", false, &[]));
        assert!(!c.is_target("model.layers.0.self_attn.k_proj", false, &[]));
        assert!(!c.is_target("model.layers.0.self_attn.xq_proj", false, &[]));
        c.layers_to_transform = Some(serde_json::json!([1]));
        assert!(!c.is_target("model.layers.0.self_attn.q_proj", false, &[]));
        assert!(c.is_target("model.layers.1.self_attn.q_proj", false, &[]));
    }

    #[test]
    fn all_linear_skips_output_layer_and_regex_is_full_match() {
        let c = LoraConfig {
            target_modules: Some(TargetModules::Regex("all-linear".into())),
            ..Default::default()
        };
        assert!(c.is_target("model.layers.0.mlp.up_proj", false, &[]));
        assert!(!c.is_target("lm_head", true, &[]));
        let c = LoraConfig {
            target_modules: Some(TargetModules::Regex(r".*\.(q|v)_proj".into())),
            ..Default::default()
        };
        assert!(c.is_target("model.layers.3.self_attn.v_proj", false, &[]));
        assert!(!c.is_target("model.layers.3.self_attn.v_proj.x", false, &[]));
    }

    #[test]
    fn patterns_resolve_first_match() {
        let mut c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: true,
            ..Default::default()
        };
        c.rank_pattern.insert("q_proj".into(), serde_json::json!(4));
        c.alpha_pattern
            .insert("layers.1.mlp.up_proj".into(), serde_json::json!(32));
        let q = c.resolve("model.layers.0.self_attn.q_proj");
        assert_eq!((q.r, q.scaling), (4, 8.0));
        let u = c.resolve("model.layers.1.mlp.up_proj");
        assert_eq!(u.r, 8);
        assert!((u.scaling - 32.0 / 8f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn wrong_peft_type_is_named() {
        let e = LoraConfig::from_json(r#"{"peft_type": "IA3"}"#, "a/adapter_config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("peft_type") && e.contains("IA3"), "{e}");
        let e = LoraConfig::from_json(r#"{"peft_type": "LORA", "r": "x"}"#, "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f: field"), "{e}");
    }

    #[test]
    fn round_trip_keeps_unknown_fields_and_sorts() {
        let text = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "zzz_future": [1, 2], "use_dora": true}"#;
        let c = LoraConfig::from_json(text, "f").unwrap();
        let out = c.to_json();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["zzz_future"], serde_json::json!([1, 2]));
        assert_eq!(v["inference_mode"], Value::Bool(true));
        assert!(out.find("\"alpha_pattern\"").unwrap() < out.find("\"r\"").unwrap());
    }
}
