//! Loading HF checkpoints (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`) into the zoo's Burn modules, shared by every architecture.
//!
//! Weights go through burn-store: [`SafetensorsStore::from_file`] memory-maps each file and
//! reads only its header up front; each tensor's bytes are copied out of the map once, when
//! it is applied to its parameter, then transposed (`Linear` weights, by
//! [`PyTorchToBurnAdapter`]) and cast to `f32` (`bf16`/`f16`/`f64` checkpoints, by
//! [`FloatCastAdapter`]). The model's own parameters are lazily initialised, so the random
//! initial values of a freshly built model are never materialised when a checkpoint replaces
//! them: at no point are two copies of the weights held, only the map (file-backed pages, not
//! heap) plus the tensor in flight. The maps are released when loading returns.
//!
//! Key names: the checkpoint's keys are rewritten into Burn module paths by regex rules
//! ([`KeyMapping::to_burn`], applied in order, like burn-store's `KeyRemapper`); problems are
//! reported under the checkpoint's own names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{
    ApplyError, FloatCastAdapter, KeyRemapper, ModuleAdapter, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;
use regex::Regex;
use serde_json::Value;

use crate::error::{ConfigProblem, ModelError, Result};

/// The single-file checkpoint name.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads a JSON file.
///
/// # Errors
/// [`ModelError::Io`] if it cannot be read, [`ModelError::InvalidConfig`] if it is not JSON.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })
}

/// Checks that a JSON config object has every field of `required`.
///
/// # Errors
/// [`ModelError::MissingConfigField`] naming the first absent (or `null`) field and the file;
/// [`ModelError::InvalidConfig`] if `value` is not an object.
pub fn require_fields(value: &Value, path: &Path, required: &[&str]) -> Result<()> {
    let Some(object) = value.as_object() else {
        return Err(ModelError::InvalidConfig {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        });
    };
    match required.iter().find(|f| object.get(**f).is_none_or(Value::is_null)) {
        Some(field) => Err(ModelError::MissingConfigField {
            path: path.to_path_buf(),
            field: field.to_string(),
        }),
        None => Ok(()),
    }
}

/// Turns a config's JSON (read from `path`) into `T`: the `required` fields must be present,
/// the JSON must deserialize, and `validate` must accept the result. Every failure names `path`.
///
/// # Errors
/// [`ModelError::MissingConfigField`] naming the first absent field; [`ModelError::InvalidConfig`]
/// for a value of the wrong type; [`ModelError::ConfigValue`] for one `validate` rejects.
pub fn parse_config<T: serde::de::DeserializeOwned>(
    value: Value,
    path: &Path,
    required: &[&str],
    validate: impl FnOnce(&T) -> std::result::Result<(), ConfigProblem>,
) -> Result<T> {
    require_fields(&value, path, required)?;
    let config: T = serde_json::from_value(value).map_err(|e| ModelError::InvalidConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    validate(&config).map_err(|problem| ModelError::config_value(path, problem))?;
    Ok(config)
}

/// Checks a config's sizes: every `(name, value)` of `positive` is non-zero, and in every
/// `(name, value, divisor name, divisor)` of `multiples` the divisor divides the value.
///
/// # Errors
/// The first problem: `` `name` must be positive `` (field `name`), or
/// `` `name` value is not a multiple of `divisor name` divisor `` (field `name`).
pub fn check_sizes(
    positive: &[(&str, usize)],
    multiples: &[(&str, usize, &str, usize)],
) -> std::result::Result<(), ConfigProblem> {
    if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(ConfigProblem::new(*name, "must be positive"));
    }
    for &(name, value, divisor_name, divisor) in multiples {
        if divisor == 0 || !value.is_multiple_of(divisor) {
            return Err(ConfigProblem::new(
                name,
                format!("{value} is not a multiple of `{divisor_name}` {divisor}"),
            ));
        }
    }
    Ok(())
}

/// How checkpoint keys relate to the module's parameter paths.
#[derive(Debug, Clone, Default)]
pub struct KeyMapping {
    /// Checkpoint key → module path rules `(regex, replacement)`, each applied in order to the
    /// result of the previous one (`replace_all` where it matches).
    pub to_burn: Vec<(String, String)>,
    /// Module path → checkpoint key rules, used only to name missing parameters in errors.
    pub to_checkpoint: Vec<(String, String)>,
    /// Regexes of checkpoint keys that are not parameters (e.g. registered buffers such as
    /// `embeddings.position_ids`); they are skipped instead of reported as unexpected.
    pub ignore: Vec<String>,
}

fn compile(rules: &[(String, String)]) -> Result<Vec<(Regex, String)>> {
    rules
        .iter()
        .map(|(from, to)| {
            Regex::new(from)
                .map(|re| (re, to.clone()))
                .map_err(|e| ModelError::InvalidInput(format!("key mapping regex `{from}`: {e}")))
        })
        .collect()
}

fn rewrite(rules: &[(Regex, String)], key: &str) -> String {
    let mut key = key.to_string();
    for (re, to) in rules {
        if re.is_match(&key) {
            key = re.replace_all(&key, to.as_str()).into_owned();
        }
    }
    key
}

/// What a successful [`Checkpoint::load_into`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Parameters loaded.
    pub applied: usize,
    /// Checkpoint keys skipped by [`KeyMapping::ignore`].
    pub ignored: Vec<String>,
    /// Checkpoint keys left unread because their parameter was in the skip set of
    /// [`Checkpoint::load_into_skipping`].
    pub skipped: Vec<String>,
    /// The safetensors files read.
    pub files: Vec<PathBuf>,
}

/// Prefix that takes a skipped parameter's checkpoint key out of the model's namespace.
const SKIPPED_PREFIX: &str = "__emloc_skipped__.";

struct Shard {
    file: PathBuf,
    store: SafetensorsStore,
    keys: Vec<String>,
}

/// An opened safetensors checkpoint (one file or several shards): headers parsed and files
/// memory-mapped, no tensor data read yet.
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("files", &self.files())
            .finish()
    }
}

impl Checkpoint {
    /// Opens the checkpoint of a model directory: `model.safetensors` if present, otherwise
    /// the shards listed in `model.safetensors.index.json` (its `weight_map`).
    ///
    /// # Errors
    /// [`ModelError::MissingFile`] if neither exists, [`ModelError::Checkpoint`] if the index
    /// or a file's header is malformed, a key of the index is not in its shard, or a shard
    /// holds a key another shard also holds.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(SAFETENSORS_FILE);
        if single.is_file() {
            return Self::open_files(&single, vec![single.clone()]);
        }
        let index = dir.join(SAFETENSORS_INDEX_FILE);
        if !index.is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_path_buf(),
                expected: format!("{SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}"),
            });
        }
        let bad = |message: String| ModelError::Checkpoint { path: index.clone(), message };
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, file) in map {
            let file =
                file.as_str().ok_or_else(|| bad(format!("`weight_map.{key}` is not a string")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!("shard name `{file}` is not a plain file name")));
            }
            files.entry(file.to_string()).or_default().push(key.clone());
        }
        if files.is_empty() {
            return Err(bad("`weight_map` is empty".into()));
        }
        let checkpoint = Self::open_files(dir, files.keys().map(|f| dir.join(f)).collect())?;
        for (shard, (file, listed)) in checkpoint.shards.iter().zip(&files) {
            let present: BTreeSet<&str> = shard.keys.iter().map(String::as_str).collect();
            let absent: Vec<&str> =
                listed.iter().map(String::as_str).filter(|k| !present.contains(k)).collect();
            if !absent.is_empty() {
                return Err(bad(format!(
                    "keys listed for {file} are not in it: {}",
                    absent.join(", ")
                )));
            }
        }
        Ok(checkpoint)
    }

    /// Opens the given safetensors files as one checkpoint named `path` (in errors).
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] if a header cannot be read or a key occurs in two files.
    pub fn open_files(path: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file in files {
            if !file.is_file() {
                return Err(ModelError::Checkpoint {
                    path: file.clone(),
                    message: "file not found".into(),
                });
            }
            let mut store = SafetensorsStore::from_file(&file);
            let keys = store.keys().map_err(|e| ModelError::Checkpoint {
                path: file.clone(),
                message: e.to_string(),
            })?;
            for key in &keys {
                if let Some(other) = seen.insert(key.clone(), file.clone()) {
                    return Err(ModelError::Checkpoint {
                        path: file.clone(),
                        message: format!("key `{key}` is also in {}", other.display()),
                    });
                }
            }
            shards.push(Shard { file, store, keys });
        }
        Ok(Self { path: path.to_path_buf(), shards })
    }

    /// The checkpoint's keys, as stored.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.shards.iter().flat_map(|s| s.keys.iter().map(String::as_str))
    }

    /// Whether the checkpoint has `key` (as stored).
    pub fn contains(&self, key: &str) -> bool {
        self.keys().any(|k| k == key)
    }

    /// The safetensors files.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.file.clone()).collect()
    }

    /// Loads every parameter of `model` from the checkpoint, renaming keys by `mapping`,
    /// transposing `Linear` weights from PyTorch's `[out, in]` and casting floats to `f32`.
    /// Consumes the checkpoint, which releases its memory maps.
    ///
    /// # Errors
    /// [`ModelError::KeyMismatch`] listing, under checkpoint names, every parameter the
    /// checkpoint lacks, every checkpoint key the model has no place for (except
    /// [`KeyMapping::ignore`]d ones) and every key with the wrong shape or dtype; the model
    /// may then be partly loaded and should be dropped. [`ModelError::Checkpoint`] if two keys
    /// map to the same parameter or a file cannot be read; [`ModelError::InvalidInput`] for an
    /// invalid regex in `mapping`.
    pub fn load_into<M: Module>(self, model: &mut M, mapping: &KeyMapping) -> Result<LoadReport> {
        self.load_into_skipping(model, mapping, &BTreeSet::new())
    }

    /// [`load_into`](Self::load_into), leaving out the parameters at the module paths in
    /// `skip`: their checkpoint tensors are never read, the parameters keep whatever they hold
    /// (a lazily initialised parameter stays unmaterialised), and they may be absent from the
    /// checkpoint. What [`emloc::load_emulator`] replaces anyway (the emulated layers' dense
    /// weights) is skipped this way, so loading an emulator never holds the original weights.
    ///
    /// # Errors
    /// As [`load_into`](Self::load_into).
    pub fn load_into_skipping<M: Module>(
        self,
        model: &mut M,
        mapping: &KeyMapping,
        skip: &BTreeSet<String>,
    ) -> Result<LoadReport> {
        let to_burn = compile(&mapping.to_burn)?;
        let to_checkpoint = compile(&mapping.to_checkpoint)?;
        let ignore: Vec<Regex> = compile(
            &mapping.ignore.iter().map(|r| (r.clone(), String::new())).collect::<Vec<_>>(),
        )?
        .into_iter()
        .map(|(re, _)| re)
        .collect();
        // Skipped parameters: their keys are renamed out of the model's namespace, so the
        // loader finds no parameter for them and never reads their bytes.
        let skip_rules = skip
            .iter()
            .map(|p| (format!("^{}$", regex::escape(p)), format!("{SKIPPED_PREFIX}{p}")));
        let remapper =
            KeyRemapper::from_patterns(mapping.to_burn.iter().cloned().chain(skip_rules).collect())
                .map_err(|e| ModelError::InvalidInput(format!("key mapping: {e}")))?;

        // Module path -> checkpoint key, for reporting; two keys onto one path is an error.
        let mut original: BTreeMap<String, String> = BTreeMap::new();
        for key in self.keys() {
            if let Some(other) = original.insert(rewrite(&to_burn, key), key.to_string()) {
                return Err(ModelError::Checkpoint {
                    path: self.path.clone(),
                    message: format!(
                        "keys `{other}` and `{key}` both map to parameter `{}`",
                        rewrite(&to_burn, key)
                    ),
                });
            }
        }
        let name = |burn_path: &str| {
            original.get(burn_path).cloned().unwrap_or_else(|| rewrite(&to_checkpoint, burn_path))
        };

        let files = self.files();
        let mut applied = 0;
        let mut missing: Option<BTreeSet<String>> = None;
        let mut unused = BTreeSet::new();
        let mut invalid = Vec::new();
        for shard in self.shards {
            let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
            let mut store = shard
                .store
                .remap(remapper.clone())
                .with_from_adapter(adapter)
                .allow_partial(true)
                .validate(false);
            let result = model.load_from(&mut store).map_err(|e| ModelError::Checkpoint {
                path: shard.file.clone(),
                message: e.to_string(),
            })?;
            applied += result.applied.len();
            let shard_missing: BTreeSet<String> =
                result.missing.into_iter().map(|(p, _)| p).collect();
            missing = Some(match missing {
                None => shard_missing,
                Some(m) => m.intersection(&shard_missing).cloned().collect(),
            });
            unused.extend(result.unused);
            invalid.extend(result.errors.iter().map(|e| describe(e, &name)));
        }

        let mut ignored = Vec::new();
        let mut unexpected = Vec::new();
        let mut skipped = Vec::new();
        for path in unused {
            if let Some(module_path) = path.strip_prefix(SKIPPED_PREFIX) {
                skipped.push(name(module_path));
                continue;
            }
            let key = name(&path);
            if ignore.iter().any(|re| re.is_match(&key)) {
                ignored.push(key);
            } else {
                unexpected.push(key);
            }
        }
        let missing: Vec<String> = missing
            .unwrap_or_default()
            .iter()
            .filter(|p| !skip.contains(*p))
            .map(|p| name(p))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() || !invalid.is_empty() {
            return Err(ModelError::KeyMismatch { path: self.path, missing, unexpected, invalid });
        }
        Ok(LoadReport { applied, ignored, skipped, files })
    }
}

fn describe(error: &ApplyError, name: &dyn Fn(&str) -> String) -> String {
    match error {
        ApplyError::ShapeMismatch { path, expected, found } => {
            // Linear weights are compared after the PyTorch transpose; report PyTorch's order.
            format!(
                "{}: expected shape {:?}, found {:?} (after conversion to Burn layout)",
                name(path),
                expected.as_slice(),
                found.as_slice()
            )
        }
        ApplyError::DTypeMismatch { path, expected, found } => {
            format!("{}: expected dtype {expected:?}, found {found:?}", name(path))
        }
        ApplyError::AdapterError { path, message } | ApplyError::LoadError { path, message } => {
            format!("{}: {message}", name(path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Sizes {
        width: usize,
        heads: usize,
    }

    fn validate(s: &Sizes) -> std::result::Result<(), ConfigProblem> {
        check_sizes(
            &[("width", s.width), ("heads", s.heads)],
            &[("width", s.width, "heads", s.heads)],
        )
    }

    #[test]
    fn check_sizes_names_the_field_at_fault() {
        let zero = check_sizes(&[("a", 1), ("b", 0)], &[]).unwrap_err();
        assert_eq!(zero, ConfigProblem::new("b", "must be positive"));
        assert_eq!(zero.to_string(), "`b` must be positive");
        let ragged =
            check_sizes(&[], &[("hidden_size", 10, "num_attention_heads", 4)]).unwrap_err();
        assert_eq!(ragged.field, "hidden_size");
        assert_eq!(
            ragged.to_string(),
            "`hidden_size` 10 is not a multiple of `num_attention_heads` 4"
        );
        assert_eq!(check_sizes(&[("a", 1)], &[("a", 8, "b", 4)]), Ok(()));
    }

    #[test]
    fn parse_config_tells_bad_values_from_bad_types() {
        let path = Path::new("dir/config.json");
        let parse = |v: Value| parse_config::<Sizes>(v, path, &["width"], validate);
        match parse(serde_json::json!({"width": 10, "heads": 4})) {
            Err(ModelError::ConfigValue { path: p, problem }) => {
                assert_eq!(p, path);
                assert_eq!(problem.field, "width");
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        }
        let err = parse(serde_json::json!({"width": "ten", "heads": 4})).unwrap_err();
        assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err:?}");
        let err = parse(serde_json::json!({"heads": 4})).unwrap_err();
        assert!(
            matches!(err, ModelError::MissingConfigField { ref field, .. } if field == "width")
        );
        assert_eq!(parse(serde_json::json!({"width": 8, "heads": 4})).unwrap().width, 8);
    }
}
