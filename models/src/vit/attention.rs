//! [`ViTAttention`]: multi-head self-attention (HF `attention.attention`) and its output
//! projection (HF `attention.output`, no residual or norm inside: ViT blocks are pre-LN).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

use super::ViTConfig;

/// HF `ViTSelfAttention`: scaled dot-product attention over every token (no mask).
#[derive(Module, Debug)]
pub struct ViTSelfAttention {
    /// Query projection `[d, d]`.
    pub query: Linear,
    /// Key projection `[d, d]`.
    pub key: Linear,
    /// Value projection `[d, d]`.
    pub value: Linear,
    /// Dropout on the attention probabilities (training only).
    pub dropout: Dropout,
    /// Number of heads.
    pub num_heads: usize,
}

impl ViTSelfAttention {
    /// # Shapes
    /// - `hidden`, output (context before the output projection): `[batch, seq, d]`
    ///
    /// # Panics
    /// If `d` is not the layer's width.
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let q = self.query.forward(hidden.clone());
        let k = self.key.forward(hidden.clone());
        let v = self.value.forward(hidden);
        multi_head_attention(q, k, v, self.num_heads, &self.dropout)
    }
}

/// Unmasked multi-head scaled dot-product attention over already projected queries, keys and
/// values: per head `softmax(q kᵀ / √head_dim) v`, heads concatenated back. Shared by ViT and
/// the CLIP vision tower ([`crate::clip`]), whose attention differs only in parameter names.
///
/// # Shapes
/// - `q`, `k`, `v`, output: `[batch, seq, d]`, with `d` a multiple of `num_heads`
///
/// # Panics
/// If `d` is not a multiple of `num_heads` or the shapes differ.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    num_heads: usize,
    dropout: &Dropout,
) -> Tensor<3> {
    let [batch, seq, d] = q.dims();
    assert!(
        num_heads > 0 && d.is_multiple_of(num_heads),
        "multi_head_attention: width {d} is not a multiple of {num_heads} heads"
    );
    let hd = d / num_heads;
    let split = |x: Tensor<3>| x.reshape([batch, seq, num_heads, hd]).swap_dims(1, 2);
    let (q, k, v) = (split(q), split(k), split(v));
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
    let probs = dropout.forward(softmax(scores, 3));
    probs.matmul(v).swap_dims(1, 2).reshape([batch, seq, d])
}

/// HF `ViTSelfOutput`: `dropout(dense(context))`.
#[derive(Module, Debug)]
pub struct ViTSelfOutput {
    /// Output projection `[d, d]`.
    pub dense: Linear,
    /// Dropout (training only).
    pub dropout: Dropout,
}

/// Configuration of [`ViTAttention`].
#[derive(Config, Debug)]
pub struct ViTAttentionConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Number of heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Biases on query, key and value.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// Dropout on the attention probabilities (training only).
    #[config(default = 0.0)]
    pub attention_dropout: f64,
    /// Dropout on the output projection (training only).
    #[config(default = 0.0)]
    pub hidden_dropout: f64,
}

impl ViTAttentionConfig {
    /// The attention configuration of a [`ViTConfig`].
    pub fn from_vit(config: &ViTConfig) -> Self {
        Self::new(config.hidden_size, config.num_attention_heads)
            .with_qkv_bias(config.qkv_bias)
            .with_attention_dropout(config.attention_probs_dropout_prob)
            .with_hidden_dropout(config.hidden_dropout_prob)
    }

    /// Builds the layer on `device` (weights lazily initialised): `attention.{query,key,value}`
    /// `[d, d]` (biases when `qkv_bias`) and `output.dense` `[d, d]` with bias.
    ///
    /// # Panics
    /// If `num_attention_heads` is zero or does not divide `hidden_size`.
    pub fn init(&self, device: &Device) -> ViTAttention {
        let d = self.hidden_size;
        assert!(
            self.num_attention_heads > 0 && d.is_multiple_of(self.num_attention_heads),
            "ViTAttentionConfig: hidden_size {d} is not a multiple of num_attention_heads {}",
            self.num_attention_heads
        );
        let qkv = || LinearConfig::new(d, d).with_bias(self.qkv_bias).init(device);
        ViTAttention {
            attention: ViTSelfAttention {
                query: qkv(),
                key: qkv(),
                value: qkv(),
                dropout: DropoutConfig::new(self.attention_dropout).init(),
                num_heads: self.num_attention_heads,
            },
            output: ViTSelfOutput {
                dense: LinearConfig::new(d, d).init(device),
                dropout: DropoutConfig::new(self.hidden_dropout).init(),
            },
        }
    }
}

/// HF `ViTAttention`: `attention` then `output` (module paths `attention.attention.query`,
/// `attention.output.dense`, as in HF).
#[derive(Module, Debug)]
pub struct ViTAttention {
    /// HF `attention`.
    pub attention: ViTSelfAttention,
    /// HF `output`.
    pub output: ViTSelfOutput,
}

impl ViTAttention {
    /// # Shapes
    /// - `hidden` (already normalised), output (before the residual): `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let context = self.attention.forward(hidden);
        self.output.dropout.forward(self.output.dense.forward(context))
    }
}
