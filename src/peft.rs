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

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use regex::Regex;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::atomic::write_atomic;
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;

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

/// PEFT's rule for a module-name pattern: the whole path, or a trailing run of whole components.
pub(crate) fn module_name_matches(path: &str, key: &str) -> bool {
    path == key || path.strip_suffix(key).is_some_and(|head| head.ends_with('.'))
}

/// Which modules an adapter targets, as PEFT's `target_modules` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names; an entry matches a path equal to it or ending in `.` + entry.
    List(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
}

impl TargetModules {
    /// Whether the module at `path` is targeted, with PEFT's semantics.
    ///
    /// Compiles the regex on every call; it fails with [`EmlocError::InvalidConfig`] when the
    /// regex is invalid.
    pub fn matches(&self, path: &str) -> Result<bool> {
        Ok(self.matcher()?.matches(path))
    }

    fn matcher(&self) -> Result<Matcher<'_>> {
        match self {
            Self::List(names) => Ok(Matcher::List(names)),
            // PEFT uses re.fullmatch; anchoring keeps `q` from matching `layers.0.q_proj`.
            Self::Regex(re) => {
                Regex::new(&format!("^(?:{re})$")).map(Matcher::Regex).map_err(|e| {
                    EmlocError::InvalidConfig(format!("target_modules regex `{re}`: {e}"))
                })
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::List(names) => format!("{names:?}"),
            Self::Regex(re) => format!("regex `{re}`"),
        }
    }
}

/// A compiled [`TargetModules`], so loops over many paths compile the regex once.
enum Matcher<'a> {
    List(&'a [String]),
    Regex(Regex),
}

impl Matcher<'_> {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::List(names) => names.iter().any(|n| module_name_matches(path, n)),
            Self::Regex(re) => re.is_match(path),
        }
    }
}

fn default_bias() -> String {
    "none".to_owned()
}

/// Older PEFT versions may write `null` for the pattern maps.
fn null_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
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

/// `rank_pattern` / `alpha_pattern` resolved as PEFT resolves them
/// (`peft.utils.other.get_pattern_key`): each key is a regex, and the first key in map order
/// for which `re.match(rf"(.*\.)?({key})$", path)` succeeds gives the value. The maps are
/// `BTreeMap`s, so map order is sorted order, which is the order of a file written by PEFT's
/// `save_pretrained` (`json.dumps(..., sort_keys=True)`; Rust's byte order on UTF-8 equals
/// Python's code-point order). A path no key matches falls back, as in PEFT, to an entry keyed
/// by the path itself, then to `r` / `lora_alpha`.
pub struct Patterns<'a> {
    config: &'a PeftConfig,
    ranks: Vec<(Regex, &'a str)>,
    alphas: Vec<(Regex, &'a str)>,
}

impl Patterns<'_> {
    /// The rank of the layer at `path`.
    pub fn rank_for(&self, path: &str) -> usize {
        resolve(&self.ranks, &self.config.rank_pattern, path).unwrap_or(self.config.r)
    }

    /// The alpha of the layer at `path`.
    pub fn alpha_for(&self, path: &str) -> f64 {
        resolve(&self.alphas, &self.config.alpha_pattern, path).unwrap_or(self.config.lora_alpha)
    }

    /// The scale `s` of the layer at `path` (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    pub fn scale_for(&self, path: &str) -> f64 {
        crate::nn::lora_scale(self.alpha_for(path), self.rank_for(path), self.config.use_rslora)
    }
}

/// PEFT's pattern regex for `key`: an optional run of leading components, then `key` to the end.
fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

fn compile_patterns<'a, T>(
    field: &str,
    map: &'a BTreeMap<String, T>,
) -> Result<Vec<(Regex, &'a str)>> {
    map.keys()
        .map(|key| {
            pattern_regex(key).map(|re| (re, key.as_str())).map_err(|e| {
                EmlocError::InvalidConfig(format!("{field} key `{key}` is not a valid regex: {e}"))
            })
        })
        .collect()
}

/// [`compile_patterns`] that skips invalid keys, for the infallible convenience lookups.
fn compile_lenient<T>(map: &BTreeMap<String, T>) -> Vec<(Regex, &str)> {
    map.keys().filter_map(|key| Some((pattern_regex(key).ok()?, key.as_str()))).collect()
}

fn resolve<T: Copy>(
    compiled: &[(Regex, &str)],
    map: &BTreeMap<String, T>,
    path: &str,
) -> Option<T> {
    let key = compiled.iter().find(|(re, _)| re.is_match(path)).map_or(path, |(_, key)| key);
    map.get(key).copied()
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

/// Parses and validates the text of a [`CONFIG_FILE`] found at `config_path`.
fn parse_config(text: &str, config_path: &Path) -> Result<PeftConfig> {
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
const UNSUPPORTED_FEATURES: &[(&str, IsInert)] = &[
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
type IsInert = fn(&Value) -> bool;

fn is_null_or_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn is_false(v: &Value) -> bool {
    matches!(v, Value::Null | Value::Bool(false))
}

fn init_keeps_base_weights(v: &Value) -> bool {
    let Some(init) = v.as_str() else { return true };
    !["pissa", "olora", "corda", "loftq", "lora_ga"].iter().any(|m| init.starts_with(m))
}

/// The first field of a config file that sets a feature emloc does not implement.
fn unsupported_feature(fields: &BTreeMap<String, Value>) -> Option<(&'static str, &Value)> {
    UNSUPPORTED_FEATURES
        .iter()
        .find_map(|(name, inert)| fields.get(*name).filter(|v| !inert(v)).map(|v| (*name, v)))
}

/// Decodes the weights file into layers, checking them against `config`'s ranks.
fn parse_weights(
    bytes: &[u8],
    weights_path: &Path,
    config: &PeftConfig,
) -> Result<BTreeMap<String, PeftLayer>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| safetensors_error(weights_path, e.to_string()))?;
    let mut tensors = st.tensors();
    if tensors.is_empty() {
        return Err(safetensors_error(weights_path, "contains no tensors"));
    }
    // Sorted so that the first error reported is the same on every run.
    tensors.sort_by(|x, y| x.0.cmp(&y.0));

    let patterns = config.patterns()?;
    // Each factor with its kernel: `Some([kh, kw])` for a 4-D `lora_A`, `Some([1, 1])` for a
    // 4-D `lora_B`.
    type Half = Option<(Matrix, Option<[usize; 2]>)>;
    let mut halves: BTreeMap<&str, (Half, Half)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    // PEFT saves modules_to_save copies as `<path>.modules_to_save.<name>` tensors.
    if let Some((key, _)) = tensors.iter().find(|(key, _)| key.contains("modules_to_save")) {
        return Err(EmlocError::UnsupportedPeftFeature {
            path: weights_path.to_owned(),
            feature: "modules_to_save".to_owned(),
            value: key.clone(),
        });
    }
    for (key, view) in &tensors {
        let Some((path, factor)) = parse_key(key) else {
            unexpected.push(key.clone());
            continue;
        };
        let matrix = decode_factor(key, view, weights_path, patterns.rank_for(path), factor)?;
        let slot = halves.entry(path).or_default();
        match factor {
            Factor::A => slot.0 = Some(matrix),
            Factor::B => slot.1 = Some(matrix),
        }
    }

    let (mut missing, mut wrong) = (Vec::new(), Vec::new());
    let mut layers = BTreeMap::new();
    for (path, (a, b)) in halves {
        let rank = patterns.rank_for(path);
        if let Some((a, kernel)) = &a
            && a.rows != rank
        {
            let found = factor_shape(Factor::A, a.rows, a.cols, *kernel);
            let mut expected = found.clone();
            expected[0] = rank;
            wrong.push(misshaped(&lora_a_key(path), expected, found));
        }
        if let Some((b, kernel)) = &b
            && b.cols != rank
        {
            let found = factor_shape(Factor::B, b.rows, b.cols, *kernel);
            let mut expected = found.clone();
            expected[1] = rank;
            wrong.push(misshaped(&lora_b_key(path), expected, found));
        }
        match (a, b) {
            // A convolution's factors are both 4-D, a linear layer's both 2-D.
            (Some((lora_a, a_kernel)), Some((lora_b, b_kernel)))
                if a_kernel.is_some() != b_kernel.is_some() =>
            {
                let b_found = factor_shape(Factor::B, lora_b.rows, lora_b.cols, b_kernel);
                let b_expected = factor_shape(Factor::B, lora_b.rows, lora_b.cols, a_kernel);
                wrong.push(format!(
                    "{}: expected {b_expected:?} for the {}-D lora_A {:?}, found {b_found:?}",
                    lora_b_key(path),
                    if a_kernel.is_some() { 4 } else { 2 },
                    factor_shape(Factor::A, lora_a.rows, lora_a.cols, a_kernel),
                ));
            }
            (Some((lora_a, kernel_size)), Some((lora_b, _))) => {
                layers.insert(path.to_owned(), PeftLayer { lora_a, lora_b, kernel_size });
            }
            (Some(_), None) => missing.push(lora_b_key(path)),
            (None, Some(_)) => missing.push(lora_a_key(path)),
            (None, None) => {}
        }
    }
    key_problems(missing, unexpected, wrong)?;

    for (path, layer) in &layers {
        for (m, factor) in [(&layer.lora_a, Factor::A), (&layer.lora_b, Factor::B)] {
            if !m.is_finite() {
                return Err(EmlocError::NonFinite {
                    layer: path.clone(),
                    what: factor.name().to_owned(),
                });
            }
        }
    }
    Ok(layers)
}

/// Converts one factor, a 2-D tensor or a convolution's 4-D kernel (`lora_A`
/// `[r, C_in, kh, kw]`, `lora_B` `[C_out, r, 1, 1]`), to an `f32` matrix (`[r, C_in·kh·kw]`,
/// `[C_out, r]`) and the kernel size it had (`[1, 1]` for a 4-D `lora_B`).
fn decode_factor(
    key: &str,
    view: &TensorView<'_>,
    weights_path: &Path,
    rank: usize,
    factor: Factor,
) -> Result<(Matrix, Option<[usize; 2]>)> {
    let shape = view.shape();
    let (rows, cols, kernel) = match (factor, shape) {
        (_, &[rows, cols]) => (rows, cols, None),
        (Factor::A, &[rows, channels, kh, kw]) => {
            (rows, channels.saturating_mul(kh).saturating_mul(kw), Some([kh, kw]))
        }
        (Factor::B, &[rows, cols, 1, 1]) => (rows, cols, Some([1, 1])),
        (Factor::B, &[rows, cols, _, _]) => {
            return Err(EmlocError::ShapeMismatch {
                name: key.to_owned(),
                expected: vec![rows, cols, 1, 1],
                found: shape.to_vec(),
            });
        }
        _ => {
            // Best guess at the intended 2-D shape, so the message shows what was expected.
            let other = match factor {
                Factor::A => shape.last(),
                Factor::B => shape.first(),
            }
            .copied()
            .unwrap_or(0);
            let expected = match factor {
                Factor::A => vec![rank, other],
                Factor::B => vec![other, rank],
            };
            return Err(EmlocError::ShapeMismatch {
                name: key.to_owned(),
                expected,
                found: shape.to_vec(),
            });
        }
    };
    let data = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => {
            data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Dtype::F16 => {
            data.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        Dtype::BF16 => {
            data.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        other => {
            return Err(safetensors_error(
                weights_path,
                format!("{key}: dtype {other} is not supported (expected F32, F16 or BF16)"),
            ));
        }
    };
    // safetensors validates offsets against shape and dtype; re-check so Matrix::new cannot panic.
    if Some(data.len()) != rows.checked_mul(cols) {
        return Err(safetensors_error(
            weights_path,
            format!("{key}: {} values for shape {shape:?}", data.len()),
        ));
    }
    Ok((Matrix::new(rows, cols, data), kernel))
}

/// IEEE binary16 to binary32; exact for every input, NaN payloads kept.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x03ff);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: mantissa * 2^-24, exact in f32.
            let magnitude = mantissa as f32 / 16_777_216.0;
            return if sign == 0 { magnitude } else { -magnitude };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mantissa << 13),
        _ => sign | ((exponent + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 is the upper half of an f32.
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Matrix {
        // Deterministic values that exercise sign, -0.0 and subnormals for the bit-exact check.
        let data = (0..rows * cols)
            .map(|i| match (i as u32 + seed) % 7 {
                0 => -0.0,
                1 => f32::from_bits(1),
                _ => ((i as f32 + 1.0) * 0.37 + seed as f32).sin() * 1e-2,
            })
            .collect();
        Matrix::new(rows, cols, data)
    }

    fn layer(r: usize, d_in: usize, d_out: usize, seed: u32) -> PeftLayer {
        PeftLayer::new(matrix(r, d_in, seed), matrix(d_out, r, seed + 1))
    }

    fn sample_adapter() -> PeftAdapter {
        let mut config = PeftConfig::new(4, 8.0, vec!["query".into(), "value".into()]);
        config.rank_pattern.insert("layers.1.attention.value".into(), 2);
        config.alpha_pattern.insert("value".into(), 3.0);
        config.base_model_name_or_path = Some("tiny-bert".into());
        config.task_type = Some("CAUSAL_LM".into());
        let mut layers = BTreeMap::new();
        layers.insert("layers.0.attention.query".into(), layer(4, 6, 5, 1));
        layers.insert("layers.0.attention.value".into(), layer(4, 6, 5, 3));
        layers.insert("layers.1.attention.value".into(), layer(2, 6, 5, 5));
        PeftAdapter { config, layers }
    }

    /// One tensor for `write_raw`: key, dtype, shape, little-endian bytes.
    type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

    fn raw(key: impl Into<String>, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Raw {
        (key.into(), dtype, shape.to_vec(), bytes)
    }

    /// An F32 tensor of `shape` filled with `value`.
    fn filled(key: impl Into<String>, shape: &[usize], value: f32) -> Raw {
        let n = shape.iter().product();
        let bytes = std::iter::repeat_n(value, n).flat_map(f32::to_le_bytes).collect();
        raw(key, Dtype::F32, shape, bytes)
    }

    /// Writes a raw safetensors weights file, bypassing every check in `save`.
    fn write_raw(dir: &Path, tensors: &[Raw]) {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, dtype, shape, bytes)| {
                (k.as_str(), TensorView::new(*dtype, shape.clone(), bytes).unwrap())
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
    }

    fn write_config(dir: &Path, config: &PeftConfig) {
        fs::write(dir.join(CONFIG_FILE), serde_json::to_string(config).unwrap()).unwrap();
    }

    fn dir_listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn conv_factors_round_trip_as_4d_kernels_and_bad_shapes_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let config = PeftConfig::new(2, 4.0, vec!["conv".into()]);
        // A [2, 3·2·2] flattened kernel: PEFT's [2, 3, 2, 2].
        let layer = PeftLayer::conv2d(matrix(2, 12, 1), matrix(5, 2, 2), [2, 2]);
        assert_eq!(
            (layer.lora_a_shape(), layer.lora_b_shape()),
            (vec![2, 3, 2, 2], vec![5, 2, 1, 1])
        );
        let adapter = PeftAdapter {
            config: config.clone(),
            layers: BTreeMap::from([("conv".to_string(), layer)]),
        };
        adapter.save(tmp.path()).unwrap();
        assert_eq!(PeftAdapter::load(tmp.path()).unwrap(), adapter);

        // A flattened kernel that is not C_in·kh·kw.
        let mut bad = adapter.clone();
        bad.layers.get_mut("conv").unwrap().kernel_size = Some([5, 1]);
        assert!(
            matches!(bad.validate(), Err(EmlocError::InvalidConfig(m)) if m.contains("kernel 5×1"))
        );

        write_config(tmp.path(), &config);
        let (a, b) = (lora_a_key("conv"), lora_b_key("conv"));
        // lora_B must be a 1×1 kernel.
        write_raw(tmp.path(), &[filled(&a, &[2, 3, 2, 2], 0.5), filled(&b, &[5, 2, 3, 1], 0.5)]);
        assert!(matches!(
            PeftAdapter::load(tmp.path()),
            Err(EmlocError::ShapeMismatch { name, expected, found })
                if name == b && expected == [5, 2, 1, 1] && found == [5, 2, 3, 1]
        ));
        // A 4-D lora_A with a 2-D lora_B (and the reverse) is one mis-shaped key.
        for (a_shape, b_shape) in
            [(&[2, 3, 2, 2][..], &[5, 2][..]), (&[2, 12][..], &[5, 2, 1, 1][..])]
        {
            write_raw(tmp.path(), &[filled(&a, a_shape, 0.5), filled(&b, b_shape, 0.5)]);
            match PeftAdapter::load(tmp.path()) {
                Err(EmlocError::AdapterKeys { misshaped, .. }) => {
                    assert_eq!(misshaped.len(), 1, "{misshaped:?}");
                    assert!(misshaped[0].starts_with(&b), "{misshaped:?}");
                }
                other => panic!("{a_shape:?}, {b_shape:?}: {other:?}"),
            }
        }
        // A conv adapter fits only a convolution of that kernel.
        let conv =
            |kernel| LayerShape { path: "conv".into(), d_in: 12, d_out: 5, kernel_size: kernel };
        adapter.check_fits(&[conv(Some([2, 2]))]).unwrap();
        for other in [None, Some([1, 1]), Some([4, 1])] {
            assert!(
                matches!(adapter.check_fits(&[conv(other)]), Err(EmlocError::AdapterKeys { .. })),
                "{other:?}"
            );
        }
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested").join("adapter");
        let adapter = sample_adapter();
        adapter.save(&dir).unwrap();
        assert_eq!(dir_listing(&dir), [CONFIG_FILE, WEIGHTS_FILE]);

        let loaded = PeftAdapter::load(&dir).unwrap();
        assert_eq!(loaded.config, adapter.config);
        assert_eq!(
            loaded.layers.keys().collect::<Vec<_>>(),
            adapter.layers.keys().collect::<Vec<_>>()
        );
        for (path, original) in &adapter.layers {
            let got = &loaded.layers[path];
            for (x, y) in [(&got.lora_a, &original.lora_a), (&got.lora_b, &original.lora_b)] {
                assert_eq!(x.shape(), y.shape(), "{path}");
                let bits = |m: &Matrix| m.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(x), bits(y), "{path}");
            }
        }

        let bytes = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = metadata.metadata().as_ref().unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let a = st.tensor(&lora_a_key("layers.1.attention.value")).unwrap();
        assert_eq!((a.dtype(), a.shape()), (Dtype::F32, &[2usize, 6][..]));

        let json = fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        assert!(json.contains("\n  \"peft_type\": \"LORA\""), "{json}");
    }

    #[test]
    fn minimal_peft_config_loads_with_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join(CONFIG_FILE),
            r#"{
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"],
                "revision": null,
                "layers_to_transform": null,
                "megatron_config": null,
                "modules_to_save": null,
                "auto_mapping": {"base_model_class": "LlamaForCausalLM"}
            }"#,
        )
        .unwrap();
        write_raw(
            tmp.path(),
            &[
                filled(lora_a_key("model.layers.0.self_attn.q_proj"), &[2, 3], 0.5),
                filled(lora_b_key("model.layers.0.self_attn.q_proj"), &[4, 2], -1.0),
            ],
        );
        let adapter = PeftAdapter::load(tmp.path()).unwrap();
        let c = &adapter.config;
        assert_eq!((c.r, c.lora_alpha), (2, 16.0));
        assert_eq!(c.target_modules, TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!((c.lora_dropout, c.use_rslora, c.bias.as_str()), (0.0, false, "none"));
        assert!(!c.fan_in_fan_out && c.rank_pattern.is_empty() && c.alpha_pattern.is_empty());
        assert_eq!((c.base_model_name_or_path.as_deref(), c.task_type.as_deref()), (None, None));
        let l = &adapter.layers["model.layers.0.self_attn.q_proj"];
        assert_eq!(l.lora_a, Matrix::new(2, 3, vec![0.5; 6]));
        assert_eq!(l.lora_b, Matrix::new(4, 2, vec![-1.0; 8]));
    }

    #[test]
    fn malformed_adapter_lists_every_key_problem() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(
            tmp.path(),
            &PeftConfig::new(4, 8.0, vec!["q".into(), "k".into(), "v".into()]),
        );
        write_raw(
            tmp.path(),
            &[
                filled(lora_a_key("l0.q"), &[4, 3], 1.0),
                filled(lora_b_key("l0.q"), &[5, 4], 1.0),
                // A without its B.
                filled(lora_a_key("l0.k"), &[4, 3], 1.0),
                // B's rank disagrees with A and with r.
                filled(lora_a_key("l0.v"), &[4, 3], 1.0),
                filled(lora_b_key("l0.v"), &[5, 3], 1.0),
                filled("base_model.model.lm_head.weight", &[2, 2], 1.0),
            ],
        );
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::AdapterKeys { missing, unexpected, misshaped }) => {
                assert_eq!(missing, [lora_b_key("l0.k")]);
                assert_eq!(unexpected, ["base_model.model.lm_head.weight"]);
                assert_eq!(
                    misshaped,
                    [format!("{}: expected [5, 4], found [5, 3]", lora_b_key("l0.v"))]
                );
            }
            other => panic!("expected AdapterKeys, got {other:?}"),
        }
    }

    #[test]
    fn rank_disagreeing_with_config_is_misshaped() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), &PeftConfig::new(4, 8.0, vec!["q".into()]));
        write_raw(
            tmp.path(),
            &[filled(lora_a_key("q"), &[2, 3], 1.0), filled(lora_b_key("q"), &[5, 2], 1.0)],
        );
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::AdapterKeys { missing, unexpected, misshaped }) => {
                assert!(missing.is_empty() && unexpected.is_empty());
                assert_eq!(
                    misshaped,
                    [
                        format!("{}: expected [4, 3], found [2, 3]", lora_a_key("q")),
                        format!("{}: expected [5, 4], found [5, 2]", lora_b_key("q")),
                    ]
                );
            }
            other => panic!("expected AdapterKeys, got {other:?}"),
        }
    }

    #[test]
    fn untargeted_layer_is_a_config_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["query".into()]));
        write_raw(
            tmp.path(),
            &[
                filled(lora_a_key("l0.key"), &[2, 3], 1.0),
                filled(lora_b_key("l0.key"), &[5, 2], 1.0),
            ],
        );
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::AdapterConfig { path, message }) => {
                assert_eq!(path, tmp.path().join(CONFIG_FILE));
                assert!(message.contains("l0.key"), "{message}");
            }
            other => panic!("expected AdapterConfig, got {other:?}"),
        }
    }

    #[test]
    fn check_fits_reports_missing_unexpected_and_misshaped() {
        let adapter = sample_adapter();
        adapter
            .check_fits(&[
                shape("layers.0.attention.query", 6, 5),
                shape("layers.0.attention.value", 6, 5),
                shape("layers.1.attention.value", 6, 5),
                shape("layers.0.attention.key", 6, 5),
            ])
            .unwrap();

        let model = [
            shape("layers.0.attention.query", 6, 5),
            // d_out differs from the adapter's B.
            shape("layers.0.attention.value", 6, 7),
            // Targeted but absent from the adapter.
            shape("layers.2.attention.query", 6, 5),
            // Not targeted: must not be reported.
            shape("layers.2.attention.key", 6, 5),
        ];
        match adapter.check_fits(&model) {
            Err(EmlocError::AdapterKeys { missing, unexpected, misshaped }) => {
                assert_eq!(
                    missing,
                    [
                        lora_a_key("layers.2.attention.query"),
                        lora_b_key("layers.2.attention.query")
                    ]
                );
                assert_eq!(
                    unexpected,
                    [
                        lora_a_key("layers.1.attention.value"),
                        lora_b_key("layers.1.attention.value")
                    ]
                );
                assert_eq!(
                    misshaped,
                    [format!(
                        "{}: expected [7, 4], found [5, 4]",
                        lora_b_key("layers.0.attention.value")
                    )]
                );
            }
            other => panic!("expected AdapterKeys, got {other:?}"),
        }
    }

    fn shape(path: &str, d_in: usize, d_out: usize) -> LayerShape {
        LayerShape { path: path.into(), d_in, d_out, kernel_size: None }
    }

    fn assert_safetensors_error(result: Result<PeftAdapter>, what: &str) {
        match result {
            Err(EmlocError::Safetensors { .. }) => {}
            other => panic!("{what}: expected Safetensors error, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_weights_are_errors_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let adapter = sample_adapter();
        adapter.save(tmp.path()).unwrap();
        let weights = tmp.path().join(WEIGHTS_FILE);
        let good = fs::read(&weights).unwrap();

        fs::write(&weights, &good[..good.len() / 2]).unwrap();
        assert_safetensors_error(PeftAdapter::load(tmp.path()), "cut in half");

        let mut past_eof = (good.len() as u64 * 4).to_le_bytes().to_vec();
        past_eof.extend_from_slice(b"{}");
        fs::write(&weights, &past_eof).unwrap();
        assert_safetensors_error(PeftAdapter::load(tmp.path()), "header length past EOF");

        let header = b"{\"x\": [1, 2,";
        let mut garbage = (header.len() as u64).to_le_bytes().to_vec();
        garbage.extend_from_slice(header);
        fs::write(&weights, &garbage).unwrap();
        assert_safetensors_error(PeftAdapter::load(tmp.path()), "garbage JSON header");

        fs::write(&weights, b"").unwrap();
        assert_safetensors_error(PeftAdapter::load(tmp.path()), "empty file");

        // Every prefix fails cleanly, and no single-byte corruption panics.
        let config = adapter.config.clone();
        for len in 0..good.len() {
            assert!(matches!(
                parse_weights(&good[..len], &weights, &config),
                Err(EmlocError::Safetensors { .. })
            ));
        }
        for i in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bytes = good.clone();
                bytes[i] ^= flip;
                let _ = parse_weights(&bytes, &weights, &config);
            }
        }
    }

    #[test]
    fn unsupported_dtype_and_rank_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["q".into()]));
        write_raw(
            tmp.path(),
            &[
                raw(lora_a_key("q"), Dtype::I32, &[2, 3], vec![0; 24]),
                filled(lora_b_key("q"), &[5, 2], 1.0),
            ],
        );
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::Safetensors { message, .. }) => {
                assert!(message.contains(&lora_a_key("q")) && message.contains("I32"), "{message}");
            }
            other => panic!("expected Safetensors error, got {other:?}"),
        }

        write_raw(
            tmp.path(),
            &[filled(lora_a_key("q"), &[2, 3, 1], 1.0), filled(lora_b_key("q"), &[5, 2], 1.0)],
        );
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::ShapeMismatch { name, found, .. }) => {
                assert_eq!((name, found), (lora_a_key("q"), vec![2, 3, 1]));
            }
            other => panic!("expected ShapeMismatch, got {other:?}"),
        }
    }

    #[test]
    fn config_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let config_path = tmp.path().join(CONFIG_FILE);
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::Io { path, .. }) => assert_eq!(path, config_path),
            other => panic!("expected Io error, got {other:?}"),
        }

        fs::write(&config_path, "{\n  \"peft_type\": \"LORA\",\n  \"r\": }").unwrap();
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::AdapterConfig { path, message }) => {
                assert_eq!(path, config_path);
                assert!(message.contains("line 3"), "{message}");
            }
            other => panic!("expected AdapterConfig, got {other:?}"),
        }

        let base = PeftConfig::new(2, 8.0, vec!["q".into()]);
        let mut prefix = base.clone();
        prefix.peft_type = "PREFIX_TUNING".into();
        let mut fan = base.clone();
        fan.fan_in_fan_out = true;
        let mut bad_regex = base.clone();
        bad_regex.target_modules = TargetModules::Regex("(unclosed".into());
        for (config, needle) in
            [(prefix, "PREFIX_TUNING"), (fan, "fan_in_fan_out"), (bad_regex, "(unclosed")]
        {
            write_config(tmp.path(), &config);
            match PeftAdapter::load(tmp.path()) {
                Err(EmlocError::AdapterConfig { message, .. }) => {
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("expected AdapterConfig for {needle}, got {other:?}"),
            }
        }

        // A valid config without weights names the weights file.
        write_config(tmp.path(), &base);
        match PeftAdapter::load(tmp.path()) {
            Err(EmlocError::Io { path, .. }) => assert_eq!(path, tmp.path().join(WEIGHTS_FILE)),
            other => panic!("expected Io error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_save_leaves_previous_adapter_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let good = sample_adapter();
        good.save(tmp.path()).unwrap();
        let snapshot = |dir: &Path| {
            (
                dir_listing(dir),
                fs::read(dir.join(CONFIG_FILE)).unwrap(),
                fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
            )
        };
        let before = snapshot(tmp.path());

        let mut rank_mismatch = good.clone();
        let l = rank_mismatch.layers.get_mut("layers.0.attention.query").unwrap();
        l.lora_b = matrix(5, 3, 9);
        assert!(matches!(
            rank_mismatch.save(tmp.path()),
            Err(EmlocError::ShapeMismatch { name, .. }) if name == lora_b_key("layers.0.attention.query")
        ));

        let mut pattern_mismatch = good.clone();
        // layers.1.attention.value must have rank 2 by rank_pattern.
        pattern_mismatch.layers.insert("layers.1.attention.value".into(), layer(4, 6, 5, 7));
        assert!(matches!(
            pattern_mismatch.save(tmp.path()),
            Err(EmlocError::ShapeMismatch { name, .. }) if name == lora_a_key("layers.1.attention.value")
        ));

        let mut nan = good.clone();
        nan.layers.get_mut("layers.0.attention.value").unwrap().lora_a.data[3] = f32::NAN;
        assert!(matches!(
            nan.save(tmp.path()),
            Err(EmlocError::NonFinite { layer, what })
                if layer == "layers.0.attention.value" && what == "lora_A"
        ));

        let mut untargeted = good.clone();
        untargeted.layers.insert("layers.0.attention.key".into(), layer(4, 6, 5, 11));
        assert!(matches!(
            untargeted.save(tmp.path()),
            Err(EmlocError::AdapterConfig { message, .. }) if message.contains("layers.0.attention.key")
        ));

        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn failed_write_removes_its_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory where the weights file should go makes the final rename fail.
        fs::create_dir(tmp.path().join(WEIGHTS_FILE)).unwrap();
        fs::write(tmp.path().join(WEIGHTS_FILE).join("keep"), b"x").unwrap();
        match sample_adapter().save(tmp.path()) {
            Err(EmlocError::Io { path, .. }) => assert_eq!(path, tmp.path().join(WEIGHTS_FILE)),
            other => panic!("expected Io error, got {other:?}"),
        }
        assert_eq!(dir_listing(tmp.path()), [WEIGHTS_FILE]);
    }

    #[test]
    fn patterns_and_scales() {
        let mut c = PeftConfig::new(8, 16.0, vec!["q".into()]);
        c.rank_pattern.insert("attn.v".into(), 4);
        c.rank_pattern.insert("layers.3.attn.q".into(), 2);
        c.alpha_pattern.insert("v".into(), 32.0);

        assert_eq!(c.rank_for("layers.0.attn.q"), 8);
        assert_eq!(c.rank_for("layers.3.attn.q"), 2);
        assert_eq!(c.rank_for("layers.13.attn.q"), 8, "suffix must start at a component");
        assert_eq!(c.rank_for("layers.0.attn.v"), 4);
        assert_eq!(c.rank_for("attn.v"), 4);
        assert_eq!(c.rank_for("layers.0.xattn.v"), 8);
        assert_eq!(c.alpha_for("layers.0.attn.v"), 32.0);
        assert_eq!(c.alpha_for("layers.0.attn.q"), 16.0);

        assert_eq!(c.scale_for("layers.0.attn.q"), 2.0);
        assert_eq!(c.scale_for("layers.0.attn.v"), 8.0);
        c.use_rslora = true;
        assert_eq!(c.scale_for("layers.0.attn.q"), 16.0 / 8f64.sqrt());
        assert_eq!(c.scale_for("layers.0.attn.v"), 16.0);

        // First match in map order wins.
        c.rank_pattern.insert("q".into(), 6);
        assert_eq!(c.rank_for("layers.3.attn.q"), 2);
        assert_eq!(c.rank_for("layers.0.attn.q"), 6);
    }

    #[test]
    fn pattern_keys_resolve_as_in_peft() {
        let mut c = PeftConfig::new(8, 16.0, vec!["q".into()]);
        for (key, r) in [
            ("attn.q", 2),
            ("cross.attn.q", 6),
            (r"layers\.[01]\.mlp\.(up|down)", 3),
            ("mlp.gate", 5),
            ("v|k", 7),
        ] {
            c.rank_pattern.insert(key.into(), r);
        }
        c.alpha_pattern.insert("q".into(), 32.0);
        c.alpha_pattern.insert(r"layers\.1\..*".into(), 4.0);
        // Expected values printed by PEFT 0.21.2: for each path,
        // `pattern.get(peft.utils.other.get_pattern_key(sorted keys, path), default)`.
        let peft = [
            ("attn.q", 2, 32.0),
            // `attn.q` sorts first and matches the tail of `cross.attn.q`.
            ("cross.attn.q", 2, 32.0),
            ("layers.0.attn.q", 2, 32.0),
            ("layers.0.mlp.up", 3, 16.0),
            ("layers.2.mlp.up", 8, 16.0),
            ("layers.1.mlp.down", 3, 4.0),
            ("layers.1.mlp.gate", 5, 4.0),
            // The alternation stays inside PEFT's group: `v` is a whole last component.
            ("layers.0.attn.v", 7, 16.0),
            ("layers.0.attn.kv", 8, 16.0),
            ("layers.0.xq", 8, 16.0),
            ("k", 7, 16.0),
        ];
        let patterns = c.patterns().unwrap();
        for (path, r, alpha) in peft {
            assert_eq!((c.rank_for(path), c.alpha_for(path)), (r, alpha), "{path}");
            assert_eq!((patterns.rank_for(path), patterns.alpha_for(path)), (r, alpha), "{path}");
        }
        assert_eq!(patterns.scale_for("layers.1.mlp.down"), 4.0 / 3.0);

        c.alpha_pattern.insert("(unclosed".into(), 1.0);
        match c.validate() {
            Err(EmlocError::InvalidConfig(message)) => {
                assert!(message.contains("alpha_pattern key `(unclosed`"), "{message}")
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_peft_features_are_rejected_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let adapter = sample_adapter();
        adapter.save(tmp.path()).unwrap();
        let config_path = tmp.path().join(CONFIG_FILE);
        let saved: Value =
            serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
        let with = |field: &str, value: Value| {
            let mut config = saved.clone();
            config[field] = value;
            fs::write(&config_path, config.to_string()).unwrap();
            PeftAdapter::load(tmp.path())
        };
        // PEFT's defaults and inert values load.
        for (field, value) in [
            ("modules_to_save", Value::Null),
            ("modules_to_save", serde_json::json!([])),
            ("use_dora", Value::Bool(false)),
            ("lora_bias", Value::Bool(false)),
            ("layers_to_transform", Value::Null),
            ("init_lora_weights", Value::Bool(false)),
            ("init_lora_weights", serde_json::json!("gaussian")),
            ("megatron_core", serde_json::json!("megatron.core")),
        ] {
            assert_eq!(with(field, value.clone()).unwrap(), adapter, "{field} = {value}");
        }
        for (field, value) in [
            ("modules_to_save", serde_json::json!(["classifier"])),
            ("use_dora", Value::Bool(true)),
            ("lora_bias", Value::Bool(true)),
            ("layers_to_transform", serde_json::json!([0])),
            ("exclude_modules", serde_json::json!(["key"])),
            ("trainable_token_indices", serde_json::json!([3])),
            ("init_lora_weights", serde_json::json!("pissa_niter_4")),
            ("alora_invocation_tokens", serde_json::json!([1, 2])),
        ] {
            match with(field, value.clone()) {
                Err(e @ EmlocError::UnsupportedPeftFeature { .. }) => {
                    let EmlocError::UnsupportedPeftFeature { path, feature, value: found } = &e
                    else {
                        unreachable!()
                    };
                    assert_eq!(
                        (path, feature.as_str(), found),
                        (&config_path, field, &value.to_string())
                    );
                    assert!(e.to_string().contains(field), "{e}");
                }
                other => {
                    panic!("{field} = {value}: expected UnsupportedPeftFeature, got {other:?}")
                }
            }
        }

        // A modules_to_save copy in the weights is named too.
        fs::write(&config_path, saved.to_string()).unwrap();
        write_raw(
            tmp.path(),
            &[
                filled(lora_a_key("q"), &[4, 3], 1.0),
                filled(lora_b_key("q"), &[5, 4], 1.0),
                filled("base_model.model.classifier.modules_to_save.default.weight", &[2, 5], 1.0),
            ],
        );
        assert!(matches!(
            PeftAdapter::load(tmp.path()),
            Err(EmlocError::UnsupportedPeftFeature { feature, value, .. })
                if feature == "modules_to_save" && value.contains("classifier")
        ));
    }

    #[test]
    fn target_module_matching() {
        let list = TargetModules::List(vec!["query".into(), "attention.value".into()]);
        assert!(list.matches("query").unwrap());
        assert!(list.matches("layers.0.attention.query").unwrap());
        assert!(list.matches("layers.0.attention.value").unwrap());
        assert!(!list.matches("layers.0.attention.query_proj").unwrap());
        assert!(!list.matches("layers.0.attention.subquery").unwrap());
        assert!(!list.matches("layers.0.cross_attention.value").unwrap());

        let re = TargetModules::Regex(r"layers\.[01]\.attention\.(query|value)".into());
        assert!(re.matches("layers.1.attention.value").unwrap());
        assert!(!re.matches("layers.2.attention.value").unwrap());
        assert!(!re.matches("model.layers.1.attention.value").unwrap(), "anchored at start");
        assert!(!re.matches("layers.1.attention.value.x").unwrap(), "anchored at end");
        let alt = TargetModules::Regex("a|b".into());
        assert!(!alt.matches("ab").unwrap(), "alternation must stay inside the anchors");

        assert!(matches!(
            TargetModules::Regex("(".into()).matches("x"),
            Err(EmlocError::InvalidConfig(_))
        ));
        let json: TargetModules = serde_json::from_str(r#""q|v""#).unwrap();
        assert_eq!(json, TargetModules::Regex("q|v".into()));
    }

    #[test]
    fn half_precision_tensors_load_as_f32() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["q".into()]));
        let f16_bits: [u16; 6] = [0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000];
        let f16_want = [1.0, -2.0, 0.5, 65504.0, 5.960_464_5e-8, -0.0];
        let bf16_bits: [u16; 6] = [0x3f80, 0xc060, 0x3e20, 0x0000, 0x4780, 0x0001];
        let bf16_want = [1.0, -3.5, 0.156_25, 0.0, 65536.0, f32::from_bits(0x0001_0000)];
        let le = |bits: &[u16]| bits.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<_>>();
        write_raw(
            tmp.path(),
            &[
                raw(lora_a_key("q"), Dtype::F16, &[2, 3], le(&f16_bits)),
                raw(lora_b_key("q"), Dtype::BF16, &[3, 2], le(&bf16_bits)),
            ],
        );
        let adapter = PeftAdapter::load(tmp.path()).unwrap();
        let l = &adapter.layers["q"];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&l.lora_a.data), bits(&f16_want));
        assert_eq!(bits(&l.lora_b.data), bits(&bf16_want));

        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x03ff), 1023.0 / 16_777_216.0);
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));

        // Every finite f16 against the textbook formula, evaluated in f64.
        for h in 0..=u16::MAX {
            let (e, m) = (i32::from((h >> 10) & 0x1f), f64::from(h & 0x3ff));
            if e == 0x1f {
                continue;
            }
            let magnitude =
                if e == 0 { m * 2f64.powi(-24) } else { (1.0 + m / 1024.0) * 2f64.powi(e - 15) };
            let want = if h & 0x8000 == 0 { magnitude } else { -magnitude };
            assert_eq!(f16_to_f32(h).to_bits(), (want as f32).to_bits(), "{h:#06x}");
        }
    }

    #[test]
    fn non_finite_loaded_values_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), &PeftConfig::new(2, 8.0, vec!["q".into()]));
        write_raw(
            tmp.path(),
            &[
                filled(lora_a_key("q"), &[2, 3], 1.0),
                filled(lora_b_key("q"), &[5, 2], f32::INFINITY),
            ],
        );
        assert!(matches!(
            PeftAdapter::load(tmp.path()),
            Err(EmlocError::NonFinite { layer, what }) if layer == "q" && what == "lora_B"
        ));
    }
}
