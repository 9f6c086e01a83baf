//! [`ClipVisionConfig`]: HF's `CLIPVisionConfig`, read from a vision `config.json` or from the
//! `vision_config` object of a full `CLIPConfig`.

use std::path::Path;

use burn::nn::LayerNormConfig;
use burn::tensor::activation::{gelu_approximate, relu, sigmoid, silu};
use burn::tensor::{Device, Tensor};
use emloc::nn::LinearConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ClipEncoderConfig, ClipVisionEmbeddingsConfig, ClipVisionModel};
use crate::error::{ConfigProblem, ModelError, Result};
use crate::loading::{check_sizes, parse_config, read_json};

/// Feed-forward activation of a CLIP tower (HF `hidden_act`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x σ(1.702 x)` (HF `"quick_gelu"`, the default and what OpenAI's CLIP uses).
    #[default]
    QuickGelu,
    /// Exact GELU, `x Φ(x)` (HF `"gelu"`).
    Gelu,
    /// Tanh approximation of GELU (HF `"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// `max(x, 0)`.
    Relu,
    /// `x σ(x)` (HF `"silu"`, `"swish"`).
    #[serde(alias = "swish")]
    Silu,
}

impl ClipActivation {
    /// Applies the activation elementwise.
    ///
    /// # Shapes
    /// - input, output: any `[..]` (same shape)
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
            Self::Gelu => emloc::ops::gelu(x),
            Self::GeluNew => gelu_approximate(x),
            Self::Relu => relu(x),
            Self::Silu => silu(x),
        }
    }
}

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_layers() -> usize {
    12
}
fn default_num_heads() -> usize {
    12
}
fn default_num_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// Configuration of a [`ClipVisionModel`] with the field names of HF's `CLIPVisionConfig`.
///
/// Every field has HF's default (those of `openai/clip-vit-base-patch32`), because HF saves
/// `CLIPConfig.vision_config` as a diff against them: a `vision_config` of `{}` is a ViT-B/32
/// tower. Unused fields (`initializer_range`, `model_type`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width `d` of the token states. Default 768.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the feed-forward layer. Default 3072.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Output width of `visual_projection` (read from the top level of a `CLIPConfig`, where
    /// HF keeps it). Default 512.
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// Number of encoder layers. Default 12.
    #[serde(default = "default_num_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`. Default 12.
    #[serde(default = "default_num_heads")]
    pub num_attention_heads: usize,
    /// Input channels. Default 3.
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Side of the (square) input image in pixels. Default 224.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Side of a (square) patch; must divide `image_size`. Default 32.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Feed-forward activation. Default `quick_gelu`.
    #[serde(default)]
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon. Default `1e-5`.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Dropout on attention probabilities (training only). Default 0.
    #[serde(default)]
    pub attention_dropout: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Default::default())).expect("all fields default")
    }
}

impl ClipVisionConfig {
    /// Reads and validates a `config.json`: a `CLIPVisionConfig` (vision fields at the top
    /// level), or a `CLIPConfig` (a `vision_config` object; its top-level `projection_dim`, if
    /// any, takes precedence). Absent fields take HF's defaults.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read; [`ModelError::InvalidConfig`] for
    /// malformed JSON, a `vision_config` that is not an object, a value of the wrong type or an
    /// unknown `hidden_act`; [`ModelError::ConfigValue`] for a value
    /// [`validate`](Self::validate) rejects (naming the field).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let invalid =
            |message: String| ModelError::InvalidConfig { path: path.to_path_buf(), message };
        let value = read_json(path)?;
        let Some(object) = value.as_object() else {
            return Err(invalid("expected a JSON object".into()));
        };
        let mut vision = match object.get("vision_config") {
            None | Some(Value::Null) => object.clone(),
            Some(Value::Object(v)) => v.clone(),
            Some(_) => return Err(invalid("`vision_config` is not an object".into())),
        };
        if object.contains_key("vision_config")
            && let Some(dim) = object.get("projection_dim").filter(|v| !v.is_null())
        {
            vision.insert("projection_dim".into(), dim.clone());
        }
        parse_config(Value::Object(vision), path, &[], Self::validate)
    }

    /// Checks sizes (non-zero, heads dividing the width, patches tiling the image), the
    /// attention dropout in `[0, 1)` and a positive epsilon.
    ///
    /// # Errors
    /// The first problem found, naming the field (the `config.json` key of the vision config).
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("projection_dim", self.projection_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        check_sizes(
            &sizes,
            &[
                ("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads),
                ("image_size", self.image_size, "patch_size", self.patch_size),
            ],
        )?;
        if !(0.0..1.0).contains(&self.attention_dropout) {
            return Err(ConfigProblem::new(
                "attention_dropout",
                format!("{} is outside [0, 1)", self.attention_dropout),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(ConfigProblem::new(
                "layer_norm_eps",
                format!("{} must be positive", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// Patches per image, `(image_size / patch_size)²`.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Builds a model with fresh (lazily initialised) weights on `device`, with HF's
    /// `visual_projection` (`[projection_dim, d]`, no bias) when `with_projection`
    /// (`CLIPVisionModelWithProjection`, or the vision half of `CLIPModel`).
    ///
    /// # Panics
    /// If the config is invalid (see [`validate`](Self::validate)).
    pub fn init(&self, with_projection: bool, device: &Device) -> ClipVisionModel {
        if let Err(problem) = self.validate() {
            panic!("invalid ClipVisionConfig: {problem}");
        }
        let norm = || LayerNormConfig::new(self.hidden_size).with_epsilon(self.layer_norm_eps);
        ClipVisionModel {
            embeddings: ClipVisionEmbeddingsConfig::from_clip(self).init(device),
            pre_layrnorm: norm().init(device),
            encoder: ClipEncoderConfig::from_clip(self).init(device),
            post_layernorm: norm().init(device),
            visual_projection: with_projection.then(|| {
                LinearConfig::new(self.hidden_size, self.projection_dim)
                    .with_bias(false)
                    .init(device)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field_at_fault() {
        assert_eq!(ClipVisionConfig::default().validate(), Ok(()));
        let c = ClipVisionConfig { attention_dropout: 1.5, ..Default::default() };
        let p = c.validate().unwrap_err();
        assert_eq!(p.field, "attention_dropout");
        assert_eq!(p.to_string(), "`attention_dropout` 1.5 is outside [0, 1)");
        let c = ClipVisionConfig { projection_dim: 0, ..Default::default() };
        assert_eq!(c.validate(), Err(ConfigProblem::new("projection_dim", "must be positive")));
    }

    #[test]
    fn from_file_reports_a_bad_vision_value_as_config_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let config = serde_json::json!({"vision_config": {"layer_norm_eps": -1.0}});
        std::fs::write(&path, config.to_string()).unwrap();
        match ClipVisionConfig::from_file(&path) {
            Err(ModelError::ConfigValue { path: p, problem }) => {
                assert_eq!(p, path);
                assert_eq!(problem, ConfigProblem::new("layer_norm_eps", "-1 must be positive"));
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        }
    }
}
