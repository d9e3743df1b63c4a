//! [`TrainConfig`]: every training setting, as the TOML file holds it (`train_config.toml`),
//! with defaults; LoRA fields named as PEFT names them. [`TrainOverrides`] is the same list with
//! every field optional: what a `--config` file or the command line sets. Both come from one
//! field list ([`settings!`]), so a setting is declared once: its type, default, help text and
//! flag. (The flags are derived here with clap's derive attributes; parsing happens in `cli`.)

use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use crate::adapter::{Bias, DoraDropout, InitLoraWeights, LoraConfig, TargetModules};
use crate::ops::bf16::ComputeDtype;
use crate::quant::QuantType;

/// What is trained and how the base is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
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

    /// Whether the base is 4-bit.
    pub fn quantized(self) -> bool {
        matches!(self, Mode::Qlora | Mode::Qdora)
    }

    /// Whether adapters are DoRA.
    pub fn dora(self) -> bool {
        matches!(self, Mode::Dora | Mode::Qdora)
    }
}

/// Declares [`TrainConfig`] (every field, with its default) and [`TrainOverrides`] (every
/// field optional, with its flag) from one list of entries
/// `/// doc` `name: Type = default, [clap arg attributes];`. (A setting that may stay unset in
/// the resolved config has an `Option` type; its override is then an `Option<Option<_>>`, which
/// clap reads as a flag whose value may be left out.)
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident : $ty:ty = $default:expr, [$($arg:tt)*];
    )*) => {
        /// All settings of a training run. Field names are the TOML keys.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct TrainConfig {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for TrainConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Settings a `--config` file or the command line gives: each one replaces the
        /// default (flags replace the file's).
        #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct TrainOverrides {
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                pub $name: Option<$ty>,
            )*
        }

        impl TrainOverrides {
            /// Writes every setting given here into `c`.
            pub fn apply_to(self, c: &mut TrainConfig) {
                $( if let Some(v) = self.$name { c.$name = v; } )*
            }

            /// These settings over `other`'s: a field set here wins.
            pub fn or(self, other: TrainOverrides) -> TrainOverrides {
                TrainOverrides { $( $name: self.$name.or(other.$name), )* }
            }
        }
    };
}

settings! {
    /// full | lora | dora | qlora | qdora.
    mode: Mode = Mode::Qdora, [long, value_enum];
    /// LoRA rank.
    r: usize = 8, [long];
    /// LoRA alpha (scaling = alpha / r, or alpha / √r with rsLoRA).
    lora_alpha: f64 = 32.0, [long];
    /// Dropout on adapter inputs.
    lora_dropout: f64 = 0.1, [long];
    /// Where DoRA applies the dropout in training: peft (PEFT's formula, a second base product)
    /// or lora-only (torchtune's DoRALinear: the low-rank path only).
    dora_dropout: DoraDropout = DoraDropout::Peft, [long, value_enum];
    /// Modules to adapt (comma-separated names), or all-linear.
    target_modules: Vec<String> = crate::model::Proj::ALL.map(|p| p.name().to_string()).to_vec(),
        [long, value_delimiter = ','];
    /// rsLoRA scaling (alpha/√r).
    use_rslora: bool = false, [long, num_args = 0..=1, default_missing_value = "true"];
    /// Initialisation of fresh adapters: true (kaiming A, zero B), gaussian, false (random).
    init_lora_weights: InitLoraWeights = InitLoraWeights::Default, [long, value_enum];
    /// Which biases train: none, all, lora_only.
    bias: Bias = Bias::None, [long, value_enum];
    /// Modules trained in full and saved with the adapter (embed_tokens, lm_head).
    modules_to_save: Vec<String> = Vec::new(), [long, value_delimiter = ','];
    /// Peak learning rate.
    lr: f32 = 2e-4, [long];
    /// Learning-rate schedule after warm-up: constant | linear | cosine.
    schedule: Schedule = Schedule::Cosine, [long, value_enum];
    /// Warm-up steps.
    warmup_steps: usize = 0, [long];
    /// AdamW β1.
    beta1: f32 = 0.9, [long];
    /// AdamW β2.
    beta2: f32 = 0.999, [long];
    /// AdamW ε.
    eps: f32 = 1e-8, [long];
    /// Decoupled weight decay.
    weight_decay: f32 = 0.0, [long];
    /// Clip the global gradient norm (0 = off).
    max_grad_norm: f64 = 1.0, [long];
    /// Passes over the data (ignored when max_steps is set).
    epochs: usize = 1, [long];
    /// Optimizer steps (overrides epochs).
    max_steps: Option<usize> = None, [long];
    /// Sequences per micro-batch.
    batch_size: usize = 4, [long];
    /// Micro-batches per optimizer step.
    grad_accum: usize = 1, [long];
    /// Tokens per sequence.
    seq_len: usize = 256, [long];
    /// Pack records into a token stream (else pad each).
    packing: bool = true, [long, num_args = 0..=1, default_missing_value = "true"];
    /// Train on prompts of alpaca/chat records too.
    train_on_prompt: bool = false, [long, num_args = 0..=1, default_missing_value = "true"];
    /// Skip unparsable records (counted and reported) instead of failing.
    skip_bad_records: bool = false, [long, num_args = 0..=1, default_missing_value = "true"];
    /// Fraction of the training data held out for evaluation when no eval file is given.
    eval_fraction: f64 = 0.05, [long];
    /// Evaluate every N steps (0 = only at the end).
    eval_every: usize = 0, [long];
    /// Checkpoint every N steps (0 = never).
    save_every: usize = 0, [long];
    /// Log a metrics line every N steps.
    log_every: usize = 1, [long];
    /// Random seed (data order, initialisation, dropout).
    seed: u64 = 42, [long];
    /// Activation checkpointing (default: on for 4-bit modes).
    gradient_checkpointing: Option<bool> = None,
        [long, num_args = 0..=1, default_missing_value = "true"];
    /// 4-bit type of qlora/qdora: nf4 | fp4.
    quant_type: QuantType = QuantType::Nf4, [long, value_enum];
    /// Block size of qlora/qdora's 4-bit base.
    blocksize: usize = 64, [long];
    /// Double quantization of qlora/qdora's 4-bit base.
    double_quant: bool = true, [long, num_args = 0..=1, default_missing_value = "true"];
    /// What the frozen weights' products compute in: f32, bf16 (bf16 operands, f32 sums, as
    /// `bnb_4bit_compute_dtype=torch.bfloat16`), or auto (bf16 where the CPU has AVX512_BF16).
    /// Adapters, optimizer and trained weights stay f32.
    compute_dtype: ComputeDtype = ComputeDtype::F32, [long, value_enum];
}

impl TrainConfig {
    /// Whether activation checkpointing is on.
    pub fn checkpointing(&self) -> bool {
        self.gradient_checkpointing.unwrap_or(self.mode.quantized())
    }

    /// Quantization settings of a 4-bit mode.
    pub fn quantize_options(&self) -> crate::quant::QuantizeOptions {
        crate::quant::QuantizeOptions {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            double_quant: self.double_quant,
        }
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
            init_lora_weights: self.init_lora_weights.to_json(),
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
        if crate::quant::blockwise::check_blocksize(self.blocksize).is_err() {
            p.push(format!(
                "blocksize: {} is not a power of two in 32..=4096",
                self.blocksize
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file's settings replace the defaults, a flag's replace the file's, and the resolved
    /// config round-trips through the TOML it is written as.
    #[test]
    fn overrides_layer_over_defaults_and_round_trip() {
        let file: TrainOverrides = toml::from_str(
            "mode = \"lora\"\nr = 4\nlr = 0.01\nmax_steps = 9\nquant_type = \"fp4\"",
        )
        .expect("a valid file");
        let flags = TrainOverrides {
            r: Some(16),
            gradient_checkpointing: Some(Some(true)),
            ..Default::default()
        };
        let mut c = TrainConfig::default();
        flags.or(file).apply_to(&mut c);
        assert_eq!((c.mode, c.r, c.lr), (Mode::Lora, 16, 0.01));
        assert_eq!(c.max_steps, Some(9));
        assert_eq!(c.quant_type, QuantType::Fp4);
        assert!(c.checkpointing());
        assert_eq!(c.batch_size, 4, "untouched settings keep their defaults");
        let again: TrainConfig =
            toml::from_str(&toml::to_string(&c).expect("serializes")).expect("parses");
        assert_eq!(format!("{again:?}"), format!("{c:?}"));
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let e = toml::from_str::<TrainOverrides>("learning_rate = 0.1")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = toml::from_str::<TrainOverrides>("mode = \"qdoraa\"")
            .expect_err("unknown mode")
            .to_string();
        assert!(e.contains("qdoraa"), "{e}");
    }
}
