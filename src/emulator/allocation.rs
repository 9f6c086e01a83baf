//! Choosing per-layer ranks: the paper's uniform keep-ratio, or a global allocation that spends a
//! parameter budget where the whitened spectra say it removes the most output error.
//!
//! Keeping singular triplet `i` of layer `l` costs `d_in + d_out` parameters and removes `σ_i²`
//! from that layer's squared whitened error `‖(W − Wᴱ) S‖_F²`, which is the squared error of the
//! layer's outputs on the calibration data. The global allocation gives every layer rank 1, then
//! repeatedly keeps the triplet with the largest `σ² / (d_in + d_out)` that still fits. Since each
//! layer's `σ²` only decrease, this is the greedy solution of the knapsack that minimises the
//! summed squared whitened error at the budget (exact up to the last, partially fitting item).
//! [`Objective::Relative`] weighs each layer's `σ²` by `1 / ‖W S‖_F²` instead, so that every
//! layer's relative output error counts the same.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use burn::module::Module;

use super::config::rank_for;
use super::factorize::factorize_layer;
use super::{EmulatorConfig, Keep, LayerRule};
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;
use crate::nn::hooks::for_each_linear;

/// The whitened singular values of one layer (descending).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpectrum {
    /// Module path.
    pub path: String,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Singular values of the whitened weight, descending; `min(d_in, d_out)` of them.
    pub singular_values: Vec<f64>,
}

impl LayerSpectrum {
    /// `‖(W − Wᴱ) S‖_F` at `rank`: the root of the dropped `σ²`.
    pub fn whitened_error(&self, rank: usize) -> f64 {
        self.singular_values.iter().skip(rank).map(|s| s * s).sum::<f64>().sqrt()
    }

    /// Parameters of the factors at `rank`.
    pub fn params(&self, rank: usize) -> usize {
        rank * (self.d_in + self.d_out)
    }
}

/// Calibrates `model` on `batches` and returns the whitened spectrum of every layer that
/// `config`'s rules would emulate (not those kept `full`), using `config`'s whitening.
///
/// # Errors
/// As [`emulate`](super::emulate) for the config, the calibration and the whitening.
pub fn whitened_spectra<M, I, F>(
    model: &M,
    batches: I,
    forward: F,
    config: &EmulatorConfig,
) -> Result<Vec<LayerSpectrum>>
where
    M: Module,
    I: IntoIterator,
    F: FnMut(&M, I::Item),
{
    config.validate()?;
    let rules = config.compiled_rules()?;
    let emulated = |path: &str| {
        rules
            .iter()
            .find(|(re, _)| re.is_match(path))
            .is_some_and(|(_, keep)| !matches!(keep, Keep::Full))
    };
    let stats = super::calibrate(model, batches, forward, emulated)?;
    let mut weights: BTreeMap<String, Matrix> = BTreeMap::new();
    for_each_linear(model, |path, linear| {
        if emulated(path) && !linear.is_emulated() {
            weights.insert(path.to_string(), Matrix::from_tensor(linear.weight.val()));
        }
    });
    stats
        .into_iter()
        .map(|stat| {
            let weight = weights.remove(&stat.path).ok_or_else(|| {
                EmlocError::InvalidConfig(format!(
                    "layer `{}` is already an emulator layer",
                    stat.path
                ))
            })?;
            let factors = factorize_layer(&stat.path, &weight, &stat.gram, 1, &config.whitening)?;
            Ok(LayerSpectrum {
                path: stat.path,
                d_in: weight.rows,
                d_out: weight.cols,
                singular_values: factors.singular_values,
            })
        })
        .collect()
}

/// The paper's rule: rank `⌊ρ·d_in·d_out/(d_in + d_out)⌋` in every layer.
///
/// # Errors
/// [`EmlocError::InvalidRatio`] unless `0 < ratio < 1`; [`EmlocError::InvalidRank`] if a layer's
/// rank comes out 0.
pub fn uniform_ranks(spectra: &[LayerSpectrum], ratio: f64) -> Result<BTreeMap<String, usize>> {
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(EmlocError::InvalidRatio { rule: "uniform".into(), ratio });
    }
    spectra
        .iter()
        .map(|s| {
            Ok((
                s.path.clone(),
                rank_for(&s.path, Keep::Ratio(ratio), s.d_in, s.d_out)?
                    .expect("a ratio keeps a rank"),
            ))
        })
        .collect()
}

#[derive(PartialEq)]
struct Candidate {
    gain_per_param: f64,
    layer: usize,
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Larger gain first; ties to the earlier layer, so the result is deterministic.
        self.gain_per_param.total_cmp(&other.gain_per_param).then(other.layer.cmp(&self.layer))
    }
}

/// What the global allocation minimises.
///
/// With the `clap` feature it is a `clap::ValueEnum` (`absolute`, `relative`; the help of each
/// value is its first paragraph here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Σ over layers of the squared whitened error, `Σ_l ‖(W_l − W_lᴱ) S_l‖_F²`: layers with
    /// large outputs dominate.
    Absolute,
    /// Σ over layers of the squared whitened error relative to the layer's ‖W S‖²,
    /// `Σ_l ‖(W_l − W_lᴱ) S_l‖_F² / ‖W_l S_l‖_F²`: every layer's relative output error counts
    /// the same.
    ///
    /// The default: on MiniLM it beat uniform ρ on the task, [`Absolute`](Self::Absolute) did
    /// not.
    #[default]
    Relative,
}

/// Global allocation of at most `params` factor parameters minimising `objective`: every layer
/// gets rank 1, then the triplet with the largest (weighted) `σ² / (d_in + d_out)` that still
/// fits is kept, until none fits (the greedy solution of the knapsack).
///
/// # Errors
/// [`EmlocError::InvalidConfig`] if `params` cannot give every layer rank 1, or `spectra` is
/// empty.
pub fn global_ranks(
    spectra: &[LayerSpectrum],
    params: usize,
    objective: Objective,
) -> Result<BTreeMap<String, usize>> {
    if spectra.is_empty() {
        return Err(EmlocError::InvalidConfig("no layers to allocate ranks to".into()));
    }
    let minimum: usize = spectra.iter().map(|s| s.params(1)).sum();
    if params < minimum {
        return Err(EmlocError::InvalidConfig(format!(
            "a budget of {params} parameters cannot keep rank 1 in all {} layers ({minimum} needed)",
            spectra.len()
        )));
    }
    let mut ranks = vec![1usize; spectra.len()];
    let mut left = params - minimum;
    let weight: Vec<f64> = spectra
        .iter()
        .map(|s| match objective {
            Objective::Absolute => 1.0,
            Objective::Relative => {
                let total: f64 = s.singular_values.iter().map(|v| v * v).sum();
                if total > 0.0 { 1.0 / total } else { 0.0 }
            }
        })
        .collect();
    let candidate = |layer: usize, rank: usize| {
        let s = &spectra[layer];
        s.singular_values.get(rank).map(|sigma| Candidate {
            gain_per_param: weight[layer] * sigma * sigma / (s.d_in + s.d_out) as f64,
            layer,
        })
    };
    let mut heap: BinaryHeap<Candidate> =
        (0..spectra.len()).filter_map(|l| candidate(l, 1)).collect();
    while let Some(best) = heap.pop() {
        let cost = spectra[best.layer].d_in + spectra[best.layer].d_out;
        if cost > left {
            continue; // does not fit; a cheaper layer's triplet still might
        }
        left -= cost;
        ranks[best.layer] += 1;
        if let Some(next) = candidate(best.layer, ranks[best.layer]) {
            heap.push(next);
        }
    }
    Ok(spectra.iter().zip(ranks).map(|(s, r)| (s.path.clone(), r)).collect())
}

/// Summed squared whitened error `Σ_l ‖(W_l − W_lᴱ) S_l‖_F²` and factor parameters of `ranks`.
///
/// # Panics
/// If `ranks` lacks a layer of `spectra`.
pub fn allocation_cost(spectra: &[LayerSpectrum], ranks: &BTreeMap<String, usize>) -> (f64, usize) {
    spectra.iter().fold((0.0, 0), |(error, params), s| {
        let rank = ranks[&s.path];
        (error + s.whitened_error(rank).powi(2), params + s.params(rank))
    })
}

/// An emulator config with exactly these ranks (one `rank` rule per layer path, matched
/// literally); every other layer stays dense.
pub fn config_for_ranks(ranks: &BTreeMap<String, usize>, base: &EmulatorConfig) -> EmulatorConfig {
    EmulatorConfig {
        rules: ranks
            .iter()
            .map(|(path, &rank)| LayerRule { pattern: regex::escape(path), keep: Keep::Rank(rank) })
            .collect(),
        whitening: base.whitening.clone(),
        sequential: base.sequential,
    }
}

/// `base` with the layers whose path fully matches one of `dense` kept dense, and every ratio
/// rule of `base` scaled down by one common factor so that the emulator of `model` keeps no more
/// parameters in the layers `base` emulates than `base` itself does (dense ends at equal size:
/// the official release keeps the last block's down-projection dense; Offsite-Tuning keeps
/// whole end blocks). Returns the config and the factor (≤ 1); the largest factor within the
/// size is found by bisection, so the size matches to within one rank step of the widest layer.
///
/// # Errors
/// [`EmlocError::InvalidConfig`] if `base` or a pattern is invalid, no pattern matches a layer
/// `base` emulates, or the dense layers alone exceed `base`'s size (then no factor fits).
pub fn with_dense_layers<M: Module>(
    model: &M,
    base: &EmulatorConfig,
    dense: &[&str],
) -> Result<(EmulatorConfig, f64)> {
    base.validate()?;
    let patterns = dense
        .iter()
        .map(|p| crate::peft::full_match_regex(p, "dense-layer regex"))
        .collect::<Result<Vec<_>>>()?;
    let mut shapes = Vec::new();
    for_each_linear(model, |path, linear| {
        shapes.push((path.to_string(), linear.d_input(), linear.d_output()));
    });
    let mut budget = 0;
    let mut emulated = Vec::new();
    for (path, d_in, d_out) in &shapes {
        if let Some(rank) = base.rank_of(path, *d_in, *d_out)? {
            budget += rank * (d_in + d_out);
            let is_dense = patterns.iter().any(|re| re.is_match(path));
            emulated.push((path.as_str(), *d_in, *d_out, is_dense));
        }
    }
    if !emulated.iter().any(|l| l.3) {
        return Err(EmlocError::InvalidConfig(format!(
            "no layer that the emulator factors matches the dense-layer patterns {dense:?}"
        )));
    }
    let scaled = |factor: f64| {
        let mut rules: Vec<LayerRule> = dense.iter().map(|p| LayerRule::full(*p)).collect();
        rules.extend(base.rules.iter().map(|rule| match rule.keep {
            Keep::Ratio(r) => {
                LayerRule { pattern: rule.pattern.clone(), keep: Keep::Ratio(r * factor) }
            }
            _ => rule.clone(),
        }));
        EmulatorConfig { rules, ..base.clone() }
    };
    // Parameters at `factor`, or `None` where some layer's rank would fall to 0.
    let size = |config: &EmulatorConfig| -> Option<usize> {
        emulated.iter().try_fold(0, |total, &(path, d_in, d_out, is_dense)| {
            let params = if is_dense {
                d_in * d_out
            } else {
                config.rank_of(path, d_in, d_out).ok()?.map_or(d_in * d_out, |k| k * (d_in + d_out))
            };
            Some(total + params)
        })
    };
    let fits = |factor: f64| size(&scaled(factor)).is_some_and(|s| s <= budget);
    let (mut low, mut high) = (0.0, 1.0);
    if fits(high) {
        low = high;
    }
    for _ in 0..60 {
        if low == high {
            break;
        }
        let mid = 0.5 * (low + high);
        if fits(mid) { low = mid } else { high = mid }
    }
    if !(low > 0.0 && fits(low)) {
        return Err(EmlocError::InvalidConfig(format!(
            "keeping {dense:?} dense leaves no rank ≥ 1 for the other layers within the \
             emulator's {budget} parameters"
        )));
    }
    Ok((scaled(low), low))
}

/// Parameters of `model` once emulated by `config` (every layer `config` factors at rank `k`
/// costs `k (d_in + d_out)` instead of `d_in d_out`), computed from the shapes alone: nothing
/// is calibrated or factored. `model` holds dense layers.
///
/// # Errors
/// [`EmlocError::InvalidConfig`], [`EmlocError::InvalidRatio`] or [`EmlocError::InvalidRank`]
/// when `config` is invalid or gives some layer rank 0 or more than it has.
pub fn emulated_params<M: Module>(model: &M, config: &EmulatorConfig) -> Result<usize> {
    config.validate()?;
    let mut shapes = Vec::new();
    for_each_linear(model, |path, linear| {
        shapes.push((path.to_string(), linear.d_input(), linear.d_output()));
    });
    let saved = shapes.iter().try_fold(0usize, |total, (path, d_in, d_out)| {
        let rank = config.rank_of(path, *d_in, *d_out)?;
        Ok::<_, EmlocError>(
            total + rank.map_or(0, |k| (d_in * d_out).saturating_sub(k * (d_in + d_out))),
        )
    })?;
    Ok(model.num_params() - saved)
}

/// The largest keep-ratio `ρ` in (0, 1) at which `model` emulated by `config_at(ρ)` has at most
/// `max_params` parameters ([`emulated_params`]), to within 10⁻⁶; `None` when no `ρ` fits (the
/// layers `config_at` keeps dense already exceed `max_params`, or every fitting `ρ` leaves some
/// layer rank 0). Sizes an emulator for a memory budget: with `B` the bytes fine-tuning may use,
/// `T` what training allocates besides the parameters and `b` bytes per frozen parameter,
/// `max_params = (B − T) / b`.
///
/// # Errors
/// Those of [`emulated_params`] for a `ρ` whose config is invalid for another reason than a
/// rank below 1.
pub fn largest_ratio<M: Module>(
    model: &M,
    config_at: impl Fn(f64) -> EmulatorConfig,
    max_params: usize,
) -> Result<Option<f64>> {
    // Parameters at ρ, `None` where ρ gives some layer rank 0 (too small a ratio).
    let size = |ratio: f64| match emulated_params(model, &config_at(ratio)) {
        Ok(params) => Ok(Some(params)),
        Err(EmlocError::InvalidRank { rank: 0, .. }) => Ok(None),
        Err(e) => Err(e),
    };
    let fits = |ratio: f64| -> Result<bool> { Ok(size(ratio)?.is_some_and(|p| p <= max_params)) };
    let (mut low, mut high) = (0.0f64, 1.0f64);
    // Ranks are floors, so the size never decreases with ρ: bisect on the last ρ that fits.
    while high - low > 1e-6 {
        let mid = 0.5 * (low + high);
        if fits(mid)? { low = mid } else { high = mid }
    }
    Ok((low > 0.0 && fits(low)?).then_some(low))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spectrum(path: &str, d: usize, values: &[f64]) -> LayerSpectrum {
        LayerSpectrum { path: path.into(), d_in: d, d_out: d, singular_values: values.to_vec() }
    }

    #[test]
    fn global_allocation_is_optimal_on_a_small_exhaustive_case() {
        let spectra = vec![
            spectrum("a", 2, &[10.0, 6.0, 1.0, 0.5]),
            spectrum("b", 3, &[9.0, 8.0, 7.0, 0.1]),
            spectrum("c", 1, &[3.0, 2.9, 2.8, 2.7]),
        ];
        for budget in [12usize, 16, 20, 24, 30, 40] {
            let ranks = global_ranks(&spectra, budget, Objective::Absolute).unwrap();
            let (error, params) = allocation_cost(&spectra, &ranks);
            assert!(params <= budget);
            // Exhaustive search over ranks 1..=4 per layer.
            let mut best = f64::INFINITY;
            for ra in 1..=4 {
                for rb in 1..=4 {
                    for rc in 1..=4 {
                        let r = BTreeMap::from([
                            ("a".to_string(), ra),
                            ("b".to_string(), rb),
                            ("c".to_string(), rc),
                        ]);
                        let (e, p) = allocation_cost(&spectra, &r);
                        if p <= budget {
                            best = best.min(e);
                        }
                    }
                }
            }
            // Greedy by ratio can miss the optimum only by the one item that did not fit.
            let slack = spectra.iter().map(|s| s.singular_values[0].powi(2)).fold(0.0, f64::max);
            assert!(error <= best + slack, "budget {budget}: greedy {error}, optimum {best}");
            assert!(error >= best - 1e-12);
        }
        assert_eq!(
            global_ranks(&spectra, 40, Objective::Absolute).unwrap(),
            BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 3), ("c".to_string(), 4)])
        );
    }

    #[test]
    fn relative_objective_evens_out_output_scales() {
        // Same shape of spectrum, one layer 100× louder: the absolute objective spends almost
        // everything on the loud layer, the relative one treats them alike.
        let base: Vec<f64> = (0..8).map(|i| 0.7f64.powi(i)).collect();
        let loud: Vec<f64> = base.iter().map(|v| 100.0 * v).collect();
        let spectra = vec![spectrum("quiet", 8, &base), spectrum("loud", 8, &loud)];
        let absolute = global_ranks(&spectra, 16 * 8, Objective::Absolute).unwrap();
        let relative = global_ranks(&spectra, 16 * 8, Objective::Relative).unwrap();
        assert!(absolute["loud"] > absolute["quiet"] + 2, "{absolute:?}");
        assert_eq!(relative["loud"], relative["quiet"], "{relative:?}");
    }

    #[test]
    fn global_allocation_never_loses_to_uniform_at_equal_size() {
        // Layers of different widths with different spectral decay.
        let decay =
            |n: usize, rate: f64| (0..n).map(|i| (-rate * i as f64).exp()).collect::<Vec<_>>();
        let spectra = vec![
            LayerSpectrum {
                path: "fast".into(),
                d_in: 24,
                d_out: 24,
                singular_values: decay(24, 0.5),
            },
            LayerSpectrum {
                path: "slow".into(),
                d_in: 24,
                d_out: 48,
                singular_values: decay(24, 0.05),
            },
            LayerSpectrum {
                path: "flat".into(),
                d_in: 16,
                d_out: 16,
                singular_values: vec![0.3; 16],
            },
        ];
        let mut strictly_better = 0;
        for ratio in [0.2, 0.4, 0.6] {
            let uniform = uniform_ranks(&spectra, ratio).unwrap();
            let (uniform_error, params) = allocation_cost(&spectra, &uniform);
            let global = global_ranks(&spectra, params, Objective::Absolute).unwrap();
            let (global_error, global_params) = allocation_cost(&spectra, &global);
            assert!(global_params <= params);
            assert!(
                global_error <= uniform_error + 1e-12,
                "ρ {ratio}: global {global_error} vs uniform {uniform_error}"
            );
            strictly_better += usize::from(global_error < uniform_error - 1e-9);
        }
        assert!(
            strictly_better >= 2,
            "the spectra differ, so the global plan should win at most sizes"
        );
        assert!(global_ranks(&spectra, 10, Objective::Relative).is_err());
        assert!(uniform_ranks(&spectra, 1.0).is_err());
    }
}
