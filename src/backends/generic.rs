//! The Gram and the fused layer as plain backend tensor ops, for any backend: Flex's
//! implementation, the Cube backend's [`ProductRoute::Matmul`](crate::ops::ProductRoute) (Burn's
//! own matmul, tensor cores where the device has them) and the autodiff backward's rarely used
//! gradients (trainable factors or bias).
//!
//! With `joined` (the matmul route) the layer writes its output once: `h_v = x W_v` and
//! `h_l = x_l A`, then one product of depth `k + r`, `y = [h_v | h_l] [W_u ; s·B] + bias`,
//! instead of two output-sized products, a scale and two additions; its backward mirrors it
//! with one product of width `k + r`, `dh = dy [W_u ; s·B]ᵀ`. Without (Flex), the plain
//! unfused form, whose base branch is bit for bit the adapter-free layer's `(x W_v) W_u`.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, FloatDType, Scalar, Shape, Slice, TensorMetadata};

use crate::ops::EmlocOps;

/// `start + XᵀX` in `f32` with the backend's own matmul.
pub(crate) fn gram<B: EmlocOps>(
    x: FloatTensor<B>,
    start: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let x = B::float_cast(x, FloatDType::F32);
    let g = B::matmul(B::float_transpose(x.clone()), x);
    match start {
        Some(start) => B::float_add(B::float_cast(start, FloatDType::F32), g),
        None => g,
    }
}

/// Columns `start..end` of a 2-D tensor (a view).
pub(crate) fn cols<B: Backend>(t: FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    let rows = t.shape()[0];
    B::float_slice(t, &[Slice::from(0..rows), Slice::from(start..end)])
}

/// `bias` `[d]` as a broadcastable `[1, d]` row.
pub(crate) fn bias_row<B: Backend>(bias: FloatTensor<B>) -> FloatTensor<B> {
    let d = bias.shape()[0];
    B::float_reshape(bias, Shape::new([1, d]))
}

/// `[W_u ; s·B]`, `[k + r, d_out]`.
fn joined_output_weights<B: EmlocOps>(
    w_u: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    B::float_cat(vec![w_u, B::float_mul_scalar(b, Scalar::from(scale))], 0)
}

/// The forward: `(y, h_l)` with `y = (x W_v) W_u + s (x_l A) B + bias` and `h_l = x_l A`
/// (`x_l = x_lora` or `x`); see [`EmlocOps::lowrank_lora_forward`](crate::ops::EmlocOps).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lowrank_lora_forward<B: EmlocOps>(
    x: FloatTensor<B>,
    x_lora: Option<FloatTensor<B>>,
    w_v: FloatTensor<B>,
    w_u: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    scale: f64,
    joined: bool,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x_l = x_lora.unwrap_or_else(|| x.clone());
    let h_v = B::matmul(x, w_v);
    let h_l = B::matmul(x_l, a);
    let y = if joined {
        let h = B::float_cat(vec![h_v, h_l.clone()], 1);
        B::matmul(h, joined_output_weights::<B>(w_u, b, scale))
    } else {
        let lora = B::float_mul_scalar(B::matmul(h_l.clone(), b), Scalar::from(scale));
        B::float_add(B::matmul(h_v, w_u), lora)
    };
    let y = match bias {
        Some(bias) => B::float_add(y, bias_row::<B>(bias)),
        None => y,
    };
    (y, h_l)
}

/// The backward; see [`EmlocOps::lowrank_lora_backward`](crate::ops::EmlocOps).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn lowrank_lora_backward<B: EmlocOps>(
    x_l: FloatTensor<B>,
    h_l: FloatTensor<B>,
    w_v: FloatTensor<B>,
    w_u: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    dy: FloatTensor<B>,
    scale: f64,
    need_x: bool,
    separate_lora_input: bool,
    joined: bool,
) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
    let [k, r] = [w_v.shape()[1], a.shape()[1]];
    let s = Scalar::from(scale);
    let (dx, dx_lora, dh_l) = if need_x && !joined {
        let dh_l = B::float_mul_scalar(B::matmul(dy.clone(), B::float_transpose(b)), s);
        let dh_v = B::matmul(dy.clone(), B::float_transpose(w_u));
        let dx_v = B::matmul(dh_v, B::float_transpose(w_v));
        let dx_l = B::matmul(dh_l.clone(), B::float_transpose(a));
        match separate_lora_input {
            true => (Some(dx_v), Some(dx_l), dh_l),
            false => (Some(B::float_add(dx_v, dx_l)), None, dh_l),
        }
    } else if need_x {
        // dh = dy [W_u ; s·B]ᵀ, [n, k + r]: both branches' bottleneck gradients in one product.
        let w_out = joined_output_weights::<B>(w_u, b, scale);
        let dh = B::matmul(dy.clone(), B::float_transpose(w_out));
        let dh_l = cols::<B>(dh.clone(), k, k + r);
        if separate_lora_input {
            let dx = B::matmul(cols::<B>(dh, 0, k), B::float_transpose(w_v));
            let dx_l = B::matmul(dh_l.clone(), B::float_transpose(a));
            (Some(dx), Some(dx_l), dh_l)
        } else {
            let w_in = B::float_cat(vec![w_v, a], 1);
            (Some(B::matmul(dh, B::float_transpose(w_in))), None, dh_l)
        }
    } else {
        (None, None, B::float_mul_scalar(B::matmul(dy.clone(), B::float_transpose(b)), s))
    };
    let da = B::matmul(B::float_transpose(x_l), dh_l);
    let db = B::float_mul_scalar(B::matmul(B::float_transpose(h_l), dy), s);
    (dx, dx_lora, da, db)
}

/// `Φ(x) = (1 + erf(x / √2)) / 2` from Burn's ops.
fn normal_cdf<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let erf = B::float_erf(B::float_mul_scalar(x, Scalar::from(std::f64::consts::FRAC_1_SQRT_2)));
    B::float_mul_scalar(B::float_add_scalar(erf, Scalar::from(1.0)), Scalar::from(0.5))
}

/// `x Φ(x)` from Burn's ops (`erf`).
pub(crate) fn erf_gelu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x.clone(), normal_cdf::<B>(x))
}

/// `dy · (Φ(x) + x φ(x))` from Burn's ops.
pub(crate) fn erf_gelu_backward<B: Backend>(
    x: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let cdf = normal_cdf::<B>(x.clone());
    let square = B::float_mul(x.clone(), x.clone());
    let pdf = B::float_exp(B::float_mul_scalar(square, Scalar::from(-0.5)));
    let pdf = B::float_mul_scalar(pdf, Scalar::from(1.0 / (2.0 * std::f64::consts::PI).sqrt()));
    B::float_mul(dy, B::float_add(cdf, B::float_mul(x, pdf)))
}
