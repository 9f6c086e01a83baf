//! Multi-head attention built on [`emloc::nn::Linear`](crate::nn::Linear): a drop-in for
//! `burn::nn::attention::MultiHeadAttention`.
//!
//! Replace `use burn::nn::attention::{...}` by `use emloc::nn::attention::{...}`: the config (fields
//! and defaults), the module's fields, the forward signatures and the record layout
//! (`query.weight`, `query.bias`, ..., `output.bias`) are Burn's, so Burn checkpoints load
//! unchanged, and [`emulate`](crate::emulate), [`attach_new_adapter`](crate::attach_new_adapter)
//! and the rest of emloc reach the four projections.
//!
//! Burn's [`MhaOutput`] is re-exported (its fields are public). [`MhaInput`] and [`MhaCache`] are
//! emloc's own types with Burn's API: Burn's keep their fields private, so a forward pass outside
//! burn-nn cannot read them. The mask helpers are Burn's, re-exported.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::activation::Gelu;
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::tensor::activation::{quiet_softmax, softmax};
use burn::tensor::{Bool, Device, Tensor, assert_shape};

pub use burn::nn::attention::{
    GeneratePaddingMask, MhaOutput, SeqLengthOption, generate_autoregressive_mask,
    generate_padding_mask,
};

use super::{Linear, LinearConfig};
use crate::{EmlocError, Result};

/// Configuration of a [`MultiHeadAttention`] layer; the same fields and defaults as
/// `burn::nn::attention::MultiHeadAttentionConfig`.
#[derive(Config, Debug)]
pub struct MultiHeadAttentionConfig {
    /// The size of each linear layer.
    pub d_model: usize,
    /// The number of heads.
    pub n_heads: usize,
    /// The dropout rate applied to the attention weights. Default: 0.1
    #[config(default = 0.1)]
    pub dropout: f64,
    /// The value masked attention scores are set to before the softmax. Default: -1.0e4
    /// A value too low might result in NaN.
    #[config(default = -1.0e4)]
    pub min_float: f64,
    /// Use "quiet softmax" (`exp(x_i) / (1 + Σ exp(x_j))`) instead of the regular softmax.
    ///
    /// Reference: <https://www.evanmiller.org/attention-is-off-by-one.html>
    #[config(default = false)]
    pub quiet_softmax: bool,
    /// Initializer of the four projections' weights and biases; Burn's default.
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
    /// Enable bias for the key [`Linear`] layer.
    #[config(default = true)]
    pub key_bias: bool,
    /// Enable bias for the value [`Linear`] layer.
    #[config(default = true)]
    pub value_bias: bool,
    /// Enable bias for the query [`Linear`] layer.
    #[config(default = true)]
    pub query_bias: bool,
    /// Enable bias for the output [`Linear`] layer.
    #[config(default = true)]
    pub output_bias: bool,
}

impl MultiHeadAttentionConfig {
    /// Builds the layer on `device`, exactly as Burn does (same parameter shapes, same
    /// initializer calls in the same order).
    ///
    /// # Panics
    /// Where Burn's `init` panics: `n_heads == 0`, or `dropout` outside `[0, 1)`. Use
    /// [`try_init`](Self::try_init) for a typed error instead.
    pub fn init(&self, device: &Device) -> MultiHeadAttention {
        let linear = LinearConfig::new(self.d_model, self.d_model)
            .with_initializer(self.initializer.clone());
        MultiHeadAttention {
            query: linear.clone().with_bias(self.query_bias).init(device),
            key: linear.clone().with_bias(self.key_bias).init(device),
            value: linear.clone().with_bias(self.value_bias).init(device),
            output: linear.clone().with_bias(self.output_bias).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            activation: Gelu::new(),
            n_heads: self.n_heads,
            d_k: self.d_model / self.n_heads,
            min_float: self.min_float,
            quiet_softmax: self.quiet_softmax,
            d_model: self.d_model,
        }
    }

    /// Checks what [`init`](Self::init) or a later forward pass would otherwise panic on:
    /// `n_heads` must be positive and divide `d_model`, `dropout` must lie in `[0, 1)` and
    /// `min_float` must not be NaN.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.n_heads == 0 {
            Some("n_heads must be positive".to_string())
        } else if !self.d_model.is_multiple_of(self.n_heads) {
            Some(format!(
                "d_model = {} is not divisible by n_heads = {}",
                self.d_model, self.n_heads
            ))
        } else if !(0.0..1.0).contains(&self.dropout) {
            Some(format!("dropout must be in [0, 1), got {}", self.dropout))
        } else if self.min_float.is_nan() {
            Some("min_float is NaN".to_string())
        } else {
            None
        };
        match problem {
            Some(p) => Err(EmlocError::InvalidConfig(format!("MultiHeadAttentionConfig: {p}"))),
            None => Ok(()),
        }
    }

    /// [`validate`](Self::validate)s the config, then [`init`](Self::init)s the layer.
    pub fn try_init(&self, device: &Device) -> Result<MultiHeadAttention> {
        self.validate()?;
        Ok(self.init(device))
    }
}

/// The multi-head attention of [Attention Is All You Need](https://arxiv.org/abs/1706.03762),
/// with the same fields, forward and record as `burn::nn::attention::MultiHeadAttention` but
/// built on [`emloc::nn::Linear`](crate::nn::Linear).
///
/// # Params
/// - `query`, `key`, `value`, `output`: [`Linear`] layers with `d_model` input and output
///   features.
///
/// Should be created with [`MultiHeadAttentionConfig`].
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct MultiHeadAttention {
    /// Linear layer to transform the input features into the query space.
    pub query: Linear,
    /// Linear layer to transform the input features into the key space.
    pub key: Linear,
    /// Linear layer to transform the input features into the value space.
    pub value: Linear,
    /// Linear layer to transform the output features back to the original space.
    pub output: Linear,
    /// Dropout applied to the attention weights.
    pub dropout: Dropout,
    /// Activation function; unused by the forward pass, kept because Burn's module has it.
    pub activation: Gelu,
    /// The size of each linear layer.
    pub d_model: usize,
    /// The number of heads.
    pub n_heads: usize,
    /// Size of the key and query vectors.
    pub d_k: usize,
    /// The value masked attention scores are set to.
    pub min_float: f64,
    /// Use "quiet softmax" instead of regular softmax.
    pub quiet_softmax: bool,
}

impl ModuleDisplay for MultiHeadAttention {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new().with_new_line_after_attribute(false).optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_model", &self.d_model)
            .add("n_heads", &self.n_heads)
            .add("d_k", &self.d_k)
            .add("dropout", &self.dropout.prob)
            .add("min_float", &self.min_float)
            .add("quiet_softmax", &self.quiet_softmax)
            .optional()
    }
}

/// [`MultiHeadAttention`] forward input: Burn's `MhaInput` API (`self_attn`, `new`, `mask_pad`,
/// `mask_attn`).
#[derive(Debug, Clone)]
pub struct MhaInput {
    /// Shape `[batch_size, seq_length_1, d_model]`.
    query: Tensor<3>,
    /// Shape `[batch_size, seq_length_2, d_model]`.
    key: Tensor<3>,
    /// Shape `[batch_size, seq_length_2, d_model]`.
    value: Tensor<3>,
    mask_pad: Option<Tensor<2, Bool>>,
    mask_attn: Option<Tensor<3, Bool>>,
}

impl MhaInput {
    /// Self-attention input: query, key and value are `tensor`.
    ///
    /// # Shapes
    /// - tensor: `[batch_size, seq_length, d_model]`
    pub fn self_attn(tensor: Tensor<3>) -> Self {
        Self::new(tensor.clone(), tensor.clone(), tensor)
    }

    /// Input with separate query, key and value.
    ///
    /// # Shapes
    /// - query: `[batch_size, seq_length_1, d_model]`
    /// - key, value: `[batch_size, seq_length_2, d_model]`
    pub fn new(query: Tensor<3>, key: Tensor<3>, value: Tensor<3>) -> Self {
        Self { query, key, value, mask_pad: None, mask_attn: None }
    }

    /// Registers the padding mask (`true` = padded key position, masked out).
    ///
    /// # Shapes
    /// - mask_pad: `[batch_size, seq_length_2]`
    pub fn mask_pad(mut self, mask_pad: Tensor<2, Bool>) -> Self {
        self.mask_pad = Some(mask_pad);
        self
    }

    /// Registers the attention mask (`true` = masked out).
    ///
    /// # Shapes
    /// - mask_attn: `[batch_size, seq_length_1, seq_length_2]`
    pub fn mask_attn(mut self, mask_attn: Tensor<3, Bool>) -> Self {
        self.mask_attn = Some(mask_attn);
        self
    }
}

impl MultiHeadAttention {
    /// Applies the attention, with Burn's maths: per-head scaled dot products
    /// `q kᵀ / sqrt(d_k)`, masked positions set to `min_float`, (quiet) softmax over the keys,
    /// dropout on the weights, then the output projection.
    ///
    /// # Shapes
    /// - query: `[batch_size, seq_length_1, d_model]`
    /// - key: `[batch_size, seq_length_2, d_model]`
    /// - value: `[batch_size, seq_length_2, d_model]`
    /// - output context: `[batch_size, seq_length_1, d_model]`, weights:
    ///   `[batch_size, n_heads, seq_length_1, seq_length_2]`
    ///
    /// # Panics
    /// If the last axis of `query`, `key` or `value` is not `d_model`, if the batch size of `key`
    /// or `value` differs from `query`, if the sequence length of `value` differs from `key`, or
    /// if a mask does not fit the scores.
    pub fn forward(&self, input: MhaInput) -> MhaOutput {
        let [batch_size, seq_length_1, d_model] = input.query.dims();
        let [_, seq_length_2, _] = input.key.dims();
        assert_shape!(input.query, [_, _, self.d_model]);
        assert_shape!(input.key, [batch_size, _, self.d_model]);
        assert_shape!(input.value, [batch_size, seq_length_2, self.d_model]);

        let query = self.attention_linear(input.query, &self.query);
        let key = self.attention_linear(input.key, &self.key);
        let value = self.attention_linear(input.value, &self.value);

        let attn_scores = self.attn_scores(query, key);
        let weights = self.attn_weights(attn_scores, input.mask_pad, input.mask_attn);

        let context = weights.clone().matmul(value);
        let context = context.swap_dims(1, 2).reshape([batch_size, seq_length_1, d_model]);
        let context = self.output.forward(context);

        MhaOutput { weights, context }
    }

    /// Applies the attention with a cache for autoregressive decoding: only the last position of
    /// each input is projected, the projections of earlier calls are reused (or, for a
    /// cross-attention cache, the key and value projections of the first call).
    ///
    /// # Shapes
    /// As [`forward`](Self::forward); each call's inputs hold the whole sequence so far.
    ///
    /// # Panics
    /// As [`forward`](Self::forward), and if the batch size changes between calls.
    pub fn forward_cache(&self, input: MhaInput, cache: &mut MhaCache) -> MhaOutput {
        let [batch_size, seq_length_1, d_model] = input.query.dims();
        let [_, seq_length_2, _] = input.key.dims();
        assert_shape!(input.query, [_, _, self.d_model]);
        assert_shape!(input.key, [batch_size, _, self.d_model]);
        assert_shape!(input.value, [batch_size, seq_length_2, self.d_model]);

        let query = cache.query.forward(input.query, |t| self.attention_linear(t, &self.query));
        let key = cache.key.forward(input.key, |t| self.attention_linear(t, &self.key));
        let value = cache.value.forward(input.value, |t| self.attention_linear(t, &self.value));

        let attn_scores = self.attn_scores(query, key);
        let weights = self.attn_weights(attn_scores, input.mask_pad, input.mask_attn);

        let context = weights.clone().matmul(value);
        let context = context.swap_dims(1, 2).reshape([batch_size, seq_length_1, d_model]);
        let context = cache.output.forward(context, |t| self.output.forward(t));

        MhaOutput { weights, context }
    }

    fn attn_scores(&self, query: Tensor<4>, key: Tensor<4>) -> Tensor<4> {
        query.matmul(key.transpose()).div_scalar((self.d_k as f32).sqrt())
    }

    fn attn_weights(
        &self,
        mut attn_scores: Tensor<4>,
        mask_pad: Option<Tensor<2, Bool>>,
        mask_attn: Option<Tensor<3, Bool>>,
    ) -> Tensor<4> {
        if let Some(mask_pad) = mask_pad {
            let [batch_size, seq_length] = mask_pad.dims();
            attn_scores = attn_scores
                .mask_fill(mask_pad.reshape([batch_size, 1, 1, seq_length]), self.min_float);
        }
        if let Some(mask_attn) = mask_attn {
            let [batch_size, seq_length_1, seq_length_2] = mask_attn.dims();
            attn_scores = attn_scores.mask_fill(
                mask_attn.reshape([batch_size, 1, seq_length_1, seq_length_2]),
                self.min_float,
            );
        }
        let weights = if self.quiet_softmax {
            quiet_softmax(attn_scores, 3)
        } else {
            softmax(attn_scores, 3)
        };
        self.dropout.forward(weights)
    }

    fn attention_linear(&self, x: Tensor<3>, linear: &Linear) -> Tensor<4> {
        let [batch_size, seq_length, _d_model] = x.dims();
        linear.forward(x).reshape([batch_size, seq_length, self.n_heads, self.d_k]).swap_dims(1, 2)
    }
}

/// Cache of [`MultiHeadAttention::forward_cache`] for autoregressive inference; Burn's
/// `MhaCache` API.
pub struct MhaCache {
    query: LinearCache<4>,
    key: LinearCache<4>,
    value: LinearCache<4>,
    output: LinearCache<3>,
}

impl MhaCache {
    /// A cache for autoregressive self-attention: every projection grows by one position per call.
    pub fn autoregressive() -> Self {
        Self {
            query: LinearCache::Autoregressive(None, 2),
            key: LinearCache::Autoregressive(None, 2),
            value: LinearCache::Autoregressive(None, 2),
            output: LinearCache::Autoregressive(None, 1),
        }
    }

    /// A cache for autoregressive cross-attention: the key and value projections of the first
    /// call (the fixed memory) are reused as they are.
    pub fn autoregressive_cross_attention() -> Self {
        Self {
            query: LinearCache::Autoregressive(None, 2),
            key: LinearCache::Full(None),
            value: LinearCache::Full(None),
            output: LinearCache::Autoregressive(None, 1),
        }
    }
}

/// One projection's cache: the projected tensor so far, and for the autoregressive kind the axis
/// along which new positions are appended. Same behaviour as burn-nn's `TensorCache`.
enum LinearCache<const D: usize> {
    Autoregressive(Option<Tensor<D>>, usize),
    Full(Option<Tensor<D>>),
}

impl<const D: usize> LinearCache<D> {
    fn forward(&mut self, tensor: Tensor<3>, func: impl Fn(Tensor<3>) -> Tensor<D>) -> Tensor<D> {
        match self {
            LinearCache::Autoregressive(state, dim) => {
                let new = match state.take() {
                    Some(old) => {
                        let [batch_size, seq_length, d_model] = tensor.dims();
                        let last =
                            tensor.slice([0..batch_size, (seq_length - 1)..seq_length, 0..d_model]);
                        Tensor::cat(vec![old, func(last)], *dim)
                    }
                    None => func(tensor),
                };
                *state = Some(new.clone());
                new
            }
            LinearCache::Full(state) => state.get_or_insert_with(|| func(tensor)).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn config_defaults_are_burns() {
        let ours = MultiHeadAttentionConfig::new(8, 2);
        let burn = burn::nn::attention::MultiHeadAttentionConfig::new(8, 2);
        assert_eq!(ours.dropout, burn.dropout);
        assert_eq!(ours.min_float, burn.min_float);
        assert_eq!(ours.quiet_softmax, burn.quiet_softmax);
        assert_eq!(ours.initializer, burn.initializer);
        assert_eq!(
            [ours.key_bias, ours.value_bias, ours.query_bias, ours.output_bias],
            [burn.key_bias, burn.value_bias, burn.query_bias, burn.output_bias]
        );
    }

    #[test]
    fn display_matches_burn() {
        let device = Device::flex();
        let ours = MultiHeadAttentionConfig::new(2, 4).init(&device);
        let burn = burn::nn::attention::MultiHeadAttentionConfig::new(2, 4).init(&device);
        assert_eq!(format!("{ours}"), format!("{burn}"));
    }

    #[test]
    fn invalid_configs_are_typed_errors() {
        let device = Device::flex();
        for config in [
            MultiHeadAttentionConfig::new(8, 0),
            MultiHeadAttentionConfig::new(8, 3),
            MultiHeadAttentionConfig::new(8, 2).with_dropout(1.0),
            MultiHeadAttentionConfig::new(8, 2).with_min_float(f64::NAN),
        ] {
            match config.try_init(&device) {
                Err(EmlocError::InvalidConfig(m)) => {
                    assert!(m.starts_with("MultiHeadAttentionConfig"), "{m}")
                }
                other => panic!("{config:?}: expected InvalidConfig, got {:?}", other.map(|_| ())),
            }
        }
        assert!(MultiHeadAttentionConfig::new(8, 2).try_init(&device).is_ok());
    }

    #[test]
    fn padded_keys_do_not_change_the_output() {
        // Analytic property: masked key positions get softmax weight exp(min_float - max) ≈ 0,
        // so changing their content does not change the context of the other positions.
        let device = Device::flex();
        let mha = MultiHeadAttentionConfig::new(8, 2).init(&device);
        let x = Tensor::<3>::random([2, 5, 8], Distribution::Default, &device);
        let y = x.clone().slice_assign(
            [0..2, 3..5, 0..8],
            Tensor::random([2, 2, 8], Distribution::Default, &device),
        );
        let mask = Tensor::<1, burn::tensor::Int>::arange(0..5, &device)
            .greater_equal_elem(3)
            .unsqueeze::<2>()
            .repeat_dim(0, 2);
        let a = mha.forward(MhaInput::new(x.clone(), x.clone(), x.clone()).mask_pad(mask.clone()));
        let b = mha.forward(MhaInput::new(x.clone(), y.clone(), y).mask_pad(mask));
        let diff = (a.context - b.context).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
        let masked = a.weights.slice([0..2, 0..2, 0..5, 3..5]).abs().max().into_scalar::<f32>();
        assert!(masked < 1e-6, "{masked}");
    }
}
