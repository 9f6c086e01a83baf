//! `adapter_config.json`: PEFT's LoRA configuration, its validation and the features emloc
//! refuses rather than silently ignores.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::targets::{Patterns, TargetModules, compile_lenient, compile_patterns, resolve};
use super::*;
use crate::error::{EmlocError, Result};

pub(super) fn default_bias() -> String {
    "none".to_owned()
}

/// Older PEFT versions may write `null` for the pattern maps.
pub(super) fn null_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The subset of PEFT's `LoraConfig` that emloc uses. Other fields in files are ignored on
/// read; fields missing from a file take PEFT's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// Adapter kind; only `"LORA"` is supported.
    pub peft_type: String,
    /// Default LoRA rank.
    pub r: usize,
    /// Default LoRA alpha; the update is scaled by `alpha / r` (or `alpha / sqrt(r)`).
    pub lora_alpha: f64,
    /// Which modules carry an adapter.
    pub target_modules: TargetModules,
    /// Dropout on the LoRA input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised LoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which biases are trained; only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Whether the base weight is stored `[in, out]` (GPT-2 Conv1D); unsupported, must be false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// The base model the adapter was trained on (hub id or path), if known.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT task type, e.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Whether the adapter is frozen for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Per-module rank overrides, keyed by regex (PEFT's rule, see [`Patterns`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, keyed by regex (PEFT's rule, see [`Patterns`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl PeftConfig {
    /// A LoRA config with PEFT's defaults for everything but rank, alpha and targets.
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> Self {
        Self {
            peft_type: LORA_TYPE.to_owned(),
            r,
            lora_alpha,
            target_modules: TargetModules::List(target_modules),
            lora_dropout: 0.0,
            use_rslora: false,
            bias: default_bias(),
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            task_type: None,
            // PEFT's save_pretrained writes true, so saved adapters look like PEFT's.
            inference_mode: true,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    /// `rank_pattern` and `alpha_pattern` compiled once, to resolve many paths.
    ///
    /// Fails with [`EmlocError::InvalidConfig`] naming the first key that is not a valid regex.
    pub fn patterns(&self) -> Result<Patterns<'_>> {
        Ok(Patterns {
            config: self,
            ranks: compile_patterns("rank_pattern", &self.rank_pattern)?,
            alphas: compile_patterns("alpha_pattern", &self.alpha_pattern)?,
        })
    }

    /// The rank of the layer at `path` with PEFT's rule (see [`Patterns`]), else `r`.
    ///
    /// Compiles the patterns on every call (use [`PeftConfig::patterns`] in loops); a key that
    /// is not a valid regex matches nothing ([`PeftConfig::validate`] rejects such configs).
    pub fn rank_for(&self, path: &str) -> usize {
        resolve(&compile_lenient(&self.rank_pattern), &self.rank_pattern, path).unwrap_or(self.r)
    }

    /// The alpha of the layer at `path`, resolved like [`PeftConfig::rank_for`] from
    /// `alpha_pattern`, else `lora_alpha`.
    pub fn alpha_for(&self, path: &str) -> f64 {
        resolve(&compile_lenient(&self.alpha_pattern), &self.alpha_pattern, path)
            .unwrap_or(self.lora_alpha)
    }

    /// The factor the LoRA update `B A x` is multiplied by at `path`: `alpha / r`, or
    /// `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, path: &str) -> f64 {
        crate::nn::lora_scale(self.alpha_for(path), self.rank_for(path), self.use_rslora)
    }

    /// Checks that emloc supports this config: LoRA, no bias training, no `fan_in_fan_out`,
    /// positive ranks, finite alphas and a valid target regex. Fails with
    /// [`EmlocError::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(EmlocError::InvalidConfig(msg));
        if self.peft_type != LORA_TYPE {
            return invalid(format!(
                "peft_type `{}` is not supported (only `{LORA_TYPE}`)",
                self.peft_type
            ));
        }
        if self.fan_in_fan_out {
            return invalid("fan_in_fan_out = true is not supported".to_owned());
        }
        if self.bias != "none" {
            return invalid(format!("bias `{}` is not supported (only `none`)", self.bias));
        }
        if self.r == 0 {
            return invalid("LoRA rank r must be at least 1".to_owned());
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return invalid(format!("rank_pattern `{key}` must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return invalid(format!("lora_alpha {} is not finite", self.lora_alpha));
        }
        if let Some((key, alpha)) = self.alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            return invalid(format!("alpha_pattern `{key}` = {alpha} is not finite"));
        }
        if !(0.0..=1.0).contains(&self.lora_dropout) {
            return invalid(format!("lora_dropout {} is outside [0, 1]", self.lora_dropout));
        }
        self.patterns()?;
        self.target_modules.matcher().map(|_| ())
    }
}

/// Parses and validates the text of a [`CONFIG_FILE`] found at `config_path`.
pub(super) fn parse_config(text: &str, config_path: &Path) -> Result<PeftConfig> {
    let config: PeftConfig = serde_json::from_str(text).map_err(|e| EmlocError::AdapterConfig {
        path: config_path.to_owned(),
        message: e.to_string(),
    })?;
    config.validate().map_err(|e| at_config_file(config_path, e))?;
    // The typed parse succeeded, so the text is a JSON object.
    let fields: BTreeMap<String, Value> = serde_json::from_str(text).unwrap_or_default();
    if let Some((feature, value)) = unsupported_feature(&fields) {
        return Err(EmlocError::UnsupportedPeftFeature {
            path: config_path.to_owned(),
            feature: feature.to_owned(),
            value: value.to_string(),
        });
    }
    Ok(config)
}

/// PEFT `LoraConfig` fields that emloc does not implement, each with the test that its value is
/// inert (PEFT's default, or a value with no effect on the adapted model's outputs). Fields
/// that only affect training (dropout, VeLoRA's backward pass, Megatron sharding) or
/// initialisation of A and B are not listed.
pub(super) const UNSUPPORTED_FEATURES: &[(&str, IsInert)] = &[
    // Extra fully trained modules (e.g. a classifier head) whose weights emloc would drop.
    ("modules_to_save", is_null_or_empty),
    ("use_dora", is_false),
    ("lora_bias", is_false),
    // Restricts the targets to some layer indices; emloc matches target_modules only.
    ("layers_to_transform", Value::is_null),
    ("exclude_modules", is_null_or_empty),
    ("trainable_token_indices", is_null_or_empty),
    ("layer_replication", is_null_or_empty),
    ("target_parameters", is_null_or_empty),
    ("alora_invocation_tokens", is_null_or_empty),
    ("use_qalora", is_false),
    ("use_bdlora", Value::is_null),
    ("arrow_config", Value::is_null),
    ("kasa_config", Value::is_null),
    ("monteclora_config", Value::is_null),
    // These inits rewrite the base weights (W − B₀A₀, or a quantized W), so the adapter only
    // fits the rewritten model; PEFT can convert such adapters to plain LoRA.
    ("init_lora_weights", init_keeps_base_weights),
];

/// Whether a config field's value leaves the feature off.
pub(super) type IsInert = fn(&Value) -> bool;

pub(super) fn is_null_or_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

pub(super) fn is_false(v: &Value) -> bool {
    matches!(v, Value::Null | Value::Bool(false))
}

pub(super) fn init_keeps_base_weights(v: &Value) -> bool {
    let Some(init) = v.as_str() else { return true };
    !["pissa", "olora", "corda", "loftq", "lora_ga"].iter().any(|m| init.starts_with(m))
}

/// The first field of a config file that sets a feature emloc does not implement.
pub(super) fn unsupported_feature(
    fields: &BTreeMap<String, Value>,
) -> Option<(&'static str, &Value)> {
    UNSUPPORTED_FEATURES
        .iter()
        .find_map(|(name, inert)| fields.get(*name).filter(|v| !inert(v)).map(|v| (*name, v)))
}
