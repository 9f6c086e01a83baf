//! [`ViTAttention`]: multi-head self-attention (HF `attention.attention`) and its output
//! projection (HF `attention.output`, no residual or norm inside: ViT blocks are pre-LN).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
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
        let [batch, seq, d] = hidden.dims();
        let heads = self.num_heads;
        let hd = d / heads;
        let split = |x: Tensor<3>| x.reshape([batch, seq, heads, hd]).swap_dims(1, 2);
        let q = split(self.query.forward(hidden.clone()));
        let k = split(self.key.forward(hidden.clone()));
        let v = split(self.value.forward(hidden));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
        let probs = self.dropout.forward(softmax(scores, 3));
        probs.matmul(v).swap_dims(1, 2).reshape([batch, seq, d])
    }
}

/// HF `ViTSelfOutput`: `dropout(dense(context))`.
#[derive(Module, Debug)]
pub struct ViTSelfOutput {
    /// Output projection `[d, d]`.
    pub dense: Linear,
    /// Dropout (training only).
    pub dropout: Dropout,
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
    /// Builds the layer of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ViTConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        let qkv = |_| LinearConfig::new(d, d).with_bias(config.qkv_bias).init(device);
        Self {
            attention: ViTSelfAttention {
                query: qkv(0),
                key: qkv(1),
                value: qkv(2),
                dropout: DropoutConfig::new(config.attention_probs_dropout_prob).init(),
                num_heads: config.num_attention_heads,
            },
            output: ViTSelfOutput {
                dense: LinearConfig::new(d, d).init(device),
                dropout: DropoutConfig::new(config.hidden_dropout_prob).init(),
            },
        }
    }

    /// # Shapes
    /// - `hidden` (already normalised), output (before the residual): `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let context = self.attention.forward(hidden);
        self.output.dropout.forward(self.output.dense.forward(context))
    }
}
