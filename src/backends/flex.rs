//! Flex implementation: plain backend tensor ops. The same generic functions are the
//! reference the kernels are tested against and serve the autodiff backward's rarely used
//! gradients (trainable factors or bias).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, FloatDType, Scalar, Shape, Slice, TensorMetadata};

use crate::ops::{EmlocOps, MaybeTensor};

impl EmlocOps for Flex {
    fn gram(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gram::<Self>(x, None)
    }

    fn gram_accumulate(acc: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        gram::<Self>(x, Some(acc))
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
        let (x_lora, bias) = (x_lora.into_option(), bias.into_option());
        lowrank_lora_forward::<Self>(x, x_lora, w_v, w_u, a, b, bias, scale).0
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
        lowrank_lora_forward::<Self>(x, x_lora, w_v, w_u, a, b, bias, scale)
    }

    fn lowrank_lora_backward(
        x: FloatTensor<Self>,
        x_lora: MaybeTensor<Self>,
        h: FloatTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        scale: f64,
        need_x: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>)
    {
        lowrank_lora_backward::<Self>(x, x_lora.into_option(), h, w_v, w_u, a, b, dy, scale, need_x)
    }
}

/// `start + XᵀX` in `f32` with the backend's own matmul.
pub(crate) fn gram<B: Backend>(x: FloatTensor<B>, start: Option<FloatTensor<B>>) -> FloatTensor<B> {
    let x = B::float_cast(x, FloatDType::F32);
    let g = B::float_matmul(B::float_transpose(x.clone()), x);
    match start {
        Some(start) => B::float_add(B::float_cast(start, FloatDType::F32), g),
        None => g,
    }
}

/// Columns `start..end` of a 2-D tensor.
pub(crate) fn cols<B: Backend>(t: FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    let rows = t.shape()[0];
    B::float_slice(t, &[Slice::from(0..rows), Slice::from(start..end)])
}

/// `bias` `[d]` as a broadcastable `[1, d]` row.
pub(crate) fn bias_row<B: Backend>(bias: FloatTensor<B>) -> FloatTensor<B> {
    let d = bias.shape()[0];
    B::float_reshape(bias, Shape::new([1, d]))
}

/// The unfused forward: `h = [x W_v | x_l A]`, `y = (x W_v) W_u + s (x_l A) B + bias`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lowrank_lora_forward<B: Backend>(
    x: FloatTensor<B>,
    x_lora: Option<FloatTensor<B>>,
    w_v: FloatTensor<B>,
    w_u: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x_l = x_lora.unwrap_or_else(|| x.clone());
    let h_v = B::float_matmul(x, w_v);
    let h_l = B::float_matmul(x_l, a);
    let lora = B::float_mul_scalar(B::float_matmul(h_l.clone(), b), Scalar::from(scale));
    let y = B::float_add(B::float_matmul(h_v.clone(), w_u), lora);
    let y = match bias {
        Some(bias) => B::float_add(y, bias_row::<B>(bias)),
        None => y,
    };
    (y, B::float_cat(vec![h_v, h_l], 1))
}

/// The unfused backward; see [`EmlocOps::lowrank_lora_backward`].
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn lowrank_lora_backward<B: Backend>(
    x: FloatTensor<B>,
    x_lora: Option<FloatTensor<B>>,
    h: FloatTensor<B>,
    w_v: FloatTensor<B>,
    w_u: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    dy: FloatTensor<B>,
    scale: f64,
    need_x: bool,
) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
    let k = w_v.shape()[1];
    let width = h.shape()[1];
    let s = Scalar::from(scale);
    let dh_l = B::float_mul_scalar(B::float_matmul(dy.clone(), B::float_transpose(b)), s);
    let (dx, dx_lora) = if need_x {
        let dh_v = B::float_matmul(dy.clone(), B::float_transpose(w_u));
        let dx_v = B::float_matmul(dh_v, B::float_transpose(w_v));
        let dx_l = B::float_matmul(dh_l.clone(), B::float_transpose(a));
        match &x_lora {
            Some(_) => (Some(dx_v), Some(dx_l)),
            None => (Some(B::float_add(dx_v, dx_l)), None),
        }
    } else {
        (None, None)
    };
    let x_l = x_lora.unwrap_or(x);
    let da = B::float_matmul(B::float_transpose(x_l), dh_l);
    let h_l = cols::<B>(h, k, width);
    let db = B::float_mul_scalar(B::float_matmul(B::float_transpose(h_l), dy), s);
    (dx, dx_lora, da, db)
}
