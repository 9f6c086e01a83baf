//! Stage 3: closed-form LoRA correction for the emulator/original mismatch.
//!
//! Per adapted layer, in f64 on the host: `Aᵀ = P Σ_A Rᵀ` (thin SVD), `A' = Pᵀ`,
//! `B' = B R Σ_A`, `C = (W − W^E) P`, `γ_j = min(1, L · mean|s B'_{:,j}| / mean|C_{:,j}|)`,
//! `A_c = A'`, `B_c = B' − C diag(γ) / s`. With `Γ = I`, `(W + s B_c A_c) x = (W^E + s B A) x`
//! for every `x` in span(P), and the layer is untouched on span(P)^⊥.
//!
//! Unlike the official release, `C` is divided by the adapter scale `s` (`α/r`, or `α/√r` for
//! rsLoRA), which the release omits because its configs use `α = r`, and the clamp compares
//! `s · B'` with `C`; everything is computed in f64 rather than bf16.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::Module;
use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::adapter::export_adapter;
use crate::emulator::factorize::weight_to_faer;
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::nn::hooks::for_each_linear;
use crate::peft::{PeftAdapter, PeftLayer};

/// Settings of the correction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectionConfig {
    /// Clamp `L`: a column's correction is scaled down so that its mean magnitude stays within
    /// `L` times the adapter's own (`γ_j = min(1, L β_j / κ_j)`). `f64::INFINITY` disables it.
    pub clamp: f64,
}

impl Default for CorrectionConfig {
    fn default() -> Self {
        Self { clamp: 3.0 }
    }
}

/// What the correction did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCorrection {
    /// Module path.
    pub path: String,
    /// Adapter rank.
    pub rank: usize,
    /// `‖C‖_F = ‖(W − W^E) P‖_F`.
    pub discrepancy_norm: f64,
    /// Per-column clamp factors `γ_j`.
    pub gamma: Vec<f64>,
    /// Share of the columns whose correction the clamp scaled down (`γ_j < 1`).
    #[serde(default = "not_recorded")]
    pub clamped_share: f64,
    /// Mean of the `γ_j` (1 when the clamp never engaged).
    #[serde(default = "not_recorded")]
    pub mean_gamma: f64,
    /// `‖C diag(γ)‖_F / ‖s B A‖_F`: the applied correction against the trained update itself
    /// (0 when nothing was corrected).
    #[serde(default = "not_recorded")]
    pub correction_ratio: f64,
}

/// NaN: the field of a report written before the field existed.
fn not_recorded() -> f64 {
    f64::NAN
}

impl LayerCorrection {
    fn new(path: &str, discrepancy_norm: f64, gamma: Vec<f64>, correction_ratio: f64) -> Self {
        let r = gamma.len().max(1) as f64;
        Self {
            path: path.to_string(),
            rank: gamma.len(),
            discrepancy_norm,
            clamped_share: gamma.iter().filter(|&&g| g < 1.0).count() as f64 / r,
            mean_gamma: if gamma.is_empty() { 1.0 } else { gamma.iter().sum::<f64>() / r },
            gamma,
            correction_ratio,
        }
    }
}

/// What [`correct`] did, layer by layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CorrectionReport {
    /// Corrected layers in path order.
    pub layers: Vec<LayerCorrection>,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl CorrectionReport {
    /// One line for logs: layers, the share of all columns the clamp scaled down, the mean
    /// `γ`, and the median and largest `‖correction‖ / ‖s B A‖` over the layers.
    pub fn summary(&self) -> String {
        let columns: usize = self.layers.iter().map(|l| l.gamma.len()).sum();
        let gammas = || self.layers.iter().flat_map(|l| l.gamma.iter().copied());
        let clamped = gammas().filter(|&g| g < 1.0).count();
        let mean_gamma = gammas().sum::<f64>() / columns.max(1) as f64;
        let mut ratios: Vec<f64> = self.layers.iter().map(|l| l.correction_ratio).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
        let max = ratios.last().copied().unwrap_or(f64::NAN);
        format!(
            "{} layers corrected; the clamp scaled down {clamped} of {columns} columns (mean γ \
             {mean_gamma:.3}); ‖correction‖ / ‖s·BA‖ median {median:.3}, max {max:.3}",
            self.layers.len()
        )
    }
}

/// The frozen weight the adapter was trained against, `W^E` or `W`.
pub enum TrainedBase<'a> {
    /// Emulator factors in Burn orientation: `w_v` `[d_in, k]`, `w_u` `[k, d_out]`.
    Factors {
        /// `W_vᵀ`.
        w_v: &'a Matrix,
        /// `W_uᵀ`.
        w_u: &'a Matrix,
    },
    /// A dense weight in Burn orientation `[d_in, d_out]` (a layer the emulator kept dense).
    Dense(&'a Matrix),
}

/// Corrects one adapter. `weight` is the original `Wᵀ` (`[d_in, d_out]`), `lora` the trained
/// adapter in PEFT layout, `scale` its `s`. Returns the corrected adapter (PEFT layout) and
/// the layer report.
pub fn correct_layer(
    path: &str,
    weight: &Matrix,
    trained_base: TrainedBase<'_>,
    lora: &PeftLayer,
    scale: f64,
    config: &CorrectionConfig,
) -> Result<(PeftLayer, LayerCorrection)> {
    correct_layer_with(path, weight, trained_base, lora, scale, config, None)
}

/// [`correct_layer`] weighted by the layer's calibration inputs: with their Gram matrix `G`
/// (`[d_in, d_in]`, e.g. from [`calibrate`](crate::calibrate)), the discrepancy is
/// `C = (W − W^E) G P (Pᵀ G P)⁻¹` instead of `(W − W^E) P`. Unclamped, the corrected layer then
/// minimises `Σ_x ‖(W + s B_c Pᵀ) x − (W^E + s B A) x‖²` over the calibration inputs among all
/// `B_c` (the paper's rule is the case `G = I`, exact on span(P) but blind to how the data
/// couples span(P) with the rest of the input space); the clamp applies as in the paper.
///
/// # Errors
/// As [`correct_layer`], and [`EmlocError::ShapeMismatch`] if `gram` is not `[d_in, d_in]`.
pub fn correct_layer_weighted(
    path: &str,
    weight: &Matrix,
    trained_base: TrainedBase<'_>,
    lora: &PeftLayer,
    scale: f64,
    gram: &Matrix,
    config: &CorrectionConfig,
) -> Result<(PeftLayer, LayerCorrection)> {
    correct_layer_with(path, weight, trained_base, lora, scale, config, Some(gram))
}

fn correct_layer_with(
    path: &str,
    weight: &Matrix,
    trained_base: TrainedBase<'_>,
    lora: &PeftLayer,
    scale: f64,
    config: &CorrectionConfig,
    gram: Option<&Matrix>,
) -> Result<(PeftLayer, LayerCorrection)> {
    let (d_in, d_out) = (weight.rows, weight.cols);
    let r = lora.lora_a.rows;
    crate::nn::check_lora_rank(path, r, d_in, d_out)?;
    let to_f64 = |m: &Matrix| Mat::<f64>::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64);
    let a = to_f64(&lora.lora_a); // [r, d_in]
    let b = to_f64(&lora.lora_b); // [d_out, r]

    let svd = a.transpose().thin_svd().map_err(|e| EmlocError::Linalg {
        layer: path.to_string(),
        message: format!("thin SVD of Aᵀ failed: {e:?}"),
    })?;
    let p = svd.U(); // [d_in, r]
    let sigma_a: Vec<f64> = (0..r).map(|i| svd.S().column_vector()[i]).collect();
    let mut b_prime = &b * svd.V(); // B R, then · Σ_A
    for (j, s) in sigma_a.iter().enumerate() {
        b_prime.col_mut(j).iter_mut().for_each(|v| *v *= s);
    }

    // The directions the discrepancy is measured along: P, or G P (Pᵀ G P)⁻¹ weighted by the
    // calibration inputs (a 10⁻⁹ relative ridge keeps Pᵀ G P invertible).
    let q = match gram {
        None => p.to_owned(),
        Some(g) => {
            if (g.rows, g.cols) != (d_in, d_in) {
                return Err(EmlocError::ShapeMismatch {
                    name: format!("{path} calibration Gram"),
                    expected: vec![d_in, d_in],
                    found: vec![g.rows, g.cols],
                });
            }
            let g = to_f64(g);
            let g_p = &g * p;
            let mut p_g_p = p.transpose() * &g_p;
            let ridge = 1e-9 * (0..r).map(|i| p_g_p[(i, i)]).sum::<f64>() / r as f64;
            (0..r).for_each(|i| p_g_p[(i, i)] += ridge.max(f64::MIN_POSITIVE));
            let inverse = faer::linalg::solvers::DenseSolveCore::inverse(&p_g_p.partial_piv_lu());
            g_p * inverse
        }
    };
    // C = W Q − W^E Q, each product formed without a dense W^E.
    let w = weight_to_faer(weight); // [d_out, d_in]
    let w_p = &w * &q;
    let we_p = match trained_base {
        TrainedBase::Dense(we) => weight_to_faer(we) * &q,
        TrainedBase::Factors { w_v, w_u } => {
            let w_v = weight_to_faer(w_v); // W_v [k, d_in]
            let w_u = weight_to_faer(w_u); // W_u [d_out, k]
            w_u * (w_v * &q)
        }
    };
    let c = w_p - we_p; // [d_out, r]

    let mut gamma = Vec::with_capacity(r);
    let mut b_c = b_prime.clone();
    let mut applied_sq = 0.0;
    for j in 0..r {
        let beta = b_prime.col(j).iter().map(|v| (scale * v).abs()).sum::<f64>() / d_out as f64;
        let kappa = c.col(j).iter().map(|v| v.abs()).sum::<f64>() / d_out as f64;
        let g = if kappa == 0.0 {
            1.0
        } else if beta == 0.0 {
            0.0
        } else {
            (config.clamp * beta / kappa).min(1.0)
        };
        gamma.push(g);
        for i in 0..d_out {
            b_c[(i, j)] -= c[(i, j)] * g / scale;
            applied_sq += (c[(i, j)] * g).powi(2);
        }
    }
    // ‖s B A‖_F = s ‖B'‖_F: A = Σ_A Rᵀ Pᵀ with orthonormal columns in P and R.
    let update_norm = scale.abs() * b_prime.norm_l2();
    let correction_ratio = if applied_sq == 0.0 { 0.0 } else { applied_sq.sqrt() / update_norm };
    let corrected = PeftLayer {
        lora_a: Matrix::new(
            r,
            d_in,
            (0..r * d_in).map(|x| p[(x % d_in, x / d_in)] as f32).collect(),
        ),
        lora_b: Matrix::new(d_out, r, (0..d_out * r).map(|x| b_c[(x / r, x % r)] as f32).collect()),
        kernel_size: lora.kernel_size,
    };
    let discrepancy_norm = c.norm_l2();
    Ok((corrected, LayerCorrection::new(path, discrepancy_norm, gamma, correction_ratio)))
}

/// An emulator layer's trained base: its factors `(w_v, w_u)`, or its dense weight.
type TrainedBaseOwned = (Option<(Matrix, Matrix)>, Option<Matrix>);

/// Corrects every adapter carried by `emulator` (trained on it) against `original`, returning
/// the corrected adapter in PEFT format, ready to [`merge_adapter`](crate::merge_adapter) into
/// (or [`attach_adapter`](crate::attach_adapter) to) the original model.
///
/// Both models must have the same layer paths and shapes; `original`'s adapted layers must be
/// dense. Checked before any work.
pub fn correct<M: Module>(
    original: &M,
    emulator: &M,
    config: &CorrectionConfig,
) -> Result<(PeftAdapter, CorrectionReport)> {
    correct_all(original, emulator, config, None)
}

/// [`correct`] with every layer's discrepancy weighted by its calibration inputs
/// ([`correct_layer_weighted`]); `grams` maps each adapted layer's path to its input Gram
/// matrix (as [`calibrate`](crate::calibrate) returns them for the original model).
///
/// # Errors
/// As [`correct`], and [`EmlocError::NoMatchingLayers`] if an adapted layer has no Gram.
pub fn correct_weighted<M: Module>(
    original: &M,
    emulator: &M,
    grams: &BTreeMap<String, Matrix>,
    config: &CorrectionConfig,
) -> Result<(PeftAdapter, CorrectionReport)> {
    correct_all(original, emulator, config, Some(grams))
}

fn correct_all<M: Module>(
    original: &M,
    emulator: &M,
    config: &CorrectionConfig,
    grams: Option<&BTreeMap<String, Matrix>>,
) -> Result<(PeftAdapter, CorrectionReport)> {
    if config.clamp.is_nan() || config.clamp <= 0.0 {
        return Err(EmlocError::InvalidConfig(format!(
            "correction clamp must be positive, got {}",
            config.clamp
        )));
    }
    let started = Instant::now();
    let trained = export_adapter(emulator)?;

    // Everything the correction needs from the emulator, per layer: the trained base and the
    // scale of the adapter actually attached (not re-derived from the exported config).
    let mut bases: BTreeMap<String, TrainedBaseOwned> = BTreeMap::new();
    let mut scales: BTreeMap<String, f64> = BTreeMap::new();
    for_each_linear(emulator, |path, linear| {
        if let Some(lora) = &linear.lora {
            let base = match &linear.factors {
                Some(f) => (
                    Some((Matrix::from_tensor(f.w_v.val()), Matrix::from_tensor(f.w_u.val()))),
                    None,
                ),
                None => (None, Some(Matrix::from_tensor(linear.base_weight()))),
            };
            bases.insert(path.to_string(), base);
            scales.insert(path.to_string(), lora.scale());
        }
    });

    let mut originals: BTreeMap<String, Matrix> = BTreeMap::new();
    let mut problem = None;
    for_each_linear(original, |path, linear| {
        let Some(lora) = trained.layers.get(path) else { return };
        if problem.is_some() {
            return;
        }
        let expected = vec![lora.lora_a.cols, lora.lora_b.rows];
        let found = vec![linear.d_input(), linear.d_output()];
        if linear.is_emulated() {
            problem = Some(EmlocError::InvalidConfig(format!(
                "layer `{path}` of the original model is an emulator layer"
            )));
        } else if found != expected {
            problem = Some(EmlocError::ShapeMismatch { name: path.to_string(), expected, found });
        } else {
            originals.insert(path.to_string(), Matrix::from_tensor(linear.base_weight()));
        }
    });
    if let Some(e) = problem {
        return Err(e);
    }
    if let Some(missing) = trained.layers.keys().find(|p| !originals.contains_key(*p)) {
        return Err(EmlocError::NoMatchingLayers(format!(
            "the adapted emulator layer `{missing}` in the original model"
        )));
    }

    let mut corrected = BTreeMap::new();
    let mut layers = Vec::new();
    for (path, lora) in &trained.layers {
        let weight = &originals[path];
        let (factors, dense) = &bases[path];
        let base = match (factors, dense) {
            (Some((w_v, w_u)), _) => TrainedBase::Factors { w_v, w_u },
            (None, Some(we)) => TrainedBase::Dense(we),
            (None, None) => unreachable!("every adapted layer has a base"),
        };
        let scale = scales[path];
        let gram = match grams {
            None => None,
            Some(grams) => Some(grams.get(path).ok_or_else(|| {
                EmlocError::NoMatchingLayers(format!("a calibration Gram for `{path}`"))
            })?),
        };
        let (layer, report) = correct_layer_with(path, weight, base, lora, scale, config, gram)?;
        corrected.insert(path.clone(), layer);
        layers.push(report);
    }
    Ok((
        PeftAdapter { config: trained.config, layers: corrected },
        CorrectionReport { layers, seconds: started.elapsed().as_secs_f64() },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::factorize::tests::noise;
    use crate::emulator::factorize::weight_to_faer;

    struct Case {
        weight: Matrix,
        w_v: Matrix,
        w_u: Matrix,
        lora: PeftLayer,
    }

    fn case(d_in: usize, d_out: usize, k: usize, r: usize, b_scale: f32) -> Case {
        Case {
            weight: Matrix::new(d_in, d_out, noise(1, d_in * d_out)),
            w_v: Matrix::new(d_in, k, noise(2, d_in * k)),
            w_u: Matrix::new(k, d_out, noise(3, k * d_out)),
            lora: PeftLayer::new(
                Matrix::new(r, d_in, noise(4, r * d_in)),
                Matrix::new(d_out, r, noise(5, d_out * r).iter().map(|v| v * b_scale).collect()),
            ),
        }
    }

    /// y = M x for PEFT-layout LoRA `W + s B A` (W given as Burn [d_in, d_out]).
    fn apply(w: &Mat<f64>, lora: &PeftLayer, s: f64, x: &Mat<f64>) -> Mat<f64> {
        let a = weight_to_faer(&lora.lora_a.transpose());
        let b = weight_to_faer(&lora.lora_b.transpose());
        w * x + (b * (a * x)) * s
    }

    fn rel(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
        (a - b).norm_l2() / b.norm_l2()
    }

    fn check_identity(s: f64) {
        let (d_in, d_out, k, r) = (20, 14, 5, 3);
        let c = case(d_in, d_out, k, r, 1.0);
        let cfg = CorrectionConfig { clamp: f64::INFINITY };
        let base = TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
        let (corrected, report) = correct_layer("l", &c.weight, base, &c.lora, s, &cfg).unwrap();
        assert!(report.gamma.iter().all(|&g| g == 1.0));
        assert!(report.discrepancy_norm > 0.0);

        let w = weight_to_faer(&c.weight);
        let w_e = weight_to_faer(&c.w_u) * weight_to_faer(&c.w_v);
        // x in span(P) = row space of A: x = Aᵀ z.
        let a_t = weight_to_faer(&c.lora.lora_a.transpose()).transpose().to_owned();
        let z = Mat::from_fn(r, 4, |i, j| noise(6, r * 4)[i * 4 + j] as f64);
        let x_in = &a_t * &z;
        let lhs = apply(&w, &corrected, s, &x_in);
        let rhs = apply(&w_e, &c.lora, s, &x_in);
        assert!(rel(&lhs, &rhs) < 1e-5, "span(P): {}", rel(&lhs, &rhs));

        // x ⊥ span(P): the original layer is untouched.
        let x = Mat::from_fn(d_in, 4, |i, j| noise(7, d_in * 4)[i * 4 + j] as f64);
        let svd = a_t.thin_svd().unwrap();
        let p = svd.U();
        let x_perp = &x - p * (p.transpose() * &x);
        let lhs = apply(&w, &corrected, s, &x_perp);
        assert!(rel(&lhs, &(&w * &x_perp)) < 1e-5);
    }

    #[test]
    fn correction_is_exact_on_span_p_with_scale_two() {
        check_identity(lora_scale_for_test(16.0, 8, false));
    }

    #[test]
    fn correction_is_exact_on_span_p_with_rslora() {
        check_identity(lora_scale_for_test(4.0, 3, true));
    }

    fn lora_scale_for_test(alpha: f64, r: usize, rs: bool) -> f64 {
        let s = crate::nn::lora_scale(alpha, r, rs);
        assert_ne!(s, 1.0);
        s
    }

    #[test]
    fn clamp_limits_a_correction_much_larger_than_the_adapter() {
        // B tiny (1e-3), emulator far from W: every column's κ ≫ β, so γ_j = L β_j / κ_j < 1.
        let c = case(16, 12, 2, 2, 1e-3);
        let s = 0.5;
        let clamp = 3.0;
        let base = TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
        let (corrected, report) =
            correct_layer("l", &c.weight, base, &c.lora, s, &CorrectionConfig { clamp }).unwrap();
        let (unclamped, _) = correct_layer(
            "l",
            &c.weight,
            TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u },
            &c.lora,
            s,
            &CorrectionConfig { clamp: f64::INFINITY },
        )
        .unwrap();
        assert!(report.gamma.iter().all(|&g| g > 0.0 && g < 1.0), "{:?}", report.gamma);
        // Recompute γ independently from the definitions: B' = B R Σ_A, C = (W − W^E) P.
        let a_t = weight_to_faer(&c.lora.lora_a.transpose()).transpose().to_owned();
        let svd = a_t.thin_svd().unwrap();
        let b = weight_to_faer(&c.lora.lora_b.transpose()); // [d_out, r]
        let mut b_prime = &b * svd.V();
        for j in 0..2 {
            let sj = svd.S().column_vector()[j];
            b_prime.col_mut(j).iter_mut().for_each(|v| *v *= sj);
        }
        let w_diff = weight_to_faer(&c.weight) - weight_to_faer(&c.w_u) * weight_to_faer(&c.w_v);
        let cm = w_diff * svd.U();
        for j in 0..2 {
            let beta = b_prime.col(j).iter().map(|v| (s * v).abs()).sum::<f64>() / 12.0;
            let kappa = cm.col(j).iter().map(|v| v.abs()).sum::<f64>() / 12.0;
            assert!((report.gamma[j] - clamp * beta / kappa).abs() < 1e-9);
            // The clamped correction moved B' by exactly γ_j times the unclamped move.
            for i in 0..12 {
                let moved = corrected.lora_b.get(i, j) as f64 - b_prime[(i, j)];
                let full = unclamped.lora_b.get(i, j) as f64 - b_prime[(i, j)];
                assert!((moved - report.gamma[j] * full).abs() < 1e-4 * full.abs().max(1e-3));
            }
        }
    }

    #[test]
    fn zero_adapter_columns_get_no_correction_and_equal_bases_none() {
        let mut c = case(10, 8, 3, 2, 0.0);
        let s = 2.0;
        let base = TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
        let (corrected, report) =
            correct_layer("l", &c.weight, base, &c.lora, s, &Default::default()).unwrap();
        assert!(report.gamma.iter().all(|&g| g == 0.0));
        assert!(corrected.lora_b.data.iter().all(|&v| v == 0.0));
        // Trained on the dense original itself: C = 0, γ = 1, the adapter's product is kept.
        c.lora.lora_b = Matrix::new(8, 2, noise(9, 16));
        let (corrected, report) = correct_layer(
            "l",
            &c.weight,
            TrainedBase::Dense(&c.weight),
            &c.lora,
            s,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(report.discrepancy_norm, 0.0);
        let x = Mat::from_fn(10, 3, |i, j| noise(10, 30)[i * 3 + j] as f64);
        let w = weight_to_faer(&c.weight);
        assert!(rel(&apply(&w, &corrected, s, &x), &apply(&w, &c.lora, s, &x)) < 1e-5);
    }

    #[test]
    fn diagnostics_measure_the_applied_correction_against_the_trained_update() {
        // Dense check: ‖s (B_c A_c − B A)‖_F is the applied correction, ‖s B A‖_F the update.
        let dense = |l: &PeftLayer| {
            weight_to_faer(&l.lora_b.transpose()) * weight_to_faer(&l.lora_a.transpose())
        };
        let s = 0.5;
        for (b_scale, clamp) in [(1.0, f64::INFINITY), (1e-3, 3.0)] {
            let c = case(16, 12, 2, 3, b_scale);
            let base = TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
            let (corrected, report) =
                correct_layer("l", &c.weight, base, &c.lora, s, &CorrectionConfig { clamp })
                    .unwrap();
            let update = dense(&c.lora) * s;
            let applied = dense(&corrected) * s - &update;
            let expected = applied.norm_l2() / update.norm_l2();
            assert!(
                (report.correction_ratio - expected).abs() < 1e-4 * expected,
                "{} vs {expected}",
                report.correction_ratio
            );
            let clamped = report.gamma.iter().filter(|&&g| g < 1.0).count() as f64 / 3.0;
            assert_eq!(report.clamped_share, clamped);
            assert_eq!(report.mean_gamma, report.gamma.iter().sum::<f64>() / 3.0);
        }
        // Unclamped: no column scaled down; a tiny adapter against a far emulator: all of them.
        let c = case(16, 12, 2, 3, 1e-3);
        let base = TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
        let (_, clamped) =
            correct_layer("l", &c.weight, base, &c.lora, s, &CorrectionConfig { clamp: 3.0 })
                .unwrap();
        assert_eq!(clamped.clamped_share, 1.0);
        assert!(clamped.mean_gamma < 1.0);
        let base = TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
        let inf = CorrectionConfig { clamp: f64::INFINITY };
        let (_, free) = correct_layer("l", &c.weight, base, &c.lora, s, &inf).unwrap();
        assert_eq!((free.clamped_share, free.mean_gamma), (0.0, 1.0));
        // A layer trained on the original itself needs no correction.
        let dense_base = TrainedBase::Dense(&c.weight);
        let (_, none) = correct_layer("l", &c.weight, dense_base, &c.lora, s, &inf).unwrap();
        assert_eq!(none.correction_ratio, 0.0);
    }

    #[test]
    fn weighted_correction_solves_the_data_weighted_least_squares_and_is_the_paper_rule_at_g_i() {
        let (d_in, d_out, k, r, s) = (12, 9, 3, 2, 0.5);
        let c = case(d_in, d_out, k, r, 1.0);
        let base = || TrainedBase::Factors { w_v: &c.w_v, w_u: &c.w_u };
        let inf = CorrectionConfig { clamp: f64::INFINITY };
        // G = I: the paper's rule exactly.
        let identity = Matrix::new(
            d_in,
            d_in,
            (0..d_in * d_in).map(|i| f32::from(i % (d_in + 1) == 0)).collect(),
        );
        let (paper, _) = correct_layer("l", &c.weight, base(), &c.lora, s, &inf).unwrap();
        let (at_i, _) =
            correct_layer_weighted("l", &c.weight, base(), &c.lora, s, &identity, &inf).unwrap();
        for (a, b) in at_i.lora_b.data.iter().zip(&paper.lora_b.data) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Correlated inputs X [40, d_in]: G = XᵀX. The normal equations of
        // min_Bc Σ_x ‖(W + s Bc Pᵀ − W^E − s B A) x‖² are R G P = 0 for the residual map R.
        let x = Mat::from_fn(40, d_in, |t, i| {
            let v = noise(20, 40 * d_in)[t * d_in + i] as f64;
            v + 0.8 * noise(21, 40)[t] as f64 // a shared component couples the features
        });
        let g64 = x.transpose() * &x;
        let gram = Matrix::new(
            d_in,
            d_in,
            (0..d_in * d_in).map(|i| g64[(i / d_in, i % d_in)] as f32).collect(),
        );
        let (weighted, report) =
            correct_layer_weighted("l", &c.weight, base(), &c.lora, s, &gram, &inf).unwrap();
        let dense = |l: &PeftLayer| {
            weight_to_faer(&l.lora_b.transpose()) * weight_to_faer(&l.lora_a.transpose())
        };
        let w = weight_to_faer(&c.weight);
        let w_e = weight_to_faer(&c.w_u) * weight_to_faer(&c.w_v);
        let residual = |l: &PeftLayer| &w + dense(l) * s - (&w_e + dense(&c.lora) * s);
        let p = weight_to_faer(&weighted.lora_a.transpose()); // Pᵀ is the corrected A
        let normal = residual(&weighted) * &g64 * p.transpose();
        let size = (residual(&weighted) * &g64).norm_l2() * p.norm_l2();
        assert!(normal.norm_l2() < 1e-5 * size, "{} vs {size}", normal.norm_l2());
        // It fits the calibration data better than the paper's rule (which ignores G).
        let loss = |l: &PeftLayer| (residual(l) * x.transpose()).norm_l2();
        assert!(loss(&weighted) < loss(&paper), "{} vs {}", loss(&weighted), loss(&paper));
        assert!(report.correction_ratio > 0.0);
        let wrong = Matrix::new(3, 3, vec![0.0; 9]);
        assert!(correct_layer_weighted("l", &c.weight, base(), &c.lora, s, &wrong, &inf).is_err());
    }
}
