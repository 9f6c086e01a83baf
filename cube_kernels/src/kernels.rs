//! The `#[cube]` entry points. Host code in [`crate::gemm`], [`crate::gram`] and [`crate::lora`]
//! picks the configuration and launches them.

use cubecl::prelude::*;

use crate::tile::{OperandArgs, TileConfig, accumulate_tile};

/// Where and how a product tile is written back.
#[derive(CubeLaunch, CubeType, Clone, Copy)]
pub struct OutputArgs {
    /// Offset of output element `(0, 0)`.
    pub offset: usize,
    /// Row stride of the output.
    pub row_stride: usize,
    /// Column stride of the output.
    pub col_stride: usize,
    /// Rows of the product.
    pub rows: usize,
    /// Columns of the product.
    pub cols: usize,
    /// Length of the reduction axis.
    pub depth: usize,
    /// Reduction length handled by one cube along `z` (a multiple of the slab depth).
    pub k_chunk: usize,
    /// Factor applied to the product (before the bias).
    pub alpha: f32,
}

/// `out = alpha · lhs · rhs (+ bias)`, one cube per output tile, written in `F`.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
pub fn gemm_direct_kernel<F: Float>(
    lhs_1: &Tensor<F>,
    lhs_2: &Tensor<F>,
    rhs_1: &Tensor<F>,
    rhs_2: &Tensor<F>,
    bias: ComptimeOption<&Tensor<F>>,
    out: &mut Tensor<F>,
    lhs: OperandArgs,
    rhs: OperandArgs,
    dst: OutputArgs,
    #[comptime] config: TileConfig,
    #[define(F)] _dtype: ElemType,
) {
    let micro = config.micro;
    let threads = config.threads;
    let tile = comptime!(config.threads * config.micro);
    let m0 = CUBE_POS_Y as usize * tile;
    let n0 = CUBE_POS_X as usize * tile;
    let mut acc = Array::<f32>::new(comptime!(config.micro * config.micro));
    accumulate_tile::<F>(
        lhs_1, lhs_2, &lhs, rhs_1, rhs_2, &rhs, &mut acc, m0, n0, 0, dst.depth, config,
    );

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..micro {
        let row = m0 + uy + i * threads;
        #[unroll]
        for j in 0..micro {
            let col = n0 + ux + j * threads;
            if row < dst.rows && col < dst.cols {
                let shift: ComptimeOption<F> = bias.as_ref().map(|bias| bias[col * bias.stride(0)]);
                let value =
                    acc[i * micro + j] * dst.alpha + f32::cast_from(shift.unwrap_or_default());
                out[dst.offset + row * dst.row_stride + col * dst.col_stride] = F::cast_from(value);
            }
        }
    }
}

/// Split-K partial products: cube `(x, y, z)` writes tile `(y, x)` of `lhs · rhs` restricted to
/// reduction chunk `z` into `partial[z]` (`[splits, rows, cols]`, `f32`). With `lower`, only
/// tiles on or below the diagonal are computed (symmetric products).
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
pub fn gemm_partial_kernel<F: Float>(
    lhs_1: &Tensor<F>,
    lhs_2: &Tensor<F>,
    rhs_1: &Tensor<F>,
    rhs_2: &Tensor<F>,
    partial: &mut Tensor<f32>,
    lhs: OperandArgs,
    rhs: OperandArgs,
    dst: OutputArgs,
    #[comptime] config: TileConfig,
    #[comptime] lower: bool,
    #[define(F)] _dtype: ElemType,
) {
    let micro = config.micro;
    let threads = config.threads;
    let tile = comptime!(config.threads * config.micro);
    if lower && CUBE_POS_X > CUBE_POS_Y {
        terminate!();
    }
    let m0 = CUBE_POS_Y as usize * tile;
    let n0 = CUBE_POS_X as usize * tile;
    let z = CUBE_POS_Z as usize;
    let k_begin = z * dst.k_chunk;
    let mut k_end = k_begin + dst.k_chunk;
    if k_end > dst.depth {
        k_end = dst.depth;
    }
    let mut acc = Array::<f32>::new(comptime!(config.micro * config.micro));
    accumulate_tile::<F>(
        lhs_1, lhs_2, &lhs, rhs_1, rhs_2, &rhs, &mut acc, m0, n0, k_begin, k_end, config,
    );

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    let base = z * dst.rows * dst.cols;
    #[unroll]
    for i in 0..micro {
        let row = m0 + uy + i * threads;
        #[unroll]
        for j in 0..micro {
            let col = n0 + ux + j * threads;
            if row < dst.rows && col < dst.cols {
                partial[base + row * dst.cols + col] = acc[i * micro + j];
            }
        }
    }
}

/// A symmetric product written straight into `out` (`f32`), without split-K: cube `(x, y)`
/// with `x ≤ y` computes lower tile `(y, x)` over the whole depth and writes it, or adds it to
/// what `out` holds with `accumulate`. [`mirror_kernel`] then completes the upper triangle.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
pub fn syrk_direct_kernel<F: Float>(
    lhs_1: &Tensor<F>,
    lhs_2: &Tensor<F>,
    rhs_1: &Tensor<F>,
    rhs_2: &Tensor<F>,
    out: &mut Tensor<f32>,
    lhs: OperandArgs,
    rhs: OperandArgs,
    dst: OutputArgs,
    #[comptime] config: TileConfig,
    #[comptime] accumulate: bool,
    #[define(F)] _dtype: ElemType,
) {
    let micro = config.micro;
    let threads = config.threads;
    let tile = comptime!(config.threads * config.micro);
    if CUBE_POS_X > CUBE_POS_Y {
        terminate!();
    }
    let m0 = CUBE_POS_Y as usize * tile;
    let n0 = CUBE_POS_X as usize * tile;
    let mut acc = Array::<f32>::new(comptime!(config.micro * config.micro));
    accumulate_tile::<F>(
        lhs_1, lhs_2, &lhs, rhs_1, rhs_2, &rhs, &mut acc, m0, n0, 0, dst.depth, config,
    );

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..micro {
        let row = m0 + uy + i * threads;
        #[unroll]
        for j in 0..micro {
            let col = n0 + ux + j * threads;
            if row < dst.rows && col < dst.cols {
                let position = dst.offset + row * dst.row_stride + col * dst.col_stride;
                let mut value = acc[i * micro + j];
                if accumulate {
                    value += out[position];
                }
                out[position] = value;
            }
        }
    }
}

/// Completes a symmetric `[d, d]` matrix whose tiles (`tile` wide) on and below the diagonal
/// are written: each element of a tile above the diagonal is copied from its transpose.
#[cube(launch)]
pub fn mirror_kernel(out: &mut Tensor<f32>, dst: OutputArgs, tile: usize) {
    let index = ABSOLUTE_POS;
    if index >= dst.rows * dst.cols {
        terminate!();
    }
    let row = index / dst.cols;
    let col = index % dst.cols;
    if (row / tile) < (col / tile) {
        out[dst.offset + row * dst.row_stride + col * dst.col_stride] =
            out[dst.offset + col * dst.row_stride + row * dst.col_stride];
    }
}

/// What the split-K reduction starts from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Start {
    /// Zero.
    Zero,
    /// The output's current value (in-place accumulation).
    Output,
    /// The `base` tensor (a copy of an accumulator that cannot be written in place).
    Base,
}

/// `out = start + alpha · Σ_z partial[z] (+ bias)`, one unit per output element. With `mirror`
/// the partials hold only the lower tiles of a symmetric product (`tile` wide) and the upper
/// triangle is read from its transpose: the symmetric matrix is completed here, once.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
pub fn split_k_reduce_kernel<F: Float>(
    partial: &Tensor<f32>,
    bias: ComptimeOption<&Tensor<F>>,
    base: ComptimeOption<&Tensor<F>>,
    out: &mut Tensor<F>,
    dst: OutputArgs,
    splits: usize,
    tile: usize,
    #[comptime] mirror: bool,
    #[comptime] start: Start,
    #[define(F)] _dtype: ElemType,
) {
    let index = ABSOLUTE_POS;
    if index >= dst.rows * dst.cols {
        terminate!();
    }
    let row = index / dst.cols;
    let col = index % dst.cols;
    let mut source = index;
    if mirror && (row / tile) < (col / tile) {
        source = col * dst.cols + row;
    }
    let stride = dst.rows * dst.cols;
    let mut sum = 0.0f32;
    for z in 0..splits {
        sum += partial[z * stride + source];
    }
    let shift: ComptimeOption<F> = bias.as_ref().map(|bias| bias[col * bias.stride(0)]);
    let mut value = sum * dst.alpha + f32::cast_from(shift.unwrap_or_default());
    let position = dst.offset + row * dst.row_stride + col * dst.col_stride;
    match start {
        Start::Zero => {}
        Start::Output => {
            value += f32::cast_from(out[position]);
        }
        Start::Base => {
            let previous: ComptimeOption<F> =
                base.as_ref().map(|base| base[row * base.stride(0) + col * base.stride(1)]);
            value += f32::cast_from(previous.unwrap_or_default());
        }
    }
    out[position] = F::cast_from(value);
}
