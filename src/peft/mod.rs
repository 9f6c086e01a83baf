//! Hugging Face PEFT LoRA adapters on disk: `adapter_config.json` plus `adapter_model.safetensors`.
//!
//! The layout is PEFT's own, so an adapter trained here loads in `peft.PeftModel.from_pretrained`
//! and a PEFT LoRA adapter loads here. Tensors are keyed
//! `base_model.model.<module path>.lora_A.weight` (`[r, d_in]`) and `...lora_B.weight`
//! (`[d_out, r]`), i.e. PyTorch's `[out, in]` convention; a 2-D convolution's factors are PEFT's
//! Conv2d LoRA kernels, `lora_A` `[r, C_in, kh, kw]` and `lora_B` `[C_out, r, 1, 1]` (see
//! [`PeftLayer::kernel_size`]).
//!
//! Loading and fitting checks collect every problem before failing, so one error message tells
//! the user everything that is wrong with an adapter instead of one key per attempt.
//!
//! Files: `targets.rs` (which modules keys and patterns select), `config.rs`
//! (`adapter_config.json`), `weights.rs` (`adapter_model.safetensors`); the adapter type and its
//! directory I/O are here.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::atomic::write_atomic;
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;

mod config;
mod renumber;
mod targets;
#[cfg(test)]
mod tests;
mod unprune;
mod weights;

pub use config::PeftConfig;
use config::parse_config;
pub use targets::{Patterns, TargetModules};
pub(crate) use targets::{full_match_regex, module_name_matches};
pub use unprune::KeptFeatures;
pub(crate) use weights::f16_to_f32;
use weights::parse_weights;

/// File name of the adapter configuration inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

const KEY_PREFIX: &str = "base_model.model.";
const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";
const LORA_TYPE: &str = "LORA";

/// The safetensors key of a layer's `lora_A` factor (`[r, d_in]`).
pub fn lora_a_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}{A_SUFFIX}")
}

/// The safetensors key of a layer's `lora_B` factor (`[d_out, r]`).
pub fn lora_b_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}{B_SUFFIX}")
}

/// One layer's adapter factors, in PyTorch layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftLayer {
    /// Down-projection, `[r, d_in]`.
    pub lora_a: Matrix,
    /// Up-projection, `[d_out, r]`.
    pub lora_b: Matrix,
    /// `None` for a linear layer; `Some([kh, kw])` for a 2-D convolution (`emloc::nn::Conv2d`),
    /// whose factors PEFT stores as convolution kernels: `lora_A` `[r, C_in, kh, kw]` and
    /// `lora_B` `[C_out, r, 1, 1]`. `lora_a` is then the kernel flattened to
    /// `[r, d_in = C_in·kh·kw]` in `(c, i, j)` order, `lora_b` is `[C_out, r]`.
    pub kernel_size: Option<[usize; 2]>,
}

impl PeftLayer {
    /// A linear layer's factors: `lora_a` `[r, d_in]`, `lora_b` `[d_out, r]`.
    pub fn new(lora_a: Matrix, lora_b: Matrix) -> Self {
        Self { lora_a, lora_b, kernel_size: None }
    }

    /// A 2-D convolution's factors, flattened: `lora_a` `[r, C_in·kh·kw]`, `lora_b` `[C_out, r]`.
    pub fn conv2d(lora_a: Matrix, lora_b: Matrix, kernel_size: [usize; 2]) -> Self {
        Self { lora_a, lora_b, kernel_size: Some(kernel_size) }
    }

    /// The shape of `lora_A` in an adapter file: `[r, d_in]`, or `[r, C_in, kh, kw]`.
    pub fn lora_a_shape(&self) -> Vec<usize> {
        factor_shape(Factor::A, self.lora_a.rows, self.lora_a.cols, self.kernel_size)
    }

    /// The shape of `lora_B` in an adapter file: `[d_out, r]`, or `[C_out, r, 1, 1]`.
    pub fn lora_b_shape(&self) -> Vec<usize> {
        factor_shape(Factor::B, self.lora_b.rows, self.lora_b.cols, self.kernel_size)
    }
}

/// A factor's file shape from its flattened `[rows, cols]` and the layer's kernel.
fn factor_shape(
    factor: Factor,
    rows: usize,
    cols: usize,
    kernel: Option<[usize; 2]>,
) -> Vec<usize> {
    match (factor, kernel) {
        (_, None) => vec![rows, cols],
        (Factor::A, Some([kh, kw])) => vec![rows, cols / (kh * kw).max(1), kh, kw],
        (Factor::B, Some(_)) => vec![rows, cols, 1, 1],
    }
}

/// An adapter: its config and its layers keyed by module path (BTreeMap for deterministic order).
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    /// The PEFT config.
    pub config: PeftConfig,
    /// Factors per module path, e.g. `layers.0.attention.query`.
    pub layers: BTreeMap<String, PeftLayer>,
}

/// What a model offers: one adaptable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    /// Dot-joined module path.
    pub path: String,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// `Some([kh, kw])` for a 2-D convolution (whose `d_in` is `C_in·kh·kw`), `None` for a
    /// linear layer.
    pub kernel_size: Option<[usize; 2]>,
}

/// Which factor a safetensors key names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

impl Factor {
    fn name(self) -> &'static str {
        match self {
            Self::A => "lora_A",
            Self::B => "lora_B",
        }
    }
}

/// Splits a key into module path and factor; `None` for anything outside the LoRA grammar.
fn parse_key(key: &str) -> Option<(&str, Factor)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (path, factor) = if let Some(path) = rest.strip_suffix(A_SUFFIX) {
        (path, Factor::A)
    } else {
        (rest.strip_suffix(B_SUFFIX)?, Factor::B)
    };
    (!path.is_empty()).then_some((path, factor))
}

fn misshaped(key: &str, expected: impl std::fmt::Debug, found: impl std::fmt::Debug) -> String {
    format!("{key}: expected {expected:?}, found {found:?}")
}

fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys.dedup();
    keys
}

/// One `AdapterKeys` error for all problems, or `Ok` when there are none.
fn key_problems(
    missing: Vec<String>,
    unexpected: Vec<String>,
    misshaped: Vec<String>,
) -> Result<()> {
    if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
        return Ok(());
    }
    Err(EmlocError::AdapterKeys {
        missing: sorted(missing),
        unexpected: sorted(unexpected),
        misshaped: sorted(misshaped),
    })
}

/// Re-labels a config validation error with the file it concerns.
fn at_config_file(path: &Path, err: EmlocError) -> EmlocError {
    match err {
        EmlocError::InvalidConfig(message) => {
            EmlocError::AdapterConfig { path: path.to_owned(), message }
        }
        other => other,
    }
}

fn safetensors_error(path: &Path, message: impl Into<String>) -> EmlocError {
    EmlocError::Safetensors { path: path.to_owned(), message: message.into() }
}

impl PeftAdapter {
    /// Checks the adapter against its own config: every layer's `lora_A` is `[r, d_in]` and
    /// `lora_B` is `[d_out, r]` with `r == config.rank_for(path)`, every value is finite, and
    /// every path is targeted by `target_modules`.
    ///
    /// Fails with [`EmlocError::InvalidConfig`], [`EmlocError::ShapeMismatch`] or
    /// [`EmlocError::NonFinite`].
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        if self.layers.is_empty() {
            return Err(EmlocError::InvalidConfig("adapter has no layers".to_owned()));
        }
        let matcher = self.config.target_modules.matcher()?;
        let patterns = self.config.patterns()?;
        let mut untargeted = Vec::new();
        for (path, layer) in &self.layers {
            if path.is_empty() {
                return Err(EmlocError::InvalidConfig(
                    "adapter layer with an empty module path".to_owned(),
                ));
            }
            if !matcher.matches(path) {
                untargeted.push(path.as_str());
            }
            let rank = patterns.rank_for(path);
            let (a, b) = (&layer.lora_a, &layer.lora_b);
            for (m, key) in [(a, lora_a_key(path)), (b, lora_b_key(path))] {
                // The fields are public, so the row-major invariant is not guaranteed.
                if m.data.len() != m.rows.saturating_mul(m.cols) {
                    return Err(EmlocError::ShapeMismatch {
                        name: key,
                        expected: vec![m.rows, m.cols],
                        found: vec![m.data.len()],
                    });
                }
            }
            if a.rows != rank {
                return Err(EmlocError::ShapeMismatch {
                    name: lora_a_key(path),
                    expected: vec![rank, a.cols],
                    found: vec![a.rows, a.cols],
                });
            }
            if b.cols != rank {
                return Err(EmlocError::ShapeMismatch {
                    name: lora_b_key(path),
                    expected: vec![b.rows, rank],
                    found: vec![b.rows, b.cols],
                });
            }
            for (m, factor) in [(a, Factor::A), (b, Factor::B)] {
                if !m.is_finite() {
                    return Err(EmlocError::NonFinite {
                        layer: path.clone(),
                        what: factor.name().to_owned(),
                    });
                }
            }
            if let Some([kh, kw]) = layer.kernel_size
                && (kh == 0 || kw == 0 || a.cols % (kh * kw) != 0)
            {
                return Err(EmlocError::InvalidConfig(format!(
                    "layer `{path}`: lora_A has {} columns, which is not C_in·kh·kw for the kernel {kh}×{kw}",
                    a.cols
                )));
            }
            crate::nn::check_lora_rank(path, rank, a.cols, b.rows)?;
        }
        if !untargeted.is_empty() {
            return Err(EmlocError::InvalidConfig(format!(
                "target_modules {} does not match adapter layers [{}]",
                self.config.target_modules.describe(),
                untargeted.join(", ")
            )));
        }
        Ok(())
    }

    /// Writes the adapter to `dir` (created if missing) as PEFT does: [`WEIGHTS_FILE`] with F32
    /// tensors and `{"format": "pt"}` metadata, and a pretty-printed [`CONFIG_FILE`].
    ///
    /// The adapter is validated (see [`PeftAdapter::validate`]; config problems are reported as
    /// [`EmlocError::AdapterConfig`]) before anything touches the disk. Each file is replaced
    /// atomically, weights first, so a failure leaves the previous file intact.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        self.validate().map_err(|e| at_config_file(&config_path, e))?;

        // Serialise both files before writing either, so encoding errors cannot leave a half
        // updated directory.
        let weights = self.serialize_weights(&weights_path)?;
        let mut config = serde_json::to_string_pretty(&self.config).map_err(|e| {
            EmlocError::AdapterConfig { path: config_path.clone(), message: e.to_string() }
        })?;
        config.push('\n');

        fs::create_dir_all(dir).map_err(|e| EmlocError::io(dir, e))?;
        write_atomic(&weights_path, &weights)?;
        write_atomic(&config_path, config.as_bytes())
    }

    fn serialize_weights(&self, weights_path: &Path) -> Result<Vec<u8>> {
        let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .layers
            .iter()
            .flat_map(|(path, layer)| {
                [
                    (lora_a_key(path), &layer.lora_a, layer.lora_a_shape()),
                    (lora_b_key(path), &layer.lora_b, layer.lora_b_shape()),
                ]
            })
            .map(|(key, m, shape)| {
                let bytes = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (key, shape, bytes)
            })
            .collect();
        let views = buffers
            .iter()
            .map(|(key, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (key.as_str(), view))
                    .map_err(|e| safetensors_error(weights_path, format!("{key}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        // PEFT writes this metadata; transformers' loaders warn or refuse without it.
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| safetensors_error(weights_path, e.to_string()))
    }

    /// Reads the adapter in `dir`.
    ///
    /// Fails with [`EmlocError::Io`] for a missing or unreadable file,
    /// [`EmlocError::AdapterConfig`] for malformed JSON, an unsupported config or layers that
    /// `target_modules` does not cover, [`EmlocError::Safetensors`] for an unparsable weights
    /// file or a dtype other than F32/F16/BF16, [`EmlocError::ShapeMismatch`] for a tensor that
    /// is neither 2-D nor a convolution's 4-D kernel, [`EmlocError::NonFinite`] for NaN or Inf
    /// values, and one [`EmlocError::AdapterKeys`] listing every missing, unexpected and
    /// mis-shaped key.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&config_path).map_err(|e| EmlocError::io(&config_path, e))?;
        // The config is checked before the weights file is read, as before `from_parts` existed.
        parse_config(&text, &config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = fs::read(&weights_path).map_err(|e| EmlocError::io(&weights_path, e))?;
        Self::parse(&text, &config_path, &bytes, &weights_path)
    }

    /// Parses an adapter from the contents of its [`CONFIG_FILE`] and [`WEIGHTS_FILE`], as
    /// [`PeftAdapter::load`] does after reading them (same checks, same errors; the files are
    /// named by their plain names). The entry point of the fuzz target.
    pub fn from_parts(config_json: &str, weights: &[u8]) -> Result<Self> {
        Self::parse(config_json, Path::new(CONFIG_FILE), weights, Path::new(WEIGHTS_FILE))
    }

    fn parse(text: &str, config_path: &Path, bytes: &[u8], weights_path: &Path) -> Result<Self> {
        let config = parse_config(text, config_path)?;
        let layers = parse_weights(bytes, weights_path, &config)?;
        for (path, layer) in &layers {
            crate::nn::check_lora_rank(
                path,
                layer.lora_a.rows,
                layer.lora_a.cols,
                layer.lora_b.rows,
            )
            .map_err(|e| at_config_file(config_path, e))?;
        }

        let matcher =
            config.target_modules.matcher().map_err(|e| at_config_file(config_path, e))?;
        let untargeted: Vec<&str> =
            layers.keys().map(String::as_str).filter(|path| !matcher.matches(path)).collect();
        if !untargeted.is_empty() {
            return Err(EmlocError::AdapterConfig {
                path: config_path.to_owned(),
                message: format!(
                    "target_modules {} does not match adapter layers [{}]",
                    config.target_modules.describe(),
                    untargeted.join(", ")
                ),
            });
        }
        Ok(Self { config, layers })
    }

    /// Checks that the adapter fits a model offering `model_layers`: every adapter layer exists
    /// in the model with `lora_A` `[r, d_in]` and `lora_B` `[d_out, r]`, and every model layer
    /// that `target_modules` selects has an adapter layer.
    ///
    /// Fails with one [`EmlocError::AdapterKeys`] listing every problem (or
    /// [`EmlocError::InvalidConfig`] for an invalid target regex).
    pub fn check_fits(&self, model_layers: &[LayerShape]) -> Result<()> {
        let matcher = self.config.target_modules.matcher()?;
        let patterns = self.config.patterns()?;
        let model: HashMap<&str, &LayerShape> =
            model_layers.iter().map(|shape| (shape.path.as_str(), shape)).collect();
        let (mut missing, mut unexpected, mut wrong) = (Vec::new(), Vec::new(), Vec::new());

        for (path, layer) in &self.layers {
            let Some(shape) = model.get(path.as_str()) else {
                unexpected.push(lora_a_key(path));
                unexpected.push(lora_b_key(path));
                continue;
            };
            let rank = patterns.rank_for(path);
            // Compared in file shapes, so that a linear adapter does not fit a convolution (PEFT
            // would not load it) even where the flattened sizes agree.
            let expected_a = factor_shape(Factor::A, rank, shape.d_in, shape.kernel_size);
            if layer.lora_a_shape() != expected_a {
                wrong.push(misshaped(&lora_a_key(path), expected_a, layer.lora_a_shape()));
            }
            let expected_b = factor_shape(Factor::B, shape.d_out, rank, shape.kernel_size);
            if layer.lora_b_shape() != expected_b {
                wrong.push(misshaped(&lora_b_key(path), expected_b, layer.lora_b_shape()));
            }
        }
        for shape in model_layers {
            if matcher.matches(&shape.path) && !self.layers.contains_key(&shape.path) {
                missing.push(lora_a_key(&shape.path));
                missing.push(lora_b_key(&shape.path));
            }
        }
        key_problems(missing, unexpected, wrong)
    }
}
