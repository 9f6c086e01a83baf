//! Flex implementation: plain backend tensor ops. The same generic functions are the
//! reference the kernels are tested against and serve the autodiff backward's rarely used
//! gradients (trainable factors or bias). Cholesky and the triangular solves have no tensor-op
//! form: they run as host loops in `f64` (Flex tensors live on the host anyway), rounded to
//! `f32` like the kernels' results.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, FloatDType, Scalar, Shape, Slice, TensorMetadata};
use burn::tensor::TensorData;

use crate::ops::{EmlocOps, MaybeTensor, status};

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

    fn cholesky(
        g: FloatTensor<Self>,
        relative_damping: f64,
        pivot_tolerance: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let device = g.device();
        let d = g.shape()[0];
        let g = host_f64::<Self>(g);
        let (l, st) = host_cholesky(&g, d, relative_damping, pivot_tolerance);
        (
            from_host::<Self>(l, vec![d, d], &device),
            from_host::<Self>(st.to_vec(), vec![status::LEN], &device),
        )
    }

    fn solve_lower_right(
        x: FloatTensor<Self>,
        l: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let device = x.device();
        let (m, d) = (x.shape()[0], x.shape()[1]);
        let mut y = host_f64::<Self>(x);
        host_solve_lower_right(&host_f64::<Self>(l), d, &mut y, m, transpose);
        from_host::<Self>(y, vec![m, d], &device)
    }
}

/// A tensor's values, row-major, as `f64`.
fn host_f64<B: Backend>(t: FloatTensor<B>) -> Vec<f64> {
    let t = B::float_cast(t, FloatDType::F32);
    let data = burn::tensor::read_sync(B::float_into_data(t)).expect("reading a host tensor");
    data.try_to_vec::<f32>().expect("an f32 tensor").into_iter().map(f64::from).collect()
}

/// An `f32` tensor from `f64` host values.
fn from_host<B: Backend>(
    values: Vec<f64>,
    shape: Vec<usize>,
    device: &B::Device,
) -> FloatTensor<B> {
    let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
    B::float_from_data(TensorData::new(values, shape), device)
}

/// Cholesky (row-oriented Crout: every inner product runs along contiguous rows) of `g + λI`
/// with the kernel's pivot rules; returns `L` (row-major, zeros above the diagonal) and the
/// status values. After a rejected pivot it carries on with `L_jj = 1`, like the kernel.
pub(crate) fn host_cholesky(
    g: &[f64],
    d: usize,
    relative_damping: f64,
    pivot_tolerance: f64,
) -> (Vec<f64>, [f64; status::LEN]) {
    let mean_diag = if d == 0 { 0.0 } else { (0..d).map(|i| g[i * d + i]).sum::<f64>() / d as f64 };
    let damping = relative_damping * mean_diag;
    let threshold = pivot_tolerance * mean_diag;
    let mut st = [0.0; status::LEN];
    st[status::MEAN_DIAG] = mean_diag;
    st[status::MIN_PIVOT] = f64::INFINITY;
    let mut l = vec![0.0; d * d];
    for j in 0..d {
        let p = g[j * d + j] + damping - l[j * d..j * d + j].iter().map(|v| v * v).sum::<f64>();
        let ok = p.is_finite() && p > 0.0 && p > threshold;
        if !ok && st[status::FIRST_FAILURE] == 0.0 {
            st[status::FIRST_FAILURE] = (j + 1) as f64;
            st[status::FAILED_VALUE] = p;
        }
        if p < st[status::MIN_PIVOT] {
            st[status::MIN_PIVOT] = p;
        }
        let pivot = if ok { p.sqrt() } else { 1.0 };
        l[j * d + j] = pivot;
        let row_j = l[j * d..j * d + j].to_vec();
        for i in j + 1..d {
            let row_i = &l[i * d..i * d + j];
            let dot: f64 = row_i.iter().zip(&row_j).map(|(a, b)| a * b).sum();
            l[i * d + j] = (g[i * d + j] - dot) / pivot;
        }
    }
    (l, st)
}

/// `Y L = X` (`transpose == false`) or `Y Lᵀ = X` in place on the rows of `y` (`[m, d]`),
/// `l` lower-triangular `[d, d]`; both forms walk the rows of `L` contiguously.
pub(crate) fn host_solve_lower_right(
    l: &[f64],
    d: usize,
    y: &mut [f64],
    m: usize,
    transpose: bool,
) {
    for r in 0..m {
        let row = &mut y[r * d..(r + 1) * d];
        if transpose {
            // y_j = (x_j − Σ_{i<j} y_i L_ji) / L_jj
            for j in 0..d {
                let l_j = &l[j * d..j * d + j];
                let dot: f64 = row[..j].iter().zip(l_j).map(|(a, b)| a * b).sum();
                row[j] = (row[j] - dot) / l[j * d + j];
            }
        } else {
            // Right to left: y_i = x_i / L_ii, then x_k −= y_i L_ik for k < i.
            for i in (0..d).rev() {
                let y_i = row[i] / l[i * d + i];
                row[i] = y_i;
                for (x_k, l_ik) in row[..i].iter_mut().zip(&l[i * d..i * d + i]) {
                    *x_k -= y_i * l_ik;
                }
            }
        }
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
