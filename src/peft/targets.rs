//! Which modules an adapter's keys and patterns select, with PEFT's semantics: module names
//! (a whole path or a trailing run of components), full-match regexes (`target_modules`, and
//! emloc's own LoRA and emulator rules) and `rank_pattern` / `alpha_pattern` keys.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::PeftConfig;
use crate::error::{EmlocError, Result};

/// PEFT's rule for a module-name pattern: the whole path, or a trailing run of whole components.
pub(crate) fn module_name_matches(path: &str, key: &str) -> bool {
    path == key || path.strip_suffix(key).is_some_and(|head| head.ends_with('.'))
}

/// `pattern` compiled to match whole module paths only, as Python's `re.fullmatch` (PEFT's
/// `target_modules` regex; emloc's LoRA `target_regex` and emulator rules follow it): anchoring
/// keeps `q` from matching `layers.0.q_proj`, and the group keeps an alternation inside the
/// anchors. `what` names the setting in the error.
///
/// # Errors
/// [`EmlocError::InvalidConfig`] when `pattern` is not a valid regex.
pub(crate) fn full_match_regex(pattern: &str, what: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| EmlocError::InvalidConfig(format!("{what} `{pattern}`: {e}")))
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

    pub(super) fn matcher(&self) -> Result<Matcher<'_>> {
        match self {
            Self::List(names) => Ok(Matcher::List(names)),
            Self::Regex(re) => full_match_regex(re, "target_modules regex").map(Matcher::Regex),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Self::List(names) => format!("{names:?}"),
            Self::Regex(re) => format!("regex `{re}`"),
        }
    }
}

/// A compiled [`TargetModules`], so loops over many paths compile the regex once.
pub(super) enum Matcher<'a> {
    List(&'a [String]),
    Regex(Regex),
}

impl Matcher<'_> {
    pub(super) fn matches(&self, path: &str) -> bool {
        match self {
            Self::List(names) => names.iter().any(|n| module_name_matches(path, n)),
            Self::Regex(re) => re.is_match(path),
        }
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
    pub(super) config: &'a PeftConfig,
    pub(super) ranks: Vec<(Regex, &'a str)>,
    pub(super) alphas: Vec<(Regex, &'a str)>,
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
pub(super) fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

pub(super) fn compile_patterns<'a, T>(
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
pub(super) fn compile_lenient<T>(map: &BTreeMap<String, T>) -> Vec<(Regex, &str)> {
    map.keys().filter_map(|key| Some((pattern_regex(key).ok()?, key.as_str()))).collect()
}

pub(super) fn resolve<T: Copy>(
    compiled: &[(Regex, &str)],
    map: &BTreeMap<String, T>,
    path: &str,
) -> Option<T> {
    let key = compiled.iter().find(|(re, _)| re.is_match(path)).map_or(path, |(_, key)| key);
    map.get(key).copied()
}
