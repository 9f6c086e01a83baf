//! [`ViTEncoder`]: a stack of pre-LN [`ViTLayer`]s.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::activation::{gelu_approximate, relu, silu};
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

use super::{ViTAttention, ViTAttentionConfig, ViTConfig};
use crate::bert::HiddenAct;

/// Configuration of [`ViTLayer`].
#[derive(Config, Debug)]
pub struct ViTLayerConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[config(default = "HiddenAct::Gelu")]
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon.
    #[config(default = 1e-12)]
    pub layer_norm_eps: f64,
    /// Biases on query, key and value.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// Dropout on sublayer outputs (training only).
    #[config(default = 0.0)]
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities (training only).
    #[config(default = 0.0)]
    pub attention_dropout: f64,
}

impl ViTLayerConfig {
    /// The layer configuration of a [`ViTConfig`] (every layer has the same).
    pub fn from_vit(config: &ViTConfig) -> Self {
        Self::new(config.hidden_size, config.num_attention_heads, config.intermediate_size)
            .with_hidden_act(config.hidden_act)
            .with_layer_norm_eps(config.layer_norm_eps)
            .with_qkv_bias(config.qkv_bias)
            .with_hidden_dropout(config.hidden_dropout_prob)
            .with_attention_dropout(config.attention_probs_dropout_prob)
    }

    /// Builds the layer on `device` (weights lazily initialised); it maps `[batch, seq, d]` to
    /// `[batch, seq, d]`, with `intermediate.dense` `[d, intermediate_size]` and `output.dense`
    /// `[intermediate_size, d]`.
    ///
    /// # Panics
    /// If `num_attention_heads` is zero or does not divide `hidden_size`.
    pub fn init(&self, device: &Device) -> ViTLayer {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let norm = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        ViTLayer {
            attention: ViTAttentionConfig::new(d, self.num_attention_heads)
                .with_qkv_bias(self.qkv_bias)
                .with_attention_dropout(self.attention_dropout)
                .with_hidden_dropout(self.hidden_dropout)
                .init(device),
            intermediate: ViTIntermediate {
                dense: LinearConfig::new(d, f).init(device),
                activation: self.hidden_act,
            },
            output: ViTOutput {
                dense: LinearConfig::new(f, d).init(device),
                dropout: DropoutConfig::new(self.hidden_dropout).init(),
            },
            layernorm_before: norm(),
            layernorm_after: norm(),
        }
    }
}

/// Configuration of [`ViTEncoder`].
#[derive(Config, Debug)]
pub struct ViTEncoderConfig {
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Every layer's configuration.
    pub layer: ViTLayerConfig,
}

impl ViTEncoderConfig {
    /// The encoder configuration of a [`ViTConfig`].
    pub fn from_vit(config: &ViTConfig) -> Self {
        Self::new(config.num_hidden_layers, ViTLayerConfig::from_vit(config))
    }

    /// Builds the encoder on `device` (weights lazily initialised); it maps `[batch, seq, d]`
    /// to `[batch, seq, d]`.
    ///
    /// # Panics
    /// As [`ViTLayerConfig::init`].
    pub fn init(&self, device: &Device) -> ViTEncoder {
        ViTEncoder { layer: (0..self.num_hidden_layers).map(|_| self.layer.init(device)).collect() }
    }
}

/// HF `ViTIntermediate`: `act(dense(x))`.
#[derive(Module, Debug)]
pub struct ViTIntermediate {
    /// Up projection `[d, intermediate_size]`.
    pub dense: Linear,
    /// Activation.
    #[module(skip)]
    pub activation: HiddenAct,
}

impl ViTIntermediate {
    /// # Shapes
    /// - input: `[batch, seq, d]`; output: `[batch, seq, intermediate_size]`
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

/// HF `ViTOutput`: `dropout(dense(h)) + residual`.
#[derive(Module, Debug)]
pub struct ViTOutput {
    /// Down projection `[intermediate_size, d]`.
    pub dense: Linear,
    /// Dropout (training only).
    pub dropout: Dropout,
}

/// HF `ViTLayer` (pre-LN): `x + attn(ln_before(x))`, then `x + mlp(ln_after(x))`.
#[derive(Module, Debug)]
pub struct ViTLayer {
    /// HF `attention`.
    pub attention: ViTAttention,
    /// HF `intermediate`.
    pub intermediate: ViTIntermediate,
    /// HF `output`.
    pub output: ViTOutput,
    /// HF `layernorm_before`.
    pub layernorm_before: LayerNorm,
    /// HF `layernorm_after`.
    pub layernorm_after: LayerNorm,
}

impl ViTLayer {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let x = hidden.clone() + self.attention.forward(self.layernorm_before.forward(hidden));
        let inner = self.intermediate.forward(self.layernorm_after.forward(x.clone()));
        x + self.output.dropout.forward(self.output.dense.forward(inner))
    }
}

/// HF `ViTEncoder` (module path `encoder.layer.N`).
#[derive(Module, Debug)]
pub struct ViTEncoder {
    /// HF `layer`.
    pub layer: Vec<ViTLayer>,
}

impl ViTEncoder {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.layer.iter().fold(hidden, |h, layer| layer.forward(h))
    }
}
