//! [`BertEncoder`]: a stack of post-LN [`BertLayer`]s (attention, then feed-forward).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::activation::{gelu_approximate, relu, silu};
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

use super::{BertAttention, BertAttentionConfig, BertConfig, HiddenAct};

/// Configuration of [`BertEncoder`].
#[derive(Config, Debug)]
pub struct BertEncoderConfig {
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[config(default = "HiddenAct::Gelu")]
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon.
    #[config(default = 1e-12)]
    pub layer_norm_eps: f64,
    /// Dropout on sublayer outputs (training only).
    #[config(default = 0.1)]
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities (training only).
    #[config(default = 0.1)]
    pub attention_dropout: f64,
}

impl BertEncoderConfig {
    /// The encoder configuration of a [`BertConfig`].
    pub fn from_bert(config: &BertConfig) -> Self {
        Self::new(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
        )
        .with_hidden_act(config.hidden_act)
        .with_layer_norm_eps(config.layer_norm_eps)
        .with_hidden_dropout(config.hidden_dropout_prob)
        .with_attention_dropout(config.attention_probs_dropout_prob)
    }

    /// Builds the encoder on `device` (weights lazily initialised).
    ///
    /// # Panics
    /// If `num_attention_heads` does not divide `hidden_size`.
    pub fn init(&self, device: &Device) -> BertEncoder {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let attention = BertAttentionConfig::new(d, self.num_attention_heads)
            .with_layer_norm_eps(self.layer_norm_eps)
            .with_attention_dropout(self.attention_dropout)
            .with_hidden_dropout(self.hidden_dropout);
        let layer = (0..self.num_hidden_layers)
            .map(|_| BertLayer {
                attention: attention.init(device),
                intermediate: BertIntermediate {
                    dense: LinearConfig::new(d, f).init(device),
                    activation: self.hidden_act,
                },
                output: BertOutput {
                    dense: LinearConfig::new(f, d).init(device),
                    layer_norm: LayerNormConfig::new(d)
                        .with_epsilon(self.layer_norm_eps)
                        .init(device),
                    dropout: DropoutConfig::new(self.hidden_dropout).init(),
                },
            })
            .collect();
        BertEncoder { layer }
    }
}

/// HF `BertIntermediate`: `act(dense(x))`.
#[derive(Module, Debug)]
pub struct BertIntermediate {
    /// Up projection `[d, intermediate_size]`.
    pub dense: Linear,
    /// Activation.
    #[module(skip)]
    pub activation: HiddenAct,
}

impl BertIntermediate {
    /// # Shapes
    /// - input: `[batch, seq, d]`
    /// - output: `[batch, seq, intermediate_size]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.dense.forward(x);
        match self.activation {
            HiddenAct::Gelu => emloc::ops::gelu(x),
            HiddenAct::GeluNew => gelu_approximate(x),
            HiddenAct::Relu => relu(x),
            HiddenAct::Silu => silu(x),
        }
    }
}

/// HF `BertOutput`: `LayerNorm(dropout(dense(h)) + input)`.
#[derive(Module, Debug)]
pub struct BertOutput {
    /// Down projection `[intermediate_size, d]`.
    pub dense: Linear,
    /// HF `LayerNorm`.
    pub layer_norm: LayerNorm,
    /// Dropout (training only).
    pub dropout: Dropout,
}

impl BertOutput {
    /// # Shapes
    /// - `h`: `[batch, seq, intermediate_size]`
    /// - `input`, output: `[batch, seq, d]`
    pub fn forward(&self, h: Tensor<3>, input: Tensor<3>) -> Tensor<3> {
        let x = self.dropout.forward(self.dense.forward(h));
        self.layer_norm.forward(x + input)
    }
}

/// HF `BertLayer` (post-LN): attention block, then feed-forward block.
#[derive(Module, Debug)]
pub struct BertLayer {
    /// HF `attention` (`attention.self`, `attention.output`).
    pub attention: BertAttention,
    /// HF `intermediate`.
    pub intermediate: BertIntermediate,
    /// HF `output`.
    pub output: BertOutput,
}

impl BertLayer {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    /// - `mask_bias`: `[batch, 1, 1, seq]`
    pub fn forward(&self, hidden: Tensor<3>, mask_bias: Option<Tensor<4>>) -> Tensor<3> {
        let attended = self.attention.forward(hidden, mask_bias);
        let inner = self.intermediate.forward(attended.clone());
        self.output.forward(inner, attended)
    }
}

/// HF `BertEncoder`: the layers, module path `encoder.layer.N`.
#[derive(Module, Debug)]
pub struct BertEncoder {
    /// HF `layer` (a list, so paths read `layer.0`, `layer.1`, ...).
    pub layer: Vec<BertLayer>,
}

impl BertEncoder {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    /// - `mask_bias`: `[batch, 1, 1, seq]`
    pub fn forward(&self, hidden: Tensor<3>, mask_bias: Option<Tensor<4>>) -> Tensor<3> {
        self.layer.iter().fold(hidden, |h, layer| layer.forward(h, mask_bias.clone()))
    }
}
