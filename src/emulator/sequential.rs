//! Sequential calibration ([`super::SequentialConfig`]): the emulator built one block at a time,
//! each block calibrated on the inputs the already-emulated blocks before it produce, with an
//! optional closed-form refit of each layer's output factor against the original's outputs.
//!
//! With `X` a layer's inputs in the original, `X'` its inputs in the emulator built so far and
//! `W` (Burn layout `[d_in, d_out]`) its weight, the layer is factored by the whitened SVD on
//! `G' = X'ᵀX'` (so `W_v` spans what matters for the inputs it will see), and the refit then
//! solves `min_U ‖X W − X' V U‖_F` for `U = W_uᵀ` with `V = W_vᵀ` fixed:
//! `U = (Vᵀ G' V)⁻¹ Vᵀ C W` with `C = X'ᵀX`. `G'`, `C` and `G = XᵀX` are accumulated in f32
//! from both models' inputs of the same forward calls; the solve is f64 on the host.

use std::collections::HashMap;
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::tensor::Tensor;
use faer::Mat;

use super::factorize::{FactorizedLayer, factorize_layer};
use super::{
    EmulatorConfig, FactorizationProgress, LayerReport, PlannedLayer, RefitReport, install_factors,
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
    let refit = config.sequential.is_some_and(|s| s.refit);
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

/// `matrix` read back to the host, checked finite.
fn finite_matrix(layer: &str, tensor: Tensor<2>, what: &str) -> Result<Matrix> {
    let matrix = Matrix::from_tensor(tensor);
    if !matrix.is_finite() {
        return Err(EmlocError::NonFinite {
            layer: layer.to_string(),
            what: format!("{what} (its calibration inputs contain NaN or Inf)"),
        });
    }
    Ok(matrix)
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
        let weight = Matrix::from_tensor(linear.weight.val());
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

/// One layer's whitened SVD on its emulated inputs, refitted when the statistics allow it.
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
    let mut f = factorize_layer(path, weight, &gram, layer.rank, &config.whitening)?;
    let mut report = layer.report(stat.tokens, &f);
    if let (Some(cross), Some(original_gram)) = (stat.cross, stat.original_gram) {
        let cross = finite_matrix(path, cross, "cross-Gram matrix")?;
        let original_gram = finite_matrix(path, original_gram, "original Gram matrix")?;
        let (w_u, refit) =
            refit_output_factor(weight, &f.w_v, &f.w_u, &gram, &cross, &original_gram);
        f.w_u = w_u;
        report.refit = Some(refit);
    }
    Ok((f, report))
}

fn to_f64(m: &Matrix) -> Mat<f64> {
    Mat::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64)
}

/// The least-squares output factor `U = (Vᵀ G' V)⁻¹ Vᵀ C W` (`[k, d_out]`, Burn orientation)
/// for input factor `v` (`[d_in, k]`), and the relative output errors of `u_svd` (the whitened
/// SVD's) and of `U`. A 10⁻¹² relative ridge keeps `Vᵀ G' V` invertible when `X' V` is rank
/// deficient.
pub(crate) fn refit_output_factor(
    weight: &Matrix,
    v: &Matrix,
    u_svd: &Matrix,
    emulated_gram: &Matrix,
    cross: &Matrix,
    original_gram: &Matrix,
) -> (Matrix, RefitReport) {
    let (w, v, g_e, c, g_o) =
        (to_f64(weight), to_f64(v), to_f64(emulated_gram), to_f64(cross), to_f64(original_gram));
    let k = v.ncols();
    let a = v.transpose() * (&g_e * &v); // [k, k]
    let r = v.transpose() * (&c * &w); // [k, d_out]
    let mut damped = a.clone();
    let ridge = 1e-12 * (0..k).map(|i| a[(i, i)]).sum::<f64>() / k.max(1) as f64;
    (0..k).for_each(|i| damped[(i, i)] += ridge.max(f64::MIN_POSITIVE));
    let inverse = faer::linalg::solvers::DenseSolveCore::inverse(&damped.partial_piv_lu());
    let u = &inverse * &r;
    // ‖X W − X' V U‖² = tr(Wᵀ G W) − 2⟨U, R⟩ + ⟨U, A U⟩ (Frobenius products).
    let inner = |x: &Mat<f64>, y: &Mat<f64>| {
        (0..x.nrows())
            .flat_map(|i| (0..x.ncols()).map(move |j| (i, j)))
            .map(|(i, j)| x[(i, j)] * y[(i, j)])
            .sum::<f64>()
    };
    let target = inner(&w, &(&g_o * &w)).max(0.0);
    let error = |u: &Mat<f64>| {
        let squared = target - 2.0 * inner(u, &r) + inner(u, &(&a * u));
        if target > 0.0 { (squared.max(0.0) / target).sqrt() } else { 0.0 }
    };
    let report = RefitReport {
        relative_output_error_before: error(&to_f64(u_svd)),
        relative_output_error: error(&u),
    };
    let (rows, cols) = (u.nrows(), u.ncols());
    let data = (0..rows * cols).map(|idx| u[(idx / cols, idx % cols)] as f32).collect();
    (Matrix::new(rows, cols, data), report)
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
