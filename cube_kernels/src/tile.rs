//! The tiled matrix-product core shared by every kernel of this crate.
//!
//! One cube computes one `bm × bm` output tile (`bm = threads · micro`) over a range of the
//! reduction axis: operands are staged through shared memory in `bk`-deep slabs (converted to
//! `f32` on load, stored as 4-wide `f32` vectors along the output axes), and each unit
//! accumulates a `micro × micro` register tile in `f32` with 4-wide vector FMAs.
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

/// How an operand's slabs are read from global memory.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Loads {
    /// One element at a time (tensors bound with vector size 1).
    Scalar,
    /// `VEC`-wide vectors along the output axis (the rows of a left operand, the columns of a
    /// right one): each one is a slab vector as it is.
    AlongOutput,
    /// `VEC`-wide vectors along the reduction axis: a unit reads a `VEC × VEC` block (`VEC`
    /// vectors) and transposes it into `VEC` slab vectors.
    AlongDepth,
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
    /// How the left operand is read (any mode but `Scalar` binds its tensors with vector size
    /// `VEC`; the host checked strides, offsets and extents).
    pub lhs_loads: Loads,
    /// How the right operand is read.
    pub rhs_loads: Loads,
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

/// Element `(row, col)` of a virtual operand as `f32`; zero outside it (ragged tiles). The
/// tensors are bound with vector size 1.
#[cube]
pub fn read_operand<F: Float, N: Size>(
    first: &Tensor<Vector<F, N>>,
    second: &Tensor<Vector<F, N>>,
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
                    first[args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1]
                        .extract(0usize),
                );
            }
            Join::Rows => {
                if row < args.split {
                    value = f32::cast_from(
                        first[args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1]
                            .extract(0usize),
                    );
                } else {
                    value = f32::cast_from(
                        second[args.offset_2
                            + (row - args.split) * args.row_stride_2
                            + col * args.col_stride_2]
                            .extract(0usize),
                    ) * args.scale_2;
                }
            }
            Join::Cols => {
                if col < args.split {
                    value = f32::cast_from(
                        first[args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1]
                            .extract(0usize),
                    );
                } else {
                    value = f32::cast_from(
                        second[args.offset_2
                            + row * args.row_stride_2
                            + (col - args.split) * args.col_stride_2]
                            .extract(0usize),
                    ) * args.scale_2;
                }
            }
        }
    }
    value
}

/// The `VEC` elements `(row + c, col)` (`along_rows`) or `(row, col + c)` of a virtual operand,
/// as `f32`; zero outside it. With `vectorized`, the tensors are bound with vector size `VEC`
/// and the run is one aligned vector load: the host guarantees unit stride along the run,
/// offsets and the other stride multiples of `VEC`, an extent along the run (and a split, if
/// the join is along it) multiple of `VEC`, so a run lies wholly inside or outside the operand
/// and inside one of its parts. Otherwise `VEC` scalar reads.
// `raw` starts empty and every arm of the (comptime) join assigns it.
#[allow(clippy::too_many_arguments, unused_assignments)]
#[cube]
pub fn read_run<F: Float, N: Size>(
    first: &Tensor<Vector<F, N>>,
    second: &Tensor<Vector<F, N>>,
    args: &OperandArgs,
    row: usize,
    col: usize,
    #[comptime] along_rows: bool,
    #[comptime] join: Join,
    #[comptime] vectorized: bool,
) -> Vec4 {
    let mut value = Vec4::new(0.0f32);
    if vectorized {
        if row < args.rows && col < args.cols {
            let mut scale = 1.0f32;
            let mut raw = Vector::<F, N>::empty();
            let index_1 = args.offset_1 + row * args.row_stride_1 + col * args.col_stride_1;
            match join {
                Join::None => {
                    raw = first[index_1 / VEC];
                }
                Join::Rows => {
                    if row < args.split {
                        raw = first[index_1 / VEC];
                    } else {
                        raw = second[(args.offset_2
                            + (row - args.split) * args.row_stride_2
                            + col * args.col_stride_2)
                            / VEC];
                        scale = args.scale_2;
                    }
                }
                Join::Cols => {
                    if col < args.split {
                        raw = first[index_1 / VEC];
                    } else {
                        raw = second[(args.offset_2
                            + row * args.row_stride_2
                            + (col - args.split) * args.col_stride_2)
                            / VEC];
                        scale = args.scale_2;
                    }
                }
            }
            #[unroll]
            for c in 0..VEC {
                value.insert(c, f32::cast_from(raw.extract(c)) * scale);
            }
        }
    } else {
        #[unroll]
        for c in 0..VEC {
            let (r, cc) = if along_rows { (row + c, col) } else { (row, col + c) };
            value.insert(c, read_operand::<F, N>(first, second, args, r, cc, join));
        }
    }
    value
}

/// Width of the `f32` vectors the register tile and the shared-memory slabs are made of.
pub const VEC: usize = 4;

/// One register-tile vector: `VEC` consecutive output columns (or slab rows) in `f32`.
pub type Vec4 = Vector<f32, Const<4>>;

/// A zeroed register tile for [`accumulate_tile`]: `micro` rows of `micro / VEC` vectors.
#[cube]
pub fn zero_tile(#[comptime] config: TileConfig) -> Array<Vec4> {
    let len = comptime!(config.micro * config.micro / VEC);
    let mut acc = Array::<Vec4>::new(len);
    #[unroll]
    for i in 0..len {
        acc[i] = Vec4::new(0.0f32);
    }
    acc
}

/// Row of the output held in register-tile row `i` by the unit at `uy` (`ux` for columns):
/// units own `VEC`-wide runs, `threads · VEC` apart, so that one vector load from a slab gives
/// a unit `VEC` consecutive rows (columns).
#[cube]
pub fn tile_offset(unit: usize, i: usize, #[comptime] threads: usize) -> usize {
    (i / VEC) * comptime!(threads * VEC) + unit * VEC + i % VEC
}

/// Stages one `bk`-deep slab of an operand in shared memory: `smem[kk · width + v]` holds the
/// `VEC` elements at output positions `origin + v·VEC ..` and depth `k0 + kk` (zero outside the
/// operand or past `k_end`). `is_lhs`: the output axis is the operand's rows (else its columns).
#[allow(clippy::too_many_arguments)]
#[cube]
pub fn load_slab<F: Float, N: Size>(
    first: &Tensor<Vector<F, N>>,
    second: &Tensor<Vector<F, N>>,
    args: &OperandArgs,
    smem: &mut Shared<[Vec4]>,
    origin: usize,
    k0: usize,
    k_end: usize,
    unit: usize,
    #[comptime] is_lhs: bool,
    #[comptime] join: Join,
    #[comptime] loads: Loads,
    #[comptime] k_contiguous: bool,
    #[comptime] config: TileConfig,
) {
    let bk = config.bk;
    let width = comptime!(config.threads * config.micro / VEC);
    let units = comptime!(config.threads * config.threads);
    match loads {
        Loads::AlongDepth => {
            // One VEC × VEC block per unit and step: VEC vectors along the depth (rows
            // origin + v·VEC + c), transposed into VEC slab vectors. Consecutive units walk the
            // depth first (coalesced).
            let runs = comptime!(config.bk / VEC);
            let blocks = comptime!(config.bk / VEC * config.threads * config.micro / VEC);
            let steps = comptime!(blocks.div_ceil(config.threads * config.threads));
            let mut block = Array::<Vec4>::new(VEC);
            #[unroll]
            for l in 0..steps {
                let index = l * units + unit;
                if index < blocks {
                    let kb = index % runs;
                    let v = index / runs;
                    let k = k0 + kb * VEC;
                    #[unroll]
                    for c in 0..VEC {
                        let position = origin + v * VEC + c;
                        let mut run = Vec4::new(0.0f32);
                        // The host checked the depth (and a split along it) is a multiple of
                        // VEC, as is k: a run lies wholly before or past k_end.
                        if k < k_end {
                            let (row, col) = if is_lhs { (position, k) } else { (k, position) };
                            run = read_run::<F, N>(
                                first, second, args, row, col, !is_lhs, join, true,
                            );
                        }
                        block[c] = run;
                    }
                    #[unroll]
                    for kk in 0..VEC {
                        let mut value = Vec4::new(0.0f32);
                        #[unroll]
                        for c in 0..VEC {
                            value.insert(c, block[c].extract(kk));
                        }
                        smem[(kb * VEC + kk) * width + v] = value;
                    }
                }
            }
        }
        _ => {
            let total = comptime!(config.bk * config.threads * config.micro / VEC);
            let steps = comptime!(total.div_ceil(config.threads * config.threads));
            let vectorized = comptime!(loads == Loads::AlongOutput);
            #[unroll]
            for l in 0..steps {
                let index = l * units + unit;
                if index < total {
                    // Consecutive units walk the operand's contiguous axis (coalesced reads).
                    let (kk, v) = if k_contiguous && !vectorized {
                        (index % bk, index / bk)
                    } else {
                        (index / width, index % width)
                    };
                    let k = k0 + kk;
                    let mut value = Vec4::new(0.0f32);
                    if k < k_end {
                        let position = origin + v * VEC;
                        let (row, col) = if is_lhs { (position, k) } else { (k, position) };
                        value = read_run::<F, N>(
                            first, second, args, row, col, is_lhs, join, vectorized,
                        );
                    }
                    smem[kk * width + v] = value;
                }
            }
        }
    }
}

/// Accumulates `lhs[m0.., k_begin..k_end] · rhs[k_begin..k_end, n0..]` into this unit's register
/// tile `acc` (`micro × micro`, stored as `micro` rows of `micro / VEC` vectors of `VEC`
/// columns; see [`tile_offset`] for which rows and columns unit `(ux, uy)` owns).
///
/// Each slab is stored `k`-major as `VEC`-wide vectors along the output axis, so one step of
/// the inner loop is `micro / VEC` vector loads per operand and `micro²/VEC` vector FMAs
/// (a broadcast row value times a column vector).
#[allow(clippy::too_many_arguments)]
#[cube]
pub fn accumulate_tile<F: Float, NL: Size, NR: Size>(
    lhs_1: &Tensor<Vector<F, NL>>,
    lhs_2: &Tensor<Vector<F, NL>>,
    lhs: &OperandArgs,
    rhs_1: &Tensor<Vector<F, NR>>,
    rhs_2: &Tensor<Vector<F, NR>>,
    rhs: &OperandArgs,
    acc: &mut Array<Vec4>,
    m0: usize,
    n0: usize,
    k_begin: usize,
    k_end: usize,
    #[comptime] config: TileConfig,
) {
    let threads = config.threads;
    let bk = config.bk;
    let groups = comptime!(config.micro / VEC);
    // Vectors per slab row (the tile's width in vectors).
    let width = comptime!(config.threads * config.micro / VEC);
    let total = comptime!(config.bk * config.threads * config.micro / VEC);

    let mut lhs_smem = Shared::<[Vec4]>::new_slice(total);
    let mut rhs_smem = Shared::<[Vec4]>::new_slice(total);
    let mut a = Array::<Vec4>::new(groups);
    let mut b = Array::<Vec4>::new(groups);

    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    let unit = uy * threads + ux;

    let mut k0 = k_begin;
    while k0 < k_end {
        load_slab::<F, NL>(
            lhs_1,
            lhs_2,
            lhs,
            &mut lhs_smem,
            m0,
            k0,
            k_end,
            unit,
            true,
            config.lhs_join,
            config.lhs_loads,
            config.lhs_k_contiguous,
            config,
        );
        load_slab::<F, NR>(
            rhs_1,
            rhs_2,
            rhs,
            &mut rhs_smem,
            n0,
            k0,
            k_end,
            unit,
            false,
            config.rhs_join,
            config.rhs_loads,
            config.rhs_k_contiguous,
            config,
        );
        sync_cube();

        #[unroll]
        for kk in 0..bk {
            #[unroll]
            for g in 0..groups {
                a[g] = lhs_smem[kk * width + g * threads + uy];
                b[g] = rhs_smem[kk * width + g * threads + ux];
            }
            #[unroll]
            for g in 0..groups {
                let column = a[g];
                #[unroll]
                for v in 0..VEC {
                    // Register-tile row g·VEC + v.
                    let row = Vec4::new(column.extract(v));
                    let base = (g * VEC + v) * groups;
                    #[unroll]
                    for h in 0..groups {
                        acc[base + h] = fma(row, b[h], acc[base + h]);
                    }
                }
            }
        }
        sync_cube();
        k0 += bk;
    }
}
