//! PEFT-compatible adapters: `LoraConfig` (= `adapter_config.json`), the frozen base an adapter
//! wraps, LoRA and DoRA forward/backward, the adapter file format, and merging.
//!
//! `adapter` knows PEFT's key names and formulas but nothing about Llama: the model tells it
//! module paths and hands it base weights.

pub mod base;
pub mod config;
pub mod dora;
pub mod dropout;
pub mod error;
pub mod lora;
pub mod merge;
pub mod peft_io;

pub use base::BaseWeight;
pub use config::{Bias, InitLoraWeights, LoraConfig, Resolved, TargetModules};
pub use dropout::Dropout;
pub use error::{Error, Result};
pub use lora::{
    AdapterKind, AdapterOptions, AdapterParam, AdapterWeights, DoraDropout, LoraAdapter, LoraGrads,
    LoraSaved,
};
