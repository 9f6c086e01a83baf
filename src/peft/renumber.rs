//! Moving an adapter trained on a model with some of its blocks dropped (Offsite-Tuning's
//! layer-drop emulator) onto the full model's matching blocks.

use std::collections::BTreeMap;

use super::{PeftAdapter, TargetModules};
use crate::error::{EmlocError, Result};

impl PeftAdapter {
    /// The adapter with every path `{prefix}{i}.…` renamed `{prefix}{kept[i]}.…` (layer keys,
    /// `rank_pattern` and `alpha_pattern` keys alike): trained on a model that keeps only the
    /// blocks `kept` of a stack (e.g. `encoder.layer.` of a BERT), it then applies to the same
    /// blocks of the full model, and the dropped blocks stay untouched. Paths outside the stack
    /// keep their names. `target_modules` becomes the list of the adapter's own (renamed)
    /// paths, so the full model's dropped blocks are not targets that lack weights.
    ///
    /// # Errors
    /// [`EmlocError::InvalidConfig`] if `kept` is empty or not strictly increasing, or a path
    /// names a block `i ≥ kept.len()` (the adapter was not trained on that model).
    pub fn renumber_blocks(&self, prefix: &str, kept: &[usize]) -> Result<Self> {
        if kept.is_empty() || kept.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EmlocError::InvalidConfig(format!(
                "kept blocks {kept:?} must be non-empty and strictly increasing"
            )));
        }
        let rename = |path: &str| -> Result<String> {
            let Some(rest) = path.strip_prefix(prefix) else { return Ok(path.to_owned()) };
            let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let Ok(i) = index.parse::<usize>() else { return Ok(path.to_owned()) };
            let Some(&to) = kept.get(i) else {
                return Err(EmlocError::InvalidConfig(format!(
                    "adapter path `{path}` names block {i}, but only {} blocks were kept",
                    kept.len()
                )));
            };
            Ok(if tail.is_empty() {
                format!("{prefix}{to}")
            } else {
                format!("{prefix}{to}.{tail}")
            })
        };
        fn renamed<V: Clone>(
            map: &BTreeMap<String, V>,
            rename: &dyn Fn(&str) -> Result<String>,
        ) -> Result<BTreeMap<String, V>> {
            map.iter().map(|(k, v)| Ok((rename(k)?, v.clone()))).collect()
        }
        let mut adapter = self.clone();
        adapter.layers = renamed(&self.layers, &rename)?;
        adapter.config.rank_pattern = renamed(&self.config.rank_pattern, &rename)?;
        adapter.config.alpha_pattern = renamed(&self.config.alpha_pattern, &rename)?;
        adapter.config.target_modules =
            TargetModules::List(adapter.layers.keys().cloned().collect());
        Ok(adapter)
    }
}

#[cfg(test)]
mod tests {
    use crate::matrix::Matrix;
    use crate::peft::{PeftAdapter, PeftConfig, PeftLayer};

    fn layer(v: f32) -> PeftLayer {
        PeftLayer::new(Matrix::new(1, 2, vec![v, v]), Matrix::new(2, 1, vec![v, -v]))
    }

    fn adapter() -> PeftAdapter {
        let mut config = PeftConfig::new(1, 2.0, vec!["query".into(), "dense".into()]);
        config.rank_pattern.insert("encoder.layer.1.query".into(), 1);
        let layers = [
            ("encoder.layer.0.query", 1.0),
            ("encoder.layer.1.query", 2.0),
            ("encoder.layer.10.query", 3.0),
            ("pooler.dense", 4.0),
        ]
        .into_iter()
        .map(|(p, v)| (p.to_string(), layer(v)))
        .collect();
        PeftAdapter { config, layers }
    }

    #[test]
    fn kept_blocks_move_to_their_original_indices_and_other_paths_stay() {
        let kept: Vec<usize> = (0..11).map(|i| i * 2 + 1).collect();
        let moved = adapter().renumber_blocks("encoder.layer.", &kept).unwrap();
        let paths: Vec<&str> = moved.layers.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "encoder.layer.1.query",
                "encoder.layer.21.query",
                "encoder.layer.3.query",
                "pooler.dense"
            ]
        );
        assert_eq!(moved.layers["encoder.layer.21.query"], layer(3.0));
        assert_eq!(moved.layers["encoder.layer.3.query"], layer(2.0));
        assert_eq!(moved.config.rank_pattern.keys().collect::<Vec<_>>(), ["encoder.layer.3.query"]);
        let targeted = |p: &str| moved.config.target_modules.matches(p).unwrap();
        assert!(targeted("encoder.layer.21.query") && targeted("pooler.dense"));
        assert!(!targeted("encoder.layer.0.query") && !targeted("encoder.layer.2.query"));
    }

    #[test]
    fn bad_kept_lists_and_blocks_beyond_them_are_refused() {
        let a = adapter();
        for kept in [vec![], vec![0, 0, 1], vec![2, 1]] {
            assert!(a.renumber_blocks("encoder.layer.", &kept).is_err(), "{kept:?}");
        }
        let err = a.renumber_blocks("encoder.layer.", &[0, 2]).unwrap_err().to_string();
        assert!(err.contains("encoder.layer.10.query") && err.contains("2 blocks"), "{err}");
    }
}
