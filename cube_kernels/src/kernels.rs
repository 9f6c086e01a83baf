//! The `#[cube]` entry points. Host code in [`crate::gemm`], [`crate::gram`] and [`crate::lora`]
//! picks the configuration and launches them.

use cubecl::prelude::*;

use crate::tile::{OperandArgs, TileConfig, VEC, accumulate_tile, tile_offset, zero_tile};

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

/// `out = alpha · lhs · rhs (+ bias)`, one cube per output tile (row tiles along the grid's
/// `x` axis, which has the largest limit, column tiles along `y`), written in `F`; with
/// `accumulate`, `out += alpha · lhs · rhs (+ bias)` (the updates of the blocked triangular
/// solve).
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub fn gemm_direct_kernel<F: Float, NL: Size, NR: Size>(
    lhs_1: &Tensor<Vector<F, NL>>,
    lhs_2: &Tensor<Vector<F, NL>>,
    rhs_1: &Tensor<Vector<F, NR>>,
    rhs_2: &Tensor<Vector<F, NR>>,
    bias: ComptimeOption<&Tensor<F>>,
    out: &mut Tensor<F>,
    lhs: OperandArgs,
    rhs: OperandArgs,
    dst: OutputArgs,
    #[comptime] config: TileConfig,
    #[comptime] accumulate: bool,
    #[define(F)] _dtype: ElemType,
) {
    let micro = config.micro;
    let threads = config.threads;
    let groups = comptime!(config.micro / VEC);
    let tile = comptime!(config.threads * config.micro);
    let m0 = CUBE_POS_X as usize * tile;
    let n0 = CUBE_POS_Y as usize * tile;
    let mut acc = zero_tile(config);
    accumulate_tile::<F, NL, NR>(
        lhs_1, lhs_2, &lhs, rhs_1, rhs_2, &rhs, &mut acc, m0, n0, 0, dst.depth, config,
    );

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..micro {
        let row = m0 + tile_offset(uy, i, threads);
        #[unroll]
        for h in 0..groups {
            let sums = acc[i * groups + h];
            #[unroll]
            for c in 0..VEC {
                let col = n0 + h * comptime!(threads * VEC) + ux * VEC + c;
                if row < dst.rows && col < dst.cols {
                    let shift: ComptimeOption<F> =
                        bias.as_ref().map(|bias| bias[col * bias.stride(0)]);
                    let mut value =
                        sums.extract(c) * dst.alpha + f32::cast_from(shift.unwrap_or_default());
                    let position = dst.offset + row * dst.row_stride + col * dst.col_stride;
                    if accumulate {
                        value += f32::cast_from(out[position]);
                    }
                    out[position] = F::cast_from(value);
                }
            }
        }
    }
}

/// Split-K partial products: cube `(x, y, z)` writes tile `(x, y)` of `lhs · rhs` restricted to
/// reduction chunk `z` into `partial[z]` (`[splits, rows, cols]`, `f32`). With `lower`, only
/// tiles on or below the diagonal are computed (symmetric products).
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub fn gemm_partial_kernel<F: Float, NL: Size, NR: Size>(
    lhs_1: &Tensor<Vector<F, NL>>,
    lhs_2: &Tensor<Vector<F, NL>>,
    rhs_1: &Tensor<Vector<F, NR>>,
    rhs_2: &Tensor<Vector<F, NR>>,
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
    let groups = comptime!(config.micro / VEC);
    let tile = comptime!(config.threads * config.micro);
    if lower && CUBE_POS_Y > CUBE_POS_X {
        terminate!();
    }
    let m0 = CUBE_POS_X as usize * tile;
    let n0 = CUBE_POS_Y as usize * tile;
    let z = CUBE_POS_Z as usize;
    let k_begin = z * dst.k_chunk;
    let mut k_end = k_begin + dst.k_chunk;
    if k_end > dst.depth {
        k_end = dst.depth;
    }
    let mut acc = zero_tile(config);
    accumulate_tile::<F, NL, NR>(
        lhs_1, lhs_2, &lhs, rhs_1, rhs_2, &rhs, &mut acc, m0, n0, k_begin, k_end, config,
    );

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    let base = z * dst.rows * dst.cols;
    #[unroll]
    for i in 0..micro {
        let row = m0 + tile_offset(uy, i, threads);
        #[unroll]
        for h in 0..groups {
            let sums = acc[i * groups + h];
            #[unroll]
            for c in 0..VEC {
                let col = n0 + h * comptime!(threads * VEC) + ux * VEC + c;
                if row < dst.rows && col < dst.cols {
                    partial[base + row * dst.cols + col] = sums.extract(c);
                }
            }
        }
    }
}

/// A symmetric product written straight into `out` (`f32`), without split-K: cube `(x, y)`
/// with `y ≤ x` computes lower tile `(x, y)` over the whole depth, scales it by `dst.alpha`
/// and writes it, or adds it to what `out` holds with `accumulate`. [`mirror_kernel`] then
/// completes the upper triangle (Gram); the Cholesky trailing update (`alpha = -1`) ignores it.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub fn syrk_direct_kernel<F: Float, NL: Size, NR: Size>(
    lhs_1: &Tensor<Vector<F, NL>>,
    lhs_2: &Tensor<Vector<F, NL>>,
    rhs_1: &Tensor<Vector<F, NR>>,
    rhs_2: &Tensor<Vector<F, NR>>,
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
    let groups = comptime!(config.micro / VEC);
    let tile = comptime!(config.threads * config.micro);
    if CUBE_POS_Y > CUBE_POS_X {
        terminate!();
    }
    let m0 = CUBE_POS_X as usize * tile;
    let n0 = CUBE_POS_Y as usize * tile;
    let mut acc = zero_tile(config);
    accumulate_tile::<F, NL, NR>(
        lhs_1, lhs_2, &lhs, rhs_1, rhs_2, &rhs, &mut acc, m0, n0, 0, dst.depth, config,
    );

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..micro {
        let row = m0 + tile_offset(uy, i, threads);
        #[unroll]
        for h in 0..groups {
            let sums = acc[i * groups + h];
            #[unroll]
            for c in 0..VEC {
                let col = n0 + h * comptime!(threads * VEC) + ux * VEC + c;
                if row < dst.rows && col < dst.cols {
                    let position = dst.offset + row * dst.row_stride + col * dst.col_stride;
                    let mut value = sums.extract(c) * dst.alpha;
                    if accumulate {
                        value += out[position];
                    }
                    out[position] = value;
                }
            }
        }
    }
}

/// Completes a symmetric `[d, d]` matrix whose tiles (`tile` wide) on and below the diagonal
/// are written: each element of a tile above the diagonal is copied from its transpose.
#[cube(launch, address_type = "dynamic")]
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
#[cube(launch, address_type = "dynamic")]
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

/// Slots of the Cholesky status buffer (`[STATUS_LEN]` `f32`), written on the device and read
/// once by the host after the whole factorization.
pub mod status {
    /// `mean(diag G)` of the undamped input (the scale of the damping and of the tolerance).
    pub const MEAN_DIAG: usize = 0;
    /// Index + 1 of the first rejected pivot, `0` when every pivot passed (exact in `f32` for
    /// `d < 2²⁴`).
    pub const FIRST_FAILURE: usize = 1;
    /// The rejected pivot's value `L_jj²` (the Schur complement's diagonal entry).
    pub const FAILED_VALUE: usize = 2;
    /// The smallest pivot `L_jj²` seen (rejected ones included).
    pub const MIN_PIVOT: usize = 3;
    /// Length of the buffer.
    pub const LEN: usize = 4;
}

/// A value above every finite pivot we accept; a pivot at or above it counts as non-finite
/// (WGSL has no portable `isinf`, and ordered comparisons are false for NaN).
const PIVOT_CEILING: f32 = 3.0e38;

/// Starts a factorization: `status[MEAN_DIAG] = mean(diag G)` (one unit walks the diagonal;
/// `d` loads are nothing next to the `d³/3` flops that follow) and resets the other slots.
#[cube(launch, address_type = "dynamic")]
pub fn cholesky_start_kernel<F: Float>(
    g: &Tensor<F>,
    status: &mut Tensor<f32>,
    d: usize,
    #[define(F)] _dtype: ElemType,
) {
    if UNIT_POS == 0 {
        let mut sum = 0.0f32;
        for i in 0..d {
            sum += f32::cast_from(g[i * g.stride(0) + i * g.stride(1)]);
        }
        let mut mean = 0.0f32;
        if d > 0 {
            mean = sum / f32::cast_from(d);
        }
        status[status::MEAN_DIAG] = mean;
        status[status::FIRST_FAILURE] = 0.0;
        status[status::FAILED_VALUE] = 0.0;
        status[status::MIN_PIVOT] = PIVOT_CEILING;
    }
}

/// The working matrix of a factorization: the lower triangle of `G + λ I` in `f32`
/// (`λ = relative_damping · mean(diag G)`), contiguous `[d, d]`; the strict upper triangle is
/// zeroed (the result is a plain lower-triangular matrix). One unit per element.
#[cube(launch, address_type = "dynamic")]
pub fn cholesky_init_kernel<F: Float>(
    g: &Tensor<F>,
    a: &mut Tensor<f32>,
    status: &Tensor<f32>,
    d: usize,
    relative_damping: f32,
    #[define(F)] _dtype: ElemType,
) {
    let index = ABSOLUTE_POS;
    if index >= d * d {
        terminate!();
    }
    let row = index / d;
    let col = index % d;
    let mut value = 0.0f32;
    if col <= row {
        value = f32::cast_from(g[row * g.stride(0) + col * g.stride(1)]);
        if col == row {
            value += relative_damping * status[status::MEAN_DIAG];
        }
    }
    a[index] = value;
}

/// Factors the diagonal block `A[k0..k0+b, k0..k0+b]` (`b ≤ nb`) of the contiguous `[d, d]`
/// working matrix in place, inside one cube: the block is staged in shared memory and factored
/// column by column (right-looking, three barriers per column).
///
/// Each pivot `p = L_jj²` is accepted when `tolerance · mean(diag G) < p`, `0 < p` and `p` is
/// finite (NaN fails every ordered comparison). The first rejected pivot is recorded in
/// `status` (blocks run in order, so the first one recorded is the first of the matrix), and
/// the factorization carries on with `L_jj = 1` so later launches stay finite; the caller reads
/// the status once at the end.
#[cube(launch, address_type = "dynamic")]
pub fn cholesky_diag_kernel(
    a: &mut Tensor<f32>,
    status: &mut Tensor<f32>,
    d: usize,
    k0: usize,
    b: usize,
    tolerance: f32,
    #[comptime] nb: usize,
) {
    let mut block = Shared::<[f32]>::new_slice(comptime!(nb * nb));
    let units = CUBE_DIM as usize;
    let unit = UNIT_POS as usize;
    let threshold = tolerance * status[status::MEAN_DIAG];

    let mut index = unit;
    while index < b * b {
        let i = index / b;
        let j = index % b;
        let mut value = 0.0f32;
        if j <= i {
            value = a[(k0 + i) * d + k0 + j];
        }
        block[i * nb + j] = value;
        index += units;
    }
    sync_cube();

    for j in 0..b {
        let p = block[j * nb + j];
        let mut pivot = 1.0f32;
        let mut ok = false;
        if p > threshold && p > 0.0 && p < PIVOT_CEILING {
            ok = true;
            pivot = f32::sqrt(p);
        }
        if unit == 0 {
            if !ok && status[status::FIRST_FAILURE] == 0.0 {
                status[status::FIRST_FAILURE] = f32::cast_from(k0 + j + 1);
                status[status::FAILED_VALUE] = p;
            }
            if p < status[status::MIN_PIVOT] {
                status[status::MIN_PIVOT] = p;
            }
        }
        // Every unit has read the pivot before column j changes.
        sync_cube();

        let mut i = unit;
        while i < b {
            if i > j {
                block[i * nb + j] /= pivot;
            } else if i == j {
                block[j * nb + j] = pivot;
            }
            i += units;
        }
        sync_cube();

        // Rank-1 update of the block's trailing lower triangle.
        let mut index = unit;
        while index < b * b {
            let i = index / b;
            let k = index % b;
            if k > j && k <= i {
                block[i * nb + k] -= block[i * nb + j] * block[k * nb + j];
            }
            index += units;
        }
        sync_cube();
    }

    let mut index = unit;
    while index < b * b {
        let i = index / b;
        let j = index % b;
        if j <= i {
            a[(k0 + i) * d + k0 + j] = block[i * nb + j];
        }
        index += units;
    }
}

/// Triangular solve of one diagonal block, one unit per row: for each row `y` of
/// `Y[.., j0..j0+b]` (`rows` rows at `y_offset`, row stride `y_stride`, contiguous columns),
/// solves `y L_JJᵀ = y` (`transpose`, forward substitution) or `y L_JJ = y` (backward
/// substitution) in place, where `L_JJ` is the `b × b` (`b ≤ nb`) lower-triangular block at
/// `l_offset` (row stride `l_stride`), staged once per cube in shared memory. The
/// off-diagonal blocks' contributions have already been subtracted from `Y`.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub fn trsm_rows_kernel(
    l: &Tensor<f32>,
    y: &mut Tensor<f32>,
    l_offset: usize,
    l_stride: usize,
    y_offset: usize,
    y_stride: usize,
    rows: usize,
    b: usize,
    #[comptime] transpose: bool,
    #[comptime] nb: usize,
) {
    let mut block = Shared::<[f32]>::new_slice(comptime!(nb * nb));
    let units = CUBE_DIM as usize;
    let unit = UNIT_POS as usize;
    let mut index = unit;
    while index < b * b {
        let i = index / b;
        let j = index % b;
        let mut value = 0.0f32;
        if j <= i {
            value = l[l_offset + i * l_stride + j];
        }
        block[i * nb + j] = value;
        index += units;
    }
    sync_cube();

    let row = CUBE_POS * units + unit;
    if row < rows {
        let base = y_offset + row * y_stride;
        let mut x = Array::<f32>::new(nb);
        for j in 0..b {
            x[j] = y[base + j];
        }
        if transpose {
            // (y Lᵀ)_j = Σ_{i ≤ j} y_i L_ji: unknowns left to right.
            for j in 0..b {
                let mut sum = x[j];
                for i in 0..j {
                    sum -= x[i] * block[j * nb + i];
                }
                x[j] = sum / block[j * nb + j];
            }
        } else {
            // (y L)_j = Σ_{i ≥ j} y_i L_ij: unknowns right to left.
            for t in 0..b {
                let j = b - 1 - t;
                let mut sum = x[j];
                for i in j + 1..b {
                    sum -= x[i] * block[i * nb + j];
                }
                x[j] = sum / block[j * nb + j];
            }
        }
        for j in 0..b {
            y[base + j] = x[j];
        }
    }
}

/// `out = cast_f32(x)` for a strided 2-D `x`, into a contiguous `[rows, cols]` `f32` tensor.
#[cube(launch, address_type = "dynamic")]
pub fn copy_f32_kernel<F: Float>(
    x: &Tensor<F>,
    out: &mut Tensor<f32>,
    rows: usize,
    cols: usize,
    #[define(F)] _dtype: ElemType,
) {
    let index = ABSOLUTE_POS;
    if index >= rows * cols {
        terminate!();
    }
    let row = index / cols;
    let col = index % cols;
    out[index] = f32::cast_from(x[row * x.stride(0) + col * x.stride(1)]);
}

/// Zeroes the strict upper triangle of a contiguous `[d, d]` matrix (the trailing updates write
/// whole tiles, including the parts of diagonal tiles above the diagonal).
#[cube(launch, address_type = "dynamic")]
pub fn zero_upper_kernel(a: &mut Tensor<f32>, d: usize) {
    let index = ABSOLUTE_POS;
    if index >= d * d {
        terminate!();
    }
    if index % d > index / d {
        a[index] = 0.0;
    }
}
