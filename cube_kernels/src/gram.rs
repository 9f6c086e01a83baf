//! Gram accumulation `G += XᵀX`.

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::std::tensor::TensorHandle;

use crate::gemm::{F32, MatRef, Operand, empty_matrix, plan, product_address, reduce, tile_config};
use crate::kernels::{OutputArgsLaunch, gemm_partial_kernel, mirror_kernel, syrk_direct_kernel};
use crate::launch::{address_of, grid};

/// What a Gram product adds to.
#[derive(Clone, Debug)]
pub enum GramStart {
    /// Nothing: returns `XᵀX`.
    Zero,
    /// This `[d, d]` `f32` matrix, updated in place (its buffer must not be shared).
    InPlace(TensorHandle),
    /// A copy of this `[d, d]` `f32` matrix plus `XᵀX` (for an accumulator still referenced
    /// elsewhere).
    Copy(TensorHandle),
}

/// `start + XᵀX` for `x` of shape `[tokens, d]` (any float dtype, any strides), as a `[d, d]`
/// `f32` matrix.
///
/// Only the tiles on and below the diagonal are computed (half the work of a general product)
/// and the upper triangle is mirrored from the lower one once at the end, so the result is
/// exactly symmetric. When the tiles alone cannot fill the device the tokens are split across
/// cubes, with a bounded `f32` workspace summed in the mirroring pass; otherwise the tiles are
/// written (or added, in place) straight into the result.
///
/// # Panics
/// If `x` is not 2-D or the accumulator is not `[d, d]` `f32`.
pub fn gram(client: &Client, x: TensorHandle, start: GramStart) -> TensorHandle {
    let x = MatRef::new(x);
    let (tokens, d) = (x.rows, x.cols);
    let dtype = x.dtype();
    if let GramStart::InPlace(g) | GramStart::Copy(g) = &start {
        assert_eq!(g.shape().as_ref(), &[d, d][..], "gram: accumulator must be [{d}, {d}]");
        assert_eq!(g.dtype, F32, "gram: accumulator must be f32");
    }
    let (out, base, in_place) = match start {
        GramStart::Zero => (empty_matrix(client, d, d, F32), None, false),
        GramStart::InPlace(g) => (g, None, true),
        GramStart::Copy(g) => (empty_matrix(client, d, d, F32), Some(g), false),
    };
    if d == 0 {
        return out;
    }

    let plan = plan(client, d, d, tokens, lower_tiles(d));
    let tile = plan.tile();
    let blocks = d.div_ceil(tile);
    let lhs = Operand::Single(x.clone().t());
    let rhs = Operand::Single(x.clone());
    let (config, lhs_vec, rhs_vec) = tile_config(client, &plan, &lhs, &rhs);
    let (l1, l2, largs, _) = lhs.launch_args();
    let (r1, r2, rargs, _) = rhs.launch_args();
    let out_ref = MatRef::new(out.clone());
    let dst = |k_chunk| {
        OutputArgsLaunch::new(
            out_ref.offset,
            out_ref.row_stride,
            out_ref.col_stride,
            d,
            d,
            tokens,
            k_chunk,
            1.0,
        )
    };
    let cube_dim = CubeDim::new_2d(plan.threads as u32, plan.threads as u32);
    let address = product_address(client, &lhs, &rhs, &out_ref);

    // One pass over the tokens: write (or add) the lower tiles straight into the result, then
    // mirror them — no workspace, which matters at d = 14336 (0.8 GB per f32 Gram).
    if plan.splits == 1 && base.is_none() && tokens > 0 {
        syrk_direct_kernel::launch(
            client,
            grid(client, [blocks, blocks, 1]),
            cube_dim,
            address,
            lhs_vec,
            rhs_vec,
            l1,
            l2,
            r1,
            r2,
            out_ref.arg(),
            largs,
            rargs,
            dst(tokens),
            config,
            in_place,
            dtype,
        );
        let elements = d * d;
        let mirror_dim = CubeDim::new(client, elements);
        let mirror_count = cubecl::calculate_cube_count_elemwise(client, elements, mirror_dim);
        mirror_kernel::launch(
            client,
            mirror_count,
            mirror_dim,
            address_of(client, &[&out]),
            out_ref.arg(),
            dst(tokens),
            tile,
        );
        return out;
    }

    // Split along the tokens: per-chunk partials, summed and mirrored in one final pass.
    let partial = client.empty(plan.splits * d * d * 4);
    let partial = TensorHandle::new_contiguous([plan.splits, d, d], partial, F32);
    if tokens > 0 {
        gemm_partial_kernel::launch(
            client,
            grid(client, [blocks, blocks, plan.splits]),
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
            dst(plan.k_chunk),
            config,
            true,
            dtype,
        );
    }
    // No tokens: the partials are never written, so reduce over zero of them.
    let splits = if tokens > 0 { plan.splits } else { 0 };
    let mirror = Some((tile, in_place));
    reduce(client, &partial, splits, &out_ref, None, base.as_ref(), mirror, dst(plan.k_chunk));
    out
}

/// Tiles on and below the diagonal of an `n × n` output, for a tile size: the work count of the
/// symmetric (lower-tiles-only) products that [`plan`] sizes.
pub(crate) fn lower_tiles(n: usize) -> impl Fn(usize) -> usize {
    move |tile| {
        let blocks = n.div_ceil(tile);
        blocks * (blocks + 1) / 2
    }
}
