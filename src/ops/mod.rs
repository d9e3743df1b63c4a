//! The compute kernels under the layers, on plain `f32` slices: matrix views and products
//! through the `gemm` crate, the attention core, the fused low-rank products, the dropout mask,
//! transposed tiles, 8-lane vectors, the activations kept for backward (f32 or bf16), and the
//! scalar math they share.
//!
//! This module and `quant` are where `unsafe` lives (raw views for parallel writers, vector
//! intrinsics, outputs allocated without zeroing); each use states its invariant. The layers
//! in `adapter` and `model` call the safe functions here and hold no `unsafe` of their own.

pub mod attention;
pub mod bands;
pub mod bf16;
mod kept;
pub mod lanes;
pub mod lowrank;
pub mod mask;
mod mat;
pub mod math;
pub mod par;
mod rng;
pub mod transpose;
pub mod uninit;

pub use kept::Kept;
pub use mat::{
    gemm, matmul_ceiling_gflops, matmul_gflops, matmul_nn, matmul_nt, matmul_tn, threads, Accum,
    MatMut, MatRef, Par,
};
pub use math::{dot, exp_neg, fmadd, sigmoid, softmax_replay, softmax_scaled, sum};
pub use par::{add_assign, reduce_parts, PAR_CHUNK};
pub use rng::Rng;
