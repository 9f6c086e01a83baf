//! [`ClipEncoder`]: a stack of pre-LN [`ClipEncoderLayer`]s (HF `encoder.layers.N`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::{ClipActivation, ClipAttention, ClipAttentionConfig, ClipVisionConfig};

/// Configuration of [`ClipEncoderLayer`].
#[derive(Config, Debug)]
pub struct ClipEncoderLayerConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[config(default = "ClipActivation::QuickGelu")]
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Dropout on attention probabilities (training only).
    #[config(default = 0.0)]
    pub attention_dropout: f64,
}

impl ClipEncoderLayerConfig {
    /// The layer configuration of a [`ClipVisionConfig`] (every layer has the same).
    pub fn from_clip(config: &ClipVisionConfig) -> Self {
        Self::new(config.hidden_size, config.num_attention_heads, config.intermediate_size)
            .with_hidden_act(config.hidden_act)
            .with_layer_norm_eps(config.layer_norm_eps)
            .with_attention_dropout(config.attention_dropout)
    }

    /// Builds the layer on `device` (weights lazily initialised); it maps `[batch, seq, d]` to
    /// `[batch, seq, d]`, with `mlp.fc1` `[d, intermediate_size]` and `mlp.fc2`
    /// `[intermediate_size, d]`.
    ///
    /// # Panics
    /// If `num_attention_heads` is zero or does not divide `hidden_size`.
    pub fn init(&self, device: &Device) -> ClipEncoderLayer {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let norm = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        ClipEncoderLayer {
            self_attn: ClipAttentionConfig::new(d, self.num_attention_heads)
                .with_attention_dropout(self.attention_dropout)
                .init(device),
            layer_norm1: norm(),
            mlp: ClipMlp {
                fc1: LinearConfig::new(d, f).init(device),
                fc2: LinearConfig::new(f, d).init(device),
                activation: self.hidden_act,
            },
            layer_norm2: norm(),
        }
    }
}

/// Configuration of [`ClipEncoder`].
#[derive(Config, Debug)]
pub struct ClipEncoderConfig {
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Every layer's configuration.
    pub layer: ClipEncoderLayerConfig,
}

impl ClipEncoderConfig {
    /// The encoder configuration of a [`ClipVisionConfig`].
    pub fn from_clip(config: &ClipVisionConfig) -> Self {
        Self::new(config.num_hidden_layers, ClipEncoderLayerConfig::from_clip(config))
    }

    /// Builds the encoder on `device` (weights lazily initialised); it maps `[batch, seq, d]`
    /// to `[batch, seq, d]`.
    ///
    /// # Panics
    /// As [`ClipEncoderLayerConfig::init`].
    pub fn init(&self, device: &Device) -> ClipEncoder {
        ClipEncoder {
            layers: (0..self.num_hidden_layers).map(|_| self.layer.init(device)).collect(),
        }
    }
}

/// HF `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// Up projection `[d, intermediate_size]`.
    pub fc1: Linear,
    /// Down projection `[intermediate_size, d]`.
    pub fc2: Linear,
    /// Activation (HF `hidden_act`).
    #[module(skip)]
    pub activation: ClipActivation,
}

impl ClipMlp {
    /// # Shapes
    /// - input, output: `[batch, seq, d]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(self.activation.forward(self.fc1.forward(x)))
    }
}

/// HF `CLIPEncoderLayer` (pre-LN, like a ViT layer): `x + self_attn(layer_norm1(x))`, then
/// `x + mlp(layer_norm2(x))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    /// HF `self_attn`.
    pub self_attn: ClipAttention,
    /// HF `layer_norm1` (before attention).
    pub layer_norm1: LayerNorm,
    /// HF `mlp`.
    pub mlp: ClipMlp,
    /// HF `layer_norm2` (before the MLP).
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let x = hidden.clone() + self.self_attn.forward(self.layer_norm1.forward(hidden));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// HF `CLIPEncoder` (module path `encoder.layers.N`).
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// HF `layers`.
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.layers.iter().fold(hidden, |h, layer| layer.forward(h))
    }
}
