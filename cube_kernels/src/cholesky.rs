//! Blocked Cholesky factorization `G + λ I = L Lᵀ` and blocked triangular solves with `L`.
//!
//! Right-looking, block size [`CHOLESKY_BLOCK`]: per block column, one cube factors the
//! diagonal block in shared memory ([`cholesky_diag_kernel`]), the panel below it is solved
//! against it row by row ([`trsm_rows_kernel`]), and the trailing lower triangle gets the
//! rank-`nb` update `A₂₂ −= L₂₁ L₂₁ᵀ` from the tiled-product core (the Gram kernel's
//! lower-tiles-only product, [`syrk_direct_kernel`], with `alpha = −1`, accumulating in place).
//! Everything is computed in `f32`, whatever the input's float type.
//!
//! Failure is not an early exit: every launch is queued without a host round trip, the first
//! rejected pivot is recorded in a small status buffer on the device, and the caller reads that
//! buffer once (see [`CholeskyStatus`]) and decides whether to retry with more damping.

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::std::tensor::TensorHandle;

use crate::gemm::{
    F32, MatRef, Operand, empty_matrix, gemm_accumulate, plan, product_address, tile_config,
};
use crate::gram::lower_tiles;
use crate::kernels::{
    OutputArgsLaunch, cholesky_diag_kernel, cholesky_init_kernel, cholesky_start_kernel,
    copy_f32_kernel, status, syrk_direct_kernel, trsm_rows_kernel, zero_upper_kernel,
};
use crate::launch::{address_of, grid};

/// Block size of the factorization and of the triangular solves: the diagonal block
/// (`nb² f32` = 4 KiB) fits the shared memory of every runtime, and each row's unknowns
/// (`nb` floats) fit in registers.
pub const CHOLESKY_BLOCK: usize = 32;

/// Units of the one-cube diagonal factorization.
const DIAG_UNITS: usize = 256;
/// Rows per cube in the row-wise block solves.
const ROW_UNITS: usize = 64;

/// The host's reading of a factorization's status buffer (layout in
/// [`kernels::status`](crate::kernels::status)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CholeskyStatus {
    /// `mean(diag G)` of the undamped input.
    pub mean_diag: f64,
    /// The first rejected pivot (0-based), if any.
    pub failed_pivot: Option<usize>,
    /// Its value `L_jj²` (0 when none failed).
    pub failed_value: f64,
    /// The smallest pivot `L_jj²` seen.
    pub min_pivot: f64,
}

impl CholeskyStatus {
    /// Parses the `[status::LEN]` values of a status buffer.
    ///
    /// # Panics
    /// If `values` is shorter than [`status::LEN`].
    pub fn from_values(values: &[f32]) -> Self {
        assert!(values.len() >= status::LEN, "CholeskyStatus: expected {} values", status::LEN);
        let first = values[status::FIRST_FAILURE];
        Self {
            mean_diag: values[status::MEAN_DIAG] as f64,
            failed_pivot: (first > 0.0).then(|| first as usize - 1),
            failed_value: values[status::FAILED_VALUE] as f64,
            min_pivot: values[status::MIN_PIVOT] as f64,
        }
    }
}

fn elementwise(client: &Client, elements: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, elements.max(1));
    (cubecl::calculate_cube_count_elemwise(client, elements.max(1), dim), dim)
}

fn units(client: &Client, wanted: usize) -> usize {
    let max = client.properties().hardware.max_units_per_cube as usize;
    wanted.min(max).max(1)
}

/// Factors `G + λ I = L Lᵀ` with `λ = relative_damping · mean(diag G)`, for a `[d, d]`
/// symmetric `g` of any float dtype and strides (only its lower triangle is read).
///
/// Returns `(L, status)`: `L` a contiguous `[d, d]` `f32` lower-triangular matrix (zeros above
/// the diagonal) and a `[status::LEN]` `f32` status buffer, still on the device. A pivot
/// `p = L_jj²` is rejected when it is not finite, not positive, or not above
/// `pivot_tolerance · mean(diag G)`; read the status ([`CholeskyStatus::from_values`]) before
/// trusting `L`, whose columns from the first rejected pivot on are meaningless.
///
/// # Panics
/// If `g` is not square.
pub fn cholesky(
    client: &Client,
    g: TensorHandle,
    relative_damping: f32,
    pivot_tolerance: f32,
) -> (TensorHandle, TensorHandle) {
    let shape = g.shape().clone();
    assert!(
        shape.len() == 2 && shape[0] == shape[1],
        "cholesky: expected a square matrix, got {shape:?}"
    );
    let d = shape[0];
    let dtype = g.dtype;
    let status_buf =
        TensorHandle::new_contiguous([status::LEN], client.empty(status::LEN * 4), F32);
    let a = empty_matrix(client, d, d, F32);

    // One address width for every launch: the working matrix is the largest buffer.
    let address = address_of(client, &[&g, &a]);
    cholesky_start_kernel::launch(
        client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        address,
        g.clone().into_arg(),
        status_buf.clone().into_arg(),
        d,
        dtype,
    );
    if d == 0 {
        return (a, status_buf);
    }
    let (count, dim) = elementwise(client, d * d);
    cholesky_init_kernel::launch(
        client,
        count,
        dim,
        address,
        g.into_arg(),
        a.clone().into_arg(),
        status_buf.clone().into_arg(),
        d,
        relative_damping,
        dtype,
    );

    let nb = CHOLESKY_BLOCK;
    let diag_units = units(client, DIAG_UNITS);
    let row_units = units(client, ROW_UNITS);
    let whole = MatRef::new(a.clone());
    let mut k0 = 0;
    while k0 < d {
        let b = nb.min(d - k0);
        cholesky_diag_kernel::launch(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(diag_units as u32),
            address,
            a.clone().into_arg(),
            status_buf.clone().into_arg(),
            d,
            k0,
            b,
            pivot_tolerance,
            nb,
        );
        let below = d - k0 - b;
        if below > 0 {
            // Panel: A₂₁ ← A₂₁ L₁₁⁻ᵀ, one unit per row.
            trsm_rows_kernel::launch(
                client,
                grid(client, [below.div_ceil(row_units), 1, 1]),
                CubeDim::new_1d(row_units as u32),
                address,
                a.clone().into_arg(),
                a.clone().into_arg(),
                k0 * d + k0,
                d,
                (k0 + b) * d + k0,
                d,
                below,
                b,
                true,
                nb,
            );
            // Trailing update, lower tiles only: A₂₂ −= L₂₁ L₂₁ᵀ.
            let panel = whole.clone().rows(k0 + b, below).cols(k0, b);
            let trailing = whole.clone().rows(k0 + b, below).cols(k0 + b, below);
            syrk_update(client, &panel, &trailing);
        }
        k0 += b;
    }
    let (count, dim) = elementwise(client, d * d);
    zero_upper_kernel::launch(client, count, dim, address, a.clone().into_arg(), d);
    (a, status_buf)
}

/// `out −= panel · panelᵀ` on the tiles on and below the diagonal of `out` (`f32`, in place).
fn syrk_update(client: &Client, panel: &MatRef, out: &MatRef) {
    let (m, depth) = (panel.rows, panel.cols);
    // The depth is one block: no split along it, whatever the plan would do for a deep product.
    let plan = plan(client, m, m, depth, lower_tiles(m));
    let tile = plan.tile();
    let blocks = m.div_ceil(tile);
    let lhs = Operand::Single(panel.clone());
    let rhs = Operand::Single(panel.clone().t());
    let address = product_address(client, &lhs, &rhs, out);
    let (config, lhs_vec, rhs_vec) = tile_config(client, &plan, &lhs, &rhs);
    let (l1, l2, largs, _) = lhs.launch_args();
    let (r1, r2, rargs, _) = rhs.launch_args();
    let dst =
        OutputArgsLaunch::new(out.offset, out.row_stride, out.col_stride, m, m, depth, depth, -1.0);
    syrk_direct_kernel::launch(
        client,
        grid(client, [blocks, blocks, 1]),
        CubeDim::new_2d(plan.threads as u32, plan.threads as u32),
        address,
        lhs_vec,
        rhs_vec,
        l1,
        l2,
        r1,
        r2,
        out.arg(),
        largs,
        rargs,
        dst,
        config,
        true,
        F32,
    );
}

/// A contiguous `f32` copy of a 2-D tensor of any float dtype and strides.
pub fn to_f32_contiguous(client: &Client, x: TensorHandle) -> TensorHandle {
    let shape = x.shape().clone();
    assert_eq!(shape.len(), 2, "to_f32_contiguous: expected a 2-D tensor, got {shape:?}");
    let (rows, cols) = (shape[0], shape[1]);
    let out = empty_matrix(client, rows, cols, F32);
    if rows * cols > 0 {
        let dtype = x.dtype;
        let (count, dim) = elementwise(client, rows * cols);
        copy_f32_kernel::launch(
            client,
            count,
            dim,
            address_of(client, &[&x, &out]),
            x.into_arg(),
            out.clone().into_arg(),
            rows,
            cols,
            dtype,
        );
    }
    out
}

/// Solves `Y L = X` (`transpose == false`, i.e. `Y = X L⁻¹`) or `Y Lᵀ = X`
/// (`transpose == true`, `Y = X L⁻ᵀ`) for a lower-triangular `[d, d]` `l` and `x` `[m, d]`
/// (any float dtype and strides), returning `Y` as a contiguous `[m, d]` `f32` tensor.
///
/// Blocked by column blocks of [`CHOLESKY_BLOCK`]: each block of `Y` first receives the
/// product of the blocks already solved with the matching block of `L` (the tiled product,
/// accumulating in place), then its `nb × nb` triangular system is solved row by row with the
/// diagonal block in shared memory. `Y = X L⁻¹` walks the blocks right to left, `X L⁻ᵀ` left
/// to right. Only the lower triangle of `l` is read; `l`'s diagonal is not checked (a zero
/// gives infinities, as in any triangular solve).
///
/// Whitening needs the first form (`W_v = Σ^{1/2} Vᵀ L⁻¹`); the second is CholeskyQR's
/// `Q = A R⁻¹` with `R = Lᵀ`. An explicit inverse is `solve(I)`.
///
/// # Panics
/// On mismatched shapes.
pub fn solve_lower_right(
    client: &Client,
    l: TensorHandle,
    x: TensorHandle,
    transpose: bool,
) -> TensorHandle {
    let (ls, xs) = (l.shape().clone(), x.shape().clone());
    assert!(ls.len() == 2 && ls[0] == ls[1], "solve_lower_right: L must be square, got {ls:?}");
    let d = ls[0];
    assert!(xs.len() == 2 && xs[1] == d, "solve_lower_right: X must be [m, {d}], got {xs:?}");
    let m = xs[0];
    // f32, contiguous: the row kernel reads L's diagonal blocks with unit column stride.
    let l = if l.dtype == F32 && l.strides()[1] == 1 { l } else { to_f32_contiguous(client, l) };
    let y = to_f32_contiguous(client, x);
    if m == 0 || d == 0 {
        return y;
    }
    let l_ref = MatRef::new(l.clone());
    let y_ref = MatRef::new(y.clone());
    let nb = CHOLESKY_BLOCK;
    let row_units = units(client, ROW_UNITS);
    let blocks = d.div_ceil(nb);
    for step in 0..blocks {
        let block = if transpose { step } else { blocks - 1 - step };
        let j0 = block * nb;
        let b = nb.min(d - j0);
        let target = y_ref.clone().cols(j0, b);
        if transpose && j0 > 0 {
            // Y_J −= Y_{<J} L_{J,<J}ᵀ
            let lhs = Operand::Single(y_ref.clone().cols(0, j0));
            let rhs = Operand::Single(l_ref.clone().rows(j0, b).cols(0, j0).t());
            gemm_accumulate(client, &lhs, &rhs, &target, -1.0);
        }
        if !transpose && j0 + b < d {
            // Y_J −= Y_{>J} L_{>J,J}
            let rest = d - j0 - b;
            let lhs = Operand::Single(y_ref.clone().cols(j0 + b, rest));
            let rhs = Operand::Single(l_ref.clone().rows(j0 + b, rest).cols(j0, b));
            gemm_accumulate(client, &lhs, &rhs, &target, -1.0);
        }
        trsm_rows_kernel::launch(
            client,
            grid(client, [m.div_ceil(row_units), 1, 1]),
            CubeDim::new_1d(row_units as u32),
            address_of(client, &[&l, &y]),
            l.clone().into_arg(),
            y.clone().into_arg(),
            j0 * l_ref.row_stride + j0,
            l_ref.row_stride,
            j0,
            d,
            m,
            b,
            transpose,
            nb,
        );
    }
    y
}
