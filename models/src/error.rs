//! The error type of `emloc-models`: loading configs, checkpoints and tokenizers, and running
//! the models on text.

use std::path::PathBuf;

/// Result alias used across `emloc-models`.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

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
    /// A JSON config could not be parsed, or a value in it is invalid or unsupported.
    #[error("{path}: {message}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
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
