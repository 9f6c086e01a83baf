//! [`ViTEncoder`]: a stack of pre-LN [`ViTLayer`]s.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::activation::{gelu_approximate, relu, silu};
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

use super::{ViTAttention, ViTConfig};
use crate::bert::HiddenAct;

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
    /// Builds a layer of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ViTConfig, device: &Device) -> Self {
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let norm = || LayerNormConfig::new(d).with_epsilon(config.layer_norm_eps).init(device);
        Self {
            attention: ViTAttention::new(config, device),
            intermediate: ViTIntermediate {
                dense: LinearConfig::new(d, f).init(device),
                activation: config.hidden_act,
            },
            output: ViTOutput {
                dense: LinearConfig::new(f, d).init(device),
                dropout: DropoutConfig::new(config.hidden_dropout_prob).init(),
            },
            layernorm_before: norm(),
            layernorm_after: norm(),
        }
    }

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
    /// Builds the encoder of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ViTConfig, device: &Device) -> Self {
        Self {
            layer: (0..config.num_hidden_layers).map(|_| ViTLayer::new(config, device)).collect(),
        }
    }

    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.layer.iter().fold(hidden, |h, layer| layer.forward(h))
    }
}
