//! [`TrainConfig`]: every training setting, as the TOML file holds it (`train_config.toml`),
//! with defaults; LoRA fields named as PEFT names them. The CLI overrides fields from flags.

use serde::{Deserialize, Serialize};

use crate::adapter::DoraDropout;

use super::schedule::Schedule;
use crate::adapter::{Bias, LoraConfig, TargetModules};

/// What is trained and how the base is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// All weights trainable, dense base.
    Full,
    /// LoRA on a dense base.
    Lora,
    /// DoRA on a dense base.
    Dora,
    /// LoRA on an NF4 base.
    Qlora,
    /// DoRA on an NF4 base.
    #[default]
    Qdora,
}

impl Mode {
    /// All five, in the order of the comparison table.
    pub const ALL: [Mode; 5] = [Mode::Full, Mode::Lora, Mode::Qlora, Mode::Dora, Mode::Qdora];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Lora => "lora",
            Mode::Dora => "dora",
            Mode::Qlora => "qlora",
            Mode::Qdora => "qdora",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether the base is 4-bit.
    pub fn quantized(self) -> bool {
        matches!(self, Mode::Qlora | Mode::Qdora)
    }

    /// Whether adapters are DoRA.
    pub fn dora(self) -> bool {
        matches!(self, Mode::Dora | Mode::Qdora)
    }
}

/// All settings of a training run. Field names are the TOML keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// full | lora | dora | qlora | qdora.
    pub mode: Mode,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (scaling = alpha / r).
    pub lora_alpha: f64,
    /// Dropout on adapter inputs.
    pub lora_dropout: f64,
    /// Where DoRA applies the dropout in training: "peft" (also on the magnitude-rescaled base
    /// term, PEFT's formula; a second base product) or "lora-only" (torchtune's DoRALinear).
    pub dora_dropout: DoraDropout,
    /// Modules to adapt: names, or ["all-linear"].
    pub target_modules: Vec<String>,
    /// Scaling alpha/√r.
    pub use_rslora: bool,
    /// "true" (kaiming A, zero B), "gaussian", "false".
    pub init_lora_weights: String,
    /// none | all | lora_only.
    pub bias: Bias,
    /// Modules trained in full and saved with the adapter (embed_tokens, lm_head).
    pub modules_to_save: Vec<String>,
    /// Peak learning rate.
    pub lr: f32,
    /// constant | linear | cosine.
    pub schedule: Schedule,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// AdamW β1.
    pub beta1: f32,
    /// AdamW β2.
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Clip the global gradient norm (0 = off).
    pub max_grad_norm: f64,
    /// Passes over the data (ignored when max_steps is set).
    pub epochs: usize,
    /// Optimizer steps (overrides epochs).
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Pack records into a token stream (else pad each).
    pub packing: bool,
    /// Train on prompts of alpaca/chat records too.
    pub train_on_prompt: bool,
    /// Skip unparsable records instead of failing.
    pub skip_bad_records: bool,
    /// Fraction of the training data held out for evaluation when no eval file is given.
    pub eval_fraction: f64,
    /// Evaluate every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0 = never).
    pub save_every: usize,
    /// Log a metrics line every N steps.
    pub log_every: usize,
    /// Random seed (data order, initialisation, dropout).
    pub seed: u64,
    /// Activation checkpointing; default on for 4-bit modes.
    pub gradient_checkpointing: Option<bool>,
    /// nf4 | fp4 for 4-bit modes.
    pub quant_type: String,
    /// Block size for 4-bit modes.
    pub blocksize: usize,
    /// Double quantization for 4-bit modes.
    pub double_quant: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Qdora,
            r: 8,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            dora_dropout: DoraDropout::Peft,
            target_modules: crate::model::llama::LINEAR_NAMES.map(String::from).to_vec(),
            use_rslora: false,
            init_lora_weights: "true".into(),
            bias: Bias::None,
            modules_to_save: vec![],
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 256,
            packing: true,
            train_on_prompt: false,
            skip_bad_records: false,
            eval_fraction: 0.05,
            eval_every: 0,
            save_every: 0,
            log_every: 1,
            seed: 42,
            gradient_checkpointing: None,
            quant_type: "nf4".into(),
            blocksize: 64,
            double_quant: true,
        }
    }
}

impl TrainConfig {
    /// Whether activation checkpointing is on.
    pub fn checkpointing(&self) -> bool {
        self.gradient_checkpointing.unwrap_or(self.mode.quantized())
    }

    /// The PEFT config these settings describe.
    pub fn lora_config(&self, base_model: &str) -> LoraConfig {
        let targets = if self.target_modules.len() == 1
            && self.target_modules[0].eq_ignore_ascii_case("all-linear")
        {
            TargetModules::Regex("all-linear".into())
        } else {
            TargetModules::List(self.target_modules.clone())
        };
        LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: Some(targets),
            use_rslora: self.use_rslora,
            use_dora: self.mode.dora(),
            init_lora_weights: match self.init_lora_weights.as_str() {
                "true" => serde_json::Value::Bool(true),
                "false" => serde_json::Value::Bool(false),
                other => serde_json::Value::String(other.into()),
            },
            bias: self.bias,
            modules_to_save: (!self.modules_to_save.is_empty())
                .then(|| self.modules_to_save.clone()),
            base_model_name_or_path: Some(base_model.into()),
            ..Default::default()
        }
    }

    /// Every problem with the settings (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.lr.is_finite() && self.lr > 0.0) {
            p.push(format!("lr: {} must be a positive number", self.lr));
        }
        if self.r == 0 && self.mode != Mode::Full {
            p.push("r: must be > 0".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            p.push(format!(
                "lora_dropout: {} is outside [0, 1)",
                self.lora_dropout
            ));
        }
        if self.batch_size == 0 {
            p.push("batch_size: must be > 0".into());
        }
        if self.grad_accum == 0 {
            p.push("grad_accum: must be > 0".into());
        }
        if self.seq_len < 2 {
            p.push(format!("seq_len: {} must be at least 2", self.seq_len));
        }
        if self.max_steps == Some(0) {
            p.push("max_steps: must be > 0".into());
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            p.push("epochs: must be > 0 (or set max_steps)".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            p.push(format!(
                "eval_fraction: {} is outside [0, 1)",
                self.eval_fraction
            ));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            p.push(format!(
                "max_grad_norm: {} must be >= 0",
                self.max_grad_norm
            ));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                p.push(format!("{k}: {v} is outside [0, 1)"));
            }
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            p.push(format!("weight_decay: {} must be >= 0", self.weight_decay));
        }
        if crate::quant::QuantType::parse(&self.quant_type).is_err() {
            p.push(format!(
                "quant_type: {:?} is not nf4 or fp4",
                self.quant_type
            ));
        }
        if crate::quant::blockwise::check_blocksize(self.blocksize).is_err() {
            p.push(format!(
                "blocksize: {} is not a power of two in 32..=4096",
                self.blocksize
            ));
        }
        p
    }
}
