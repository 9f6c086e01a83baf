//! Moving an adapter trained on a structurally pruned model (LLM-Pruner / LORAM style: whole
//! neurons removed) onto the unpruned model.

use super::PeftAdapter;
use crate::error::{EmlocError, Result};
use crate::matrix::Matrix;

/// Which features of one side of a layer a pruned model kept: strictly increasing indices into
/// the unpruned layer's `full` features.
#[derive(Debug, Clone, Copy)]
pub struct KeptFeatures<'a> {
    /// Kept feature indices, strictly increasing, each below `full`.
    pub indices: &'a [usize],
    /// Features of the unpruned layer.
    pub full: usize,
}

impl KeptFeatures<'_> {
    fn check(&self, path: &str, side: &str, pruned: usize) -> Result<()> {
        let ok = self.indices.len() == pruned
            && self.indices.windows(2).all(|w| w[0] < w[1])
            && self.indices.last().is_none_or(|&last| last < self.full);
        if ok {
            return Ok(());
        }
        Err(EmlocError::InvalidConfig(format!(
            "`{path}`: {} kept {side} features (strictly increasing, below {}) for an adapter \
             with {pruned}",
            self.indices.len(),
            self.full
        )))
    }
}

impl PeftAdapter {
    /// Moves the adapter of layer `path`, trained on a model whose layer lost input features
    /// (`inputs`: columns of `lora_A`) and/or output features (`outputs`: rows of `lora_B`),
    /// onto the unpruned layer: the pruned features get zeros, so the unpruned model's pruned
    /// neurons stay untouched and the kept ones get exactly the trained update
    /// (`B_full A_full` restricted to the kept rows and columns is `B A`).
    ///
    /// # Errors
    /// [`EmlocError::InvalidConfig`] if the adapter has no layer `path`, or a side's indices are
    /// not strictly increasing, below `full`, and as many as the adapter's features there.
    pub fn unprune_layer(
        &mut self,
        path: &str,
        inputs: Option<KeptFeatures<'_>>,
        outputs: Option<KeptFeatures<'_>>,
    ) -> Result<()> {
        let layer = self.layers.get_mut(path).ok_or_else(|| {
            EmlocError::InvalidConfig(format!("the adapter has no layer `{path}`"))
        })?;
        if let Some(kept) = inputs {
            let a = &layer.lora_a; // [r, d_in]
            kept.check(path, "input", a.cols)?;
            let mut full = Matrix::new(a.rows, kept.full, vec![0.0; a.rows * kept.full]);
            for i in 0..a.rows {
                for (j, &to) in kept.indices.iter().enumerate() {
                    full.data[i * kept.full + to] = a.get(i, j);
                }
            }
            layer.lora_a = full;
        }
        if let Some(kept) = outputs {
            let b = &layer.lora_b; // [d_out, r]
            kept.check(path, "output", b.rows)?;
            let mut full = Matrix::new(kept.full, b.cols, vec![0.0; kept.full * b.cols]);
            for (i, &to) in kept.indices.iter().enumerate() {
                for j in 0..b.cols {
                    full.data[to * b.cols + j] = b.get(i, j);
                }
            }
            layer.lora_b = full;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::KeptFeatures;
    use crate::matrix::Matrix;
    use crate::peft::{PeftAdapter, PeftConfig, PeftLayer};

    #[test]
    fn kept_features_get_the_trained_update_and_pruned_ones_zero() {
        // Pruned layer: 2 inputs of 4 kept (1, 3), 2 outputs of 3 kept (0, 2); r = 1.
        let a = Matrix::new(1, 2, vec![2.0, 3.0]);
        let b = Matrix::new(2, 1, vec![5.0, 7.0]);
        let mut adapter = PeftAdapter {
            config: PeftConfig::new(1, 1.0, vec!["l".into()]),
            layers: [("l".to_string(), PeftLayer::new(a, b))].into_iter().collect(),
        };
        let (ins, outs) = (
            KeptFeatures { indices: &[1, 3], full: 4 },
            KeptFeatures { indices: &[0, 2], full: 3 },
        );
        adapter.unprune_layer("l", Some(ins), Some(outs)).unwrap();
        let l = &adapter.layers["l"];
        assert_eq!(l.lora_a.data, [0.0, 2.0, 0.0, 3.0]);
        assert_eq!(l.lora_b.data, [5.0, 0.0, 7.0]);
        // The full update B A [3, 4]: rows 0 and 2, columns 1 and 3 hold the pruned layer's
        // B A; everything else is zero.
        let update = |i: usize, j: usize| l.lora_b.get(i, 0) * l.lora_a.get(0, j);
        assert_eq!(
            (update(0, 1), update(2, 3), update(0, 3), update(2, 1)),
            (10.0, 21.0, 15.0, 14.0)
        );
        assert!((0..4).all(|j| update(1, j) == 0.0) && (0..3).all(|i| update(i, 0) == 0.0));
        adapter.validate().unwrap();
    }

    #[test]
    fn mismatched_or_unordered_kept_features_are_refused() {
        let layer =
            PeftLayer::new(Matrix::new(1, 2, vec![1.0; 2]), Matrix::new(2, 1, vec![1.0; 2]));
        let adapter = PeftAdapter {
            config: PeftConfig::new(1, 1.0, vec!["l".into()]),
            layers: [("l".to_string(), layer)].into_iter().collect(),
        };
        for (indices, full) in [(&[0, 1, 2][..], 4), (&[1, 0], 4), (&[0, 4], 4), (&[1, 1], 4)] {
            let mut a = adapter.clone();
            let kept = Some(KeptFeatures { indices, full });
            assert!(a.unprune_layer("l", kept, None).is_err(), "{indices:?}");
        }
        let mut a = adapter.clone();
        let err = a.unprune_layer("m", None, None).unwrap_err().to_string();
        assert!(err.contains("no layer `m`"), "{err}");
    }
}
