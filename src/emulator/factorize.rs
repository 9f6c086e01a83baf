//! Activation-aware truncated SVD of one layer, on the host in f64 (faer).
//!
//! `W S = U Σ Vᵀ` with `S Sᵀ = G = XᵀX`; keep `k` triplets; `W_u = U_k Σ_k^{1/2}`,
//! `W_v = Σ_k^{1/2} V_kᵀ S⁻¹` (a triangular solve with Cholesky, never an explicit inverse).
//! f64 throughout: the solve against a possibly ill-conditioned `S` is where f32 loses digits.

use faer::{Mat, MatRef, Side};

use super::config::{SvdMethod, WhiteningConfig, WhiteningMethod};
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::ops;

/// A whitening `S` of a Gram matrix `G` (`S Sᵀ = G + λ I`), kept in factored form.
#[derive(Debug, Clone)]
pub struct Whitening {
    kind: WhiteningKind,
    /// Absolute damping `λ` added to the diagonal before factoring (0 when none was needed).
    pub damping: f64,
    /// `λ / mean(diag G)`.
    pub relative_damping: f64,
}

#[derive(Debug, Clone)]
enum WhiteningKind {
    /// `S = L`, lower triangular.
    Cholesky(Mat<f64>),
    /// `S = Q diag(√λ)`.
    Eigen { q: Mat<f64>, sqrt_lambda: Vec<f64> },
    /// `S = I`.
    Identity,
}

impl Whitening {
    /// The method that produced this whitening.
    pub fn method(&self) -> WhiteningMethod {
        match self.kind {
            WhiteningKind::Cholesky(_) => WhiteningMethod::Cholesky,
            WhiteningKind::Eigen { .. } => WhiteningMethod::Eigen,
            WhiteningKind::Identity => WhiteningMethod::None,
        }
    }

    /// `W S` for `W` of shape `[d_out, d_in]`.
    pub fn whiten(&self, w: MatRef<'_, f64>) -> Mat<f64> {
        match &self.kind {
            WhiteningKind::Cholesky(l) => w * l,
            WhiteningKind::Eigen { q, sqrt_lambda } => {
                let mut ws = w * q;
                for (j, s) in sqrt_lambda.iter().enumerate() {
                    ws.col_mut(j).iter_mut().for_each(|v| *v *= s);
                }
                ws
            }
            WhiteningKind::Identity => w.to_owned(),
        }
    }

    /// `X S⁻¹` for `X` of shape `[k, d_in]`.
    pub fn unwhiten(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        match &self.kind {
            WhiteningKind::Cholesky(l) => {
                // X L⁻¹ = (L⁻ᵀ Xᵀ)ᵀ: one upper-triangular solve with Lᵀ.
                let mut y = x.transpose().to_owned();
                l.transpose().solve_upper_triangular_in_place(&mut y);
                y.transpose().to_owned()
            }
            WhiteningKind::Eigen { q, sqrt_lambda } => {
                let mut scaled = x.to_owned();
                for (j, s) in sqrt_lambda.iter().enumerate() {
                    scaled.col_mut(j).iter_mut().for_each(|v| *v /= s);
                }
                scaled * q.transpose()
            }
            WhiteningKind::Identity => x.to_owned(),
        }
    }
}

/// Finds `S` with `S Sᵀ = G (+ damping)` following `config`; see [`WhiteningConfig`].
pub fn whitening(
    layer: &str,
    gram: MatRef<'_, f64>,
    config: &WhiteningConfig,
) -> Result<Whitening> {
    let d = gram.nrows();
    let mean_diag = (0..d).map(|i| gram[(i, i)]).sum::<f64>() / d as f64;
    if config.method == WhiteningMethod::None || mean_diag <= 0.0 {
        // A zero Gram (the layer only ever saw zeros) carries no information to weight by.
        return Ok(Whitening {
            kind: WhiteningKind::Identity,
            damping: 0.0,
            relative_damping: 0.0,
        });
    }
    if config.method == WhiteningMethod::Cholesky
        && let Some(device) = &config.cholesky_device
    {
        match device_cholesky(gram, device, config) {
            Ok(whitening) => return Ok(whitening),
            // Damping ran out: the eigen path, as on the host.
            Err(EmlocError::NotPositiveDefinite { .. }) => {
                return eigen_whitening(layer, gram, mean_diag, config);
            }
            Err(e) => return Err(e),
        }
    }
    if config.method == WhiteningMethod::Cholesky {
        let mut relative = 0.0;
        for attempt in 0..=config.max_damping_attempts {
            if attempt == 1 {
                relative = config.initial_damping;
            } else if attempt > 1 {
                relative *= config.damping_growth;
            }
            let damping = relative * mean_diag;
            let mut damped = gram.to_owned();
            for i in 0..d {
                damped[(i, i)] += damping;
            }
            if let Ok(llt) = damped.llt(Side::Lower) {
                let l = llt.L().to_owned();
                let min_pivot = (0..d).map(|i| l[(i, i)] * l[(i, i)]).fold(f64::INFINITY, f64::min);
                if min_pivot.is_finite() && min_pivot > config.pivot_tolerance * mean_diag {
                    return Ok(Whitening {
                        kind: WhiteningKind::Cholesky(l),
                        damping,
                        relative_damping: relative,
                    });
                }
            }
        }
    }
    eigen_whitening(layer, gram, mean_diag, config)
}

/// [`crate::ops::cholesky`] with the damping retries of the host whitening ([`WhiteningConfig`]'s
/// `initial_damping`, `damping_growth`, `max_damping_attempts`, `pivot_tolerance`; its
/// `method` is ignored): undamped first, then relative damping `initial_damping`, multiplied by
/// `damping_growth` after each failure, at most `max_damping_attempts` damped attempts. The
/// result reports the damping that worked and the attempts it took.
///
/// # Errors
/// As [`crate::ops::cholesky`]; [`EmlocError::NotPositiveDefinite`] describes the last attempt when every
/// damping failed. A matrix whose diagonal mean is not positive (a zero Gram) fails after the
/// first attempt: damping relative to it cannot help.
pub fn cholesky_damped(
    g: burn::tensor::Tensor<2>,
    config: &WhiteningConfig,
) -> Result<ops::Cholesky> {
    ops::check_square("cholesky_damped: G", &g)?;
    ops::check_factor_args(config.initial_damping, config.pivot_tolerance)?;
    if !(config.damping_growth.is_finite() && config.damping_growth >= 1.0) {
        return Err(EmlocError::InvalidConfig(format!(
            "damping growth must be finite and ≥ 1, got {}",
            config.damping_growth
        )));
    }
    let g = g.without_autodiff();
    let mut relative = 0.0;
    let mut last = None;
    for attempt in 0..=config.max_damping_attempts {
        if attempt == 1 {
            relative = config.initial_damping;
        } else if attempt > 1 {
            relative *= config.damping_growth;
        }
        match ops::factor_once(&g, relative, config.pivot_tolerance, attempt + 1) {
            Ok(factor) => return Ok(factor),
            Err((error, mean_diag)) => {
                last = Some(error);
                if !(mean_diag.is_finite() && mean_diag > 0.0) {
                    break;
                }
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// The Cholesky attempts of [`whitening`] on `device`, in `f32` ([`cholesky_damped`]);
/// the factor comes back to the host as `f64`.
fn device_cholesky(
    gram: MatRef<'_, f64>,
    device: &burn::tensor::Device,
    config: &WhiteningConfig,
) -> Result<Whitening> {
    use burn::tensor::{Tensor, TensorData};
    let d = gram.nrows();
    let values: Vec<f32> = (0..d * d).map(|k| gram[(k / d, k % d)] as f32).collect();
    let g = Tensor::<2>::from_data(TensorData::new(values, [d, d]), device);
    let floor = d as f64 * f32::EPSILON as f64;
    let config =
        WhiteningConfig { pivot_tolerance: config.pivot_tolerance.max(floor), ..config.clone() };
    let factor = cholesky_damped(g, &config)?;
    let l = factor.l.into_data().try_to_vec::<f32>().expect("the Cholesky factor is f32");
    Ok(Whitening {
        kind: WhiteningKind::Cholesky(Mat::from_fn(d, d, |i, j| l[i * d + j] as f64)),
        damping: factor.damping,
        relative_damping: factor.relative_damping,
    })
}

fn eigen_whitening(
    layer: &str,
    gram: MatRef<'_, f64>,
    mean_diag: f64,
    config: &WhiteningConfig,
) -> Result<Whitening> {
    let eig = gram.self_adjoint_eigen(Side::Lower).map_err(|e| EmlocError::Linalg {
        layer: layer.to_string(),
        message: format!("symmetric eigendecomposition failed: {e:?}"),
    })?;
    let d = gram.nrows();
    let lambdas: Vec<f64> = (0..d).map(|i| eig.S().column_vector()[i]).collect();
    // mean(λ) = tr(G)/d = mean(diag G).
    let floor = config.eigen_floor * mean_diag;
    let raised: f64 = lambdas.iter().map(|l| (floor - l).max(0.0)).fold(0.0, f64::max);
    let sqrt_lambda = lambdas.iter().map(|l| l.max(floor).sqrt()).collect();
    Ok(Whitening {
        kind: WhiteningKind::Eigen { q: eig.U().to_owned(), sqrt_lambda },
        damping: raised,
        relative_damping: raised / mean_diag,
    })
}

/// One layer's emulator factors in Burn orientation, and what the truncation cost.
#[derive(Debug, Clone)]
pub struct FactorizedLayer {
    /// `W_vᵀ`, shape `[d_in, k]`.
    pub w_v: Matrix,
    /// `W_uᵀ`, shape `[k, d_out]`.
    pub w_u: Matrix,
    /// All singular values of `W S`, descending.
    pub singular_values: Vec<f64>,
    /// `‖(W − W^E) S‖_F = √(Σ_{i>k} σ_i²)` (Eckart–Young).
    pub whitened_error: f64,
    /// `‖W S‖_F`, to make the error relative.
    pub whitened_norm: f64,
    /// The whitening that was used.
    pub whitening: Whitening,
}

/// `f64` copy of a Burn-layout weight `[d_in, d_out]` as `W` (`[d_out, d_in]`).
pub(crate) fn weight_to_faer(weight: &Matrix) -> Mat<f64> {
    Mat::from_fn(weight.cols, weight.rows, |i, j| weight.get(j, i) as f64)
}

/// `f64` copy of a square matrix.
pub(crate) fn square_to_faer(m: &Matrix) -> Mat<f64> {
    Mat::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64)
}

/// `(U_k, σ_1..σ_k, V_k)` of a truncated SVD.
pub type TruncatedSvd = (Mat<f64>, Vec<f64>, Mat<f64>);

/// Randomized truncated SVD of `a` (`[m, n]`): the top `rank` (+ `oversample`) singular triplets
/// from a Gaussian sketch with `power_iterations` re-orthonormalised subspace iterations. The
/// sketch is seeded from the shape, so the result is deterministic. Returns `(U [m, l], σ [l],
/// V [n, l])` with `l = min(rank + oversample, m, n)`.
///
/// # Errors
/// If the small SVD fails to converge.
pub fn randomized_svd(
    a: MatRef<'_, f64>,
    rank: usize,
    oversample: usize,
    power_iterations: usize,
) -> std::result::Result<TruncatedSvd, faer::linalg::svd::SvdError> {
    let (m, n) = (a.nrows(), a.ncols());
    let l = (rank + oversample).min(m).min(n).max(1);
    let mut state =
        (m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (n as u64) ^ 0xD1B5_4A32_D192_ED03 | 1;
    let mut gaussian = || {
        // Box–Muller from two xorshift uniforms.
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (u1, u2) = (uniform(), uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let omega = Mat::from_fn(n, l, |_, _| gaussian());
    let mut q = (a * &omega).qr().compute_thin_Q();
    for _ in 0..power_iterations {
        let z = (a.transpose() * &q).qr().compute_thin_Q();
        q = (a * &z).qr().compute_thin_Q();
    }
    let b = q.transpose() * a; // [l, n]
    let svd = b.thin_svd()?;
    let u = &q * svd.U();
    let sigma = (0..svd.S().column_vector().nrows()).map(|i| svd.S().column_vector()[i]).collect();
    Ok((u, sigma, svd.V().to_owned()))
}

/// Builds rank-`rank` emulator factors of `weight` (Burn layout `[d_in, d_out]`) whitened by
/// `gram` (`[d_in, d_in]`).
pub fn factorize_layer(
    layer: &str,
    weight: &Matrix,
    gram: &Matrix,
    rank: usize,
    config: &WhiteningConfig,
) -> Result<FactorizedLayer> {
    let (d_in, d_out) = (weight.rows, weight.cols);
    if gram.shape() != [d_in, d_in] {
        return Err(EmlocError::ShapeMismatch {
            name: format!("{layer} (Gram matrix)"),
            expected: vec![d_in, d_in],
            found: gram.shape().to_vec(),
        });
    }
    let max = d_in.min(d_out);
    if rank == 0 || rank > max {
        return Err(EmlocError::InvalidRank { layer: layer.to_string(), rank, max });
    }
    let w = weight_to_faer(weight);
    let whitening = whitening(layer, square_to_faer(gram).as_ref(), config)?;
    let ws = whitening.whiten(w.as_ref());
    let failed = |e: faer::linalg::svd::SvdError| EmlocError::Linalg {
        layer: layer.to_string(),
        message: format!("SVD of the whitened weight failed: {e:?}"),
    };
    let (u, sigma, v) = match config.svd {
        SvdMethod::Exact => {
            let svd = ws.thin_svd().map_err(failed)?;
            let n = d_in.min(d_out);
            let sigma: Vec<f64> = (0..n).map(|i| svd.S().column_vector()[i]).collect();
            (svd.U().to_owned(), sigma, svd.V().to_owned())
        }
        SvdMethod::Randomized { oversample, power_iterations } => {
            randomized_svd(ws.as_ref(), rank, oversample, power_iterations).map_err(failed)?
        }
    };
    let n = sigma.len();
    // faer returns singular values in descending order; rely on it but keep the order explicit.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]));
    let kept = &order[..rank];
    let (u, v) = (u.as_ref(), v.as_ref());
    // W_u = U_k Σ^{1/2} ([d_out, k]); X = Σ^{1/2} V_kᵀ ([k, d_in]).
    let w_u = Mat::from_fn(d_out, rank, |i, j| u[(i, kept[j])] * sigma[kept[j]].sqrt());
    let x = Mat::from_fn(rank, d_in, |i, j| v[(j, kept[i])] * sigma[kept[i]].sqrt());
    let w_v = whitening.unwhiten(x.as_ref());

    // ‖W S − Wᴱ S‖² = ‖W S‖² − Σ_kept σ², exact for both SVD methods (the kept triplets are
    // exact singular triplets of the projection of W S that the factors reproduce).
    let whitened_norm = ws.norm_l2();
    let kept_energy: f64 = kept.iter().map(|&i| sigma[i] * sigma[i]).sum();
    let whitened_error = (whitened_norm * whitened_norm - kept_energy).max(0.0).sqrt();
    let mut singular_values: Vec<f64> = order.iter().map(|&i| sigma[i]).collect();
    singular_values.shrink_to_fit();

    Ok(FactorizedLayer {
        // Burn orientation: w_v = W_vᵀ [d_in, k], w_u = W_uᵀ [k, d_out].
        w_v: Matrix::new(
            d_in,
            rank,
            (0..d_in * rank).map(|idx| w_v[(idx % rank, idx / rank)] as f32).collect(),
        ),
        w_u: Matrix::new(
            rank,
            d_out,
            (0..rank * d_out).map(|idx| w_u[(idx % d_out, idx / d_out)] as f32).collect(),
        ),
        singular_values,
        whitened_error,
        whitened_norm,
        whitening,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers (xorshift), so tests need no RNG crate.
    pub(crate) fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// Gram of `tokens` rows that live mostly in a few directions (like real activations).
    fn calibration_gram(d_in: usize, tokens: usize, seed: u64) -> Matrix {
        let x = noise(seed, tokens * d_in);
        let mut g = vec![0.0f32; d_in * d_in];
        for t in 0..tokens {
            let row: Vec<f32> =
                (0..d_in).map(|j| x[t * d_in + j] * (1.0 + 8.0 / (1.0 + j as f32))).collect();
            for i in 0..d_in {
                for j in 0..d_in {
                    g[i * d_in + j] += row[i] * row[j];
                }
            }
        }
        Matrix::new(d_in, d_in, g)
    }

    /// Oracle: symmetric square root `S' = Q Λ^{1/2} Qᵀ` and `W^E = [W S']_k S'⁻¹` with an
    /// explicit inverse, all through the eigen route (never Cholesky).
    fn oracle_emulator(w: &Mat<f64>, gram: &Mat<f64>, k: usize) -> (Mat<f64>, Vec<f64>) {
        let eig = gram.self_adjoint_eigen(Side::Lower).unwrap();
        let d = gram.nrows();
        let q = eig.U();
        let lam: Vec<f64> = (0..d).map(|i| eig.S().column_vector()[i]).collect();
        let s = Mat::from_fn(d, d, |i, j| {
            (0..d).map(|m| q[(i, m)] * lam[m].sqrt() * q[(j, m)]).sum::<f64>()
        });
        let s_inv = Mat::from_fn(d, d, |i, j| {
            (0..d).map(|m| q[(i, m)] / lam[m].sqrt() * q[(j, m)]).sum::<f64>()
        });
        let ws = w * &s;
        let svd = ws.thin_svd().unwrap();
        let n = svd.S().column_vector().nrows();
        let sigma: Vec<f64> = (0..n).map(|i| svd.S().column_vector()[i]).collect();
        let u_k = svd.U().subcols(0, k);
        let v_k = svd.V().subcols(0, k);
        let mut us = u_k.to_owned();
        for (j, s) in sigma.iter().enumerate().take(k) {
            us.col_mut(j).iter_mut().for_each(|v| *v *= s);
        }
        (us * v_k.transpose() * s_inv, sigma)
    }

    fn dense_emulator(f: &FactorizedLayer) -> Mat<f64> {
        // W^E = W_u W_v, from the Burn-oriented factors.
        weight_to_faer(&f.w_u) * weight_to_faer(&f.w_v)
    }

    fn max_rel_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
        (a - b).norm_max() / b.norm_max()
    }

    #[test]
    fn factors_match_eigen_oracle_and_eckart_young() {
        let (d_in, d_out, k) = (24, 17, 7);
        let weight = Matrix::new(d_in, d_out, noise(1, d_in * d_out));
        let gram = calibration_gram(d_in, 200, 2);
        let f = factorize_layer("l", &weight, &gram, k, &WhiteningConfig::default()).unwrap();
        assert_eq!(f.whitening.method(), WhiteningMethod::Cholesky);
        assert_eq!(f.whitening.damping, 0.0);
        assert_eq!((f.w_v.shape(), f.w_u.shape()), ([d_in, k], [k, d_out]));

        let w = weight_to_faer(&weight);
        let g = square_to_faer(&gram);
        let (oracle, sigma) = oracle_emulator(&w, &g, k);
        let ours = dense_emulator(&f);
        // Factors are stored in f32: agreement to f32 precision.
        assert!(max_rel_diff(&ours, &oracle) < 1e-4, "{}", max_rel_diff(&ours, &oracle));

        let tail = sigma[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((f.whitened_error - tail).abs() <= 1e-9 * tail.max(1.0));
        // And the error it reports is the real output error on the calibration data:
        // ‖(W − W^E) S‖²_F = tr((W − W^E) G (W − W^E)ᵀ).
        let diff = &w - &ours;
        let err2 = (&diff * &g * diff.transpose()).diagonal().column_vector().iter().sum::<f64>();
        assert!((err2.sqrt() - tail).abs() / tail < 1e-3, "{} vs {tail}", err2.sqrt());
    }

    #[test]
    fn randomized_svd_matches_the_exact_path_and_reports_its_true_error() {
        // A weight with a decaying spectrum (rank-structured plus a little noise).
        let (d_in, d_out, k) = (60, 50, 10);
        let left = Matrix::new(d_in, 12, noise(11, d_in * 12));
        let right = Matrix::new(12, d_out, noise(12, 12 * d_out));
        let tail = noise(13, d_in * d_out);
        let data: Vec<f32> = (0..d_in * d_out)
            .map(|idx| {
                let (i, j) = (idx / d_out, idx % d_out);
                (0..12).map(|r| left.get(i, r) * right.get(r, j) / (1.0 + r as f32)).sum::<f32>()
                    + 0.01 * tail[idx]
            })
            .collect();
        let weight = Matrix::new(d_in, d_out, data);
        let gram = calibration_gram(d_in, 300, 14);
        let exact = factorize_layer("l", &weight, &gram, k, &WhiteningConfig::default()).unwrap();
        let config = WhiteningConfig {
            svd: SvdMethod::Randomized { oversample: 8, power_iterations: 2 },
            ..WhiteningConfig::default()
        };
        let fast = factorize_layer("l", &weight, &gram, k, &config).unwrap();
        assert_eq!(fast.singular_values.len(), k + 8);
        // The reported error is the true one: tr((W − Wᴱ) G (W − Wᴱ)ᵀ) for the randomized factors.
        let (w, g) = (weight_to_faer(&weight), square_to_faer(&gram));
        let diff = &w - &dense_emulator(&fast);
        let err2 = (&diff * &g * diff.transpose()).diagonal().column_vector().iter().sum::<f64>();
        assert!(
            (err2.sqrt() - fast.whitened_error).abs() / fast.whitened_error < 1e-3,
            "{} vs {}",
            err2.sqrt(),
            fast.whitened_error
        );
        // Eckart–Young: never better than exact, and close to it with power iterations.
        assert!(fast.whitened_error >= exact.whitened_error * (1.0 - 1e-9));
        assert!(
            fast.whitened_error <= exact.whitened_error * 1.01,
            "{} vs {}",
            fast.whitened_error,
            exact.whitened_error
        );
        for i in 0..k {
            let (a, b) = (fast.singular_values[i], exact.singular_values[i]);
            assert!((a - b).abs() <= 1e-3 * b, "σ_{i}: {a} vs {b}");
        }
    }

    #[test]
    fn eigen_and_cholesky_give_the_same_emulator() {
        let (d_in, d_out, k) = (20, 30, 9);
        let weight = Matrix::new(d_in, d_out, noise(3, d_in * d_out));
        let gram = calibration_gram(d_in, 100, 4);
        let chol = factorize_layer("l", &weight, &gram, k, &WhiteningConfig::default()).unwrap();
        let eigen_cfg = WhiteningConfig { method: WhiteningMethod::Eigen, ..Default::default() };
        let eig = factorize_layer("l", &weight, &gram, k, &eigen_cfg).unwrap();
        assert_eq!(eig.whitening.method(), WhiteningMethod::Eigen);
        assert!(max_rel_diff(&dense_emulator(&chol), &dense_emulator(&eig)) < 1e-4);
    }

    #[test]
    fn full_rank_reproduces_the_weight() {
        let (d_in, d_out) = (12, 9);
        let weight = Matrix::new(d_in, d_out, noise(5, d_in * d_out));
        let gram = calibration_gram(d_in, 50, 6);
        let f = factorize_layer("l", &weight, &gram, 9, &WhiteningConfig::default()).unwrap();
        assert!(max_rel_diff(&dense_emulator(&f), &weight_to_faer(&weight)) < 1e-4);
        assert!(f.whitened_error < 1e-6 * f.whitened_norm);
    }

    #[test]
    fn rank_deficient_gram_builds_with_reported_damping() {
        let (d_in, d_out, k) = (32, 16, 4);
        let weight = Matrix::new(d_in, d_out, noise(7, d_in * d_out));
        // 10 tokens for 32 input features: G has rank 10.
        let gram = calibration_gram(d_in, 10, 8);
        let f = factorize_layer("l", &weight, &gram, k, &WhiteningConfig::default()).unwrap();
        assert!(f.whitening.damping > 0.0, "damping must be reported");
        assert!(f.whitening.relative_damping >= 1e-6);
        assert!(f.w_v.is_finite() && f.w_u.is_finite());
        // On the calibration subspace the emulator is still the Eckart–Young optimum of the
        // damped problem: its error is below the weight's own whitened norm.
        assert!(f.whitened_error < f.whitened_norm);
    }

    #[test]
    fn exhausted_damping_falls_back_to_eigen() {
        let (d_in, d_out) = (16, 8);
        let weight = Matrix::new(d_in, d_out, noise(9, d_in * d_out));
        let gram = calibration_gram(d_in, 4, 10);
        let cfg = WhiteningConfig { max_damping_attempts: 0, ..Default::default() };
        let f = factorize_layer("l", &weight, &gram, 3, &cfg).unwrap();
        assert_eq!(f.whitening.method(), WhiteningMethod::Eigen);
        assert!(f.whitening.damping > 0.0);
    }

    #[test]
    fn bad_rank_and_gram_shape_are_rejected() {
        let weight = Matrix::new(6, 4, noise(11, 24));
        let gram = calibration_gram(6, 20, 12);
        for rank in [0, 5] {
            let err = factorize_layer("blk.q", &weight, &gram, rank, &Default::default());
            assert!(matches!(err, Err(EmlocError::InvalidRank { max: 4, .. })), "{err:?}");
        }
        let err =
            factorize_layer("blk.q", &weight, &calibration_gram(5, 20, 1), 2, &Default::default());
        assert!(matches!(err, Err(EmlocError::ShapeMismatch { .. })));
    }
}
