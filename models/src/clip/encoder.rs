//! [`ClipEncoder`]: a stack of pre-LN [`ClipEncoderLayer`]s (HF `encoder.layers.N`).

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::{ClipActivation, ClipAttention, ClipVisionConfig};

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
    /// Builds a layer of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ClipVisionConfig, device: &Device) -> Self {
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let norm = || LayerNormConfig::new(d).with_epsilon(config.layer_norm_eps).init(device);
        Self {
            self_attn: ClipAttention::new(config, device),
            layer_norm1: norm(),
            mlp: ClipMlp {
                fc1: LinearConfig::new(d, f).init(device),
                fc2: LinearConfig::new(f, d).init(device),
                activation: config.hidden_act,
            },
            layer_norm2: norm(),
        }
    }

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
    /// Builds the encoder of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ClipVisionConfig, device: &Device) -> Self {
        Self {
            layers: (0..config.num_hidden_layers)
                .map(|_| ClipEncoderLayer::new(config, device))
                .collect(),
        }
    }

    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.layers.iter().fold(hidden, |h, layer| layer.forward(h))
    }
}
