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
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerKvCache::default(); num_layers] }
    }

    /// Number of cached positions (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKvCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerKvCache::default();
        }
    }
}
