//! The error type of `emloc-models`: loading configs, checkpoints and tokenizers, and running
//! the models on text.

use std::path::PathBuf;

/// Result alias used across `emloc-models`.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// A config value that is out of range or unsupported: which field, and what is wrong with it.
///
/// Returned by the zoo configs' `validate` methods (e.g.
/// [`LlamaConfig::validate`](crate::llama::LlamaConfig::validate)); loading a config file
/// wraps it in [`ModelError::ConfigValue`] with the file's path. Displays as
/// `` `field` problem ``, e.g. `` `head_dim` 7 must be even for RoPE ``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {problem}")]
pub struct ConfigProblem {
    /// The field (JSON key) at fault, e.g. `num_key_value_heads` or `rope_scaling.factor`.
    pub field: String,
    /// What is wrong with it, e.g. `must be positive` (the sentence after the field's name).
    pub problem: String,
}

impl ConfigProblem {
    /// A problem with `field`: `problem` is the rest of the sentence after the field's name.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }
}

/// Everything that can go wrong while loading or running a model of the zoo, named so a caller
/// can match on it and a user can act on the message (every variant names the file or the keys).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An I/O error, with the file it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file the model directory must contain is absent.
    #[error("{dir}: no {expected} found")]
    MissingFile {
        /// The model directory.
        dir: PathBuf,
        /// What was looked for, e.g. `model.safetensors or model.safetensors.index.json`.
        expected: String,
    },
    /// A required field is absent from a JSON config.
    #[error("{path}: required field `{field}` is missing")]
    MissingConfigField {
        /// The config file.
        path: PathBuf,
        /// The missing field.
        field: String,
    },
    /// A config could not be read as the model's config: the JSON does not parse, or a value
    /// has the wrong type or is not one the config can represent (an unknown `model_type` or
    /// enum value). A value of the right type that is out of range is a
    /// [`ConfigValue`](Self::ConfigValue).
    #[error("{path}: {message}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A config read from a file (`config.json`, GGUF metadata) has a value the config's
    /// `validate` rejects: out of range or unsupported.
    #[error("{path}: {problem}")]
    ConfigValue {
        /// The config file.
        path: PathBuf,
        /// The field at fault and what is wrong with it.
        #[source]
        problem: ConfigProblem,
    },
    /// A checkpoint file could not be read (malformed safetensors, bad shard index, ...).
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint does not fit the model. Every problem is listed, under the checkpoint's
    /// own (HF) key names.
    #[error(
        "checkpoint {path} does not fit the model: {}",
        format_key_problems(.missing, .unexpected, .invalid)
    )]
    KeyMismatch {
        /// The checkpoint (file, or directory for a sharded checkpoint).
        path: PathBuf,
        /// Keys the model needs that the checkpoint lacks.
        missing: Vec<String>,
        /// Keys in the checkpoint that the model has no place for.
        unexpected: Vec<String>,
        /// Keys present but unusable (wrong shape or dtype), with the reason.
        invalid: Vec<String>,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A line of a data file is malformed.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An input the model cannot take (a token id outside the vocabulary, mismatched shapes, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An error of the emloc core (emulation, LoRA, correction).
    #[error(transparent)]
    Emloc(#[from] emloc::EmlocError),
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// Wraps a [`ConfigProblem`] with the config file it was found in.
    pub fn config_value(path: impl Into<PathBuf>, problem: ConfigProblem) -> Self {
        Self::ConfigValue { path: path.into(), problem }
    }
}

fn format_key_problems(missing: &[String], unexpected: &[String], invalid: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing keys [{}]", missing.len(), missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("{} unexpected keys [{}]", unexpected.len(), unexpected.join(", ")));
    }
    if !invalid.is_empty() {
        parts.push(format!("{} unusable keys [{}]", invalid.len(), invalid.join("; ")));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn config_problem_displays_field_then_problem() {
        let problem = ConfigProblem::new("head_dim", "7 must be even for RoPE");
        assert_eq!(problem.to_string(), "`head_dim` 7 must be even for RoPE");
    }

    #[test]
    fn config_value_displays_like_invalid_config_and_keeps_the_problem_as_source() {
        let problem = ConfigProblem::new("rms_norm_eps", "0 must be positive");
        let err = ModelError::config_value("m/config.json", problem.clone());
        let old = ModelError::InvalidConfig {
            path: "m/config.json".into(),
            message: "`rms_norm_eps` 0 must be positive".into(),
        };
        assert_eq!(err.to_string(), old.to_string());
        let source = err.source().and_then(|s| s.downcast_ref::<ConfigProblem>());
        assert_eq!(source, Some(&problem));
    }
}
