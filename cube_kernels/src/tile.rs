//! The tiled matrix-product core shared by every kernel of this crate.
//!
//! One cube computes one `bm × bm` output tile (`bm = threads · micro`) over a range of the
//! reduction axis: operands are staged through shared memory in `bk`-deep slabs (converted to
//! `f32` on load), and each unit accumulates a `micro × micro` register tile in `f32`.
//! Operands are *virtual* matrices ([`OperandArgs`]): a strided view of one tensor, or two tensors
//! concatenated along one axis with the second part scaled — which is how `[W_v | A]` and
//! `[W_u ; s·B]` are read without ever being materialised.

use cubecl::prelude::*;

/// How an operand's second tensor is joined to its first one.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Join {
    /// One tensor only.
    None,
    /// The second tensor continues the rows (`[first ; second]`).
    Rows,
    /// The second tensor continues the columns (`[first | second]`).
    Cols,
}

/// Compile-time shape of a tiled product.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct TileConfig {
    /// Units per side of the cube (`threads²` units in all).
    pub threads: usize,
    /// Side of each unit's register tile.
    pub micro: usize,
    /// Depth of one shared-memory slab along the reduction axis.
    pub bk: usize,
    /// How the left operand is joined.
    pub lhs_join: Join,
    /// How the right operand is joined.
    pub rhs_join: Join,
    /// Whether the left operand is contiguous along the reduction axis (picks the coalesced
    /// load order).
    pub lhs_k_contiguous: bool,
    /// Whether the right operand is contiguous along the reduction axis.
    pub rhs_k_contiguous: bool,
}

impl TileConfig {
    /// Side of the output tile one cube computes.
    pub fn tile(&self) -> usize {
        self.threads * self.micro
    }
}

/// Runtime description of a virtual operand matrix (element offsets and strides into its
/// tensor buffers).
#[derive(CubeLaunch, CubeType, Clone, Copy)]
pub struct OperandArgs {
    /// Offset of element `(0, 0)` of the first tensor.
    pub offset_1: usize,
    /// Row stride of the first tensor.
    pub row_stride_1: usize,
    /// Column stride of the first tensor.
    pub col_stride_1: usize,
    /// Offset of element `(0, 0)` of the second tensor.
    pub offset_2: usize,
    /// Row stride of the second tensor.
    pub row_stride_2: usize,
    /// Column stride of the second tensor.
    pub col_stride_2: usize,
    /// Where the second tensor starts along the joined axis.
    pub split: usize,
    /// Rows of the virtual matrix.
    pub rows: usize,
    /// Columns of the virtual matrix.
    pub cols: usize,
    /// Factor applied to the second tensor's values.
    pub scale_2: f32,
}

/// Element `(row, col)` of a virtual operand as `f32`; zero outside it (ragged tiles).
#[cube]
pub fn read_operand<F: Float>(
    first: &Tensor<F>,
    second: &Tensor<F>,
    args: &OperandArgs,
    row: usize,
    col: usize,
    #[comptime] join: Join,
) -> f32 {
    let mut value = 0.0f32;
    if row < args.rows && col < args.cols {
        match join {
            Join::None => {
                value = f32::cast_from(
                    first[args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1],
                );
            }
            Join::Rows => {
                if row < args.split {
                    value = f32::cast_from(
                        first[args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1],
                    );
                } else {
                    value = f32::cast_from(
                        second[args.offset_2
                            + (row - args.split) * args.row_stride_2
                            + col * args.col_stride_2],
                    ) * args.scale_2;
                }
            }
            Join::Cols => {
                if col < args.split {
                    value = f32::cast_from(
                        first[args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1],
                    );
                } else {
                    value = f32::cast_from(
                        second[args.offset_2
                            + row * args.row_stride_2
                            + (col - args.split) * args.col_stride_2],
                    ) * args.scale_2;
                }
            }
        }
    }
    value
}

/// Accumulates `lhs[m0.., k_begin..k_end] · rhs[k_begin..k_end, n0..]` into this unit's register
/// tile `acc` (`micro × micro`, row-major; unit `(ux, uy)` owns rows `m0 + uy + threads·i` and
/// columns `n0 + ux + threads·j`, a strided layout that keeps shared-memory reads conflict-free).
#[allow(clippy::too_many_arguments)]
#[cube]
pub fn accumulate_tile<F: Float>(
    lhs_1: &Tensor<F>,
    lhs_2: &Tensor<F>,
    lhs: &OperandArgs,
    rhs_1: &Tensor<F>,
    rhs_2: &Tensor<F>,
    rhs: &OperandArgs,
    acc: &mut Array<f32>,
    m0: usize,
    n0: usize,
    k_begin: usize,
    k_end: usize,
    #[comptime] config: TileConfig,
) {
    let threads = config.threads;
    let micro = config.micro;
    let bk = config.bk;
    let tile = comptime!(config.threads * config.micro);
    // One padding column: k-major stores then hit distinct banks.
    let stride = comptime!(config.threads * config.micro + 1);
    let units = comptime!(config.threads * config.threads);
    let loads =
        comptime!(config.threads * config.micro * config.bk / (config.threads * config.threads));

    let mut lhs_smem =
        Shared::<[f32]>::new_slice(comptime!(config.bk * (config.threads * config.micro + 1)));
    let mut rhs_smem =
        Shared::<[f32]>::new_slice(comptime!(config.bk * (config.threads * config.micro + 1)));
    let mut a = Array::<f32>::new(micro);
    let mut b = Array::<f32>::new(micro);

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    let unit = uy * threads + ux;

    let mut k0 = k_begin;
    while k0 < k_end {
        #[unroll]
        for l in 0..loads {
            let index = l * units + unit;
            // Consecutive units walk the operand's contiguous axis (coalesced global reads).
            let (kk, mm) = if config.lhs_k_contiguous {
                (index % bk, index / bk)
            } else {
                (index / tile, index % tile)
            };
            let k = k0 + kk;
            let mut value = 0.0f32;
            if k < k_end {
                value = read_operand::<F>(lhs_1, lhs_2, lhs, m0 + mm, k, config.lhs_join);
            }
            lhs_smem[kk * stride + mm] = value;

            let (kk, nn) = if config.rhs_k_contiguous {
                (index % bk, index / bk)
            } else {
                (index / tile, index % tile)
            };
            let k = k0 + kk;
            let mut value = 0.0f32;
            if k < k_end {
                value = read_operand::<F>(rhs_1, rhs_2, rhs, k, n0 + nn, config.rhs_join);
            }
            rhs_smem[kk * stride + nn] = value;
        }
        sync_cube();

        #[unroll]
        for kk in 0..bk {
            #[unroll]
            for i in 0..micro {
                a[i] = lhs_smem[kk * stride + uy + i * threads];
                b[i] = rhs_smem[kk * stride + ux + i * threads];
            }
            #[unroll]
            for i in 0..micro {
                #[unroll]
                for j in 0..micro {
                    acc[i * micro + j] += a[i] * b[j];
                }
            }
        }
        sync_cube();
        k0 += bk;
    }
}
