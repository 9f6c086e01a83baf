//! emloc's own tensor operations, as a Burn backend extension: every backend computes them
//! through one code path.
//!
//! - [`gram`] / [`gram_accumulate`]: the calibration statistic `G (+)= XᵀX`, in `f32`;
//! - [`lowrank_lora`]: the emulator layer with its adapter,
//!   `y = (x W_v) W_u + s (dropout(x) A) B + b`, computed as one product of width `k + r` and
//!   one of depth `k + r`; its backward keeps only the LoRA input and the `[.., r]` LoRA
//!   bottleneck `h_l = x_l A` and gives gradients to `x`, `A` and `B` (and to the factors or
//!   bias only if they are trainable);
//! - [`matmul`] / [`linear`]: the dense products (of `Linear`, LoRA and the CPU forms above),
//!   through faer on the CPU, where Burn Flex's own matmul is several times slower;
//! - [`gelu`]: the exact GELU in one CPU pass, with the exact derivative;
//! - [`cholesky`]: `G + λI = L Lᵀ` in `f32` with the first rejected pivot reported as
//!   [`EmlocError::NotPositiveDefinite`] (the damping retries of whitening are
//!   [`crate::emulator::cholesky_damped`]); [`solve_lower_right`]: `X L⁻¹` (whitening's `W_v = Σ^{1/2} Vᵀ L⁻¹`)
//!   or `X L⁻ᵀ` (CholeskyQR). Never tracked by autodiff.
//!
//! Implementations ([`EmlocOps`]): `Cube` (emloc's CubeCL kernels, crate `emloc-cube-kernels`,
//! for the wgpu, CUDA and CPU runtimes; the heavy products of the Gram and the fused layer go
//! through Burn's own matmul on devices with tensor cores, see [`ProductRoute`]), `Flex` (plain
//! tensor ops for the Gram and LoRA ops, a host `f64` loop for Cholesky and the solves; also
//! the test oracle) and `Autodiff` (custom backward; Cholesky and the solves delegate to the
//! inner backend). Any other backend panics at run time.

use burn::backend::{Backend, Dispatch, ExtensionType, backend_extension, tensor::FloatTensor};
use burn::tensor::{FloatDType, Tensor};

use crate::error::{EmlocError, Result};

mod route;
pub use route::{ProductRoute, with_product_route};

/// Layout of the `[LEN]` `f32` status tensor that [`EmlocOps::cholesky`] returns (the same as
/// `emloc_cube_kernels::kernels::status`).
pub mod status {
    /// `mean(diag G)` of the undamped input.
    pub const MEAN_DIAG: usize = 0;
    /// Index + 1 of the first rejected pivot, 0 when none.
    pub const FIRST_FAILURE: usize = 1;
    /// The rejected pivot's value `L_jj²`.
    pub const FAILED_VALUE: usize = 2;
    /// The smallest pivot `L_jj²` seen.
    pub const MIN_PIVOT: usize = 3;
    /// Length of the status tensor.
    pub const LEN: usize = 4;
}

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
/// `a` `[d_in, r]`, `b` `[r, d_out]`, `bias` `[d_out]`, `h_l` `[n, r]`.
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

    /// Like [`lowrank_lora`](Self::lowrank_lora), also returning the LoRA bottleneck
    /// `h_l = x_l A` (`[n, r]`, a buffer of its own) that the backward pass needs: `(y, h_l)`.
    /// The low-rank bottleneck `x W_v` (`[n, k]`) is not kept. Not differentiable itself.
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

    /// Gradients of the fused layer from the saved LoRA input `x_l` (`x_lora`, or `x` when
    /// there is none), the LoRA bottleneck `h_l` `[n, r]` and the output gradient `dy`
    /// `[n, d_out]`: `(dx, dx_lora, da, db)`. The factors are read, never differentiated here.
    ///
    /// `dx` is computed only when `need_x`: with `separate_lora_input` it is the low-rank
    /// branch's part `dy W_uᵀ W_vᵀ` and `dx_lora = s·dy Bᵀ Aᵀ` is the LoRA branch's;
    /// otherwise `dx` is their sum and `dx_lora` is `None`. Not differentiable itself.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
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
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>);

    /// `lhs · rhs` for `lhs` `[n, k]` and `rhs` `[k, m]`, the dense products of [`linear`] and
    /// of the CPU forms of the fused layer and the Gram. Strided views (a transpose) are read
    /// in place. Flex computes `f32` and `f64` with faer's matrix product (several times Burn
    /// Flex's own on x86 hosts with AVX-512, BENCHMARKS.md), other dtypes and backends with
    /// Burn's matmul. Differentiable.
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The exact GELU `x Φ(x) = x (1 + erf(x / √2)) / 2` (HF's `"gelu"`), elementwise, any
    /// shape. Flex runs `f32` through one vectorisable pass with a rational `erf` (absolute
    /// error below 5·10⁻⁷, Eigen's); other dtypes and backends compose Burn's ops.
    /// Differentiable, with the exact derivative (Burn's own GELU backward is the tanh
    /// approximation's).
    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `dy · (Φ(x) + x φ(x))`, the exact GELU's input gradient. Not differentiable itself.
    fn erf_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Cholesky factor of `g + λI` (`g` `[d, d]` symmetric, any float dtype, only its lower
    /// triangle read; `λ = relative_damping · mean(diag g)`), in `f32`: `(L, status)` with `L`
    /// `[d, d]` lower-triangular and `status` the `[4]` `f32` tensor described in
    /// [`status`] (mean diagonal, first rejected pivot + 1, its value, smallest pivot). A
    /// pivot `L_jj²` is rejected when it is not finite, not positive or not above
    /// `pivot_tolerance · mean(diag g)`; `L` is meaningless from there on. Never tracked by
    /// autodiff.
    fn cholesky(
        g: FloatTensor<Self>,
        relative_damping: f64,
        pivot_tolerance: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `Y` `[m, d]` (`f32`) with `Y L = X` (`transpose == false`) or `Y Lᵀ = X`
    /// (`transpose == true`), for `x` `[m, d]` and a lower-triangular `l` `[d, d]` (only its
    /// lower triangle is read). Never tracked by autodiff.
    fn solve_lower_right(
        x: FloatTensor<Self>,
        l: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self>;
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

/// `lhs · rhs`, `[n, k] · [k, m] → [n, m]`, through [`EmlocOps::matmul`] (faer on the CPU).
///
/// # Panics
/// If the inner dimensions differ.
pub fn matmul(lhs: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    let ([n, k], [k_rhs, m]) = (lhs.dims(), rhs.dims());
    assert_eq!(k, k_rhs, "matmul: lhs is [{n}, {k}] but rhs is [{k_rhs}, {m}]");
    Tensor::from_dispatch(<Dispatch as EmlocOps>::matmul(lhs.into_dispatch(), rhs.into_dispatch()))
}

/// The dense layer `y = x W + bias` (Burn's orientation: `weight` `[d_in, d_out]`), every
/// leading dimension of `x` folded into the rows of one [`matmul`].
///
/// # Shapes
/// - `x`: `[..., d_in]`; output `[..., d_out]`
/// - `weight` `[d_in, d_out]`, `bias` `[d_out]`
///
/// # Panics
/// If the last dimension of `x` is not `d_in`, or `bias` is not `[d_out]`.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let mut dims = x.dims();
    let [d_in, d_out] = weight.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "linear: x has {} features, the weight expects {d_in}",
        dims[D - 1]
    );
    let mut y = matmul(x.reshape([-1, d_in as i64]), weight);
    if let Some(bias) = bias {
        assert_eq!(bias.dims(), [d_out], "linear: bias must be [{d_out}]");
        y = y + bias.unsqueeze_dim(0);
    }
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// The exact GELU, `x Φ(x)`, elementwise (HF's `"gelu"`), through [`EmlocOps::erf_gelu`]:
/// one pass on the CPU instead of Burn's five, and the exact derivative under autodiff.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as EmlocOps>::erf_gelu(x.into_dispatch()))
}

/// The emulator layer with a LoRA adapter, fused:
/// `y = (x W_v) W_u + s · (x_l A) B + bias`, with `x_l = x_lora.unwrap_or(x)` (pass
/// `dropout(x)` as `x_lora` for adapter dropout).
///
/// Computes the bottleneck `h = [x W_v | x_l A]` (`[.., k + r]`) and `y = h [W_u ; s·B] + bias`
/// without building any dense `d_in × d_out` matrix (see [`ProductRoute`] for how each device
/// runs the two products). Under autodiff the backward keeps only the LoRA input `x_l` and
/// `h_l = x_l A` (`[.., r]`), plus `x` when a factor is trainable (never in EMLoC), and gives
/// gradients to `x`, `x_lora`, `a` and `b`; the factors and the bias get gradients only if they
/// require them.
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

/// A Cholesky factor `G + λI = L Lᵀ` and how it was obtained ([`cholesky`],
/// [`cholesky_damped`](crate::emulator::cholesky_damped)).
#[derive(Debug, Clone)]
pub struct Cholesky {
    /// `L`, `[d, d]` `f32`, lower-triangular (zeros above the diagonal), on `G`'s device.
    pub l: Tensor<2>,
    /// Absolute damping `λ` added to the diagonal (0 when none was needed).
    pub damping: f64,
    /// `λ / mean(diag G)`.
    pub relative_damping: f64,
    /// `mean(diag G)` (computed in `f32` on the device).
    pub mean_diag: f64,
    /// The smallest pivot `L_jj²`.
    pub min_pivot: f64,
    /// Factorizations tried (1 when the first one succeeded).
    pub attempts: usize,
}

pub(crate) fn check_square(name: &str, t: &Tensor<2>) -> Result<usize> {
    let [rows, cols] = t.dims();
    if rows != cols {
        return Err(EmlocError::ShapeMismatch {
            name: name.to_string(),
            expected: vec![rows, rows],
            found: vec![rows, cols],
        });
    }
    Ok(rows)
}

/// One factorization and the reading of its status (the one host synchronisation).
pub(crate) fn factor_once(
    g: &Tensor<2>,
    relative_damping: f64,
    pivot_tolerance: f64,
    attempts: usize,
) -> std::result::Result<Cholesky, (EmlocError, f64)> {
    let (l, st) = <Dispatch as EmlocOps>::cholesky(
        g.clone().into_dispatch(),
        relative_damping,
        pivot_tolerance,
    );
    let st = Tensor::<1>::from_dispatch(st)
        .into_data()
        .try_to_vec::<f32>()
        .expect("cholesky: the status tensor is f32");
    let mean_diag = st[status::MEAN_DIAG] as f64;
    let first = st[status::FIRST_FAILURE];
    if first > 0.0 {
        let error = EmlocError::NotPositiveDefinite {
            pivot: first as usize - 1,
            value: st[status::FAILED_VALUE] as f64,
            threshold: pivot_tolerance * mean_diag,
            relative_damping,
            attempts,
        };
        return Err((error, mean_diag));
    }
    Ok(Cholesky {
        l: Tensor::from_dispatch(l),
        damping: relative_damping * mean_diag,
        relative_damping,
        mean_diag,
        min_pivot: st[status::MIN_PIVOT] as f64,
        attempts,
    })
}

pub(crate) fn check_factor_args(relative_damping: f64, pivot_tolerance: f64) -> Result<()> {
    if !(relative_damping.is_finite() && relative_damping >= 0.0) {
        return Err(EmlocError::InvalidConfig(format!(
            "relative damping must be finite and ≥ 0, got {relative_damping}"
        )));
    }
    if !(pivot_tolerance.is_finite() && pivot_tolerance >= 0.0) {
        return Err(EmlocError::InvalidConfig(format!(
            "pivot tolerance must be finite and ≥ 0, got {pivot_tolerance}"
        )));
    }
    Ok(())
}

/// Cholesky factor of `G + λI` with `λ = relative_damping · mean(diag G)`, in `f32`, on `G`'s
/// device (`G` `[d, d]` symmetric, any float dtype; only its lower triangle is read). One
/// attempt; one host synchronisation (the status read).
///
/// On the Cube backend this is emloc's blocked kernel; on Flex a host `f64` loop rounded to
/// `f32`. Not tracked by autodiff.
///
/// # Errors
/// - [`EmlocError::ShapeMismatch`] if `G` is not square;
/// - [`EmlocError::InvalidConfig`] for a negative or non-finite damping or tolerance;
/// - [`EmlocError::NotPositiveDefinite`] with the first pivot `L_jj²` that is not finite, not
///   positive, or not above `pivot_tolerance · mean(diag G)` (a zero matrix fails at pivot 0).
///   In `f32`, tolerances below about `d · 1.2e-7` cannot tell a singular matrix from rounding.
pub fn cholesky(g: Tensor<2>, relative_damping: f64, pivot_tolerance: f64) -> Result<Cholesky> {
    check_square("cholesky: G", &g)?;
    check_factor_args(relative_damping, pivot_tolerance)?;
    factor_once(&g.without_autodiff(), relative_damping, pivot_tolerance, 1).map_err(|(e, _)| e)
}

/// `Y = X L⁻¹` (`transpose == false`: `Y L = X`) or `Y = X L⁻ᵀ` (`transpose == true`:
/// `Y Lᵀ = X`), in `f32`, for `x` `[m, d]` (any float dtype) and a lower-triangular `l`
/// `[d, d]` (only its lower triangle is read; a zero on its diagonal gives infinities).
///
/// Whitening's `W_v = Σ^{1/2} Vᵀ L⁻¹` is the first form (its Burn-oriented transpose
/// `L⁻ᵀ (Σ^{1/2} Vᵀ)ᵀ` is the transpose of the result); CholeskyQR's `Q = A R⁻¹` with
/// `R = Lᵀ` is the second. On the Cube backend: emloc's blocked solve; on Flex: a host `f64`
/// substitution rounded to `f32`. Not tracked by autodiff.
///
/// # Errors
/// [`EmlocError::ShapeMismatch`] if `l` is not square or `x` does not have `d` columns.
pub fn solve_lower_right(x: Tensor<2>, l: Tensor<2>, transpose: bool) -> Result<Tensor<2>> {
    let d = check_square("solve_lower_right: L", &l)?;
    let [m, cols] = x.dims();
    if cols != d {
        return Err(EmlocError::ShapeMismatch {
            name: "solve_lower_right: X".to_string(),
            expected: vec![m, d],
            found: vec![m, cols],
        });
    }
    let y = <Dispatch as EmlocOps>::solve_lower_right(
        x.without_autodiff().into_dispatch(),
        l.without_autodiff().into_dispatch(),
        transpose,
    );
    Ok(Tensor::from_dispatch(y))
}
