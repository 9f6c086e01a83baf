//! [`LlamaMlp`]: the SwiGLU feed-forward layer, `down(silu(gate(x)) ⊙ up(x))`.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Linear, LinearConfig};

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
    /// A SwiGLU layer of width `hidden` and inner width `intermediate` on `device`, with biases
    /// when `bias` (weights lazily initialised).
    pub fn new(hidden: usize, intermediate: usize, bias: bool, device: &Device) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(bias).init(device);
        Self {
            gate_proj: linear(hidden, intermediate),
            up_proj: linear(hidden, intermediate),
            down_proj: linear(intermediate, hidden),
        }
    }

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
