//! [`LlamaConfig`]: HF's `config.json` for Llama-family decoders (Llama 1/2/3, TinyLlama,
//! SmolLM, Mistral-style GQA configs without sliding windows, and Qwen2).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rope::RopeScaling;
use crate::error::{ConfigProblem, ModelError, Result};
use crate::loading::{check_sizes, read_json, require_fields};

/// The fields of `config.json` that have no default: a config without one of them is rejected
/// with [`ModelError::MissingConfigField`].
pub const REQUIRED_FIELDS: [&str; 5] =
    ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"];

/// Which HF architecture a config describes (`model_type`); it decides where the linear layers
/// have biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlamaFamily {
    /// `"llama"` (also TinyLlama, SmolLM, Llama 3): biases only where `attention_bias` /
    /// `mlp_bias` say.
    #[default]
    Llama,
    /// `"qwen2"`: `q_proj`, `k_proj` and `v_proj` always have a bias; `o_proj` and the MLP never.
    Qwen2,
}

/// One or several end-of-sequence token ids (HF allows both forms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids, any of which ends generation.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".into()
}

/// Integer fields, checked one by one so a wrong type is reported with the field's name (serde's
/// own message does not name it).
const INTEGER_FIELDS: [&str; 8] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
];
const NUMBER_FIELDS: [&str; 2] = ["rms_norm_eps", "rope_theta"];
const BOOL_FIELDS: [&str; 4] =
    ["attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"];

/// Checks the JSON types of the fields serde would otherwise reject without naming them. These
/// are problems of the JSON's form, not of a value's range, so they stay plain messages (reported
/// as [`ModelError::InvalidConfig`]).
fn check_field_types(value: &Value) -> std::result::Result<(), String> {
    let present = |name: &str| value.get(name).filter(|v| !v.is_null());
    for name in INTEGER_FIELDS {
        if let Some(v) = present(name).filter(|v| v.as_u64().is_none()) {
            return Err(format!("`{name}` must be a non-negative integer, got {v}"));
        }
    }
    for name in NUMBER_FIELDS {
        if let Some(v) = present(name).filter(|v| v.as_f64().is_none()) {
            return Err(format!("`{name}` must be a number, got {v}"));
        }
    }
    for name in BOOL_FIELDS {
        if let Some(v) = present(name).filter(|v| !v.is_boolean()) {
            return Err(format!("`{name}` must be true or false, got {v}"));
        }
    }
    if let Some(v) = present("hidden_act").filter(|v| !v.is_string()) {
        return Err(format!("`hidden_act` must be a string, got {v}"));
    }
    Ok(())
}

/// Configuration of a [`LlamaForCausalLM`](super::LlamaForCausalLM), read from (and with the
/// field names of) HF's `config.json` (`LlamaConfig` / `Qwen2Config`). Fields the model does not
/// use (`architectures`, `initializer_range`, `torch_dtype`, `use_cache`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `model_type`: `"llama"` (default) or `"qwen2"`.
    #[serde(default)]
    pub model_type: LlamaFamily,
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Width `d` of the hidden states.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention); must divide `num_attention_heads`.
    /// Default: `num_attention_heads` (multi-head attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head. Default: `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Feed-forward activation; only `"silu"` (SwiGLU) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// RMSNorm epsilon. Default `1e-6`.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base `θ`. Default `10000`.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE frequency scaling (`{"rope_type": "llama3", ...}` or `"linear"`); none by default.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was trained for. Default 2048. Not enforced (RoPE has no
    /// table), only reported.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Llama: biases on `q/k/v/o_proj`. Ignored for Qwen2. Default false.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: biases on `gate/up/down_proj`. Ignored for Qwen2. Default false.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Whether `lm_head` shares `embed_tokens`' weight. Default false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id, if any.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token id(s): generation stops at any of them.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Qwen2 sliding-window attention; only `false` (full attention) is supported.
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl LlamaConfig {
    /// A plain Llama config with the given sizes and HF's defaults for everything else
    /// (multi-head attention, no biases, untied head, no RoPE scaling).
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
    ) -> Self {
        Self {
            model_type: LlamaFamily::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: default_hidden_act(),
            rms_norm_eps: default_rms_norm_eps(),
            rope_theta: default_rope_theta(),
            rope_scaling: None,
            max_position_embeddings: default_max_position_embeddings(),
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            use_sliding_window: false,
        }
    }

    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] if the file cannot be read; [`ModelError::MissingConfigField`] naming
    /// the first absent field of [`REQUIRED_FIELDS`]; [`ModelError::InvalidConfig`] for
    /// malformed JSON, a value of the wrong type, an unsupported `model_type` or
    /// `rope_scaling.rope_type`, or an incomplete `rope_scaling` (the message names the field);
    /// [`ModelError::ConfigValue`] for a value [`validate`](Self::validate) rejects.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        Self::from_json(&value, path)
    }

    /// Parses and validates an already-read `config.json` (`path` only names it in errors).
    ///
    /// # Errors
    /// As [`from_file`](Self::from_file), except I/O.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        require_fields(value, path, &REQUIRED_FIELDS)?;
        let invalid =
            |message: String| ModelError::InvalidConfig { path: path.to_path_buf(), message };
        if let Some(model_type) = value.get("model_type") {
            match model_type.as_str() {
                Some("llama" | "qwen2") => {}
                _ => {
                    return Err(invalid(format!(
                        "`model_type` {model_type} is not supported (\"llama\" or \"qwen2\")"
                    )));
                }
            }
        }
        let bad_value = |problem| ModelError::config_value(path, problem);
        if let Some(scaling) = value.get("rope_scaling").filter(|v| !v.is_null()) {
            RopeScaling::parse_unchecked(scaling)
                .map_err(invalid)?
                .validate()
                .map_err(bad_value)?;
        }
        check_field_types(value).map_err(invalid)?;
        let config: Self =
            serde_json::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(bad_value)?;
        Ok(config)
    }

    /// Checks sizes (non-zero, heads dividing evenly, `num_key_value_heads` dividing
    /// `num_attention_heads`, an even `head_dim`), a positive epsilon and θ, the activation, the
    /// RoPE scaling and sliding windows.
    ///
    /// # Errors
    /// The first problem found, naming the field (the `config.json` key).
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        check_sizes(&sizes, &[])?;
        if self.num_key_value_heads == Some(0) {
            return Err(ConfigProblem::new("num_key_value_heads", "must be positive"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads()) {
            return Err(ConfigProblem::new(
                "num_attention_heads",
                format!(
                    "{} is not a multiple of `num_key_value_heads` {}",
                    self.num_attention_heads,
                    self.num_key_value_heads()
                ),
            ));
        }
        match self.head_dim {
            Some(0) => return Err(ConfigProblem::new("head_dim", "must be positive")),
            Some(_) => {}
            None if !self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                return Err(ConfigProblem::new(
                    "hidden_size",
                    format!(
                        "{} is not a multiple of `num_attention_heads` {} (and no `head_dim` is \
                         given)",
                        self.hidden_size, self.num_attention_heads
                    ),
                ));
            }
            None => {}
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigProblem::new(
                "head_dim",
                format!("{} must be even for RoPE", self.head_dim()),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(ConfigProblem::new(
                "hidden_act",
                format!("\"{}\" is not supported (only \"silu\")", self.hidden_act),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(ConfigProblem::new(
                "rms_norm_eps",
                format!("{} must be positive", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ConfigProblem::new(
                "rope_theta",
                format!("{} must be greater than 1", self.rope_theta),
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        if self.use_sliding_window {
            return Err(ConfigProblem::new(
                "use_sliding_window",
                "true is not supported (full attention only)",
            ));
        }
        Ok(())
    }

    /// Key/value heads (`num_key_value_heads`, or `num_attention_heads` when absent).
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head (`head_dim`, or `hidden_size / num_attention_heads` when absent).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether `q_proj`, `k_proj`, `v_proj` have biases.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type {
            LlamaFamily::Llama => self.attention_bias,
            LlamaFamily::Qwen2 => true,
        }
    }

    /// Whether `o_proj` has a bias.
    pub fn o_bias(&self) -> bool {
        match self.model_type {
            LlamaFamily::Llama => self.attention_bias,
            LlamaFamily::Qwen2 => false,
        }
    }

    /// Whether the MLP projections have biases.
    pub fn mlp_bias(&self) -> bool {
        match self.model_type {
            LlamaFamily::Llama => self.mlp_bias,
            LlamaFamily::Qwen2 => false,
        }
    }

    /// The end-of-sequence ids (empty when the config has none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig::new(32, 16, 24, 2, 4)
    }

    fn problem(edit: impl FnOnce(&mut LlamaConfig)) -> ConfigProblem {
        let mut config = tiny();
        edit(&mut config);
        config.validate().unwrap_err()
    }

    #[test]
    fn validate_names_the_field_at_fault() {
        assert_eq!(tiny().validate(), Ok(()));
        let p = problem(|c| c.num_key_value_heads = Some(0));
        assert_eq!(p, ConfigProblem::new("num_key_value_heads", "must be positive"));
        // A ragged GQA grouping is reported on the heads it must divide, as the message reads.
        let p = problem(|c| {
            c.num_attention_heads = 12;
            c.hidden_size = 48;
            c.num_key_value_heads = Some(5);
        });
        assert_eq!(p.field, "num_attention_heads");
        assert_eq!(
            p.to_string(),
            "`num_attention_heads` 12 is not a multiple of `num_key_value_heads` 5"
        );
        let p = problem(|c| c.hidden_act = "gelu".into());
        assert_eq!(p.field, "hidden_act");
        assert_eq!(p.to_string(), "`hidden_act` \"gelu\" is not supported (only \"silu\")");
        let p = problem(|c| c.head_dim = Some(7));
        assert_eq!(
            (p.field.as_str(), p.to_string()),
            ("head_dim", "`head_dim` 7 must be even for RoPE".into())
        );
        let p = problem(|c| c.hidden_size = 18);
        assert_eq!(p.field, "hidden_size");
        assert_eq!(
            p.to_string(),
            "`hidden_size` 18 is not a multiple of `num_attention_heads` 4 (and no `head_dim` is given)"
        );
        assert_eq!(problem(|c| c.vocab_size = 0).field, "vocab_size");
        assert_eq!(problem(|c| c.rope_theta = 1.0).field, "rope_theta");
        assert_eq!(problem(|c| c.rms_norm_eps = f64::NAN).field, "rms_norm_eps");
        assert_eq!(problem(|c| c.use_sliding_window = true).field, "use_sliding_window");
        let p = problem(|c| c.rope_scaling = Some(RopeScaling::Linear { factor: 0.0 }));
        assert_eq!(p.field, "rope_scaling.factor");
    }

    #[test]
    #[should_panic(expected = "invalid LlamaConfig: `head_dim` 7 must be even for RoPE")]
    fn init_panics_with_the_problem() {
        let mut config = tiny();
        config.head_dim = Some(7);
        config.init(true, &burn::tensor::Device::default());
    }

    fn load(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Result<LlamaConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut value = serde_json::to_value(tiny()).unwrap();
        edit(value.as_object_mut().unwrap());
        std::fs::write(&path, value.to_string()).unwrap();
        LlamaConfig::from_file(&path)
    }

    #[test]
    fn from_file_reports_bad_values_as_config_value() {
        assert_eq!(load(|_| {}).unwrap(), tiny());
        let value_error = |edit: fn(&mut serde_json::Map<String, Value>)| match load(edit) {
            Err(ModelError::ConfigValue { path, problem }) => {
                assert!(path.ends_with("config.json"), "{path:?}");
                problem
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        };
        let p = value_error(|c| {
            c.insert("num_key_value_heads".into(), 0.into());
        });
        assert_eq!(p.field, "num_key_value_heads");
        let p = value_error(|c| {
            c.insert("rms_norm_eps".into(), (-1.0).into());
        });
        assert_eq!(p, ConfigProblem::new("rms_norm_eps", "-1 must be positive"));
        // A RoPE scaling of the right form but with a bad value is a value problem too.
        let p = value_error(|c| {
            c.insert("rope_scaling".into(), serde_json::json!({"type": "linear", "factor": -2.0}));
        });
        assert_eq!(p.field, "rope_scaling.factor");
        // The same text as before the problem was structured.
        let err = load(|c| {
            c.insert("hidden_act".into(), "gelu".into());
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("config.json: `hidden_act` \"gelu\" is not supported (only \"silu\")"),
            "{err}"
        );
    }

    #[test]
    fn from_file_reports_bad_types_and_forms_as_invalid_config() {
        let invalid = |edit: fn(&mut serde_json::Map<String, Value>)| match load(edit) {
            Err(ModelError::InvalidConfig { message, .. }) => message,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        let m = invalid(|c| {
            c.insert("hidden_size".into(), "sixteen".into());
        });
        assert!(m.starts_with("`hidden_size` must be a non-negative integer"), "{m}");
        let m = invalid(|c| {
            c.insert("model_type".into(), "mistral".into());
        });
        assert!(m.starts_with("`model_type`"), "{m}");
        let m = invalid(|c| {
            c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "llama3"}));
        });
        assert!(m.starts_with("`rope_scaling.factor`"), "{m}");
    }
}
