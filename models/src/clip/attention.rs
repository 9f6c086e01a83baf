//! [`ClipAttention`]: multi-head self-attention of a CLIP vision layer (HF `self_attn`).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

use super::ClipVisionConfig;
use crate::vit::multi_head_attention;

/// Configuration of [`ClipAttention`].
#[derive(Config, Debug)]
pub struct ClipAttentionConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Number of heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Dropout on the attention probabilities (training only).
    #[config(default = 0.0)]
    pub attention_dropout: f64,
}

impl ClipAttentionConfig {
    /// The attention configuration of a [`ClipVisionConfig`].
    pub fn from_clip(config: &ClipVisionConfig) -> Self {
        Self::new(config.hidden_size, config.num_attention_heads)
            .with_attention_dropout(config.attention_dropout)
    }

    /// Builds the layer on `device` (weights lazily initialised): `q_proj`, `k_proj`,
    /// `v_proj` and `out_proj`, each `[d, d]` with bias.
    ///
    /// # Panics
    /// If `num_attention_heads` is zero or does not divide `hidden_size`.
    pub fn init(&self, device: &Device) -> ClipAttention {
        let d = self.hidden_size;
        assert!(
            self.num_attention_heads > 0 && d.is_multiple_of(self.num_attention_heads),
            "ClipAttentionConfig: hidden_size {d} is not a multiple of num_attention_heads {}",
            self.num_attention_heads
        );
        let proj = || LinearConfig::new(d, d).init(device);
        ClipAttention {
            q_proj: proj(),
            k_proj: proj(),
            v_proj: proj(),
            out_proj: proj(),
            dropout: DropoutConfig::new(self.attention_dropout).init(),
            num_heads: self.num_attention_heads,
        }
    }
}

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
    /// # Shapes
    /// - `hidden` (already normalised), output (before the residual): `[batch, seq, d]`
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let q = self.q_proj.forward(hidden.clone());
        let k = self.k_proj.forward(hidden.clone());
        let v = self.v_proj.forward(hidden);
        self.out_proj.forward(multi_head_attention(q, k, v, self.num_heads, &self.dropout))
    }
}
