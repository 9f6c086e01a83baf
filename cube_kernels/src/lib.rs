//! # emloc-cube-kernels
//!
//! CubeCL kernels for [emloc](https://github.com/emloc/emloc), written once for every CubeCL
//! runtime (wgpu, CUDA, ROCm, CPU) and generic over the float type (`f32`, `f16`, `bf16` where
//! the runtime has it), always accumulating in `f32`:
//!
//! - [`gram`]: Gram accumulation `G += XᵀX` for calibration (lower tiles only, split along the
//!   tokens, mirrored once at the end);
//! - [`LowRankLora`]: the fused emulator layer `y = [x W_v | x A] [W_u ; s·B] + b` and its
//!   backward (gradients for `x`, `A`, `B` only), which needs just the LoRA input and the
//!   `[n, r]` LoRA bottleneck `h_l = x A`;
//! - [`cholesky`] and [`solve_lower_right`]: blocked Cholesky `G + λI = L Lᵀ` (right-looking,
//!   diagonal blocks factored in shared memory, trailing updates on the tiled product) with the
//!   first rejected pivot recorded on the device for the caller's damping retries, and the
//!   blocked triangular solves `X L⁻¹` / `X L⁻ᵀ` (whitening, CholeskyQR);
//! - [`gemm`]: the tiled product they are built on, reading strided, transposed and
//!   concatenated ([`Operand`]) operands in place.
//!
//! Every kernel is compiled for the address width its buffers need (64-bit indices past
//! `u32::MAX` elements where the runtime has them); a launch the runtime cannot address or
//! grid is refused on the host with a [`KernelError`] message before anything is queued.
//!
//! The crate only depends on CubeCL: tensors come in and go out as
//! [`TensorHandle`](cubecl::std::tensor::TensorHandle)s, and emloc's Burn backend extension
//! (`emloc::ops`) wraps them.

#![warn(missing_docs)]

mod cholesky;
mod gemm;
mod gram;
/// The `#[cube]` entry points, for callers that want to launch them directly. CubeCL's macros
/// generate undocumented launch items beside each documented kernel.
#[allow(missing_docs)]
pub mod kernels;
mod launch;
mod lora;
/// The shared tiled-product core (CubeCL's macros generate undocumented items here too).
#[allow(missing_docs)]
pub mod tile;

pub use cholesky::{
    CHOLESKY_BLOCK, CholeskyStatus, cholesky, solve_lower_right, to_f32_contiguous,
};
pub use gemm::{MatRef, Operand, empty_matrix, gemm, gemm_accumulate};
pub use gram::{GramStart, gram};
pub use launch::{KernelError, address_type, address_type_for, cube_count, cube_count_for};
pub use lora::{LowRankLora, LowRankLoraGrads};
