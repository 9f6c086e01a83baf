//! The error type shared by every fallible emloc operation.

use std::path::PathBuf;

/// Result alias used across emloc.
pub type Result<T, E = EmlocError> = std::result::Result<T, E>;

/// Everything that can go wrong in emloc, named so a caller can match on it and a user can act on
/// the message. Validation errors are raised before any expensive work starts.
#[derive(Debug, thiserror::Error)]
pub enum EmlocError {
    /// A keep-ratio outside the open interval (0, 1).
    #[error("keep-ratio {ratio} for rule `{rule}` is outside (0, 1)")]
    InvalidRatio {
        /// The rule (regex) the ratio belongs to.
        rule: String,
        /// The offending ratio.
        ratio: f64,
    },
    /// A rank of zero or above `min(d_in, d_out)`.
    #[error("rank {rank} for layer `{layer}` must be in 1..={max}")]
    InvalidRank {
        /// Module path of the layer.
        layer: String,
        /// Requested rank.
        rank: usize,
        /// Largest admissible rank for this layer.
        max: usize,
    },
    /// The calibration iterator yielded no batch, or no matched layer saw a token.
    #[error("calibration set is empty: {0}")]
    EmptyCalibration(String),
    /// A selected layer saw no calibration tokens (it is unused by the forward pass, or it is a
    /// stock `burn::nn::Linear`, which cannot record statistics).
    #[error(
        "layer `{layer}` saw no calibration tokens; only emloc::nn::Linear layers that the \
         calibration forward pass reaches can be emulated (stock burn::nn::Linear cannot record \
         input statistics)"
    )]
    NoCalibrationTokens {
        /// Module path of the layer.
        layer: String,
    },
    /// NaN or infinity found in a tensor.
    #[error("non-finite value (NaN or Inf) in the {what} of layer `{layer}`")]
    NonFinite {
        /// Module path of the layer.
        layer: String,
        /// Which tensor: "weight", "Gram matrix", "activations", "lora_A", ...
        what: String,
    },
    /// A tensor does not have the shape its context requires.
    #[error("shape mismatch for `{name}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Layer path or key of the tensor.
        name: String,
        /// Expected dimensions.
        expected: Vec<usize>,
        /// Actual dimensions.
        found: Vec<usize>,
    },
    /// No layer of the model matched the selection (regex rules or target list).
    #[error("no linear layer matched {0}")]
    NoMatchingLayers(String),
    /// A configuration value is invalid (bad regex, LoRA rank 0, negative alpha, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The adapter's tensors do not fit the model or its own config. Every problem is listed.
    #[error("adapter does not fit: {}", format_key_problems(.missing, .unexpected, .misshaped))]
    AdapterKeys {
        /// Keys the model needs that the adapter lacks.
        missing: Vec<String>,
        /// Keys in the adapter that the model has no place for.
        unexpected: Vec<String>,
        /// Keys present with the wrong shape, as `key: expected [..], found [..]`.
        misshaped: Vec<String>,
    },
    /// `adapter_config.json` is missing, malformed or inconsistent with the weights.
    #[error("adapter config {path}: {message}")]
    AdapterConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The adapter uses a PEFT feature that emloc does not implement and that changes the
    /// model's outputs (e.g. `modules_to_save`, DoRA), so loading it without the feature would
    /// silently give other results than PEFT.
    #[error(
        "{path}: PEFT feature `{feature}` ({value}) is not supported by emloc; the adapter \
         cannot be loaded without changing the model's outputs"
    )]
    UnsupportedPeftFeature {
        /// The config or weights file that uses it.
        path: PathBuf,
        /// The `LoraConfig` field (or tensor-key kind), e.g. `modules_to_save`.
        feature: String,
        /// The value found (JSON), or the tensor key.
        value: String,
    },
    /// A safetensors file could not be parsed or written.
    #[error("safetensors file {path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A saved emulator directory is malformed or does not fit the model.
    #[error("emulator file {path}: {message}")]
    EmulatorFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An I/O error, with the file it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A Cholesky factorization ([`crate::ops::cholesky`]) met a pivot `L_jj²` that is not
    /// finite, not positive, or not above `pivot_tolerance · mean(diag G)`, with every damping
    /// it was allowed to try.
    #[error(
        "Cholesky factorization failed at pivot {pivot} (L_jj² = {value:e}, must exceed \
         {threshold:e}) after {attempts} attempt(s), last relative damping {relative_damping:e}"
    )]
    NotPositiveDefinite {
        /// The first rejected pivot (0-based) of the last attempt.
        pivot: usize,
        /// Its value `L_jj²` (the Schur complement's diagonal entry).
        value: f64,
        /// The acceptance threshold, `pivot_tolerance · mean(diag G)`.
        threshold: f64,
        /// Damping of the last attempt, relative to `mean(diag G)`.
        relative_damping: f64,
        /// Factorizations tried.
        attempts: usize,
    },
    /// A device this build cannot run on (its Burn backend feature is off).
    #[error("device `{device}` is not in this build: rebuild with `--features {feature}`")]
    DeviceUnavailable {
        /// The device asked for.
        device: String,
        /// The cargo feature that brings it.
        feature: String,
    },
    /// Host linear algebra failed (eigen decomposition or SVD did not converge).
    #[error("linear algebra failed for layer `{layer}`: {message}")]
    Linalg {
        /// Module path of the layer.
        layer: String,
        /// What failed.
        message: String,
    },
}

fn format_key_problems(missing: &[String], unexpected: &[String], misshaped: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing keys [{}]", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected keys [{}]", unexpected.join(", ")));
    }
    if !misshaped.is_empty() {
        parts.push(format!("mis-shaped keys [{}]", misshaped.join("; ")));
    }
    parts.join("; ")
}

impl EmlocError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
