//! The command line as clap types: raw flags only. Each `cli/<command>.rs` turns them into
//! library options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::adapter::DoraDropout;
use crate::export::ExportType;
use crate::ops::bf16::ComputeDtype;
use crate::quant::{Dtype, QuantType};
use crate::train::{Mode, TrainOverrides};

/// qdora: fine-tune Hugging Face Llama-family models with QDoRA, QLoRA, DoRA, LoRA or in full,
/// on a CPU, with PEFT-compatible adapters.
#[derive(Parser, Debug)]
#[command(
    name = "qdora",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    /// Subcommand.
    #[command(subcommand)]
    pub command: Command,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune a model (default: QDoRA on the bundled stories260K with tinyshakespeare).
    Train(Box<TrainArgs>),
    /// Generate text, optionally with an adapter.
    Generate(GenerateArgs),
    /// Mean loss and perplexity over a dataset.
    Eval(EvalArgs),
    /// Logits (and loss) for token ids from a safetensors file: the interop/debugging door.
    Logits(LogitsArgs),
    /// Quantize a dense checkpoint into a bitsandbytes 4-bit checkpoint.
    Quantize(QuantizeArgs),
    /// Fold an adapter into the base model and write a full checkpoint.
    Merge(MergeArgs),
    /// Write a GGUF file for llama.cpp / Ollama (the adapter merged), or a GGUF LoRA adapter.
    Export(ExportArgs),
    /// Benchmarks that print figures (quantization kernels, training steps).
    Bench(BenchArgs),
    /// Train several modes on the same data and compare them (table, JSON, plot).
    Compare(Box<CompareArgs>),
}

/// Model and adapter selection shared by inference commands.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder (config.json + safetensors + tokenizer.json); default: bundled stories260K.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// `qdora train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model folder; default: bundled stories260K.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (.jsonl, .json, .txt); default: bundled tinyshakespeare.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "runs/qdora")]
    pub out: PathBuf,
    /// TOML file with settings (its keys are the flags' names with `_`; flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Evaluation data (else a held-out fraction).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Replace the contents of a non-empty --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Start even if the memory estimate exceeds available memory.
    #[arg(long)]
    pub force: bool,
    /// The training settings (each also a key of the --config file).
    #[command(flatten)]
    pub settings: TrainOverrides,
    /// Activation checkpointing off (= --gradient-checkpointing false).
    #[arg(long, conflicts_with = "gradient_checkpointing")]
    pub no_gradient_checkpointing: bool,
    /// Pad each record instead of packing records into a stream (= --packing false).
    #[arg(long, conflicts_with = "packing")]
    pub no_packing: bool,
    /// After training, generate from this prompt with the new adapter.
    #[arg(long)]
    pub sample_prompt: Option<String>,
    /// Tokens to generate for --sample-prompt.
    #[arg(long, default_value_t = 120)]
    pub sample_tokens: usize,
    /// Temperature of the sample (0 = greedy; top-k 40 otherwise).
    #[arg(long, default_value_t = 0.8)]
    pub sample_temperature: f32,
}

/// `qdora generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model and adapter.
    #[command(flatten)]
    pub model: ModelArgs,
    /// What the frozen weights' products compute in: f32, bf16 or auto (bf16 where the CPU
    /// has AVX512_BF16); default: as the adapter was trained (its train_config.toml), else f32.
    #[arg(long, value_enum)]
    pub compute_dtype: Option<ComputeDtype>,
    /// Prompt text.
    #[arg(long, default_value = "Once upon a time")]
    pub prompt: String,
    /// Wrap the prompt as a user message with the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `qdora eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model and adapter.
    #[command(flatten)]
    pub model: ModelArgs,
    /// What the frozen weights' products compute in: f32, bf16 or auto (bf16 where the CPU
    /// has AVX512_BF16); default: as the adapter was trained (its train_config.toml), else f32.
    #[arg(long, value_enum)]
    pub compute_dtype: Option<ComputeDtype>,
    /// Data file (.txt, .jsonl, .json).
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Load the base in NF4 (as QLoRA/QDoRA training sees it).
    #[arg(long)]
    pub nf4: bool,
}

/// `qdora logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model and adapter.
    #[command(flatten)]
    pub model: ModelArgs,
    /// What the frozen weights' products compute in: f32, bf16 or auto (bf16 where the CPU
    /// has AVX512_BF16); default: as the adapter was trained (its train_config.toml), else f32.
    #[arg(long, value_enum)]
    pub compute_dtype: Option<ComputeDtype>,
    /// safetensors with `input_ids` (i64 [batch, seq]) and optional `labels`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors (`logits`, `loss`).
    #[arg(long)]
    pub out: PathBuf,
}

/// `qdora quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Dense Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// nf4 | fp4.
    #[arg(long, value_enum, default_value_t = QuantType::Nf4)]
    pub quant_type: QuantType,
    /// Elements per absmax block.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Double quantization (default on).
    #[arg(long, overrides_with = "no_double_quant")]
    pub double_quant: bool,
    /// No double quantization.
    #[arg(long)]
    pub no_double_quant: bool,
    /// bnb_4bit_compute_dtype written to the config.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub compute_dtype: Dtype,
    /// Comma-separated modules to keep dense (llm_int8_skip_modules).
    #[arg(long)]
    pub skip_modules: Option<String>,
    /// Replace an existing --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// `qdora merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// f32 | bf16 | f16 for the dense output.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Write a bitsandbytes 4-bit checkpoint (re-quantized, as PEFT's 4-bit merge).
    #[arg(long)]
    pub requantize: bool,
    /// Replace an existing --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// `qdora export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The model and the adapter to merge into it (or to export alone).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output GGUF file.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage type of the matrices (norms, biases and 1-D tensors stay f32).
    #[arg(long = "type", value_enum, default_value_t = ExportType::F16)]
    pub ggml_type: ExportType,
    /// Write only the adapter, as a llama.cpp LoRA adapter (plain LoRA; DoRA is refused).
    #[arg(long)]
    pub adapter_only: bool,
    /// `general.name` (default: the model folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// llama.cpp's name of a byte-level pre-tokenizer it does not recognize (llama-bpe, qwen2, ...).
    #[arg(long)]
    pub tokenizer_pre: Option<String>,
    /// Replace an existing --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// What `qdora bench` measures.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchWhat {
    /// Quantization kernels: quantize, dequantize, 4-bit matmuls next to dense ones.
    Quant,
    /// One adapted Linear's forward + backward in the five flavours.
    Layers,
    /// Whole training steps (tokens/s, MFU, peak memory).
    Train,
    /// Prefill and KV-cached decoding.
    Generate,
}

/// Which bases `qdora bench generate` measures.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchWeights {
    /// As stored and quantized to NF4.
    Both,
    /// As stored (f32 for a preset).
    F32,
    /// Quantized to NF4 on load.
    Nf4,
}

/// `qdora bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub what: BenchWhat,
    /// Model folder (train).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Random-initialised preset (train): llama-tiny-512, llama-small-1024, llama-1024-8l,
    /// llama2-7b; without --preset and --model, the bundled stories260K.
    #[arg(long)]
    pub preset: Option<String>,
    /// Mode (train).
    #[arg(long, value_enum, default_value_t = Mode::Qdora)]
    pub mode: Mode,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Activation checkpointing.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// DoRA dropout placement (train, layers): peft | lora-only.
    #[arg(long, value_enum, default_value_t = DoraDropout::Peft)]
    pub dora_dropout: DoraDropout,
    /// Smaller shapes (quick check).
    #[arg(long)]
    pub quick: bool,
    /// Bases to measure (generate): both, f32 (as stored) or nf4 (quantized on load; a
    /// llama2-7b preset fits in memory only as nf4).
    #[arg(long, value_enum, default_value_t = BenchWeights::Both)]
    pub weights: BenchWeights,
    /// What the frozen weights' products compute in (train, generate): f32, bf16 or auto.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub compute_dtype: ComputeDtype,
}

/// `qdora compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Base model folder; default: bundled stories260K.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Random-initialised preset instead of a model folder.
    #[arg(long)]
    pub preset: Option<String>,
    /// Training data; default: bundled tinyshakespeare.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation data (else a held-out fraction).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Comma-separated modes.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "full,lora,qlora,dora,qdora"
    )]
    pub modes: Vec<Mode>,
    /// Optimizer steps per mode.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Rank(s): one value, or a comma-separated sweep (e.g. 2,4,8,16,32).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub r: Vec<usize>,
    /// LoRA alpha (default: 4 × r).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Learning rate of adapter modes.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    /// Learning rate of full fine-tuning.
    #[arg(long, default_value_t = 5e-4)]
    pub full_lr: f32,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 25)]
    pub eval_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// What the frozen weights' products compute in, every mode: f32, bf16 or auto.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub compute_dtype: ComputeDtype,
    /// Output folder for the table, JSON and plot.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
}
