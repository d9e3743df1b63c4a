//! qdora: fine-tuning of Hugging Face Llama-family models on limited hardware, with QDoRA (DoRA
//! adapters on an NF4 base) at its heart and full fine-tuning, LoRA, QLoRA and DoRA beside it.
//!
//! Modules depend one way: `sys`, `io`, `dist` → `ops`, `gguf` → `quant` → `adapter` → `model`
//! → `train`, `export` → `bench`, `fuzzing`, `embedded` → `cli`; `tests/layering.rs` checks it.
//!
//! Dimension legend used in shape comments: `B` batch, `T` tokens, `D` hidden, `H`/`Hkv` heads,
//! `Dh` head dim, `F` MLP width, `V` vocab, `R` LoRA rank, `N = B*T` rows of a flattened batch.
#![warn(missing_docs)]
// Numeric kernels index several arrays with one loop variable, mirroring the formulas.
#![allow(clippy::needless_range_loop)]

pub mod adapter;
pub mod bench;
pub mod cli;
pub mod dist;
pub mod embedded;
pub mod export;
pub mod fuzzing;
pub mod gguf;
pub mod io;
pub mod model;
pub mod ops;
pub mod quant;
pub mod sys;
pub mod train;
