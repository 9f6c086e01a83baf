//! [`LlamaMlp`]: the SwiGLU feed-forward layer, `down(silu(gate(x)) ⊙ up(x))`.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::LlamaConfig;

/// Configuration of [`LlamaMlp`].
#[derive(Config, Debug)]
pub struct LlamaMlpConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Inner width of the SwiGLU layer.
    pub intermediate_size: usize,
    /// Whether the three projections have biases.
    #[config(default = false)]
    pub bias: bool,
}

impl LlamaMlpConfig {
    /// The MLP configuration of a [`LlamaConfig`] (biases as [`LlamaConfig::mlp_bias`] says).
    pub fn from_llama(config: &LlamaConfig) -> Self {
        Self::new(config.hidden_size, config.intermediate_size).with_bias(config.mlp_bias())
    }

    /// Builds the layer on `device` (weights lazily initialised): `gate_proj` and `up_proj`
    /// `[d, intermediate_size]`, `down_proj` `[intermediate_size, d]`.
    pub fn init(&self, device: &Device) -> LlamaMlp {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(self.bias).init(device);
        let (hidden, intermediate) = (self.hidden_size, self.intermediate_size);
        LlamaMlp {
            gate_proj: linear(hidden, intermediate),
            up_proj: linear(hidden, intermediate),
            down_proj: linear(intermediate, hidden),
        }
    }
}

/// HF `LlamaMLP` / `Qwen2MLP` (module path `mlp`).
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// Gate projection `[d, intermediate]` (HF `gate_proj`).
    pub gate_proj: Linear,
    /// Up projection `[d, intermediate]` (HF `up_proj`).
    pub up_proj: Linear,
    /// Down projection `[intermediate, d]` (HF `down_proj`).
    pub down_proj: Linear,
}

impl LlamaMlp {
    /// # Shapes
    /// - input, output: `[batch, seq, d]`
    ///
    /// # Panics
    /// If the last input dimension is not `d`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
