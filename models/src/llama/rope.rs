//! Rotary position embeddings (RoPE) as in HF Llama: the "rotate half" layout (the first and
//! second halves of a head are the two coordinates of each rotated pair), with the `linear` and
//! Llama-3 (`llama3`) frequency scalings of `rope_scaling`.

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConfigProblem;

/// HF's `rope_scaling` object (read and written in HF's JSON form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub enum RopeScaling {
    /// `{"rope_type": "default"}`: no scaling.
    Default,
    /// `{"rope_type": "linear", "factor": f}`: every frequency divided by `f`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's scaling (`{"rope_type": "llama3", ...}`): low frequencies (wavelength above
    /// `original_max_position_embeddings / low_freq_factor`) divided by `factor`, high ones kept,
    /// and a smooth interpolation in between.
    Llama3 {
        /// Divisor of the low frequencies (8 for Llama 3.1).
        factor: f64,
        /// Wavelength threshold factor below which frequencies are scaled (1 for Llama 3.1).
        low_freq_factor: f64,
        /// Wavelength threshold factor above which frequencies are kept (4 for Llama 3.1).
        high_freq_factor: f64,
        /// The pre-training context length (8192 for Llama 3.1).
        original_max_position_embeddings: f64,
    },
}

impl TryFrom<Value> for RopeScaling {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        Self::from_json(&value)
    }
}

impl From<RopeScaling> for Value {
    fn from(scaling: RopeScaling) -> Value {
        match scaling {
            RopeScaling::Default => serde_json::json!({"rope_type": "default"}),
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        }
    }
}

impl RopeScaling {
    /// Parses HF's `rope_scaling` (`rope_type`, or the older `type`, plus its parameters) and
    /// checks it with [`validate`](Self::validate).
    ///
    /// # Errors
    /// A message naming the field (`rope_scaling.rope_type`, `rope_scaling.factor`, ...) when
    /// the type is unsupported, a parameter is absent or not a number, or
    /// [`validate`](Self::validate) rejects a value.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let scaling = Self::parse_unchecked(value)?;
        scaling.validate().map_err(|problem| problem.to_string())?;
        Ok(scaling)
    }

    /// [`from_json`](Self::from_json) without [`validate`](Self::validate): only the form of the
    /// JSON (the type and parameters present and numeric) is checked.
    pub(crate) fn parse_unchecked(value: &Value) -> Result<Self, String> {
        let kind = value
            .get("rope_type")
            .or_else(|| value.get("type"))
            .and_then(Value::as_str)
            .ok_or("`rope_scaling.rope_type` is missing")?;
        let number = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("`rope_scaling.{name}` is missing or not a number"))
        };
        Ok(match kind {
            "default" => Self::Default,
            "linear" => Self::Linear { factor: number("factor")? },
            "llama3" => Self::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
            other => {
                return Err(format!(
                    "`rope_scaling.rope_type` \"{other}\" is not supported (\"default\", \
                     \"linear\" or \"llama3\")"
                ));
            }
        })
    }

    /// Checks the parameters (positive factors, `high_freq_factor > low_freq_factor`).
    ///
    /// # Errors
    /// The first problem, its field named `rope_scaling.factor`, `rope_scaling.low_freq_factor`,
    /// ... (as the keys of `config.json`).
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ConfigProblem::new(
                    format!("rope_scaling.{name}"),
                    format!("{v} must be positive"),
                ))
            }
        };
        match *self {
            Self::Default => Ok(()),
            Self::Linear { factor } => positive("factor", factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                positive("original_max_position_embeddings", original_max_position_embeddings)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(ConfigProblem::new(
                        "rope_scaling.high_freq_factor",
                        format!(
                            "{high_freq_factor} must exceed `low_freq_factor` {low_freq_factor}"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The inverse frequencies `θ^(-2i/head_dim)`, `i < head_dim / 2`, after `scaling` (HF's
/// `inv_freq`), in f64.
///
/// # Panics
/// If `head_dim` is odd or zero.
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    assert!(head_dim > 0 && head_dim.is_multiple_of(2), "RoPE head_dim {head_dim} must be even");
    let base: Vec<f64> =
        (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect();
    match scaling {
        None | Some(RopeScaling::Default) => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_context,
        }) => {
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// RoPE for one head width: precomputed inverse frequencies; cosines and sines are computed
/// in f64 on the host for the positions of each call.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f64>,
}

impl RotaryEmbedding {
    /// RoPE for heads of width `head_dim`, base `theta`, with optional scaling.
    ///
    /// # Panics
    /// If `head_dim` is odd or zero.
    pub fn new(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        Self { inv_freq: inverse_frequencies(head_dim, theta, scaling) }
    }

    /// The inverse frequencies (length `head_dim / 2`).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Cosine and sine tables for positions `offset..offset + len`, each `[len, head_dim]`
    /// (the frequencies repeated for both halves, as HF's `cat((freqs, freqs))`).
    pub fn tables(&self, offset: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let positions: Vec<usize> = (offset..offset + len).collect();
        let (cos, sin) = self.host_tables(&positions);
        let hd = self.head_dim();
        (
            Tensor::from_data(TensorData::new(cos, [len, hd]), device),
            Tensor::from_data(TensorData::new(sin, [len, hd]), device),
        )
    }

    /// Cosine and sine tables for per-row positions (computed in f64 like
    /// [`tables`](Self::tables), so equal positions give bit-identical tables).
    ///
    /// # Shapes
    /// - `positions`: row-major `[batch, seq]`
    /// - outputs: `[batch, seq, head_dim]` each
    ///
    /// # Panics
    /// If `positions.len() != batch * seq`.
    pub fn position_tables(
        &self,
        positions: &[usize],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> (Tensor<3>, Tensor<3>) {
        assert_eq!(
            positions.len(),
            batch * seq,
            "RotaryEmbedding::position_tables: {} positions for [{batch}, {seq}]",
            positions.len()
        );
        let (cos, sin) = self.host_tables(positions);
        let hd = self.head_dim();
        (
            Tensor::from_data(TensorData::new(cos, [batch, seq, hd]), device),
            Tensor::from_data(TensorData::new(sin, [batch, seq, hd]), device),
        )
    }

    fn host_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let hd = self.head_dim();
        let mut cos = Vec::with_capacity(positions.len() * hd);
        let mut sin = Vec::with_capacity(positions.len() * hd);
        for &p in positions {
            for _half in 0..2 {
                for f in &self.inv_freq {
                    let angle = p as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        (cos, sin)
    }

    /// Rotates queries or keys at positions `offset..offset + seq` (every row the same):
    /// `x cos + rotate_half(x) sin` with `rotate_half([x1, x2]) = [-x2, x1]`.
    ///
    /// # Shapes
    /// - `x`, output: `[batch, heads, seq, head_dim]`
    ///
    /// # Panics
    /// If the last dimension of `x` is not `head_dim`.
    pub fn apply(&self, x: Tensor<4>, offset: usize) -> Tensor<4> {
        let seq = x.dims()[2];
        let (cos, sin) = self.tables(offset, seq, &x.device());
        let hd = cos.dims()[1];
        self.apply_tables(x, cos.reshape([1, seq, hd]), sin.reshape([1, seq, hd]))
    }

    /// Rotates queries or keys at per-row positions (e.g. from
    /// [`PaddingMask::position_ids`](super::PaddingMask::position_ids)). Reads `positions` to
    /// the host.
    ///
    /// # Shapes
    /// - `x`, output: `[batch, heads, seq, head_dim]`
    /// - `positions`: `[batch, seq]`, non-negative
    ///
    /// # Panics
    /// If the last dimension of `x` is not `head_dim`, the shapes disagree, or a position is
    /// negative.
    pub fn apply_positions(&self, x: Tensor<4>, positions: Tensor<2, Int>) -> Tensor<4> {
        let [batch, seq] = positions.dims();
        let positions: Vec<usize> = positions
            .into_data()
            .iter::<i64>()
            .map(|p| usize::try_from(p).expect("RotaryEmbedding: negative position"))
            .collect();
        let (cos, sin) = self.position_tables(&positions, batch, seq, &x.device());
        self.apply_tables(x, cos, sin)
    }

    /// Rotates `x` with precomputed tables (from [`tables`](Self::tables) reshaped to
    /// `[1, seq, head_dim]`, or [`position_tables`](Self::position_tables)); the tables are cast
    /// to `x`'s float type when it differs.
    ///
    /// # Shapes
    /// - `x`, output: `[batch, heads, seq, head_dim]`
    /// - `cos`, `sin`: `[batch or 1, seq, head_dim]`
    ///
    /// # Panics
    /// If the last dimension of `x` is not `head_dim` or the tables do not match `x`.
    pub fn apply_tables(&self, x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
        let [batch, heads, seq, hd] = x.dims();
        assert_eq!(
            hd,
            self.head_dim(),
            "RotaryEmbedding::apply: head_dim {hd} != {}",
            self.head_dim()
        );
        let [tb, ts, thd] = cos.dims();
        assert!(
            (tb == batch || tb == 1) && ts == seq && thd == hd && sin.dims() == cos.dims(),
            "RotaryEmbedding::apply_tables: tables {:?} / {:?} for x {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        );
        let (cos, sin) = if cos.dtype() == x.dtype() {
            (cos, sin)
        } else {
            (cos.cast(x.dtype()), sin.cast(x.dtype()))
        };
        let cos = cos.reshape([tb, 1, seq, hd]);
        let sin = sin.reshape([tb, 1, seq, hd]);
        let half = hd / 2;
        let x1 = x.clone().slice([0..batch, 0..heads, 0..seq, 0..half]);
        let x2 = x.clone().slice([0..batch, 0..heads, 0..seq, half..hd]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_interpolates_between() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 256.0,
        };
        let base = inverse_frequencies(8, 500_000.0, None);
        let scaled = inverse_frequencies(8, 500_000.0, Some(&scaling));
        // wavelengths: 6.3 (< 64: kept), 167 (between 64 and 256: smoothed), 4443, ... (/ 8).
        assert_eq!(scaled[0], base[0]);
        assert!(scaled[1] < base[1] && scaled[1] > base[1] / 8.0);
        assert!((scaled[2] - base[2] / 8.0).abs() < 1e-15);
        assert!((scaled[3] - base[3] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn rope_scaling_parses_both_type_keys_and_names_bad_fields() {
        let linear = RopeScaling::from_json(&serde_json::json!({"type": "linear", "factor": 2.0}));
        assert_eq!(linear, Ok(RopeScaling::Linear { factor: 2.0 }));
        let err = RopeScaling::from_json(&serde_json::json!({"rope_type": "llama3", "factor": 8}))
            .unwrap_err();
        assert!(err.contains("rope_scaling.low_freq_factor"), "{err}");
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let json = serde_json::to_value(&llama3).unwrap();
        assert_eq!(json["rope_type"], "llama3");
        assert_eq!(serde_json::from_value::<RopeScaling>(json).unwrap(), llama3);
        let err = RopeScaling::from_json(&serde_json::json!({"rope_type": "yarn", "factor": 8}))
            .unwrap_err();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn validate_names_the_scaling_field() {
        let bad = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192.0,
        };
        let problem = bad.validate().unwrap_err();
        assert_eq!(problem.field, "rope_scaling.high_freq_factor");
        assert_eq!(
            problem.to_string(),
            "`rope_scaling.high_freq_factor` 1 must exceed `low_freq_factor` 4"
        );
        let problem = RopeScaling::Linear { factor: -2.0 }.validate().unwrap_err();
        assert_eq!(problem, ConfigProblem::new("rope_scaling.factor", "-2 must be positive"));
        // `from_json` keeps reporting it as text, and `parse_unchecked` leaves it to `validate`.
        let json = serde_json::json!({"rope_type": "linear", "factor": -2.0});
        assert_eq!(RopeScaling::from_json(&json), Err(problem.to_string()));
        assert_eq!(RopeScaling::parse_unchecked(&json), Ok(RopeScaling::Linear { factor: -2.0 }));
        assert_eq!(RopeScaling::Default.validate(), Ok(()));
    }

    #[test]
    fn rotation_preserves_norms_and_is_identity_at_position_zero() {
        let device = Device::default();
        let rope = RotaryEmbedding::new(4, 10_000.0, None);
        let x = Tensor::<4>::from_data(
            TensorData::new((0..16).map(|i| i as f32 - 7.5).collect::<Vec<_>>(), [1, 1, 4, 4]),
            &device,
        );
        let y = rope.apply(x.clone(), 0);
        let xs: Vec<f32> = x.clone().into_data().iter::<f32>().collect();
        let ys: Vec<f32> = y.into_data().iter::<f32>().collect();
        assert_eq!(&xs[..4], &ys[..4]);
        for row in 0..4 {
            let n = |v: &[f32]| v[row * 4..row * 4 + 4].iter().map(|a| a * a).sum::<f32>();
            assert!((n(&xs) - n(&ys)).abs() < 1e-3);
        }
        // Offsetting equals rotating the later rows.
        let late = rope.apply(x.clone().slice([0..1, 0..1, 2..4, 0..4]), 2);
        let full: Vec<f32> = rope.apply(x, 0).into_data().iter::<f32>().collect();
        let late: Vec<f32> = late.into_data().iter::<f32>().collect();
        for (a, b) in late.iter().zip(&full[8..]) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn per_row_positions_equal_offsets() {
        let device = Device::default();
        let rope = RotaryEmbedding::new(4, 10_000.0, None);
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..32).map(|i| i as f32 * 0.25 - 3.0).collect::<Vec<_>>(),
                [2, 1, 4, 4],
            ),
            &device,
        );
        // Row 0 at positions 0..4, row 1 at 5..9.
        let positions = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 1, 2, 3, 5, 6, 7, 8], [2, 4]),
            &device,
        );
        let both: Vec<f32> =
            rope.apply_positions(x.clone(), positions).into_data().iter().collect();
        let row = |r: usize, offset| -> Vec<f32> {
            let xr = x.clone().slice([r..r + 1, 0..1, 0..4, 0..4]);
            rope.apply(xr, offset).into_data().iter().collect()
        };
        assert_eq!(&both[..16], &row(0, 0)[..]);
        assert_eq!(&both[16..], &row(1, 5)[..]);
    }
}
