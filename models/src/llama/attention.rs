//! [`LlamaAttention`]: causal self-attention with grouped-query heads (GQA) and RoPE, with an
//! optional [`LayerKvCache`] for incremental decoding and key padding through
//! [`AttentionInputs`].

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::LlamaConfig;
use super::cache::LayerKvCache;
use super::mask::AttentionInputs;
use super::rope::{RopeScaling, RotaryEmbedding};

/// The score of a key a query may not attend: scores are overwritten with it by masked fill
/// (never added as a `{0, 1} · MIN` product, which gives `0 · -inf = NaN` where the value is
/// infinite, as `f32::MIN` becomes in f16/bf16). Every query attends at least itself, so a
/// softmax row never consists of this value alone.
pub const CAUSAL_MASK_BIAS: f32 = f32::MIN;

/// The additive causal bias for `seq` queries at positions `offset..offset + seq` over keys at
/// positions `0..offset + seq`: 0 where the key is not in the future, [`CAUSAL_MASK_BIAS`]
/// where it is (built by masked fill, so no `0 · MIN` products).
///
/// # Shapes
/// - output: `[seq, offset + seq]`
pub fn causal_mask_bias(seq: usize, offset: usize, device: &Device) -> Tensor<2> {
    let total = offset + seq;
    let query_pos = Tensor::<1, Int>::arange(offset as i64..total as i64, device).reshape([seq, 1]);
    let key_pos = Tensor::<1, Int>::arange(0..total as i64, device).reshape([1, total]);
    let future = key_pos.expand([seq, total]).greater(query_pos.expand([seq, total]));
    Tensor::<2>::zeros([seq, total], device).mask_fill(future, CAUSAL_MASK_BIAS)
}

/// The fill value of blocked scores in `dtype`: [`CAUSAL_MASK_BIAS`] (`f32::MIN`), or the
/// dtype's most negative finite value where `f32::MIN` is not representable (f16: -65504,
/// bf16: -3.39e38), as HF's `torch.finfo(dtype).min`.
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_389_251_535_5e38,
        _ => f64::from(CAUSAL_MASK_BIAS),
    }
}

/// Configuration of [`LlamaAttention`].
#[derive(Config, Debug)]
pub struct LlamaAttentionConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); must divide `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one head; must be even (RoPE rotates pairs).
    pub head_dim: usize,
    /// Whether `q_proj`, `k_proj` and `v_proj` have biases.
    #[config(default = false)]
    pub qkv_bias: bool,
    /// Whether `o_proj` has a bias.
    #[config(default = false)]
    pub o_bias: bool,
    /// RoPE base `θ`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RoPE frequency scaling (none by default).
    pub rope_scaling: Option<RopeScaling>,
}

impl LlamaAttentionConfig {
    /// The attention configuration of a [`LlamaConfig`]: its key/value heads and head width
    /// (with HF's defaults when absent), biases as [`LlamaConfig::qkv_bias`] and
    /// [`LlamaConfig::o_bias`] say, and its RoPE `θ` and scaling.
    pub fn from_llama(config: &LlamaConfig) -> Self {
        Self::new(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads(),
            config.head_dim(),
        )
        .with_qkv_bias(config.qkv_bias())
        .with_o_bias(config.o_bias())
        .with_rope_theta(config.rope_theta)
        .with_rope_scaling(config.rope_scaling.clone())
    }

    /// Builds the layer on `device` (weights lazily initialised): `q_proj`
    /// `[d, heads · head_dim]`, `k_proj` and `v_proj` `[d, kv_heads · head_dim]`, `o_proj`
    /// `[heads · head_dim, d]`, and the RoPE frequencies of `head_dim`, `rope_theta` and
    /// `rope_scaling`.
    ///
    /// # Panics
    /// If `num_key_value_heads` is zero or does not divide `num_attention_heads`, or
    /// `head_dim` is zero or odd.
    pub fn init(&self, device: &Device) -> LlamaAttention {
        let d = self.hidden_size;
        let (heads, kv, hd) = (self.num_attention_heads, self.num_key_value_heads, self.head_dim);
        assert!(
            kv > 0 && heads.is_multiple_of(kv),
            "LlamaAttentionConfig: num_attention_heads {heads} is not a multiple of \
             num_key_value_heads {kv}"
        );
        assert!(
            hd > 0 && hd.is_multiple_of(2),
            "LlamaAttentionConfig: head_dim {hd} must be positive and even (RoPE)"
        );
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        LlamaAttention {
            q_proj: linear(d, heads * hd, self.qkv_bias),
            k_proj: linear(d, kv * hd, self.qkv_bias),
            v_proj: linear(d, kv * hd, self.qkv_bias),
            o_proj: linear(heads * hd, d, self.o_bias),
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
            rope: RotaryEmbedding::new(hd, self.rope_theta, self.rope_scaling.as_ref()),
        }
    }
}

/// HF `LlamaAttention` / `Qwen2Attention` (module path `self_attn`).
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// Query projection `[d, heads · head_dim]` (HF `q_proj`).
    pub q_proj: Linear,
    /// Key projection `[d, kv_heads · head_dim]` (HF `k_proj`).
    pub k_proj: Linear,
    /// Value projection `[d, kv_heads · head_dim]` (HF `v_proj`).
    pub v_proj: Linear,
    /// Output projection `[heads · head_dim, d]` (HF `o_proj`).
    pub o_proj: Linear,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (each serves `num_heads / num_kv_heads` query heads).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE frequencies.
    #[module(skip)]
    pub rope: RotaryEmbedding,
}

impl LlamaAttention {
    /// Causal self-attention of `hidden` (positions `offset..offset + seq`, where `offset` is
    /// the number of positions in `cache`, 0 without one) over itself and the cached positions,
    /// without padding. With a cache, this call's keys and values are appended to it.
    ///
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    ///
    /// # Panics
    /// If `d` is not the layer's width, or the cache holds another batch size.
    pub fn forward(&self, hidden: Tensor<3>, cache: Option<&mut LayerKvCache>) -> Tensor<3> {
        let seq = hidden.dims()[1];
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let inputs = AttentionInputs::causal(&self.rope, seq, offset, &hidden.device());
        self.forward_with(hidden, &inputs, cache)
    }

    /// Self-attention of `hidden` over the cached positions and itself, with the RoPE tables
    /// and blocked keys of `inputs` (see [`AttentionInputs`]: causal order plus key padding).
    /// With a cache, this call's keys and values are appended to it.
    ///
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    /// - `inputs.cos`, `inputs.sin`: `[batch or 1, seq, head_dim]`
    /// - `inputs.blocked`: `[batch or 1, seq, cached + seq]`
    ///
    /// # Panics
    /// If `d` is not the layer's width, the cache holds another batch size, or `inputs` does
    /// not match these shapes.
    pub fn forward_with(
        &self,
        hidden: Tensor<3>,
        inputs: &AttentionInputs,
        cache: Option<&mut LayerKvCache>,
    ) -> Tensor<3> {
        let [batch, seq, _] = hidden.dims();
        let (heads, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = heads / kv;

        let q =
            self.q_proj.forward(hidden.clone()).reshape([batch, seq, heads, hd]).swap_dims(1, 2);
        let k = self.k_proj.forward(hidden.clone()).reshape([batch, seq, kv, hd]).swap_dims(1, 2);
        let v = self.v_proj.forward(hidden).reshape([batch, seq, kv, hd]).swap_dims(1, 2);
        let q = self.rope.apply_tables(q, inputs.cos.clone(), inputs.sin.clone());
        let k = self.rope.apply_tables(k, inputs.cos.clone(), inputs.sin.clone());
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let total = k.dims()[2];

        // GQA without copying keys: query heads h = g·group + r share key head g, so the
        // `group` query heads of a key head are stacked along the query axis.
        let q = q.reshape([batch, kv, group * seq, hd]);
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
        let scores = scores.reshape([batch, kv, group, seq, total]);
        let scores = match &inputs.blocked {
            Some(blocked) => {
                let [mb, ms, mt] = blocked.dims();
                assert!(
                    (mb == batch || mb == 1) && ms == seq && mt == total,
                    "LlamaAttention: blocked-key mask {:?} for {batch} rows, {seq} queries, \
                     {total} keys",
                    blocked.dims()
                );
                let blocked = blocked
                    .clone()
                    .reshape([mb, 1, 1, seq, total])
                    .expand([batch, kv, group, seq, total]);
                let fill = mask_value(scores.dtype());
                scores.mask_fill(blocked, fill)
            }
            None => scores,
        };
        // Softmax in f32 whatever the weights' dtype, as HF does (a no-op for f32).
        let dtype = scores.dtype();
        let probs = softmax(scores.cast(FloatDType::F32), 4).cast(dtype).reshape([
            batch,
            kv,
            group * seq,
            total,
        ]);
        let context = probs.matmul(v).reshape([batch, heads, seq, hd]);
        self.o_proj.forward(context.swap_dims(1, 2).reshape([batch, seq, heads * hd]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_bias_masks_only_future_keys() {
        let bias: Vec<f32> =
            causal_mask_bias(2, 3, &Device::default()).into_data().iter::<f32>().collect();
        // Queries at positions 3 and 4 over keys 0..5.
        let m = CAUSAL_MASK_BIAS;
        assert_eq!(bias, vec![0.0, 0.0, 0.0, 0.0, m, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
