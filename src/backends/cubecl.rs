//! Cube implementation (every CubeCL runtime: wgpu, CUDA, CPU): emloc's own kernels from
//! `emloc-cube-kernels`, with the heavy products of the Gram and the fused layer on Burn's
//! matmul instead where [`ProductRoute`] says so (tensor cores).

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::ir::{ElemType, FloatKind};
use burn_cubecl::cubecl::std::tensor::TensorHandle;
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
use burn_cubecl::kernel::untile;
use burn_cubecl::tensor::CubeTensor;
use emloc_cube_kernels::{GramStart, LowRankLora};

use super::generic;
use crate::ops::{EmlocOps, MaybeTensor, ProductRoute};

// `ops::status` restates the kernels' status layout (emloc cannot re-export it without the
// `cube` feature); the two must agree slot for slot.
const _: () = {
    use crate::ops::status as ops;
    use emloc_cube_kernels::kernels::status as kernels;
    assert!(ops::MEAN_DIAG == kernels::MEAN_DIAG && ops::FIRST_FAILURE == kernels::FIRST_FAILURE);
    assert!(ops::FAILED_VALUE == kernels::FAILED_VALUE && ops::MIN_PIVOT == kernels::MIN_PIVOT);
    assert!(ops::LEN == kernels::LEN);
};

/// Whether the device has tensor cores (CubeCL `cmma`) for this half-precision (`f16`/`bf16`)
/// tensor's inputs with `f32` accumulation; `false` for any other dtype.
fn has_half_tensor_cores(tensor: &CubeTensor) -> bool {
    let input = match tensor.dtype {
        DType::F16 => ElemType::Float(FloatKind::F16),
        DType::BF16 => ElemType::Float(FloatKind::BF16),
        _ => return false,
    };
    let f32 = ElemType::Float(FloatKind::F32);
    let features = &tensor.client.properties().features.matmul;
    features.cmma.iter().any(|c| c.a_type == input && c.cd_type == f32)
}

/// Whether this product runs on Burn's matmul rather than the tiled core; see
/// [`ProductRoute`]: under `Auto`, half-precision inputs on a device with tensor cores for them
/// (an `f32` input would run as TF32 there, so it stays on the tiled core).
fn on_matmul(tensor: &CubeTensor) -> bool {
    match ProductRoute::current() {
        ProductRoute::Tiled => false,
        ProductRoute::Matmul => true,
        ProductRoute::Auto => has_half_tensor_cores(tensor),
    }
}

/// `XᵀX` on Burn's matmul, `f32` output whatever `x`'s dtype (`f16`/`bf16` products are exact in
/// the `f32` accumulator, as in the tiled core).
fn gram_on_matmul(x: CubeTensor) -> CubeTensor {
    let xt = CubeBackend::float_transpose(x.clone());
    matmul(xt, x, None, MatmulStrategy::default(), DType::F32)
        .unwrap_or_else(|e| panic!("gram: Burn's matmul could not run: {e:?}"))
}

/// The kernels' view of a tensor: its buffer and strides, as they are (no copy).
fn handle(tensor: CubeTensor) -> TensorHandle {
    untile(tensor).into()
}

/// Wraps a kernel output (contiguous, allocated on `like`'s client) as a Burn tensor.
fn wrap(like: &CubeTensor, out: TensorHandle, dtype: DType) -> CubeTensor {
    let shape = Shape::from(out.shape().to_vec());
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, out.handle, dtype)
}

fn check_dtypes(op: &str, x: &CubeTensor, others: &[&CubeTensor]) {
    for t in others {
        assert_eq!(t.dtype, x.dtype, "{op}: all tensors must share x's dtype {:?}", x.dtype);
    }
}

#[allow(clippy::too_many_arguments)]
fn layer(
    op: &str,
    x: &CubeTensor,
    x_lora: Option<&CubeTensor>,
    w_v: CubeTensor,
    w_u: CubeTensor,
    a: CubeTensor,
    b: CubeTensor,
    scale: f64,
) -> LowRankLora {
    check_dtypes(op, x, &[&w_v, &w_u, &a, &b]);
    if let Some(x_lora) = x_lora {
        check_dtypes(op, x, &[x_lora]);
    }
    LowRankLora {
        w_v: handle(w_v),
        w_u: handle(w_u),
        a: handle(a),
        b: handle(b),
        scale: scale as f32,
    }
}

impl EmlocOps for CubeBackend {
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        generic::erf_gelu::<Self>(x)
    }

    fn erf_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        generic::erf_gelu_backward::<Self>(x, dy)
    }

    fn gram(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if on_matmul(&x) {
            return gram_on_matmul(x);
        }
        let like = x.clone();
        let g = emloc_cube_kernels::gram(&like.client, handle(x), GramStart::Zero);
        wrap(&like, g, DType::F32)
    }

    fn gram_accumulate(acc: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        assert_eq!(acc.dtype, DType::F32, "gram_accumulate: the accumulator must be f32");
        if on_matmul(&x) {
            return Self::float_add(acc, gram_on_matmul(x));
        }
        let like = x.clone();
        // In place when this call holds the only reference to the accumulator's buffer.
        let start = if acc.can_mut() {
            GramStart::InPlace(handle(acc))
        } else {
            GramStart::Copy(handle(acc))
        };
        let g = emloc_cube_kernels::gram(&like.client, handle(x), start);
        wrap(&like, g, DType::F32)
    }

    fn lowrank_lora(
        x: FloatTensor<Self>,
        x_lora: MaybeTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        bias: MaybeTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::lowrank_lora_forward(x, x_lora, w_v, w_u, a, b, bias, scale).0
    }

    fn lowrank_lora_forward(
        x: FloatTensor<Self>,
        x_lora: MaybeTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        bias: MaybeTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x_lora, bias) = (x_lora.into_option(), bias.into_option());
        if on_matmul(&x) {
            return generic::lowrank_lora_forward::<Self>(
                x, x_lora, w_v, w_u, a, b, bias, scale, true,
            );
        }
        let layer = layer("lowrank_lora", &x, x_lora.as_ref(), w_v, w_u, a, b, scale);
        if let Some(bias) = &bias {
            check_dtypes("lowrank_lora", &x, &[bias]);
        }
        let like = x.clone();
        let bias = bias.map(handle);
        let (y, h_l) = layer.forward(&like.client, handle(x), x_lora.map(handle), bias.as_ref());
        (wrap(&like, y, like.dtype), wrap(&like, h_l, like.dtype))
    }

    fn lowrank_lora_backward(
        x_l: FloatTensor<Self>,
        h_l: FloatTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        scale: f64,
        need_x: bool,
        separate_lora_input: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>)
    {
        let sep = separate_lora_input;
        if on_matmul(&x_l) {
            return generic::lowrank_lora_backward::<Self>(
                x_l, h_l, w_v, w_u, a, b, dy, scale, need_x, sep, true,
            );
        }
        let layer = layer("lowrank_lora_backward", &x_l, None, w_v, w_u, a, b, scale);
        check_dtypes("lowrank_lora_backward", &x_l, &[&h_l, &dy]);
        let like = x_l.clone();
        let grads = layer.backward(&like.client, handle(x_l), handle(h_l), handle(dy), need_x, sep);
        let dtype = like.dtype;
        (
            grads.x.map(|t| wrap(&like, t, dtype)),
            grads.x_lora.map(|t| wrap(&like, t, dtype)),
            wrap(&like, grads.a, dtype),
            wrap(&like, grads.b, dtype),
        )
    }

    fn cholesky(
        g: FloatTensor<Self>,
        relative_damping: f64,
        pivot_tolerance: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let like = g.clone();
        let (l, status) = emloc_cube_kernels::cholesky(
            &like.client,
            handle(g),
            relative_damping as f32,
            pivot_tolerance as f32,
        );
        (wrap(&like, l, DType::F32), wrap(&like, status, DType::F32))
    }

    fn solve_lower_right(
        x: FloatTensor<Self>,
        l: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let like = x.clone();
        let y =
            emloc_cube_kernels::solve_lower_right(&like.client, handle(l), handle(x), transpose);
        wrap(&like, y, DType::F32)
    }
}
