//! Flex implementation: the plain tensor-op forms of [`super::generic`] (also the reference the
//! kernels are tested against). Cholesky and the triangular solves have no tensor-op form: they
//! run as host loops in `f64` (Flex tensors live on the host anyway), rounded to `f32` like the
//! kernels' results.

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Flex, FloatDType, Shape, TensorMetadata};
use burn::tensor::TensorData;

use super::generic::{self, gram, lowrank_lora_backward, lowrank_lora_forward};
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
        lowrank_lora_forward::<Self>(x, x_lora, w_v, w_u, a, b, bias, scale, false).0
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
        lowrank_lora_forward::<Self>(x, x_lora, w_v, w_u, a, b, bias, scale, false)
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
        lowrank_lora_backward::<Self>(x_l, h_l, w_v, w_u, a, b, dy, scale, need_x, sep, false)
    }

    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        match (lhs.dtype(), rhs.dtype()) {
            (DType::F32, DType::F32) => faer_matmul::<f32>(&lhs, &rhs, 1.0),
            (DType::F64, DType::F64) => faer_matmul::<f64>(&lhs, &rhs, 1.0),
            _ => Self::float_matmul(lhs, rhs),
        }
    }

    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return generic::erf_gelu::<Self>(x);
        }
        let x = x.to_contiguous();
        let mut y = FloatTensor::<Self>::empty(x.shape(), DType::F32);
        elementwise(x.storage::<f32>(), None, y.storage_mut::<f32>(), |x, _| {
            0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
        });
        y
    }

    fn erf_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || dy.dtype() != DType::F32 {
            return generic::erf_gelu_backward::<Self>(x, dy);
        }
        let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
        let mut dx = FloatTensor::<Self>::empty(x.shape(), DType::F32);
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        elementwise(
            x.storage::<f32>(),
            Some(dy.storage::<f32>()),
            dx.storage_mut::<f32>(),
            |x, dy| {
                let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                // Clamped at e⁻⁸⁰, where the term no longer counts: exp never underflows.
                dy * (cdf + x * inv_sqrt_2pi * (-0.5 * x * x).max(-80.0).exp())
            },
        );
        dx
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

/// Below this many multiply-adds (`n·k·m`) a product runs on the calling thread: splitting it
/// costs more than it saves.
const PARALLEL_WORK: usize = 1 << 21;

/// `lhs · rhs` of two 2-D Flex tensors of element type `T`, read in place through their strides,
/// with faer's matrix product on the rayon pool Flex uses too.
fn faer_matmul<T>(lhs: &FloatTensor<Flex>, rhs: &FloatTensor<Flex>, one: T) -> FloatTensor<Flex>
where
    T: faer::traits::ComplexField + burn::tensor::Element + bytemuck::Pod,
{
    let (n, k, m) = (lhs.shape()[0], lhs.shape()[1], rhs.shape()[1]);
    assert_eq!(rhs.shape()[0], k, "matmul: inner dimensions differ");
    let mut out = FloatTensor::<Flex>::zeros(Shape::new([n, m]), T::dtype());
    if n == 0 || m == 0 || k == 0 {
        return out;
    }
    let view = |t: &FloatTensor<Flex>| {
        let layout = t.layout();
        let (rows, cols) = (layout.shape()[0], layout.shape()[1]);
        let (row_stride, col_stride) = (layout.strides()[0], layout.strides()[1]);
        let storage = t.storage::<T>();
        let last = (rows as isize - 1) * row_stride + (cols as isize - 1) * col_stride;
        assert!(
            row_stride >= 0
                && col_stride >= 0
                && layout.start_offset() + (last as usize) < storage.len(),
            "matmul: a Flex view outside its buffer"
        );
        // SAFETY: non-negative strides, and the last element (the farthest from the start)
        // lies inside `storage`, which outlives the view.
        unsafe {
            faer::MatRef::<T>::from_raw_parts(
                storage.as_ptr().add(layout.start_offset()),
                rows,
                cols,
                row_stride,
                col_stride,
            )
        }
    };
    let (lhs, rhs) = (contiguous_if_reversed(lhs), contiguous_if_reversed(rhs));
    let par = if n.saturating_mul(k).saturating_mul(m) >= PARALLEL_WORK {
        faer::Par::rayon(0)
    } else {
        faer::Par::Seq
    };
    let dst = faer::MatMut::from_row_major_slice_mut(out.storage_mut::<T>(), n, m);
    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, view(&lhs), view(&rhs), one, par);
    out
}

/// `t` itself, or a contiguous copy when a stride is negative (a flipped view).
fn contiguous_if_reversed(t: &FloatTensor<Flex>) -> std::borrow::Cow<'_, FloatTensor<Flex>> {
    if t.layout().strides().iter().all(|&s| s >= 0) {
        std::borrow::Cow::Borrowed(t)
    } else {
        std::borrow::Cow::Owned(t.to_contiguous())
    }
}

/// `out[i] = f(x[i], dy[i])` (`dy[i] = 0` without `dy`), on the calling thread: on the rayon
/// pool the same loop ran 12× slower, beside faer's spinning product threads.
fn elementwise(x: &[f32], dy: Option<&[f32]>, out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    match dy {
        Some(dy) => {
            for ((o, &x), &dy) in out.iter_mut().zip(x).zip(dy) {
                *o = f(x, dy);
            }
        }
        None => {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = f(x, 0.0);
            }
        }
    }
}

/// `erf(x)` in `f32` as Eigen's rational approximation on `[-4, 4]` (clamped outside, where
/// `erf` is ±1 to `f32` precision): absolute error below 5·10⁻⁷, no branches and no `exp`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = [
        -2.726_142_3e-10_f32,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.9546e-3,
        -1.609_603_3e-2,
    ]
    .iter()
    .fold(0.0_f32, |acc, &c| acc * x2 + c);
    let q = [-1.456_607_2e-5_f32, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2]
        .iter()
        .fold(0.0_f32, |acc, &c| acc * x2 + c);
    x * p / q
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
