//! Llama-family models as Hugging Face stores them: config, weights (dense or bitsandbytes
//! 4-bit), the layers with forward and backward, loss, adapters wired into the decoder's
//! linears by module path, tokenization and generation.

pub mod adapters;
pub mod config;
pub mod error;
pub mod generate;
pub mod layers;
pub mod llama;
pub mod load;
pub mod loss;
pub mod params;
pub mod random;
pub mod tokenizer;

pub use config::{Arch, LlamaConfig};
pub use error::{Error, Result};
pub use llama::{Grads, Llama, StepOptions};
pub use load::{load, BaseStorage, LoadOptions};
pub use params::{ParamId, Proj};
