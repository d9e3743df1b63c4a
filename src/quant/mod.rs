//! 4-bit quantization compatible with bitsandbytes: NF4/FP4 codebooks, blockwise absmax
//! quantization with optional double quantization, the packed layout, the quant-state JSON that
//! transformers stores next to each weight, checkpoint I/O, and fused CPU kernels.
//!
//! Reference: bitsandbytes 0.50 (`functional.py`, `csrc/cpu_ops.cpp`), QLoRA arXiv:2305.14314,
//! and `shared/spec/peft-dora-nf4.md` §5–6.

pub mod blockwise;
pub mod bnb_io;
pub mod codebook;
pub mod error;
pub mod gemv;
pub mod kernels;
pub mod pairs;
mod weight;

pub use blockwise::{Absmax, QuantType};
pub use error::{Error, Result};
pub use weight::{Dtype, Parts, QuantizeOptions, QuantizedWeight};
