//! [`ViTConfig`]: HF's `config.json` for `ViTModel`.

use std::path::Path;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{ViTEmbeddingsConfig, ViTEncoderConfig, ViTModel, ViTPoolerConfig};
use crate::bert::HiddenAct;
use crate::error::{ConfigProblem, Result};
use crate::loading::{check_sizes, parse_config, read_json};

/// The fields of `config.json` that have no default: a config without one of them is rejected
/// with [`ModelError::MissingConfigField`].
///
/// [`ModelError::MissingConfigField`]: crate::ModelError::MissingConfigField
pub const REQUIRED_FIELDS: [&str; 6] = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
];

fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_num_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

/// Configuration of a [`ViTModel`], read from (and with the field names of) HF's `config.json`
/// (`ViTConfig`). Unused fields (`architectures`, `initializer_range`, `encoder_stride`,
/// `id2label`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    /// Width `d` of the token states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Side of the (square) input image in pixels.
    pub image_size: usize,
    /// Side of a (square) patch; must divide `image_size`.
    pub patch_size: usize,
    /// Input channels. Default 3.
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Feed-forward activation. Default exact GELU.
    #[serde(default)]
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon. Default `1e-12`.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Dropout after embeddings and sublayers (training only). Default 0.
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (training only). Default 0.
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Biases on query, key and value. Default true.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
}

impl ViTConfig {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read; [`ModelError::MissingConfigField`] naming
    /// the first absent field of [`REQUIRED_FIELDS`]; [`ModelError::InvalidConfig`] for
    /// malformed JSON or a value of the wrong type; [`ModelError::ConfigValue`] for a value
    /// [`validate`](Self::validate) rejects (naming the field).
    ///
    /// [`ModelError::ConfigValue`]: crate::ModelError::ConfigValue
    /// [`ModelError::InvalidConfig`]: crate::ModelError::InvalidConfig
    /// [`ModelError::Io`]: crate::ModelError::Io
    /// [`ModelError::MissingConfigField`]: crate::ModelError::MissingConfigField
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        parse_config(read_json(path)?, path, &REQUIRED_FIELDS, Self::validate)
    }

    /// Checks sizes (non-zero, heads dividing the width, patches tiling the image), dropout
    /// probabilities in `[0, 1)` and a positive epsilon.
    ///
    /// # Errors
    /// The first problem found, naming the field (the `config.json` key).
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ];
        check_sizes(
            &sizes,
            &[
                ("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads),
                ("image_size", self.image_size, "patch_size", self.patch_size),
            ],
        )?;
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(ConfigProblem::new(name, format!("{p} is outside [0, 1)")));
            }
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

    /// Builds a model with fresh (lazily initialised) weights on `device`, with a pooler when
    /// `add_pooling_layer` (HF's `ViTModel(config, add_pooling_layer)`).
    ///
    /// # Panics
    /// If the config is invalid (see [`validate`](Self::validate)).
    pub fn init(&self, add_pooling_layer: bool, device: &Device) -> ViTModel {
        if let Err(problem) = self.validate() {
            panic!("invalid ViTConfig: {problem}");
        }
        ViTModel {
            embeddings: ViTEmbeddingsConfig::from_vit(self).init(device),
            encoder: ViTEncoderConfig::from_vit(self).init(device),
            layernorm: burn::nn::LayerNormConfig::new(self.hidden_size)
                .with_epsilon(self.layer_norm_eps)
                .init(device),
            pooler: add_pooling_layer.then(|| ViTPoolerConfig::from_vit(self).init(device)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::ModelError;

    fn tiny() -> serde_json::Value {
        json!({
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 24,
            "image_size": 8,
            "patch_size": 4,
        })
    }

    #[test]
    fn validate_names_the_field_at_fault() {
        let config: ViTConfig = serde_json::from_value(tiny()).unwrap();
        assert_eq!(config.validate(), Ok(()));
        let mut c = config.clone();
        c.patch_size = 3;
        let p = c.validate().unwrap_err();
        assert_eq!(p.field, "image_size");
        assert_eq!(p.to_string(), "`image_size` 8 is not a multiple of `patch_size` 3");
        let mut c = config;
        c.hidden_dropout_prob = -0.5;
        assert_eq!(
            c.validate(),
            Err(ConfigProblem::new("hidden_dropout_prob", "-0.5 is outside [0, 1)"))
        );
    }

    #[test]
    fn from_file_reports_a_bad_value_as_config_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut value = tiny();
        value["num_channels"] = 0.into();
        std::fs::write(&path, value.to_string()).unwrap();
        match ViTConfig::from_file(&path) {
            Err(ModelError::ConfigValue { problem, .. }) => {
                assert_eq!(problem, ConfigProblem::new("num_channels", "must be positive"));
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        }
    }
}
