use serde::{Deserialize, Serialize};

use crate::error::{EmlocError, Result};
use crate::peft::full_match_regex;

/// How much of a layer the emulator keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// Keep-ratio ρ ∈ (0, 1): the fraction of the layer's parameters kept,
    /// `k = ⌊ρ · d_in · d_out / (d_in + d_out)⌋`.
    Ratio(f64),
    /// An explicit rank `k ∈ 1..=min(d_in, d_out)`.
    Rank(usize),
    /// Leave the layer dense.
    Full,
}

/// One rule: layers whose module path fully matches `pattern` get `keep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRule {
    /// A regex over the dot-joined module path (e.g. `layers\.\d+\.attention\..*`); it must match
    /// the whole path.
    pub pattern: String,
    /// What matching layers keep.
    pub keep: Keep,
}

impl LayerRule {
    /// A rule keeping ratio `ratio` of layers matching `pattern`.
    pub fn ratio(pattern: impl Into<String>, ratio: f64) -> Self {
        Self { pattern: pattern.into(), keep: Keep::Ratio(ratio) }
    }

    /// A rule leaving layers matching `pattern` dense.
    pub fn full(pattern: impl Into<String>) -> Self {
        Self { pattern: pattern.into(), keep: Keep::Full }
    }
}

/// Which whitening `S` (with `S Sᵀ = XᵀX`) to use.
///
/// With the `clap` feature it is a `clap::ValueEnum` (`cholesky`, `eigen`, `none`; the help
/// of each value is its summary here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum WhiteningMethod {
    /// Cholesky `G = L Lᵀ` of the Gram, with relative damping retries, then the eigen path if
    /// damping runs out.
    Cholesky,
    /// Symmetric eigendecomposition of the Gram with floored eigenvalues (robust, slower).
    Eigen,
    /// No whitening (`S = I`): plain truncated SVD of the weight, the ablation baseline.
    None,
}

/// Numerical settings of the whitening step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WhiteningConfig {
    /// Method to try first.
    pub method: WhiteningMethod,
    /// First damping tried after an undamped failure, relative to `mean(diag G)`.
    pub initial_damping: f64,
    /// Factor by which the damping grows on each failure.
    pub damping_growth: f64,
    /// Damped attempts before falling back to the eigen path.
    pub max_damping_attempts: usize,
    /// A Cholesky pivot `L_jj²` below `pivot_tolerance · mean(diag G)` counts as a failure: the
    /// matrix is numerically singular and `S⁻¹` would amplify rounding noise.
    pub pivot_tolerance: f64,
    /// Eigen path: eigenvalues are floored at `eigen_floor · mean(λ)`.
    pub eigen_floor: f64,
    /// How the whitened weight's truncated SVD is computed.
    pub svd: SvdMethod,
    /// Opt-in: run the Cholesky attempts (same damping schedule) on this device with emloc's
    /// `f32` kernel ([`crate::emulator::cholesky_damped`]) instead of faer in `f64` on the host; the
    /// factor then comes back to the host for the rest of the whitening. `None` (the default)
    /// keeps the host `f64` path: `f32` loses digits on ill-conditioned Grams. On the device the
    /// pivot tolerance is floored at `d · 2⁻²³` (below it `f32` rounding looks like a real
    /// pivot). Runtime-only: never serialized.
    #[serde(skip)]
    pub cholesky_device: Option<burn::tensor::Device>,
}

/// How the truncated SVD of the whitened weight is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SvdMethod {
    /// Full thin SVD (exact; the report's spectrum has every singular value).
    #[default]
    Exact,
    /// Randomized range finder with `oversample` extra columns and `power_iterations`
    /// subspace iterations (Halko, Martinsson, Tropp 2011); deterministic (fixed seed). Only the
    /// top `rank + oversample` singular values are computed; the whitened error stays exact
    /// (`‖W S‖_F² − Σ_kept σ²`).
    Randomized {
        /// Extra columns of the sketch.
        oversample: usize,
        /// Subspace iterations (each one re-orthonormalised).
        power_iterations: usize,
    },
}

impl Default for WhiteningConfig {
    fn default() -> Self {
        Self {
            method: WhiteningMethod::Cholesky,
            initial_damping: 1e-6,
            damping_growth: 10.0,
            max_damping_attempts: 6,
            pivot_tolerance: 1e-10,
            eigen_floor: 1e-7,
            svd: SvdMethod::Exact,
            cholesky_device: None,
        }
    }
}

/// Sequential calibration: the emulator is built block by block, each block calibrated on the
/// inputs that the already-emulated blocks before it produce (the sequential scheme of SVD-LLM,
/// Wang et al., ICLR 2025; `docs/DESIGN.md`), so that each layer is fitted to what it will see
/// in the emulator instead of what it sees in the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequentialConfig {
    /// Whether (and which factors) to refit in closed form against the original's outputs.
    pub refit: Refit,
}

/// The closed-form refit of sequential calibration: with `X` a layer's inputs in the original
/// and `X'` in the emulator, fit the layer's factors so that `X' Wᴱᵀ` comes closest to the
/// original layer's outputs `X Wᵀ` (least squares on the calibration data), so that each block
/// undoes what the blocks before it got wrong instead of passing it on. SVD-LLM updates the
/// factors by gradient descent on the calibration data; these are exact solutions.
///
/// With the `clap` feature it is a `clap::ValueEnum` (`none`, `output`, `both`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Refit {
    /// The whitened SVD of `W` on the emulator's inputs, no refit.
    #[default]
    None,
    /// `W_v` from that SVD, `W_u` refitted: `argmin ‖X Wᵀ − X' W_vᵀ W_uᵀ‖_F`.
    Output,
    /// Both factors: the best rank-`k` map, `argmin_{rank k} ‖X Wᵀ − X' Mᵀ‖_F` (the whitened SVD
    /// of the unconstrained least-squares map `(X'ᵀX')⁻¹ X'ᵀ X Wᵀ` on `X'ᵀX'`, with a small ridge
    /// where `X'ᵀX'` is singular). It can overfit the calibration data: on SmolLM2-135M with 64
    /// calibration sequences the emulator's held-out loss rose to 21.6 (one-shot: 4.95).
    Both,
}

/// Configuration of [`emulate`](crate::emulate).
///
/// `rules` map module paths to what is kept; the **first** rule whose regex matches the whole path
/// wins, and layers that no rule matches stay dense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmulatorConfig {
    /// Ordered rules.
    pub rules: Vec<LayerRule>,
    /// Whitening settings.
    #[serde(default)]
    pub whitening: WhiteningConfig,
    /// `None` (the paper's construction): every layer calibrated in one pass of the original.
    /// `Some`: block by block on the emulated prefix's outputs ([`SequentialConfig`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential: Option<SequentialConfig>,
}

impl Default for EmulatorConfig {
    /// The release's recipe: every linear layer at ρ = 0.4, except embeddings, output heads,
    /// poolers and projectors, which stay dense.
    fn default() -> Self {
        Self::uniform(0.4)
    }
}

impl EmulatorConfig {
    /// Keep-ratio `ratio` for every linear layer except embeddings, output heads, poolers and
    /// multimodal projectors (kept dense, as in the paper's release).
    pub fn uniform(ratio: f64) -> Self {
        Self {
            rules: vec![
                LayerRule::full(r"(?i).*(embed|lm_head|head|classifier|pooler|projector).*"),
                LayerRule::ratio(".*", ratio),
            ],
            whitening: WhiteningConfig::default(),
            sequential: None,
        }
    }

    /// Keep-ratio `ratio` for every linear layer, no exceptions.
    pub fn all_layers(ratio: f64) -> Self {
        Self {
            rules: vec![LayerRule::ratio(".*", ratio)],
            whitening: WhiteningConfig::default(),
            sequential: None,
        }
    }

    /// Replaces the whitening method.
    pub fn with_whitening(mut self, method: WhiteningMethod) -> Self {
        self.whitening.method = method;
        self
    }

    /// Switches to sequential calibration ([`SequentialConfig`]) with `refit`.
    pub fn with_sequential(mut self, refit: Refit) -> Self {
        self.sequential = Some(SequentialConfig { refit });
        self
    }

    /// Checks every rule (ratio range, regex syntax) and the whitening settings.
    pub fn validate(&self) -> Result<()> {
        self.compiled_rules().map(|_| ())?;
        let w = &self.whitening;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let valid = positive(w.initial_damping)
            && w.damping_growth.is_finite()
            && w.damping_growth > 1.0
            && positive(w.eigen_floor)
            && w.pivot_tolerance.is_finite()
            && w.pivot_tolerance >= 0.0;
        if !valid {
            return Err(EmlocError::InvalidConfig(format!(
                "whitening settings must be positive (damping growth > 1): {w:?}"
            )));
        }
        Ok(())
    }

    /// The rank [`emulate`](crate::emulate) keeps for a `d_out × d_in` layer at `path`: the
    /// first rule matching the whole path decides; `None` when no rule matches or it keeps the
    /// layer dense.
    ///
    /// # Errors
    /// As [`validate`](Self::validate) for the rules; [`EmlocError::InvalidRank`] if the rank
    /// is 0 or above `min(d_in, d_out)`.
    pub fn rank_of(&self, path: &str, d_in: usize, d_out: usize) -> Result<Option<usize>> {
        let rules = self.compiled_rules()?;
        match rules.iter().find(|(re, _)| re.is_match(path)) {
            Some((_, keep)) => rank_for(path, *keep, d_in, d_out),
            None => Ok(None),
        }
    }

    pub(crate) fn compiled_rules(&self) -> Result<Vec<(regex::Regex, Keep)>> {
        self.rules
            .iter()
            .map(|rule| {
                match rule.keep {
                    Keep::Ratio(r) if !(r > 0.0 && r < 1.0) => {
                        return Err(EmlocError::InvalidRatio {
                            rule: rule.pattern.clone(),
                            ratio: r,
                        });
                    }
                    Keep::Rank(0) => {
                        return Err(EmlocError::InvalidRank {
                            layer: rule.pattern.clone(),
                            rank: 0,
                            max: usize::MAX,
                        });
                    }
                    _ => {}
                }
                let re = full_match_regex(&rule.pattern, "rule regex")?;
                Ok((re, rule.keep))
            })
            .collect()
    }
}

/// The rank kept for a `d_out × d_in` layer under `keep`, or `None` when it stays dense.
pub(crate) fn rank_for(
    layer: &str,
    keep: Keep,
    d_in: usize,
    d_out: usize,
) -> Result<Option<usize>> {
    let max = d_in.min(d_out);
    let rank = match keep {
        Keep::Full => return Ok(None),
        // In f64 so that huge shapes (a corrupt description or rules input) cannot overflow;
        // identical to the integer product for every shape below 2^53 parameters.
        Keep::Ratio(rho) => {
            (rho * (d_in as f64 * d_out as f64) / (d_in as f64 + d_out as f64)).floor() as usize
        }
        Keep::Rank(k) => k,
    };
    if rank == 0 || rank > max {
        return Err(EmlocError::InvalidRank { layer: layer.to_string(), rank, max });
    }
    Ok(Some(rank))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_of_huge_or_empty_shapes_is_an_error_or_a_valid_rank() {
        // Regression (fuzzing, emulator_rules): `d_in * d_out` overflowed and panicked.
        let config = EmulatorConfig::all_layers(0.5);
        for (d_in, d_out) in
            [(usize::MAX, usize::MAX), (usize::MAX, 2), (1 << 40, 1 << 40), (0, 0), (0, 7)]
        {
            match config.rank_of("layers.0.q", d_in, d_out) {
                Ok(Some(rank)) => {
                    assert!(rank >= 1 && rank <= d_in.min(d_out), "{rank} for [{d_in}, {d_out}]")
                }
                Ok(None) => panic!("a matching ratio rule gives a rank or an error"),
                Err(e) => assert!(matches!(e, EmlocError::InvalidRank { .. }), "{e:?}"),
            }
        }
        // Unchanged for ordinary shapes: ⌊0.5 · 16·32 / 48⌋ = 5.
        assert_eq!(config.rank_of("layers.0.q", 16, 32).unwrap(), Some(5));
        assert_eq!(EmulatorConfig::uniform(0.5).rank_of("pooler.dense", 16, 16).unwrap(), None);
        assert_eq!(
            EmulatorConfig { rules: vec![], ..EmulatorConfig::default() }
                .rank_of("x", 4, 4)
                .unwrap(),
            None
        );
    }
}
