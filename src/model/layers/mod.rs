//! The layers of a Llama-family decoder, each with `forward`, `forward_train` and `backward`
//! side by side: linear (with its adapter), RMSNorm, RoPE, attention, SwiGLU MLP, decoder block.

pub mod attention;
pub mod block;
pub mod linear;
pub mod mlp;
pub mod rms_norm;
pub mod rope;

pub use attention::{Attention, AttentionGrads, KvCache};
pub use block::{Block, BlockGrads, BlockSaved, Keep};
pub use linear::{Linear, LinearGrads};
pub use mlp::{Mlp, MlpGrads};
pub use rms_norm::RmsNorm;
pub use rope::Rope;
