//! [`BertConfig`]: HF's `config.json` for `BertModel`.

use std::path::Path;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{BertEmbeddingsConfig, BertEncoderConfig, BertModel, BertPoolerConfig};
use crate::error::{ConfigProblem, Result};
use crate::loading::{check_sizes, parse_config, read_json};

/// The activation of the intermediate (feed-forward) layer, HF's `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU, `x Φ(x)` (HF `"gelu"`).
    #[default]
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

/// The fields of `config.json` that have no default: a config without one of them is rejected
/// with [`ModelError::MissingConfigField`].
///
/// [`ModelError::MissingConfigField`]: crate::ModelError::MissingConfigField
pub const REQUIRED_FIELDS: [&str; 6] = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
];

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// Configuration of a [`BertModel`], read from (and with the field names of) HF's
/// `config.json`. Fields HF's `BertConfig` has but the encoder does not use (`architectures`,
/// `initializer_range`, `use_cache`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (rows of `word_embeddings`).
    pub vocab_size: usize,
    /// Width `d` of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest sequence (rows of `position_embeddings`).
    pub max_position_embeddings: usize,
    /// Number of token types (segments). Default 2.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon. Default `1e-12`.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Feed-forward activation. Default exact GELU.
    #[serde(default)]
    pub hidden_act: HiddenAct,
    /// Dropout after embeddings and sublayers (active only when training). Default 0.1.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (active only when training). Default 0.1.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Id of the padding token. Default 0.
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    /// Only `"absolute"` (learned position embeddings) is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

impl BertConfig {
    /// A config with the given sizes and HF's defaults for everything else.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        intermediate_size: usize,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            max_position_embeddings,
            type_vocab_size: default_type_vocab_size(),
            layer_norm_eps: default_layer_norm_eps(),
            hidden_act: HiddenAct::default(),
            hidden_dropout_prob: default_dropout(),
            attention_probs_dropout_prob: default_dropout(),
            pad_token_id: Some(0),
            position_embedding_type: default_position_embedding_type(),
        }
    }

    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read; [`ModelError::MissingConfigField`] naming
    /// the first absent field of [`REQUIRED_FIELDS`]; [`ModelError::InvalidConfig`] for
    /// malformed JSON or a value of the wrong type; [`ModelError::ConfigValue`] for a value
    /// [`validate`](Self::validate) rejects.
    ///
    /// [`ModelError::ConfigValue`]: crate::ModelError::ConfigValue
    /// [`ModelError::InvalidConfig`]: crate::ModelError::InvalidConfig
    /// [`ModelError::Io`]: crate::ModelError::Io
    /// [`ModelError::MissingConfigField`]: crate::ModelError::MissingConfigField
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        parse_config(read_json(path)?, path, &REQUIRED_FIELDS, Self::validate)
    }

    /// Checks sizes (non-zero, heads dividing the width), dropout probabilities in `[0, 1)`,
    /// a positive epsilon and the position embedding type.
    ///
    /// # Errors
    /// The first problem found, naming the field (the `config.json` key).
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        check_sizes(
            &sizes,
            &[("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)],
        )?;
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(ConfigProblem::new(name, format!("{p} is outside [0, 1)")));
            }
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(ConfigProblem::new(
                "layer_norm_eps",
                format!("{} must be positive", self.layer_norm_eps),
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(ConfigProblem::new(
                "position_embedding_type",
                format!(
                    "\"{}\" is not supported (only \"absolute\")",
                    self.position_embedding_type
                ),
            ));
        }
        Ok(())
    }

    /// Width of one attention head, `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Builds a model with fresh (lazily initialised) weights on `device`, with a pooler when
    /// `add_pooling_layer` (HF's `BertModel(config, add_pooling_layer)`).
    ///
    /// # Panics
    /// If the config is invalid (see [`validate`](Self::validate)).
    pub fn init(&self, add_pooling_layer: bool, device: &Device) -> BertModel {
        if let Err(problem) = self.validate() {
            panic!("invalid BertConfig: {problem}");
        }
        BertModel {
            embeddings: BertEmbeddingsConfig::from_bert(self).init(device),
            encoder: BertEncoderConfig::from_bert(self).init(device),
            pooler: add_pooling_layer.then(|| BertPoolerConfig::from_bert(self).init(device)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ModelError;

    fn tiny() -> BertConfig {
        BertConfig::new(32, 16, 2, 4, 24, 64)
    }

    #[test]
    fn validate_names_the_field_at_fault() {
        assert_eq!(tiny().validate(), Ok(()));
        let mut c = tiny();
        c.hidden_size = 18;
        let p = c.validate().unwrap_err();
        assert_eq!(p.field, "hidden_size");
        assert_eq!(p.to_string(), "`hidden_size` 18 is not a multiple of `num_attention_heads` 4");
        let mut c = tiny();
        c.attention_probs_dropout_prob = 1.0;
        assert_eq!(
            c.validate(),
            Err(ConfigProblem::new("attention_probs_dropout_prob", "1 is outside [0, 1)"))
        );
        let mut c = tiny();
        c.position_embedding_type = "relative_key".into();
        let p = c.validate().unwrap_err();
        assert_eq!(p.field, "position_embedding_type");
        assert_eq!(
            p.to_string(),
            "`position_embedding_type` \"relative_key\" is not supported (only \"absolute\")"
        );
    }

    #[test]
    fn from_file_reports_a_bad_value_as_config_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut value = serde_json::to_value(tiny()).unwrap();
        value["layer_norm_eps"] = 0.0.into();
        std::fs::write(&path, value.to_string()).unwrap();
        match BertConfig::from_file(&path) {
            Err(ModelError::ConfigValue { path: p, problem }) => {
                assert_eq!(p, path);
                assert_eq!(problem, ConfigProblem::new("layer_norm_eps", "0 must be positive"));
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        }
    }
}
