//! Host side of the tiled product: strided views, joined operands, launch configuration and
//! split-K.

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::std::tensor::TensorHandle;

use crate::kernels::{
    OutputArgsLaunch, Start, gemm_direct_kernel, gemm_partial_kernel, split_k_reduce_kernel,
};
use crate::launch::{address_of, grid};
use crate::tile::{Join, Loads, OperandArgsLaunch, TileConfig, VEC};

/// A 2-D strided view of a tensor buffer: element `(i, j)` is at
/// `offset + i·row_stride + j·col_stride`.
#[derive(Clone, Debug)]
pub struct MatRef {
    /// The tensor whose buffer is read (or written).
    pub tensor: TensorHandle,
    /// Offset of element `(0, 0)`, in elements.
    pub offset: usize,
    /// Rows of the view.
    pub rows: usize,
    /// Columns of the view.
    pub cols: usize,
    /// Distance between rows, in elements.
    pub row_stride: usize,
    /// Distance between columns, in elements.
    pub col_stride: usize,
}

impl MatRef {
    /// The whole of a 2-D tensor.
    ///
    /// # Panics
    /// If the tensor is not 2-D.
    pub fn new(tensor: TensorHandle) -> Self {
        let shape = tensor.shape().clone();
        let strides = tensor.strides().clone();
        assert_eq!(shape.len(), 2, "MatRef::new: expected a 2-D tensor, got shape {shape:?}");
        Self {
            offset: 0,
            rows: shape[0],
            cols: shape[1],
            row_stride: strides[0],
            col_stride: strides[1],
            tensor,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Columns `start..start + len` (no copy).
    pub fn cols(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.cols, "MatRef::cols: {start}+{len} > {}", self.cols);
        Self { offset: self.offset + start * self.col_stride, cols: len, ..self }
    }

    /// Rows `start..start + len` (no copy).
    pub fn rows(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.rows, "MatRef::rows: {start}+{len} > {}", self.rows);
        Self { offset: self.offset + start * self.row_stride, rows: len, ..self }
    }

    /// Element type of the underlying tensor.
    pub fn dtype(&self) -> ElemType {
        self.tensor.dtype
    }

    pub(crate) fn arg(&self) -> TensorArg {
        self.tensor.clone().into_arg()
    }
}

/// A virtual matrix operand: one view, or two views joined along an axis with the second one
/// scaled (`[W_v | A]`, `[W_u ; s·B]`), read in place by the kernels.
#[derive(Clone, Debug)]
pub enum Operand {
    /// A single view.
    Single(MatRef),
    /// `[first ; scale·second]`: the rows of `second` follow those of `first`.
    Rows {
        /// Top part.
        first: MatRef,
        /// Bottom part (same number of columns).
        second: MatRef,
        /// Factor applied to `second`.
        scale: f32,
    },
    /// `[first | scale·second]`: the columns of `second` follow those of `first`.
    Cols {
        /// Left part.
        first: MatRef,
        /// Right part (same number of rows).
        second: MatRef,
        /// Factor applied to `second`.
        scale: f32,
    },
}

impl Operand {
    /// Rows of the virtual matrix.
    pub fn rows(&self) -> usize {
        match self {
            Operand::Single(m) | Operand::Cols { first: m, .. } => m.rows,
            Operand::Rows { first, second, .. } => first.rows + second.rows,
        }
    }

    /// Columns of the virtual matrix.
    pub fn cols(&self) -> usize {
        match self {
            Operand::Single(m) | Operand::Rows { first: m, .. } => m.cols,
            Operand::Cols { first, second, .. } => first.cols + second.cols,
        }
    }

    fn parts(&self) -> (&MatRef, &MatRef, Join, f32) {
        match self {
            Operand::Single(m) => (m, m, Join::None, 1.0),
            Operand::Rows { first, second, scale } => {
                assert_eq!(first.cols, second.cols, "Operand::Rows: column counts differ");
                (first, second, Join::Rows, *scale)
            }
            Operand::Cols { first, second, scale } => {
                assert_eq!(first.rows, second.rows, "Operand::Cols: row counts differ");
                (first, second, Join::Cols, *scale)
            }
        }
    }

    fn dtype(&self) -> ElemType {
        let (first, second, _, _) = self.parts();
        assert_eq!(first.dtype(), second.dtype(), "Operand: parts have different dtypes");
        first.dtype()
    }

    /// Whether the reduction axis is the contiguous one (`k_axis_is_cols` for a left operand).
    fn k_contiguous(&self, k_axis_is_cols: bool) -> bool {
        let (first, _, _, _) = self.parts();
        if k_axis_is_cols { first.col_stride == 1 } else { first.row_stride == 1 }
    }

    /// Vector size of this operand's loads along its output axis (the rows of a left operand,
    /// `along_rows`, the columns of a right one): [`VEC`] when every part has unit stride
    /// along that axis, offsets and the other stride multiples of `VEC` (buffer offset
    /// included), an extent (and a split, when joined along that axis) multiple of `VEC`, and
    /// the runtime has `VEC`-wide loads for the dtype; 1 otherwise (scalar loads).
    pub(crate) fn vector_size(&self, client: &Client, along_rows: bool) -> usize {
        let (first, second, join, _) = self.parts();
        let elem = first.dtype().size();
        if !client.io_optimized_vector_sizes(elem).any(|size| size == VEC) {
            return 1;
        }
        let extent = if along_rows { self.rows() } else { self.cols() };
        let split = match (join, along_rows) {
            (Join::Rows, true) => first.rows,
            (Join::Cols, false) => first.cols,
            _ => 0,
        };
        if !extent.is_multiple_of(VEC) || !split.is_multiple_of(VEC) {
            return 1;
        }
        let aligned = |m: &MatRef| {
            let (run, other) = if along_rows {
                (m.row_stride, m.col_stride)
            } else {
                (m.col_stride, m.row_stride)
            };
            let buffer_offset = m.tensor.handle.offset_start.unwrap_or(0) as usize;
            run == 1
                && other.is_multiple_of(VEC)
                && m.offset.is_multiple_of(VEC)
                && buffer_offset.is_multiple_of(VEC * elem)
        };
        let parts_aligned = match join {
            Join::None => aligned(first),
            _ => aligned(first) && aligned(second),
        };
        if parts_aligned { VEC } else { 1 }
    }

    pub(crate) fn launch_args(&self) -> (TensorArg, TensorArg, OperandArgsLaunch, Join) {
        let (first, second, join, scale) = self.parts();
        let split = match join {
            Join::None => 0,
            Join::Rows => first.rows,
            Join::Cols => first.cols,
        };
        let args = OperandArgsLaunch::new(
            first.offset,
            first.row_stride,
            first.col_stride,
            second.offset,
            second.row_stride,
            second.col_stride,
            split,
            self.rows(),
            self.cols(),
            scale,
        );
        (first.arg(), second.arg(), args, join)
    }
}

/// `f32`, the accumulation type.
pub(crate) const F32: ElemType = ElemType::Float(cubecl::ir::FloatKind::F32);

/// Slab depth along the reduction axis.
pub(crate) const BK: usize = 16;
/// Largest split-K workspace, in bytes.
const MAX_WORKSPACE: usize = 256 << 20;

/// Launch geometry of one product.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub threads: usize,
    pub micro: usize,
    pub splits: usize,
    pub k_chunk: usize,
}

impl Plan {
    pub fn tile(&self) -> usize {
        self.threads * self.micro
    }
}

/// The tiled core's configuration for `lhs · rhs` under `plan`, with the vector sizes the left
/// and right operands' tensors are bound with (each [`VEC`] or 1).
pub(crate) fn tile_config(
    client: &Client,
    plan: &Plan,
    lhs: &Operand,
    rhs: &Operand,
) -> (TileConfig, usize, usize) {
    // Vectors along the output axis where the layout allows it, else along the depth.
    let loads = |operand: &Operand, output_axis_is_rows: bool| {
        if operand.vector_size(client, output_axis_is_rows) == VEC {
            Loads::AlongOutput
        } else if operand.vector_size(client, !output_axis_is_rows) == VEC {
            Loads::AlongDepth
        } else {
            Loads::Scalar
        }
    };
    let (lhs_loads, rhs_loads) = (loads(lhs, true), loads(rhs, false));
    let size = |loads| if loads == Loads::Scalar { 1 } else { VEC };
    let (lhs_vec, rhs_vec) = (size(lhs_loads), size(rhs_loads));
    let config = TileConfig {
        threads: plan.threads,
        micro: plan.micro,
        bk: BK,
        lhs_join: lhs.parts().2,
        rhs_join: rhs.parts().2,
        lhs_k_contiguous: lhs.k_contiguous(true),
        rhs_k_contiguous: rhs.k_contiguous(false),
        lhs_loads,
        rhs_loads,
    };
    if std::env::var_os("EMLOC_KERNELS_LOG").is_some() {
        eprintln!(
            "[emloc-cube-kernels] {}x{} · {}x{}: loads lhs {lhs_loads:?}, rhs {rhs_loads:?}",
            lhs.rows(),
            lhs.cols(),
            rhs.rows(),
            rhs.cols()
        );
    }
    (config, lhs_vec, rhs_vec)
}

/// Cubes that keep the device busy: two per streaming multiprocessor (or core).
fn target_cubes(client: &Client) -> usize {
    let hw = &client.properties().hardware;
    let units = hw.num_streaming_multiprocessors.or(hw.num_cpu_cores).unwrap_or(16);
    2 * units as usize
}

/// Picks the cube shape, register tile and split-K factor for an `rows × cols` product of depth
/// `depth`; `tiles_of` counts the output tiles for a tile side (all of them, or only the lower
/// triangle of a symmetric product).
pub(crate) fn plan(
    client: &Client,
    rows: usize,
    cols: usize,
    depth: usize,
    tiles_of: impl Fn(usize) -> usize,
) -> Plan {
    let hw = &client.properties().hardware;
    let max_units = hw.max_units_per_cube as usize;
    // 16×16 units where allowed; smaller cubes on runtimes with few units per cube.
    let mut threads = 16;
    while threads > 1 && threads * threads > max_units {
        threads /= 2;
    }
    let target = target_cubes(client);
    // 8×8 register tiles (twice the flops per shared-memory read of 4×4; measured 2.2× faster
    // on lavapipe) unless the output is thin; split-K, not smaller tiles, fills the device.
    let micro = if rows.min(cols) > threads * 4 { 8 } else { 4 };
    let tiles = tiles_of(threads * micro).max(1);

    let mut splits = 1;
    if tiles < target {
        let wanted = target.div_ceil(tiles);
        // Each chunk at least four slabs deep, and a bounded workspace.
        let by_depth = (depth / (4 * BK)).max(1);
        let by_memory = (MAX_WORKSPACE / (4 * rows * cols).max(1)).max(1);
        splits = wanted.min(by_depth).min(by_memory);
    }
    let k_chunk = depth.div_ceil(splits).div_ceil(BK) * BK;
    let splits = depth.div_ceil(k_chunk.max(1)).max(1);
    let plan = Plan { threads, micro, splits, k_chunk: k_chunk.max(BK) };
    // Set EMLOC_KERNELS_LOG to see each launch's geometry (tuning, benchmark reports).
    if std::env::var_os("EMLOC_KERNELS_LOG").is_some() {
        eprintln!(
            "[emloc-cube-kernels] {rows}x{cols} depth {depth}: {plan:?}, {tiles} tiles, target {target} cubes"
        );
    }
    plan
}

/// The address width of a product over these operands and output (panics when the runtime
/// lacks it; see [`crate::KernelError`]).
pub(crate) fn product_address(
    client: &Client,
    lhs: &Operand,
    rhs: &Operand,
    out: &MatRef,
) -> AddressType {
    let (l, r) = (lhs.parts(), rhs.parts());
    address_of(client, &[&l.0.tensor, &l.1.tensor, &r.0.tensor, &r.1.tensor, &out.tensor])
}

/// A contiguous `[rows, cols]` tensor with uninitialised contents.
pub fn empty_matrix(client: &Client, rows: usize, cols: usize, dtype: ElemType) -> TensorHandle {
    let handle = client.empty(rows * cols * dtype.size());
    TensorHandle::new_contiguous([rows, cols], handle, dtype)
}

/// Writes `alpha · lhs · rhs (+ bias)` into `out` (`lhs.rows() × rhs.cols()`), accumulating in
/// `f32`. `out` must not share a buffer with the operands; `bias` is 1-D of length `rhs.cols()`.
///
/// # Panics
/// On mismatched shapes or dtypes.
pub fn gemm(
    client: &Client,
    lhs: &Operand,
    rhs: &Operand,
    out: &MatRef,
    bias: Option<&TensorHandle>,
    alpha: f32,
) {
    let (rows, depth, cols) = (lhs.rows(), lhs.cols(), rhs.cols());
    assert_eq!(rhs.rows(), depth, "gemm: inner dimensions differ ({depth} vs {})", rhs.rows());
    assert_eq!((out.rows, out.cols), (rows, cols), "gemm: output has the wrong shape");
    let dtype = lhs.dtype();
    assert_eq!(rhs.dtype(), dtype, "gemm: operands have different dtypes");
    assert_eq!(out.dtype(), dtype, "gemm: output dtype differs from the operands'");
    if rows == 0 || cols == 0 {
        return;
    }

    let plan = plan(client, rows, cols, depth, |tile| rows.div_ceil(tile) * cols.div_ceil(tile));
    let tile = plan.tile();
    let (l1, l2, largs, _) = lhs.launch_args();
    let (r1, r2, rargs, _) = rhs.launch_args();
    let (config, lhs_vec, rhs_vec) = tile_config(client, &plan, lhs, rhs);
    let cube_dim = CubeDim::new_2d(plan.threads as u32, plan.threads as u32);
    let bias_arg = || bias.map(|b| b.clone().into_arg()).into();
    let address = product_address(client, lhs, rhs, out);

    if depth == 0 || plan.splits == 1 {
        let dst = OutputArgsLaunch::new(
            out.offset,
            out.row_stride,
            out.col_stride,
            rows,
            cols,
            depth,
            depth.max(1),
            alpha,
        );
        gemm_direct_kernel::launch(
            client,
            grid(client, [rows.div_ceil(tile), cols.div_ceil(tile), 1]),
            cube_dim,
            address,
            lhs_vec,
            rhs_vec,
            l1,
            l2,
            r1,
            r2,
            bias_arg(),
            out.arg(),
            largs,
            rargs,
            dst,
            config,
            false,
            dtype,
        );
        return;
    }

    let partial = client.empty(plan.splits * rows * cols * 4);
    let partial = TensorHandle::new_contiguous([plan.splits, rows, cols], partial, F32);
    let dst = |alpha| {
        OutputArgsLaunch::new(
            out.offset,
            out.row_stride,
            out.col_stride,
            rows,
            cols,
            depth,
            plan.k_chunk,
            alpha,
        )
    };
    gemm_partial_kernel::launch(
        client,
        grid(client, [rows.div_ceil(tile), cols.div_ceil(tile), plan.splits]),
        cube_dim,
        address.max(address_of(client, &[&partial])),
        lhs_vec,
        rhs_vec,
        l1,
        l2,
        r1,
        r2,
        partial.clone().into_arg(),
        largs,
        rargs,
        dst(1.0),
        config,
        false,
        dtype,
    );
    reduce(client, &partial, plan.splits, out, bias, None, None, dst(alpha));
}

/// Sums the split-K partials into `out`; see `split_k_reduce_kernel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce(
    client: &Client,
    partial: &TensorHandle,
    splits: usize,
    out: &MatRef,
    bias: Option<&TensorHandle>,
    base: Option<&TensorHandle>,
    mirror_tile: Option<(usize, bool)>,
    dst: OutputArgsLaunch,
) {
    let elements = out.rows * out.cols;
    let cube_dim = CubeDim::new(client, elements);
    let cube_count = cubecl::calculate_cube_count_elemwise(client, elements, cube_dim);
    let (tile, mirror, in_place) = match mirror_tile {
        Some((tile, in_place)) => (tile, true, in_place),
        None => (1, false, false),
    };
    let start = match (base, in_place) {
        (Some(_), _) => Start::Base,
        (None, true) => Start::Output,
        (None, false) => Start::Zero,
    };
    let mut tensors = vec![partial, &out.tensor];
    tensors.extend(bias);
    tensors.extend(base);
    split_k_reduce_kernel::launch(
        client,
        cube_count,
        cube_dim,
        address_of(client, &tensors),
        partial.clone().into_arg(),
        bias.map(|b| b.clone().into_arg()).into(),
        base.map(|b| b.clone().into_arg()).into(),
        out.arg(),
        dst,
        splits,
        tile,
        mirror,
        start,
        out.dtype(),
    );
}

/// Adds `alpha · lhs · rhs` to `out` in place (`out += alpha · lhs · rhs`), accumulating in
/// `f32`. `out` may share a buffer with the operands as long as the regions do not overlap
/// (the blocked triangular solve updates one column block of `Y` from the others).
///
/// One cube per output tile over the whole depth (no split-K: the split partials would need a
/// second in-place reduction; the solve's updates are wide enough in rows to fill the device).
///
/// # Panics
/// On mismatched shapes or dtypes.
pub fn gemm_accumulate(client: &Client, lhs: &Operand, rhs: &Operand, out: &MatRef, alpha: f32) {
    let (rows, depth, cols) = (lhs.rows(), lhs.cols(), rhs.cols());
    assert_eq!(rhs.rows(), depth, "gemm_accumulate: inner dimensions differ");
    assert_eq!((out.rows, out.cols), (rows, cols), "gemm_accumulate: output has the wrong shape");
    let dtype = lhs.dtype();
    assert_eq!(rhs.dtype(), dtype, "gemm_accumulate: operands have different dtypes");
    assert_eq!(out.dtype(), dtype, "gemm_accumulate: output dtype differs from the operands'");
    if rows == 0 || cols == 0 || depth == 0 {
        return;
    }
    let mut plan =
        plan(client, rows, cols, depth, |tile| rows.div_ceil(tile) * cols.div_ceil(tile));
    if rows.min(cols) <= 32 && plan.threads >= 8 {
        // A thin update (one 32-wide block of the triangular solve): 32-wide tiles, so that
        // half of each 64-wide tile does not compute zeros.
        plan.threads = 8;
        plan.micro = 4;
    }
    let tile = plan.tile();
    let (l1, l2, largs, _) = lhs.launch_args();
    let (r1, r2, rargs, _) = rhs.launch_args();
    let (config, lhs_vec, rhs_vec) = tile_config(client, &plan, lhs, rhs);
    let address = product_address(client, lhs, rhs, out);
    let dst = OutputArgsLaunch::new(
        out.offset,
        out.row_stride,
        out.col_stride,
        rows,
        cols,
        depth,
        depth,
        alpha,
    );
    gemm_direct_kernel::launch(
        client,
        grid(client, [rows.div_ceil(tile), cols.div_ceil(tile), 1]),
        CubeDim::new_2d(plan.threads as u32, plan.threads as u32),
        address,
        lhs_vec,
        rhs_vec,
        l1,
        l2,
        r1,
        r2,
        Option::<TensorArg>::None.into(),
        out.arg(),
        largs,
        rargs,
        dst,
        config,
        true,
        dtype,
    );
}
