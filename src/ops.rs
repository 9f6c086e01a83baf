//! emloc's own tensor operations, as a Burn backend extension: every backend computes them
//! through one code path.
//!
//! - [`gram`] / [`gram_accumulate`]: the calibration statistic `G (+)= XᵀX`, in `f32`;
//! - [`lowrank_lora`]: the emulator layer with its adapter,
//!   `y = (x W_v) W_u + s (dropout(x) A) B + b`, computed as one product of width `k + r` and
//!   one of depth `k + r`; its backward keeps only `x` and the `[.., k + r]` bottleneck and
//!   gives gradients to `x`, `A` and `B` (and to the factors or bias only if they are trainable).
//!
//! Implementations ([`EmlocOps`]): `Cube` (emloc's CubeCL kernels, crate `emloc-cube-kernels`,
//! for the wgpu, CUDA and CPU runtimes), `Flex` (plain tensor ops; also the test oracle) and
//! `Autodiff` (custom backward). Any other backend panics at run time.

use burn::backend::{Backend, Dispatch, ExtensionType, backend_extension, tensor::FloatTensor};
use burn::tensor::{FloatDType, Tensor};

/// An optional float tensor argument of an [`EmlocOps`] operation (`#[backend_extension]` maps
/// tensors, tuples and derived types across the dispatch boundary, but not `Option` inputs).
#[derive(ExtensionType, Debug)]
pub enum MaybeTensor<B: Backend> {
    /// No tensor.
    None,
    /// A tensor.
    Some(FloatTensor<B>),
}

impl<B: Backend> MaybeTensor<B> {
    /// The tensor, if any.
    pub fn into_option(self) -> Option<FloatTensor<B>> {
        match self {
            Self::None => None,
            Self::Some(t) => Some(t),
        }
    }

    /// Wraps an `Option`.
    pub fn from_option(tensor: Option<FloatTensor<B>>) -> Self {
        match tensor {
            None => Self::None,
            Some(t) => Self::Some(t),
        }
    }
}

/// The backend operations behind [`gram`] and [`lowrank_lora`].
///
/// Shapes use Burn's orientation: `x` `[n, d_in]`, `w_v` `[d_in, k]`, `w_u` `[k, d_out]`,
/// `a` `[d_in, r]`, `b` `[r, d_out]`, `bias` `[d_out]`, `h` `[n, k + r]`.
#[backend_extension(
    Autodiff,
    Cube: cfg(feature = "cube"),
    Flex,
)]
pub trait EmlocOps: Backend {
    /// `XᵀX` for `x` `[n, d]` of any float dtype, as a `[d, d]` `f32` matrix. Never tracked by
    /// autodiff.
    fn gram(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `acc + XᵀX` (`acc` `[d, d]` `f32`), updating `acc`'s buffer in place where the backend
    /// can and nothing else holds it. Never tracked by autodiff.
    fn gram_accumulate(acc: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The fused layer `y = [x W_v | x_l A] [W_u ; s·B] + bias`, where `x_l` is `x_lora`
    /// (the LoRA branch's dropped-out input) or `x`.
    #[allow(clippy::too_many_arguments)]
    fn lowrank_lora(
        x: FloatTensor<Self>,
        #[extension_type] x_lora: MaybeTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        #[extension_type] bias: MaybeTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// Like [`lowrank_lora`](Self::lowrank_lora), also returning the bottleneck
    /// `h = [x W_v | x_l A]` that the backward pass needs: `(y, h)`. Not differentiable itself.
    #[allow(clippy::too_many_arguments)]
    fn lowrank_lora_forward(
        x: FloatTensor<Self>,
        #[extension_type] x_lora: MaybeTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        #[extension_type] bias: MaybeTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of the fused layer from the saved `x`, `x_lora`, `h` and the output gradient
    /// `dy` `[n, d_out]`: `(dx, dx_lora, da, db)`. `dx` is computed only when `need_x` (the
    /// low-rank branch's part when `x_lora` is given, both branches' otherwise); `dx_lora` only
    /// when `need_x` and `x_lora` is given. Not differentiable itself.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn lowrank_lora_backward(
        x: FloatTensor<Self>,
        #[extension_type] x_lora: MaybeTensor<Self>,
        h: FloatTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        scale: f64,
        need_x: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The Gram matrix `XᵀX` of `x` `[n, d]`, as `[d, d]` `f32` whatever `x`'s float dtype.
/// Never part of an autodiff graph.
pub fn gram(x: Tensor<2>) -> Tensor<2> {
    gram_accumulate(None, x)
}

/// `acc + XᵀX` (`acc` `[d, d]` `f32`, `x` `[n, d]`), updating `acc`'s buffer in place when
/// nothing else holds it. Never part of an autodiff graph.
///
/// # Panics
/// If `acc` is not `[d, d]`.
pub fn gram_accumulate(acc: Option<Tensor<2>>, x: Tensor<2>) -> Tensor<2> {
    let d = x.dims()[1];
    let x = x.without_autodiff().into_dispatch();
    let out = match acc {
        Some(acc) => {
            assert_eq!(acc.dims(), [d, d], "gram_accumulate: accumulator must be [{d}, {d}]");
            let acc = acc.without_autodiff().cast(FloatDType::F32).into_dispatch();
            <Dispatch as EmlocOps>::gram_accumulate(acc, x)
        }
        None => <Dispatch as EmlocOps>::gram(x),
    };
    Tensor::from_dispatch(out)
}

/// The emulator layer with a LoRA adapter, fused:
/// `y = (x W_v) W_u + s · (x_l A) B + bias`, with `x_l = x_lora.unwrap_or(x)` (pass
/// `dropout(x)` as `x_lora` for adapter dropout).
///
/// Computes `h = [x W_v | x_l A]` (`[.., k + r]`) in one product and `y = h [W_u ; s·B] + bias`
/// in another, without building `[W_v | A]`, `[W_u ; s·B]` or any dense `d_in × d_out` matrix.
/// Under autodiff the backward keeps `x` (and `x_lora`) and `h`, and gives gradients to `x`,
/// `x_lora`, `a` and `b`; the factors and the bias get gradients only if they require them.
///
/// # Shapes
/// - `x`, `x_lora`: `[..., d_in]`; output `[..., d_out]`
/// - `w_v` `[d_in, k]`, `w_u` `[k, d_out]`, `a` `[d_in, r]`, `b` `[r, d_out]`, `bias` `[d_out]`
///
/// # Panics
/// On mismatched shapes.
#[allow(clippy::too_many_arguments)]
pub fn lowrank_lora<const D: usize>(
    x: Tensor<D>,
    x_lora: Option<Tensor<D>>,
    w_v: Tensor<2>,
    w_u: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    bias: Option<Tensor<1>>,
    scale: f64,
) -> Tensor<D> {
    let dims = x.dims();
    let [d_in, k] = w_v.dims();
    let [k_u, d_out] = w_u.dims();
    let [d_in_a, r] = a.dims();
    let [r_b, d_out_b] = b.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "lowrank_lora: x has {} features, W_v expects {d_in}",
        dims[D - 1]
    );
    assert_eq!(k_u, k, "lowrank_lora: W_v is [{d_in}, {k}] but W_u is [{k_u}, {d_out}]");
    assert_eq!(d_in_a, d_in, "lowrank_lora: A is [{d_in_a}, {r}], expected d_in = {d_in}");
    assert_eq!((r_b, d_out_b), (r, d_out), "lowrank_lora: B must be [{r}, {d_out}]");
    if let Some(bias) = &bias {
        assert_eq!(bias.dims(), [d_out], "lowrank_lora: bias must be [{d_out}]");
    }
    if let Some(x_lora) = &x_lora {
        assert_eq!(x_lora.dims(), dims, "lowrank_lora: x_lora must have x's shape");
    }
    let flat = |t: Tensor<D>| -> Tensor<2> { t.reshape([-1, d_in as i64]) };
    let y = <Dispatch as EmlocOps>::lowrank_lora(
        flat(x).into_dispatch(),
        MaybeTensor::from_option(x_lora.map(|t| flat(t).into_dispatch())),
        w_v.into_dispatch(),
        w_u.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        MaybeTensor::from_option(bias.map(Tensor::into_dispatch)),
        scale,
    );
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    Tensor::<2>::from_dispatch(y).reshape(out_dims)
}
