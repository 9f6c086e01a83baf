//! Sequential calibration ([`super::SequentialConfig`]): the emulator built one block at a time,
//! each block calibrated on the inputs the already-emulated blocks before it produce, with an
//! optional closed-form refit ([`Refit`]) against the original's outputs.
//!
//! With `X` a layer's inputs in the original, `X'` its inputs in the emulator built so far and
//! `W` (Burn layout `[d_in, d_out]`) its weight, the layer is factored by the whitened SVD on
//! `G' = X'ᵀX'`. [`Refit::Output`] then solves `min_U ‖X W − X' V U‖_F` for `U = W_uᵀ` with
//! `V = W_vᵀ` fixed: `U = (Vᵀ G' V)⁻¹ Vᵀ C W` with `C = X'ᵀX`; [`Refit::Both`] factors the
//! unconstrained solution `G'⁻¹ C W` instead of `W`. `G'`, `C` and `G = XᵀX` are accumulated in
//! f32 from both models' inputs of the same forward calls; the solves are f64 on the host.

use std::collections::HashMap;
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::tensor::Tensor;
use faer::Mat;

use super::factorize::{FactorizedLayer, factorize_layer};
use super::{
    EmulatorConfig, FactorizationProgress, LayerReport, PlannedLayer, Refit, RefitReport,
    finite_matrix, install_factors,
};
use crate::calibration::CalibrationSession;
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::nn::hooks::map_linears;

/// The block a layer belongs to: its path up to and including the first numeric segment
/// (`encoder.layer.3` for `encoder.layer.3.attention.self.query`); a path without one is a
/// block of its own.
pub(crate) fn block_of(path: &str) -> &str {
    let mut end = 0;
    for segment in path.split('.') {
        end += segment.len();
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            return &path[..end];
        }
        end += 1;
    }
    path
}

/// What [`emulate_sequential`] built.
pub(super) struct Built<M> {
    pub model: M,
    pub layers: Vec<LayerReport>,
    /// Seconds spent in forward passes.
    pub calibration_seconds: f64,
}

/// One layer's statistics over the calibration batches.
struct Statistics {
    /// `X'ᵀX'`.
    emulated_gram: Option<Tensor<2>>,
    /// Refit only: `X'ᵀX` and `XᵀX`.
    cross: Option<Tensor<2>>,
    original_gram: Option<Tensor<2>>,
    tokens: u64,
}

/// Builds the emulator of `model` block by block over `plan` (see the module docs).
pub(super) fn emulate_sequential<M, B, F, P>(
    model: M,
    plan: &[PlannedLayer],
    batches: &[B],
    forward: &mut F,
    config: &EmulatorConfig,
    on_layer: &mut P,
) -> Result<Built<M>>
where
    M: Module,
    B: Clone,
    F: FnMut(&M, B),
    P: FnMut(FactorizationProgress<'_>),
{
    let refit = config.sequential.is_some_and(|s| s.refit != Refit::None);
    // Shares every tensor with `model`; the emulator's factored layers stop sharing theirs.
    let original = refit.then(|| model.clone());
    let mut current = model;
    let mut layers = Vec::with_capacity(plan.len());
    let mut calibration_seconds = 0.0;
    let mut start = 0;
    while start < plan.len() {
        let block = block_of(&plan[start].path);
        let end = start + plan[start..].iter().take_while(|l| block_of(&l.path) == block).count();
        let started = Instant::now();
        let stats =
            block_statistics(&current, original.as_ref(), &plan[start..end], batches, forward)?;
        calibration_seconds += started.elapsed().as_secs_f64();
        current = factor_block(
            current,
            &plan[start..end],
            stats,
            config,
            plan.len(),
            &mut layers,
            on_layer,
        )?;
        start = end;
    }
    Ok(Built { model: current, layers, calibration_seconds })
}

/// The inputs of the layers `ids` during `forward(model, batch)`, per layer in call order.
fn captured_inputs<M, B, F: FnMut(&M, B)>(
    model: &M,
    ids: &[ParamId],
    batch: B,
    forward: &mut F,
) -> Vec<Vec<Tensor<2>>> {
    let session = CalibrationSession::capture(ids.to_vec());
    forward(model, batch);
    session.finish().into_iter().map(|acc| acc.captured.unwrap_or_default()).collect()
}

/// Every layer of `block`'s statistics in `current` (and, for the refit, in `original`).
fn block_statistics<M, B, F>(
    current: &M,
    original: Option<&M>,
    block: &[PlannedLayer],
    batches: &[B],
    forward: &mut F,
) -> Result<Vec<Statistics>>
where
    B: Clone,
    F: FnMut(&M, B),
{
    let ids: Vec<ParamId> = block.iter().map(|l| l.weight_id).collect();
    let mut stats: Vec<Statistics> = block
        .iter()
        .map(|_| Statistics { emulated_gram: None, cross: None, original_gram: None, tokens: 0 })
        .collect();
    for batch in batches {
        let emulated = captured_inputs(current, &ids, batch.clone(), forward);
        let originals = original.map(|m| captured_inputs(m, &ids, batch.clone(), forward));
        for (l, (stat, inputs)) in stats.iter_mut().zip(emulated).enumerate() {
            let paired = originals.as_ref().map(|o| &o[l]);
            if let Some(paired) = paired {
                let same = paired.len() == inputs.len()
                    && paired.iter().zip(&inputs).all(|(a, b)| a.dims() == b.dims());
                if !same {
                    return Err(EmlocError::InvalidConfig(format!(
                        "layer `{}`: the original and the emulator saw differently shaped inputs \
                         in one calibration batch ({} vs {} calls); the refit needs a \
                         deterministic forward pass",
                        block[l].path,
                        paired.len(),
                        inputs.len()
                    )));
                }
            }
            for (call, x_emulated) in inputs.into_iter().enumerate() {
                stat.tokens += x_emulated.dims()[0] as u64;
                if let Some(paired) = paired {
                    let x = paired[call].clone();
                    let cross = x_emulated.clone().transpose().matmul(x.clone());
                    stat.cross = Some(match stat.cross.take() {
                        Some(sum) => sum + cross,
                        None => cross,
                    });
                    stat.original_gram =
                        Some(crate::ops::gram_accumulate(stat.original_gram.take(), x));
                }
                stat.emulated_gram =
                    Some(crate::ops::gram_accumulate(stat.emulated_gram.take(), x_emulated));
            }
        }
    }
    Ok(stats)
}

/// Factors (and refits) every layer of `block` in `model` from `stats`.
fn factor_block<M: Module, P: FnMut(FactorizationProgress<'_>)>(
    model: M,
    block: &[PlannedLayer],
    stats: Vec<Statistics>,
    config: &EmulatorConfig,
    total: usize,
    layers: &mut Vec<LayerReport>,
    on_layer: &mut P,
) -> Result<M> {
    let mut pending: HashMap<ParamId, (&PlannedLayer, Statistics)> =
        block.iter().zip(stats).map(|(l, s)| (l.weight_id, (l, s))).collect();
    let mut failure = None;
    let model = map_linears(model, |_, mut linear| {
        let Some((layer, stat)) = pending.remove(&linear.weight.id) else { return linear };
        if failure.is_some() {
            return linear;
        }
        let weight = Matrix::from_tensor(linear.base_weight());
        match factor_layer(layer, &weight, stat, config) {
            Ok((f, report)) => {
                layers.push(report);
                on_layer(FactorizationProgress { done: layers.len(), total, path: &layer.path });
                install_factors(&mut linear, &f.w_v, &f.w_u);
            }
            Err(e) => failure = Some(e),
        }
        linear
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// One layer's whitened SVD on its emulated inputs, refitted as `config` asks.
fn factor_layer(
    layer: &PlannedLayer,
    weight: &Matrix,
    stat: Statistics,
    config: &EmulatorConfig,
) -> Result<(FactorizedLayer, LayerReport)> {
    let path = &layer.path;
    let Some(gram) = stat.emulated_gram.filter(|_| stat.tokens > 0) else {
        return Err(EmlocError::NoCalibrationTokens { layer: path.clone() });
    };
    let gram = finite_matrix(path, gram, "Gram matrix")?;
    let plain = factorize_layer(path, weight, &gram, layer.rank, &config.whitening)?;
    let (Some(cross), Some(original_gram)) = (stat.cross, stat.original_gram) else {
        let report = layer.report(stat.tokens, &plain);
        return Ok((plain, report));
    };
    let fit = LeastSquares::new(
        weight,
        &gram,
        &finite_matrix(path, cross, "cross-Gram matrix")?,
        &finite_matrix(path, original_gram, "original Gram matrix")?,
    );
    let before = fit.relative_error(&plain.w_v, &plain.w_u);
    let refit = config.sequential.map_or(Refit::None, |s| s.refit);
    let fitted = match refit {
        Refit::None => plain,
        Refit::Output => FactorizedLayer { w_u: fit.output_factor(&plain.w_v), ..plain },
        Refit::Both => {
            factorize_layer(path, &fit.full_map(), &gram, layer.rank, &config.whitening)?
        }
    };
    let mut report = layer.report(stat.tokens, &fitted);
    report.refit = Some(RefitReport {
        relative_output_error_before: before,
        relative_output_error: fit.relative_error(&fitted.w_v, &fitted.w_u),
    });
    Ok((fitted, report))
}

fn to_f64(m: &Matrix) -> Mat<f64> {
    Mat::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64)
}

fn to_matrix(m: &Mat<f64>) -> Matrix {
    let (rows, cols) = (m.nrows(), m.ncols());
    Matrix::new(
        rows,
        cols,
        (0..rows * cols).map(|idx| m[(idx / cols, idx % cols)] as f32).collect(),
    )
}

/// Frobenius inner product.
fn inner(x: &Mat<f64>, y: &Mat<f64>) -> f64 {
    (0..x.nrows()).flat_map(|i| (0..x.ncols()).map(move |j| x[(i, j)] * y[(i, j)])).sum()
}

/// `a⁻¹ b` with a relative ridge `relative · mean(diag a)` on `a`'s diagonal (so that a singular
/// `a`, from rank-deficient inputs, still gives the minimum-norm-like solution).
fn ridge_solve(a: &Mat<f64>, b: &Mat<f64>, relative: f64) -> Mat<f64> {
    let n = a.nrows();
    let mut damped = a.clone();
    let ridge = relative * (0..n).map(|i| a[(i, i)]).sum::<f64>() / n.max(1) as f64;
    (0..n).for_each(|i| damped[(i, i)] += ridge.max(f64::MIN_POSITIVE));
    faer::linalg::solvers::DenseSolveCore::inverse(&damped.partial_piv_lu()) * b
}

/// The least-squares problem `min ‖X W − X' M‖_F` of one layer (Burn orientation: `W`, `M` are
/// `[d_in, d_out]`), from `G' = X'ᵀX'`, `C = X'ᵀX` and `G = XᵀX`, in f64.
struct LeastSquares {
    emulated_gram: Mat<f64>,
    /// `C W = X'ᵀ X W`, `[d_in, d_out]`.
    cross_target: Mat<f64>,
    /// `‖X W‖_F²`.
    target_norm: f64,
}

impl LeastSquares {
    fn new(
        weight: &Matrix,
        emulated_gram: &Matrix,
        cross: &Matrix,
        original_gram: &Matrix,
    ) -> Self {
        let w = to_f64(weight);
        let cross_target = to_f64(cross) * &w;
        let target_norm = inner(&w, &(to_f64(original_gram) * &w)).max(0.0);
        Self { emulated_gram: to_f64(emulated_gram), cross_target, target_norm }
    }

    /// `U = (Vᵀ G' V)⁻¹ Vᵀ C W` (`[k, d_out]`) for `v = V` (`[d_in, k]`); a 10⁻¹² relative
    /// ridge keeps the `k × k` system invertible when `X' V` is rank-deficient.
    fn output_factor(&self, v: &Matrix) -> Matrix {
        let v = to_f64(v);
        let a = v.transpose() * (&self.emulated_gram * &v);
        to_matrix(&ridge_solve(&a, &(v.transpose() * &self.cross_target), 1e-12))
    }

    /// The unconstrained fit `M̂ = G'⁻¹ C W` (10⁻⁶ relative ridge, the whitening's first
    /// damping, where `G'` is singular): the weight whose whitened SVD on `G'` is the best rank-k
    /// fit, since `‖X W − X' M‖² = ‖X W − X' M̂‖² + ‖X' (M̂ − M)‖²`.
    fn full_map(&self) -> Matrix {
        to_matrix(&ridge_solve(&self.emulated_gram, &self.cross_target, 1e-6))
    }

    /// `‖X W − X' V U‖_F / ‖X W‖_F` = √(‖X W‖² − 2⟨V U, C W⟩ + ⟨V U, G' V U⟩) / ‖X W‖.
    fn relative_error(&self, v: &Matrix, u: &Matrix) -> f64 {
        let m = to_f64(v) * to_f64(u);
        let squared = self.target_norm - 2.0 * inner(&m, &self.cross_target)
            + inner(&m, &(&self.emulated_gram * &m));
        if self.target_norm > 0.0 { (squared.max(0.0) / self.target_norm).sqrt() } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_paths_up_to_the_first_number() {
        assert_eq!(block_of("encoder.layer.3.attention.self.query"), "encoder.layer.3");
        assert_eq!(block_of("model.layers.12.mlp.down_proj"), "model.layers.12");
        assert_eq!(block_of("lm_head"), "lm_head");
        assert_eq!(block_of("l2"), "l2");
        assert_eq!(block_of("a.b2.c"), "a.b2.c");
        assert_eq!(block_of("0.fc"), "0");
    }
}
