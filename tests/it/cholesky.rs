//! [`emloc::ops::cholesky`], [`emloc::emulator::cholesky_damped`] and
//! [`emloc::ops::solve_lower_right`] against float64 references (faer's `llt`, and a
//! hand-written `f64` Crout factorization for the pivot values), on sizes that are not multiples
//! of the kernel's 32-wide blocks; on SPD inputs of known condition number, rank-deficient and
//! indefinite inputs (damping retries, the reported pivot) and a zero matrix; Cube vs Flex.
//!
//! Tolerances, with `ε = 2⁻²³` (f32) and `κ` the condition number of the factored matrix:
//! backward error `max|L Lᵀ − G| / max|G| ≤ 4 (d + 1) ε` (Cholesky is backward stable: Higham,
//! Thm 10.3); forward error `max|L − L₆₄| / max|L₆₄| ≤ 4 d κ ε` (Higham, Thm 10.8: the factor's
//! perturbation grows with `κ`); triangular solves: residual
//! `‖Y op(L) − X‖_F / (‖Y‖_F ‖L‖_F) ≤ 4 d ε`, forward error `≤ 4 d κ(L) ε`.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use emloc::EmlocError;
use emloc::emulator::{WhiteningConfig, cholesky_damped};
use emloc::ops;
use faer::{Mat, Side};

use crate::common::noise;

const EPS: f64 = f32::EPSILON as f64;
/// Sizes around and across the 32-wide blocks (and the 64/128-wide product tiles).
const SIZES: &[usize] = &[1, 7, 33, 100, 257];

/// `Q diag(λ) Qᵀ` with `Q` orthogonal (QR of a random matrix) and `λ` given, rounded to `f32`
/// and exactly symmetric, as row-major `f64` values.
fn with_spectrum(lambda: &[f64], seed: u64) -> Vec<f64> {
    let d = lambda.len();
    let r = noise(seed, d * d);
    let q = Mat::from_fn(d, d, |i, j| r[i * d + j] as f64).qr().compute_thin_Q();
    let mut g = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let v: f64 = (0..d).map(|k| q[(i, k)] * lambda[k] * q[(j, k)]).sum();
            let v = v as f32 as f64;
            g[i * d + j] = v;
            g[j * d + i] = v;
        }
    }
    g
}

/// An SPD matrix with eigenvalues spread geometrically from 1 down to `1/kappa`.
fn spd(d: usize, kappa: f64, seed: u64) -> Vec<f64> {
    let lambda: Vec<f64> = (0..d)
        .map(|i| if d == 1 { 1.0 } else { kappa.powf(-(i as f64) / (d - 1) as f64) })
        .collect();
    with_spectrum(&lambda, seed)
}

fn tensor(values: &[f64], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

fn host(t: Tensor<2>) -> Vec<f64> {
    let v = t.cast(FloatDType::F32).into_data().try_to_vec::<f32>().unwrap();
    v.into_iter().map(f64::from).collect()
}

/// faer's f64 Cholesky factor (row-major).
fn llt_f64(g: &[f64], d: usize) -> Vec<f64> {
    let m = Mat::from_fn(d, d, |i, j| g[i * d + j]);
    let llt = m.llt(Side::Lower).expect("reference matrix must be SPD in f64");
    let l = llt.L();
    (0..d * d).map(|k| if k % d <= k / d { l[(k / d, k % d)] } else { 0.0 }).collect()
}

/// Hand-written f64 Crout factorization with the same pivot rule as the op: the first pivot
/// `p = L_jj²` with `!(p > tolerance · mean(diag G))` or `p ≤ 0`, and its value.
fn first_bad_pivot_f64(g: &[f64], d: usize, relative: f64, tolerance: f64) -> Option<(usize, f64)> {
    let mean = (0..d).map(|i| g[i * d + i]).sum::<f64>() / d as f64;
    let mut l = vec![0.0f64; d * d];
    for j in 0..d {
        let p = g[j * d + j] + relative * mean - (0..j).map(|k| l[j * d + k].powi(2)).sum::<f64>();
        if !(p > 0.0 && p > tolerance * mean) {
            return Some((j, p));
        }
        l[j * d + j] = p.sqrt();
        for i in j + 1..d {
            let dot: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            l[i * d + j] = (g[i * d + j] - dot) / l[j * d + j];
        }
    }
    None
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// `max|L Lᵀ − G| / max|G|`.
fn backward_error(l: &[f64], g: &[f64], d: usize) -> f64 {
    let mut err = 0.0f64;
    for i in 0..d {
        for j in 0..=i {
            let v: f64 = (0..=j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            err = err.max((v - g[i * d + j]).abs());
        }
    }
    err / max_abs(g).max(f64::MIN_POSITIVE)
}

fn check(what: &str, err: f64, tol: f64) {
    println!("{what}: {err:.2e} (tolerance {tol:.1e})");
    assert!(err <= tol, "{what}: {err:.3e} > {tol:.1e}");
}

fn assert_lower(l: &[f64], d: usize, what: &str) {
    for i in 0..d {
        assert!(l[i * d + i] > 0.0, "{what}: L[{i},{i}] = {} is not positive", l[i * d + i]);
        for j in i + 1..d {
            assert_eq!(l[i * d + j], 0.0, "{what}: L[{i},{j}] above the diagonal is not zero");
        }
    }
}

/// Factors SPD matrices of condition number `kappa`, stored as `dtype` on `device`.
fn check_factor(device: &Device, dtype: FloatDType, kappa: f64) {
    for (s, &d) in SIZES.iter().enumerate() {
        let g = tensor(&spd(d, kappa, 10 + s as u64), d, d, device).cast(dtype);
        // The reference factors exactly the (possibly f16-rounded) values the op sees.
        let gh = host(g.clone());
        let factor = ops::cholesky(g, 0.0, 1e-6).expect("SPD input must factor");
        assert_eq!(factor.l.dims(), [d, d]);
        assert_eq!(factor.l.dtype(), burn::tensor::DType::F32, "L is always f32");
        assert_eq!((factor.attempts, factor.damping), (1, 0.0));
        let mean = (0..d).map(|i| gh[i * d + i]).sum::<f64>() / d as f64;
        assert!((factor.mean_diag - mean).abs() <= 1e-6 * mean, "mean diag {}", factor.mean_diag);
        let l = host(factor.l);
        let tag = format!("{dtype:?} d={d} κ={kappa:e}");
        assert_lower(&l, d, &tag);
        check(
            &format!("cholesky backward error {tag}"),
            backward_error(&l, &gh, d),
            4.0 * (d + 1) as f64 * EPS,
        );
        let want = llt_f64(&gh, d);
        check(
            &format!("cholesky forward error {tag}"),
            max_diff(&l, &want) / max_abs(&want),
            4.0 * d as f64 * kappa * EPS,
        );
        let min_pivot = (0..d).map(|i| want[i * d + i].powi(2)).fold(f64::INFINITY, f64::min);
        assert!(
            (factor.min_pivot - min_pivot).abs()
                <= 4.0 * d as f64 * kappa * EPS * min_pivot.max(1e-30) + 1e-6,
            "min pivot {} vs {min_pivot}",
            factor.min_pivot
        );
    }
}

/// A rank-deficient PSD Gram (half its eigenvalues zero): the undamped factorization must fail,
/// and the damping retries must succeed at the same relative damping as the host f64 whitening.
fn check_damping_retry(device: &Device) {
    let d = 100;
    let lambda: Vec<f64> = (0..d).map(|i| if i < d / 2 { 1.0 } else { 0.0 }).collect();
    let gh = with_spectrum(&lambda, 7);
    let config = WhiteningConfig {
        initial_damping: 1e-6,
        damping_growth: 10.0,
        max_damping_attempts: 6,
        // f32 rounding leaves pivots around d·ε·mean ≈ 1e-5·mean on a singular matrix: only a
        // tolerance above that tells them from real ones.
        pivot_tolerance: 3e-5,
        ..WhiteningConfig::default()
    };
    let g = tensor(&gh, d, d, device);
    match ops::cholesky(g.clone(), 0.0, config.pivot_tolerance) {
        Err(EmlocError::NotPositiveDefinite { pivot, attempts: 1, .. }) => {
            println!("rank-deficient, undamped: rejected pivot {pivot}");
            assert!(pivot >= d / 2 - 1, "pivot {pivot} rejected inside the positive-definite part");
        }
        other => panic!("undamped factorization of a singular matrix must fail, got {other:?}"),
    }
    let factor = cholesky_damped(g, &config).expect("damping must rescue a PSD matrix");
    println!(
        "rank-deficient: relative damping {:e} (λ = {:e}) after {} attempts, min pivot {:e}",
        factor.relative_damping, factor.damping, factor.attempts, factor.min_pivot
    );
    // Schedule 0, 1e-6, 1e-5, 1e-4: 1e-4 is the first relative damping whose pivots (≈ λ)
    // clear 3e-5 · mean.
    assert_eq!(factor.attempts, 4);
    assert!((factor.relative_damping - 1e-4).abs() < 1e-12, "{}", factor.relative_damping);
    assert!((factor.damping - 1e-4 * factor.mean_diag).abs() < 1e-12);
    // The host f64 whitening picks the same damping with the same settings.
    let host_whitening = emloc::emulator::whitening(
        "test",
        Mat::from_fn(d, d, |i, j| gh[i * d + j]).as_ref(),
        &config,
    )
    .expect("host whitening");
    assert_eq!(host_whitening.method(), emloc::emulator::WhiteningMethod::Cholesky);
    assert!((host_whitening.relative_damping - factor.relative_damping).abs() < 1e-12);

    let mut damped = gh.clone();
    for i in 0..d {
        damped[i * d + i] += factor.damping;
    }
    let l = host(factor.l);
    assert_lower(&l, d, "damped");
    check(
        "damped cholesky backward error",
        backward_error(&l, &damped, d),
        4.0 * (d + 1) as f64 * EPS,
    );
    // κ(G + λI) = (1 + λ) / λ.
    let kappa = (1.0 + factor.damping) / factor.damping;
    let want = llt_f64(&damped, d);
    check(
        "damped cholesky forward error",
        max_diff(&l, &want) / max_abs(&want),
        4.0 * d as f64 * kappa * EPS,
    );
}

/// An SPD matrix with one negative diagonal entry at `p`: the leading `p × p` block stays SPD,
/// so pivot `p` is the first to fail, with the Schur complement's value.
fn indefinite(d: usize, p: usize) -> Vec<f64> {
    let mut g = spd(d, 10.0, 40 + p as u64);
    g[p * d + p] = -0.5;
    g
}

fn check_indefinite(device: &Device) {
    let d = 100;
    for p in [0, 31, 32, 57, 99] {
        let gh = indefinite(d, p);
        let (want_pivot, want_value) = first_bad_pivot_f64(&gh, d, 0.0, 1e-6).expect("indefinite");
        assert_eq!(want_pivot, p, "test matrix: the f64 reference fails at {want_pivot}");
        match ops::cholesky(tensor(&gh, d, d, device), 0.0, 1e-6) {
            Err(EmlocError::NotPositiveDefinite { pivot, value, threshold, attempts, .. }) => {
                println!(
                    "indefinite p={p}: rejected pivot {pivot}, value {value:.6e} (f64 {want_value:.6e})"
                );
                assert_eq!(pivot, p, "wrong pivot reported");
                assert_eq!(attempts, 1);
                assert!(
                    value < 0.0 && (value - want_value).abs() <= 1e-4 * want_value.abs().max(1.0)
                );
                assert!(threshold > 0.0);
            }
            other => panic!("indefinite matrix (p = {p}) must fail, got {other:?}"),
        }
    }

    // Retries: the device picks the first damping of the schedule that the f64 reference accepts.
    let gh = indefinite(d, 57);
    let config = WhiteningConfig {
        initial_damping: 1e-3,
        damping_growth: 10.0,
        max_damping_attempts: 5,
        pivot_tolerance: 1e-6,
        ..WhiteningConfig::default()
    };
    let mut want_relative = None;
    let mut relative = 0.0;
    for attempt in 0..=config.max_damping_attempts {
        relative = if attempt == 0 {
            0.0
        } else if attempt == 1 {
            1e-3
        } else {
            relative * 10.0
        };
        if first_bad_pivot_f64(&gh, d, relative, config.pivot_tolerance).is_none() {
            want_relative = Some((relative, attempt + 1));
            break;
        }
    }
    let (want_relative, want_attempts) = want_relative.expect("the schedule reaches a PD shift");
    let factor = cholesky_damped(tensor(&gh, d, d, device), &config).expect("damping rescues it");
    println!(
        "indefinite retry: relative damping {:e} after {} attempts (f64 reference {want_relative:e}, {want_attempts})",
        factor.relative_damping, factor.attempts
    );
    assert_eq!(factor.attempts, want_attempts);
    assert!((factor.relative_damping - want_relative).abs() <= 1e-12 * want_relative);
    let mut damped = gh.clone();
    for i in 0..d {
        damped[i * d + i] += factor.damping;
    }
    check(
        "indefinite, damped: backward error",
        backward_error(&host(factor.l), &damped, d),
        4.0 * (d + 1) as f64 * EPS,
    );

    // Too few attempts: the last failure is reported with the attempts made.
    let short = WhiteningConfig { max_damping_attempts: want_attempts - 2, ..config };
    match cholesky_damped(tensor(&gh, d, d, device), &short) {
        Err(EmlocError::NotPositiveDefinite { attempts, relative_damping, .. }) => {
            assert_eq!(attempts, want_attempts - 1);
            assert!(relative_damping < want_relative);
        }
        other => panic!("exhausted retries must fail, got {other:?}"),
    }
}

fn check_zero(device: &Device) {
    let d = 33;
    let g = Tensor::<2>::zeros([d, d], device);
    match ops::cholesky(g.clone(), 0.0, 1e-6) {
        Err(EmlocError::NotPositiveDefinite {
            pivot: 0, value, threshold, attempts: 1, ..
        }) => {
            assert_eq!((value, threshold), (0.0, 0.0));
        }
        other => panic!("zero matrix must fail at pivot 0, got {other:?}"),
    }
    // Damping relative to a zero diagonal cannot help: one attempt, then the error.
    match cholesky_damped(g, &WhiteningConfig::default()) {
        Err(EmlocError::NotPositiveDefinite { pivot: 0, attempts: 1, .. }) => {}
        other => panic!("zero matrix must fail without retries, got {other:?}"),
    }
}

fn check_shapes(device: &Device) {
    let g = Tensor::<2>::zeros([4, 5], device);
    assert!(matches!(ops::cholesky(g, 0.0, 1e-6), Err(EmlocError::ShapeMismatch { .. })));
    let l = Tensor::<2>::zeros([4, 4], device);
    let x = Tensor::<2>::zeros([3, 5], device);
    assert!(matches!(
        ops::solve_lower_right(x, l.clone(), false),
        Err(EmlocError::ShapeMismatch { .. })
    ));
    assert!(matches!(ops::cholesky(l, -1.0, 1e-6), Err(EmlocError::InvalidConfig(_))));
}

/// `Y L = X` and `Y Lᵀ = X` for `L` the f64 Cholesky factor of an SPD matrix of condition
/// number 100 (so `κ(L) = 10`), rounded to f32; `X` `[m, d]`, also read through a transposed
/// view.
fn check_solve(device: &Device) {
    let m = 37;
    for (s, &d) in SIZES.iter().enumerate() {
        let lh: Vec<f64> =
            llt_f64(&spd(d, 100.0, 60 + s as u64), d).iter().map(|&v| v as f32 as f64).collect();
        let xh: Vec<f64> = noise(80 + s as u64, m * d).into_iter().map(f64::from).collect();
        let l = tensor(&lh, d, d, device);
        for transpose in [false, true] {
            for strided in [false, true] {
                let x = if strided {
                    // The same values, read through a transposed view of an [d, m] tensor.
                    let xt: Vec<f64> = (0..d * m).map(|k| xh[(k % m) * d + k / m]).collect();
                    tensor(&xt, d, m, device).transpose()
                } else {
                    tensor(&xh, m, d, device)
                };
                let y = host(ops::solve_lower_right(x, l.clone(), transpose).unwrap());
                // Residual Y op(L) − X, and the f64 solution.
                let op = |i: usize, j: usize| if transpose { lh[j * d + i] } else { lh[i * d + j] };
                let mut res = 0.0f64;
                for r in 0..m {
                    for j in 0..d {
                        let v: f64 = (0..d).map(|i| y[r * d + i] * op(i, j)).sum();
                        res += (v - xh[r * d + j]).powi(2);
                    }
                }
                let frob = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let tag = format!("d={d} transpose={transpose} strided={strided}");
                check(
                    &format!("solve residual {tag}"),
                    res.sqrt() / (frob(&y) * frob(&lh)),
                    4.0 * d as f64 * EPS,
                );
                let mut want = xh.clone();
                reference_solve(&lh, d, &mut want, m, transpose);
                check(
                    &format!("solve forward error {tag}"),
                    max_diff(&y, &want) / max_abs(&want),
                    4.0 * d as f64 * 10.0 * EPS,
                );
            }
        }
    }
}

/// f64 substitution, column by column (a different loop order from the Flex implementation).
fn reference_solve(l: &[f64], d: usize, y: &mut [f64], m: usize, transpose: bool) {
    for r in 0..m {
        let row = &mut y[r * d..(r + 1) * d];
        if transpose {
            for j in 0..d {
                let s: f64 = (0..j).map(|i| row[i] * l[j * d + i]).sum();
                row[j] = (row[j] - s) / l[j * d + j];
            }
        } else {
            for j in (0..d).rev() {
                let s: f64 = (j + 1..d).map(|i| row[i] * l[i * d + j]).sum();
                row[j] = (row[j] - s) / l[j * d + j];
            }
        }
    }
}

/// The emulator's whitening with the opt-in device Cholesky (`cholesky_device`) against the
/// default host f64 path on a well-conditioned calibration Gram: same factors up to f32 rounding.
fn check_whitening_on_device(device: &Device) {
    use emloc::Matrix;
    use emloc::emulator::factorize_layer;
    let (tokens, d_in, d_out, rank) = (300, 70, 45, 12);
    let x = noise(90, tokens * d_in);
    let mut g = vec![0.0f32; d_in * d_in];
    for t in 0..tokens {
        for i in 0..d_in {
            for j in 0..d_in {
                g[i * d_in + j] += x[t * d_in + i] * x[t * d_in + j];
            }
        }
    }
    let gram = Matrix::new(d_in, d_in, g);
    let weight = Matrix::new(d_in, d_out, noise(91, d_in * d_out));
    let host_cfg = WhiteningConfig::default();
    let device_cfg =
        WhiteningConfig { cholesky_device: Some(device.clone()), ..WhiteningConfig::default() };
    let on_host = factorize_layer("l", &weight, &gram, rank, &host_cfg).unwrap();
    let on_device = factorize_layer("l", &weight, &gram, rank, &device_cfg).unwrap();
    assert_eq!(on_device.whitening.method(), emloc::emulator::WhiteningMethod::Cholesky);
    assert_eq!(on_device.whitening.relative_damping, 0.0);
    // The dense emulators W_vᵀ W_uᵀ ([d_in, d_out]) of both paths.
    let dense = |f: &emloc::emulator::FactorizedLayer| -> Vec<f64> {
        let mut out = vec![0.0; d_in * d_out];
        for i in 0..d_in {
            for j in 0..d_out {
                out[i * d_out + j] =
                    (0..rank).map(|r| f.w_v.get(i, r) as f64 * f.w_u.get(r, j) as f64).sum();
            }
        }
        out
    };
    let (a, b) = (dense(&on_device), dense(&on_host));
    // Typical-case f32 error of the factor, 4 κ ε √d (κ(G) ≈ 10 here), which the emulator
    // inherits: tight enough to catch a 10⁻³ perturbation of L (8e-5 when tried), which the
    // worst-case bound 4 d κ ε would not.
    let gf = Mat::from_fn(d_in, d_in, |i, j| gram.get(i, j) as f64);
    let eig = gf.self_adjoint_eigen(Side::Lower).unwrap();
    let lambda: Vec<f64> = (0..d_in).map(|i| eig.S().column_vector()[i]).collect();
    let kappa = max_abs(&lambda) / lambda.iter().fold(f64::INFINITY, |m, &v| m.min(v));
    let tol = 4.0 * kappa * EPS * (d_in as f64).sqrt();
    println!("whitening Gram: κ = {kappa:.1}");
    check("device vs host whitening: dense emulator", max_diff(&a, &b) / max_abs(&b), tol);
    let rel = (on_device.whitened_error - on_host.whitened_error).abs() / on_host.whitened_error;
    check("device vs host whitening: whitened error", rel, tol);
}

#[test]
fn flex_whitening_with_device_cholesky_matches_host() {
    check_whitening_on_device(&Device::flex());
}

#[test]
fn autodiff_device_delegates_to_the_inner_backend() {
    // Through the wrappers (which strip autodiff) and through the Autodiff implementation itself.
    use burn::backend::Dispatch;
    use emloc::ops::EmlocOps;
    let d = 40;
    let gh = spd(d, 100.0, 21);
    let ad = Device::flex().autodiff();
    let want = host(ops::cholesky(tensor(&gh, d, d, &Device::flex()), 0.0, 1e-6).unwrap().l);
    let got = host(ops::cholesky(tensor(&gh, d, d, &ad), 0.0, 1e-6).unwrap().l);
    assert_eq!(got, want);
    let (l, st) =
        <Dispatch as EmlocOps>::cholesky(tensor(&gh, d, d, &ad).into_dispatch(), 0.0, 1e-6);
    assert_eq!(host(Tensor::<2>::from_dispatch(l)), want);
    assert_eq!(Tensor::<1>::from_dispatch(st).dims(), [4]);
    let x: Vec<f64> = noise(22, 3 * d).into_iter().map(f64::from).collect();
    let y = <Dispatch as EmlocOps>::solve_lower_right(
        tensor(&x, 3, d, &ad).into_dispatch(),
        tensor(&want, d, d, &ad).into_dispatch(),
        true,
    );
    let flex = ops::solve_lower_right(
        tensor(&x, 3, d, &Device::flex()),
        tensor(&want, d, d, &Device::flex()),
        true,
    );
    assert_eq!(host(Tensor::<2>::from_dispatch(y)), host(flex.unwrap()));
}

#[test]
fn flex_cholesky_matches_f64() {
    check_factor(&Device::flex(), FloatDType::F32, 100.0);
}

#[test]
fn flex_cholesky_damping_retry() {
    check_damping_retry(&Device::flex());
}

#[test]
fn flex_cholesky_indefinite_reports_pivot() {
    check_indefinite(&Device::flex());
}

#[test]
fn flex_cholesky_zero_and_shapes() {
    check_zero(&Device::flex());
    check_shapes(&Device::flex());
}

#[test]
fn flex_solve_lower_right_matches_f64() {
    check_solve(&Device::flex());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube {
    use super::*;
    use crate::kernels::cube_device;

    #[test]
    fn cholesky_f32_matches_f64() {
        check_factor(&cube_device(), FloatDType::F32, 100.0);
    }

    #[test]
    fn cholesky_ill_conditioned_f32() {
        // κ = 10⁴: the forward error grows with κ, the backward error does not.
        check_factor(&cube_device(), FloatDType::F32, 1e4);
    }

    #[test]
    fn cholesky_f16_input() {
        let device = cube_device();
        if device.supports_dtype(burn::tensor::DType::F16) {
            check_factor(&device, FloatDType::F16, 100.0);
        } else {
            println!("[emloc kernels] f16 unsupported on this adapter: f16 Cholesky skipped");
        }
    }

    #[test]
    fn cholesky_damping_retry() {
        check_damping_retry(&cube_device());
    }

    #[test]
    fn cholesky_indefinite_reports_pivot() {
        check_indefinite(&cube_device());
    }

    #[test]
    fn cholesky_zero_and_shapes() {
        check_zero(&cube_device());
        check_shapes(&cube_device());
    }

    #[test]
    fn solve_lower_right_matches_f64() {
        check_solve(&cube_device());
    }

    #[test]
    fn whitening_with_device_cholesky_matches_host() {
        check_whitening_on_device(&cube_device());
    }

    #[test]
    fn cholesky_and_solve_match_flex() {
        let device = cube_device();
        let flex = Device::flex();
        let d = 150;
        let gh = spd(d, 100.0, 3);
        let lc = ops::cholesky(tensor(&gh, d, d, &device), 0.0, 1e-6).unwrap().l;
        let lf = ops::cholesky(tensor(&gh, d, d, &flex), 0.0, 1e-6).unwrap().l;
        let (lc, lf) = (host(lc), host(lf));
        check(
            "cholesky cube vs flex",
            max_diff(&lc, &lf) / max_abs(&lf),
            4.0 * d as f64 * 100.0 * EPS,
        );
        let xh: Vec<f64> = noise(5, 20 * d).into_iter().map(f64::from).collect();
        for transpose in [false, true] {
            let yc = ops::solve_lower_right(
                tensor(&xh, 20, d, &device),
                tensor(&lf, d, d, &device),
                transpose,
            );
            let yf = ops::solve_lower_right(
                tensor(&xh, 20, d, &flex),
                tensor(&lf, d, d, &flex),
                transpose,
            );
            let (yc, yf) = (host(yc.unwrap()), host(yf.unwrap()));
            check(
                &format!("solve cube vs flex transpose={transpose}"),
                max_diff(&yc, &yf) / max_abs(&yf),
                4.0 * d as f64 * 10.0 * EPS,
            );
        }
        for p in [0, 45, 149] {
            let gh = indefinite(d, p);
            let pivot = |device: &Device| match ops::cholesky(tensor(&gh, d, d, device), 0.0, 1e-6)
            {
                Err(EmlocError::NotPositiveDefinite { pivot, .. }) => pivot,
                other => panic!("expected a failure, got {other:?}"),
            };
            assert_eq!(pivot(&device), pivot(&flex), "cube and flex disagree on the failing pivot");
        }
    }
}
