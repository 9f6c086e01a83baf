//! Stage 1: build the emulator from the original model and a few downstream samples.

mod allocation;
mod config;
pub(crate) mod factorize;
mod sequential;
mod store;

pub use allocation::{
    LayerSpectrum, Objective, allocation_cost, config_for_ranks, emulated_params, global_ranks,
    largest_ratio, uniform_ranks, whitened_spectra, with_dense_layers,
};
pub use config::{
    EmulatorConfig, Keep, LayerRule, Refit, SequentialConfig, SvdMethod, WhiteningConfig,
    WhiteningMethod,
};
pub use factorize::{FactorizedLayer, Whitening, cholesky_damped, factorize_layer, whitening};
pub use store::{
    DESCRIPTION_FILE, EmulatorDescription, FACTORS_FILE, FORMAT_VERSION, LayerFactors, Provenance,
    load_emulator, parse_emulator, read_emulator, read_emulator_description, save_emulator,
};

use std::collections::HashMap;
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::calibration::CalibrationSession;
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::nn::LowRankFactors;
use crate::nn::hooks::{all_layer_paths, all_linear_paths, for_each_linear, map_linears};

/// What emulation did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Module path.
    pub path: String,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Kept rank `k`.
    pub rank: usize,
    /// `d_in · d_out`.
    pub params_original: usize,
    /// `k (d_in + d_out)`.
    pub params_kept: usize,
    /// Calibration tokens the layer saw.
    pub tokens: u64,
    /// `‖(W − W^E) S‖_F`, the error on the calibration outputs.
    pub whitened_error: f64,
    /// `whitened_error / ‖W S‖_F`.
    pub relative_whitened_error: f64,
    /// Whitening actually used (`cholesky`, `eigen` after a fallback, or `none`).
    pub whitening: WhiteningMethod,
    /// Damping added to the Gram diagonal, relative to `mean(diag G)` (eigen path: largest
    /// eigenvalue raise).
    pub relative_damping: f64,
    /// What the closed-form refit of sequential calibration did (`None` without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refit: Option<RefitReport>,
}

/// The output error of one layer refitted by sequential calibration
/// ([`SequentialConfig::refit`]): `‖X Wᵀ − X' Wᴱᵀ‖_F / ‖X Wᵀ‖_F` on the calibration data, with
/// `X` the original's inputs to the layer and `X'` the emulator's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefitReport {
    /// With the whitened SVD of `W` on `X'` (no refit).
    pub relative_output_error_before: f64,
    /// With the refitted factors.
    pub relative_output_error: f64,
}

/// What [`emulate`] did, layer by layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmulatorReport {
    /// Emulated layers in traversal order.
    pub layers: Vec<LayerReport>,
    /// Linear layers (and `emloc::nn::Conv2d` layers) left dense (no rule, a `Full` rule, a
    /// grouped convolution, which emloc cannot factor, or a stock layer).
    pub dense_layers: Vec<String>,
    /// Of the dense layers, those that are stock `burn::nn::Linear`, which emloc cannot emulate
    /// or train (use `emloc::nn::Linear` or emloc's drop-ins for Burn's composite modules);
    /// adapters can still be served on them or merged into them. Empty in reports written
    /// before this field existed.
    #[serde(default)]
    pub stock_layers: Vec<String>,
    /// Calibration batches run.
    pub calibration_batches: usize,
    /// Wall time of the calibration forward passes, seconds.
    pub calibration_seconds: f64,
    /// Wall time of whitening + SVD + factoring, seconds.
    pub construction_seconds: f64,
}

impl EmulatorReport {
    /// Parameters of the emulated layers before emulation.
    pub fn params_original(&self) -> usize {
        self.layers.iter().map(|l| l.params_original).sum()
    }

    /// Parameters of the emulated layers after emulation.
    pub fn params_kept(&self) -> usize {
        self.layers.iter().map(|l| l.params_kept).sum()
    }

    /// The emulated layers whose calibration saw fewer tokens than they have input features:
    /// their Gram matrix `XᵀX` has rank at most `tokens < d_in`, so whitening measures only
    /// part of the input space and the damping decides the rest.
    pub fn rank_deficient_layers(&self) -> impl Iterator<Item = &LayerReport> {
        self.layers.iter().filter(|l| l.tokens < l.d_in as u64)
    }

    /// A one-line warning naming the rank-deficient layers (see
    /// [`rank_deficient_layers`](Self::rank_deficient_layers)), or `None` when there are none.
    pub fn calibration_warning(&self) -> Option<String> {
        let layers: Vec<&LayerReport> = self.rank_deficient_layers().collect();
        let first = layers.first()?;
        let fewest = layers.iter().map(|l| l.tokens).min().unwrap_or(0);
        Some(format!(
            "{} of {} layers saw fewer calibration tokens than input features (e.g. `{}`: {} \
             tokens, d_in {}; fewest {fewest}): their Gram matrices are rank-deficient; \
             calibrate on more tokens",
            layers.len(),
            self.layers.len(),
            first.path,
            first.tokens,
            first.d_in
        ))
    }
}

/// Calibration statistics of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStatistics {
    /// Module path.
    pub path: String,
    /// Input Gram matrix `XᵀX`, `[d_in, d_in]`, accumulated in f32.
    pub gram: Matrix,
    /// Tokens (rows of X) seen.
    pub tokens: u64,
}

/// Runs `forward(model, batch)` over `batches` and returns the input Gram matrix of every
/// `emloc::nn::Linear` whose module path satisfies `select`, in traversal order.
///
/// Errors: no selected layer, no batch, a selected layer that saw no token, or a non-finite Gram.
pub fn calibrate<M, I, F>(
    model: &M,
    batches: I,
    mut forward: F,
    select: impl Fn(&str) -> bool,
) -> Result<Vec<LayerStatistics>>
where
    M: Module,
    I: IntoIterator,
    F: FnMut(&M, I::Item),
{
    let mut layers = Vec::new();
    for_each_linear(model, |path, linear| {
        if select(path) {
            layers.push((path.to_string(), linear.weight.id));
        }
    });
    if layers.is_empty() {
        return Err(EmlocError::NoMatchingLayers("the calibration selection".into()));
    }
    run_calibration(model, layers, batches, &mut forward).map(|(stats, _, _)| stats)
}

/// Accumulates the Grams of `layers` (path, weight id) over `batches`; returns them with the
/// number of batches and the wall time.
fn run_calibration<M, I, F>(
    model: &M,
    layers: Vec<(String, ParamId)>,
    batches: I,
    forward: &mut F,
) -> Result<(Vec<LayerStatistics>, usize, f64)>
where
    M: Module,
    I: IntoIterator,
    F: FnMut(&M, I::Item),
{
    let started = Instant::now();
    let session = CalibrationSession::start(layers.iter().map(|(_, id)| *id).collect());
    let mut batch_count = 0;
    for batch in batches {
        forward(model, batch);
        batch_count += 1;
    }
    let accumulators = session.finish();
    if batch_count == 0 {
        return Err(EmlocError::EmptyCalibration("no calibration batch was given".into()));
    }
    let mut stats = Vec::with_capacity(layers.len());
    for ((path, _), acc) in layers.into_iter().zip(accumulators) {
        let Some(gram) = acc.gram.filter(|_| acc.tokens > 0) else {
            return Err(EmlocError::NoCalibrationTokens { layer: path });
        };
        let gram = finite_matrix(&path, gram, "Gram matrix")?;
        stats.push(LayerStatistics { path, gram, tokens: acc.tokens });
    }
    Ok((stats, batch_count, started.elapsed().as_secs_f64()))
}

/// A calibration statistic of `layer` read back to the host, checked finite (`what` names it
/// in the error).
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

struct PlannedLayer {
    path: String,
    weight_id: ParamId,
    d_in: usize,
    d_out: usize,
    rank: usize,
}

impl PlannedLayer {
    /// The report of this layer factored as `f` from `tokens` calibration tokens.
    fn report(&self, tokens: u64, f: &FactorizedLayer) -> LayerReport {
        LayerReport {
            path: self.path.clone(),
            d_in: self.d_in,
            d_out: self.d_out,
            rank: self.rank,
            params_original: self.d_in * self.d_out,
            params_kept: self.rank * (self.d_in + self.d_out),
            tokens,
            whitened_error: f.whitened_error,
            relative_whitened_error: relative(f.whitened_error, f.whitened_norm),
            whitening: f.whitening.method(),
            relative_damping: f.whitening.relative_damping,
            refit: None,
        }
    }
}

/// Turns `linear` into an emulator layer with factors `w_v` (`W_vᵀ`) and `w_u` (`W_uᵀ`) in its
/// dense weight's dtype (f32 unless `cast_frozen`), dropping the dense weight but keeping its id
/// so that the layer stays addressable.
fn install_factors(linear: &mut crate::nn::Linear, w_v: &Matrix, w_u: &Matrix) {
    let device = linear.weight.val().device();
    let dtype = linear.weight.val().dtype();
    linear.factors = Some(LowRankFactors::new(
        w_v.to_tensor(&device).cast(dtype),
        w_u.to_tensor(&device).cast(dtype),
    ));
    linear.drop_dense_weight();
}

/// Turns `model` into its emulator.
///
/// Runs `forward(&model, batch)` for every calibration batch (the original model, in inference;
/// its outputs are ignored) while every selected `emloc::nn::Linear` accumulates its input Gram
/// matrix, then replaces each selected layer by rank-`k` factors from the whitened truncated SVD,
/// one layer at a time. Returns the same model type, whose emulated layers no longer hold their
/// dense weight, and a per-layer report.
///
/// Everything that can be checked before the expensive work is: the config (ratios in (0, 1),
/// regexes), ranks against each layer's shape, that some layer is selected, non-finite weights,
/// and, after calibration, empty calibration, layers that saw no tokens and non-finite Grams
/// (all reported by layer path). The model is only consumed once all checks passed.
///
/// Keep a clone of the original (`model.clone()` shares its tensors) if you need it for the
/// correction step; otherwise its dense weights are released layer by layer.
///
/// With [`EmulatorConfig::sequential`] set, the batches are collected (hence `Clone`) and run
/// once per block (twice with a refit, through the original too): block `b`'s layers are
/// calibrated on what the emulator with blocks `0..b` already factored feeds them. Blocks are
/// the layers' paths up to their first numeric segment (`encoder.layer.3`), taken in the
/// module's traversal order, which must be the order data flows through them (it is in
/// every model of the zoo); a layer outside numbered blocks is a block of its own. The forward
/// pass must be deterministic (no dropout): a refit pairs each original input with the
/// emulator's input of the same call.
///
/// [`emulate_with_progress`] also reports each factored layer.
pub fn emulate<M, I, F>(
    model: M,
    batches: I,
    forward: F,
    config: &EmulatorConfig,
) -> Result<(M, EmulatorReport)>
where
    M: Module,
    I: IntoIterator,
    I::Item: Clone,
    F: FnMut(&M, I::Item),
{
    emulate_with_progress(model, batches, forward, config, |_| {})
}

/// Where the factorisation of [`emulate_with_progress`] stands, after each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactorizationProgress<'a> {
    /// Layers factored so far, this one included.
    pub done: usize,
    /// Layers to factor.
    pub total: usize,
    /// Module path of the layer just factored.
    pub path: &'a str,
}

/// [`emulate`], calling `on_layer` after each layer's whitened SVD. Factorisation is most of an
/// emulator's construction on large models (16 of 19 minutes for a 1.24 B Llama on two cores);
/// calibration progress is the caller's, who runs the forward passes.
pub fn emulate_with_progress<M, I, F, P>(
    model: M,
    batches: I,
    mut forward: F,
    config: &EmulatorConfig,
    mut on_layer: P,
) -> Result<(M, EmulatorReport)>
where
    M: Module,
    I: IntoIterator,
    I::Item: Clone,
    F: FnMut(&M, I::Item),
    P: FnMut(FactorizationProgress<'_>),
{
    if config.sequential.is_none() {
        return emulate_part(model, "", batches, forward, config, on_layer);
    }
    config.validate()?;
    let plan = plan_layers(&model, config, "")?;
    let batches: Vec<I::Item> = batches.into_iter().collect();
    if batches.is_empty() {
        return Err(EmlocError::EmptyCalibration("no calibration batch was given".into()));
    }
    let started = Instant::now();
    let built = sequential::emulate_sequential(
        model,
        &plan,
        &batches,
        &mut forward,
        config,
        &mut on_layer,
    )?;
    let report = EmulatorReport {
        layers: built.layers,
        dense_layers: Vec::new(),
        stock_layers: Vec::new(),
        calibration_batches: batches.len(),
        calibration_seconds: built.calibration_seconds,
        construction_seconds: started.elapsed().as_secs_f64() - built.calibration_seconds,
    };
    Ok(with_unemulated_layers(built.model, "", report))
}

/// [`emulate_with_progress`] for one part of a larger model (a decoder block, say) that sits at
/// module path `part_path` in the whole model (`"model.layers.3"`; `""` for the whole model):
/// `config`'s rules are matched against, and the report names, each layer's whole-model path
/// (`model.layers.3.self_attn.q_proj`).
///
/// This is what lets an emulator be built one block at a time (streaming construction: load a
/// block, calibrate it on the previous block's outputs, factor it, drop its dense weights, go
/// on), holding one dense block instead of the whole original. Per layer, the result is the
/// same as [`emulate`] on the whole model when each part sees the same inputs in the same
/// order. The report's `dense_layers` and `stock_layers` cover only `part`; the calibration
/// counters are the part's.
///
/// # Errors
/// As [`emulate`]; a part in which no rule selects a layer is an error
/// ([`EmlocError::NoMatchingLayers`]).
pub fn emulate_part<M, I, F, P>(
    part: M,
    part_path: &str,
    batches: I,
    mut forward: F,
    config: &EmulatorConfig,
    mut on_layer: P,
) -> Result<(M, EmulatorReport)>
where
    M: Module,
    I: IntoIterator,
    F: FnMut(&M, I::Item),
    P: FnMut(FactorizationProgress<'_>),
{
    let model = part;
    config.validate()?;
    if config.sequential.is_some() {
        return Err(EmlocError::InvalidConfig(
            "sequential calibration replays the calibration batches through the whole model: \
             use emloc::emulate (emulate_part builds one part from fixed inputs)"
                .into(),
        ));
    }
    let plan = plan_layers(&model, config, part_path)?;

    let (stats, calibration_batches, calibration_seconds) = run_calibration(
        &model,
        plan.iter().map(|p| (p.path.clone(), p.weight_id)).collect(),
        batches,
        &mut forward,
    )?;
    let mut grams: HashMap<ParamId, (Matrix, u64)> = plan
        .iter()
        .zip(stats)
        .map(|(layer, stat)| (layer.weight_id, (stat.gram, stat.tokens)))
        .collect();

    let started = Instant::now();
    let by_id: HashMap<ParamId, &PlannedLayer> = plan.iter().map(|p| (p.weight_id, p)).collect();
    let mut reports = Vec::new();
    let mut failure = None;
    let model = map_linears(model, |_, mut linear| {
        let Some(layer) = by_id.get(&linear.weight.id) else { return linear };
        if failure.is_some() {
            return linear;
        }
        let (gram, tokens) = grams.remove(&linear.weight.id).expect("planned layers have Grams");
        let weight = Matrix::from_tensor(linear.base_weight());
        match factorize_layer(&layer.path, &weight, &gram, layer.rank, &config.whitening) {
            Ok(f) => {
                reports.push(layer.report(tokens, &f));
                on_layer(FactorizationProgress {
                    done: reports.len(),
                    total: plan.len(),
                    path: &layer.path,
                });
                install_factors(&mut linear, &f.w_v, &f.w_u);
                linear
            }
            Err(e) => {
                failure = Some(e);
                linear
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let report = EmulatorReport {
        layers: reports,
        dense_layers: Vec::new(),
        stock_layers: Vec::new(),
        calibration_batches,
        calibration_seconds,
        construction_seconds: started.elapsed().as_secs_f64(),
    };
    Ok(with_unemulated_layers(model, part_path, report))
}

/// `report` with the part's dense and stock layers filled in.
fn with_unemulated_layers<M: Module>(
    model: M,
    part_path: &str,
    report: EmulatorReport,
) -> (M, EmulatorReport) {
    let emulated: Vec<&str> = report.layers.iter().map(|r| r.path.as_str()).collect();
    let dense_layers = all_layer_paths(&model)
        .into_iter()
        .map(|p| join_path(part_path, &p))
        .filter(|p| !emulated.contains(&p.as_str()))
        .collect();
    let emloc_paths: Vec<String> =
        crate::adapter::linear_layers(&model).into_iter().map(|l| l.path).collect();
    let stock_layers = crate::stock::stock_linear_layers(&model, &emloc_paths)
        .into_iter()
        .map(|l| join_path(part_path, &l.shape.path))
        .collect();
    (model, EmulatorReport { dense_layers, stock_layers, ..report })
}

fn relative(error: f64, norm: f64) -> f64 {
    if norm > 0.0 { error / norm } else { 0.0 }
}

/// Selects layers by the first matching rule and validates their ranks and weights.
/// `path` of a layer inside the part at `part_path`, as a path in the whole model.
fn join_path(part_path: &str, path: &str) -> String {
    match (part_path.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (false, true) => part_path.to_string(),
        (false, false) => format!("{part_path}.{path}"),
    }
}

fn plan_layers<M: Module>(
    model: &M,
    config: &EmulatorConfig,
    part_path: &str,
) -> Result<Vec<PlannedLayer>> {
    let rules = config.compiled_rules()?;
    let mut plan = Vec::new();
    let mut problem = None;
    let mut emloc_paths = Vec::new();
    for_each_linear(model, |path, linear| {
        let path = &join_path(part_path, path);
        emloc_paths.push(path.to_string());
        if problem.is_some() {
            return;
        }
        let Some((_, keep)) = rules.iter().find(|(re, _)| re.is_match(path)) else { return };
        if linear.is_emulated() {
            problem = Some(EmlocError::InvalidConfig(format!(
                "layer `{path}` is already an emulator layer"
            )));
            return;
        }
        let (d_in, d_out) = (linear.d_input(), linear.d_output());
        match config::rank_for(path, *keep, d_in, d_out) {
            Ok(Some(rank)) => {
                if !linear.base_weight().is_finite().all().into_scalar::<bool>() {
                    problem = Some(EmlocError::NonFinite {
                        layer: path.to_string(),
                        what: "weight".into(),
                    });
                    return;
                }
                plan.push(PlannedLayer {
                    path: path.to_string(),
                    weight_id: linear.weight.id,
                    d_in,
                    d_out,
                    rank,
                });
            }
            Ok(None) => {}
            Err(e) => problem = Some(e),
        }
    });
    if let Some(e) = problem {
        return Err(e);
    }
    if plan.is_empty() {
        let stock: Vec<String> = all_linear_paths(model)
            .into_iter()
            .map(|p| join_path(part_path, &p))
            .filter(|p| !emloc_paths.contains(p))
            .collect();
        let what = if stock.is_empty() {
            format!(
                "the emulator rules {:?}",
                config.rules.iter().map(|r| &r.pattern).collect::<Vec<_>>()
            )
        } else {
            format!(
                "the emulator rules; these layers are stock burn::nn::Linear, which cannot be \
                 emulated (use emloc::nn::Linear): {stock:?}"
            )
        };
        return Err(EmlocError::NoMatchingLayers(what));
    }
    Ok(plan)
}
