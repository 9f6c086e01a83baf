//! [`ClipAttention`]: multi-head self-attention of a CLIP vision layer (HF `self_attn`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

use super::ClipVisionConfig;
use crate::vit::multi_head_attention;

/// HF `CLIPAttention` without a mask (the vision tower attends to every token):
/// `out_proj(mha(q_proj(x), k_proj(x), v_proj(x)))`. The math is ViT's
/// ([`multi_head_attention`]); HF scales the queries by `head_dim^-0.5` before the product,
/// which is the same.
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query projection `[d, d]`, with bias.
    pub q_proj: Linear,
    /// Key projection `[d, d]`, with bias.
    pub k_proj: Linear,
    /// Value projection `[d, d]`, with bias.
    pub v_proj: Linear,
    /// Output projection `[d, d]`, with bias.
    pub out_proj: Linear,
    /// Dropout on the attention probabilities (training only).
    pub dropout: Dropout,
    /// Number of heads.
    pub num_heads: usize,
}

impl ClipAttention {
    /// Builds the layer of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ClipVisionConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        let proj = || LinearConfig::new(d, d).init(device);
        Self {
            q_proj: proj(),
            k_proj: proj(),
            v_proj: proj(),
            out_proj: proj(),
            dropout: DropoutConfig::new(config.attention_dropout).init(),
            num_heads: config.num_attention_heads,
        }
    }

    /// # Shapes
    /// - `hidden` (already normalised), output (before the residual): `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let q = self.q_proj.forward(hidden.clone());
        let k = self.k_proj.forward(hidden.clone());
        let v = self.v_proj.forward(hidden);
        self.out_proj.forward(multi_head_attention(q, k, v, self.num_heads, &self.dropout))
    }
}
