//! [`KvCache`]: the keys and values of the positions already processed, per layer, so that
//! decoding one more token costs one position's work.

use burn::tensor::Tensor;

/// The cached keys and values of one attention layer, after RoPE, before the GQA head
/// expansion: `[batch, num_key_value_heads, cached_len, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKvCache {
    /// Cached keys.
    pub key: Option<Tensor<4>>,
    /// Cached values.
    pub value: Option<Tensor<4>>,
}

impl LayerKvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new keys and values and returns all of them (cached first).
    ///
    /// # Shapes
    /// - `key`, `value`: `[batch, kv_heads, new, head_dim]`
    /// - outputs: `[batch, kv_heads, cached + new, head_dim]`
    ///
    /// # Panics
    /// If batch, heads or head width differ from the cached ones.
    pub fn append(&mut self, key: Tensor<4>, value: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let cat = |old: Option<Tensor<4>>, new: Tensor<4>| match old {
            Some(old) => {
                let [b, h, _, d] = old.dims();
                let [nb, nh, _, nd] = new.dims();
                assert_eq!((b, h, d), (nb, nh, nd), "LayerKvCache::append: shape mismatch");
                Tensor::cat(vec![old, new], 2)
            }
            None => new,
        };
        let key = cat(self.key.take(), key);
        let value = cat(self.value.take(), value);
        self.key = Some(key.clone());
        self.value = Some(value.clone());
        (key, value)
    }
}

/// A KV cache for every layer of a [`LlamaForCausalLM`](super::LlamaForCausalLM); create it
/// with [`LlamaForCausalLM::new_cache`](super::LlamaForCausalLM::new_cache) and pass it to every
/// forward call of one sequence (batch).
///
/// Besides the keys and values it carries, per row, which cached positions are real tokens
/// (so later calls never attend cached pads) and the position id of the row's next token (the
/// number of real tokens cached), both updated by the model's forward calls.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKvCache>,
    key_mask: Vec<Vec<bool>>,
    next_positions: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerKvCache::default(); num_layers], ..Self::default() }
    }

    /// Number of cached positions (slots, pads included): the slot of the next token.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKvCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per row, whether each cached position is a real token (`[batch][len]`); empty before
    /// the first forward call through the model.
    pub fn key_mask(&self) -> &[Vec<bool>] {
        &self.key_mask
    }

    /// Per row, the position id of the next token (its number of cached real tokens); empty
    /// before the first forward call through the model.
    pub fn next_positions(&self) -> &[usize] {
        &self.next_positions
    }

    /// The key mask and next positions of `batch` rows as the next call sees them: positions
    /// cached without the model's bookkeeping (through [`LayerKvCache::append`] directly)
    /// count as real tokens.
    ///
    /// # Panics
    /// If the recorded rows are not `batch`.
    pub(crate) fn state(&self, batch: usize) -> (Vec<Vec<bool>>, Vec<usize>) {
        let len = self.len();
        if self.key_mask.is_empty() {
            return (vec![vec![true; len]; batch], vec![len; batch]);
        }
        assert_eq!(
            self.key_mask.len(),
            batch,
            "KvCache: the cache holds {} rows, the input {batch}",
            self.key_mask.len()
        );
        let (mut key_mask, mut next) = (self.key_mask.clone(), self.next_positions.clone());
        for (keys, next) in key_mask.iter_mut().zip(&mut next) {
            *next += len.saturating_sub(keys.len());
            keys.resize(len, true);
        }
        (key_mask, next)
    }

    /// Records a forward call's real tokens after `state` (what [`state`](Self::state)
    /// returned before the call).
    pub(crate) fn record(
        &mut self,
        (mut key_mask, mut next): (Vec<Vec<bool>>, Vec<usize>),
        mask: &super::PaddingMask,
    ) {
        for (r, (keys, next)) in key_mask.iter_mut().zip(&mut next).enumerate() {
            keys.extend_from_slice(mask.row(r));
            *next += mask.row(r).iter().filter(|&&x| x).count();
        }
        self.key_mask = key_mask;
        self.next_positions = next;
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerKvCache::default();
        }
        self.key_mask.clear();
        self.next_positions.clear();
    }
}
