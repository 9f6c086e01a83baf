//! CLIP vision encoder (HF `CLIPVisionModel`, `CLIPVisionModelWithProjection`, or the vision
//! half of a `CLIPModel`): bias-free patch convolution plus class and position embeddings,
//! `pre_layrnorm`, a pre-LN encoder, and the pooled output `post_layernorm(class token)`.
//!
//! The math is ViT's ([`crate::vit`]) with other names, a LayerNorm before the encoder instead
//! of after it, and `quick_gelu` (`x σ(1.702 x)`); the patch flattening
//! ([`crate::vit::patch_tokens`]) and the attention ([`crate::vit::multi_head_attention`]) are
//! shared with ViT.
//!
//! ```no_run
//! # fn main() -> emloc_models::Result<()> {
//! use emloc_models::clip::ClipVisionModel;
//! let device = burn::tensor::Device::default();
//! let (model, config) = ClipVisionModel::load("/path/to/clip-vit-base-patch32", &device)?;
//! let s = config.image_size;
//! let pixels = burn::tensor::Tensor::<4>::zeros([1, config.num_channels, s, s], &device);
//! let out = model.forward(pixels);
//! let pooled = out.pooler_output; // [1, d]
//! let embeds = out.image_embeds; // Some([1, projection_dim]) for a CLIPModel checkpoint
//! # Ok(()) }
//! ```
//!
//! # Module paths and checkpoint keys
//!
//! | HF checkpoint key                                          | Burn module path          |
//! |------------------------------------------------------------|---------------------------|
//! | `vision_model.` prefix (or none)                           | no prefix                 |
//! | `embeddings.class_embedding` `[d]`                         | same                      |
//! | `embeddings.patch_embedding.weight` (Conv2d, no bias)      | same                      |
//! | `embeddings.position_embedding.weight` `[patches + 1, d]`  | same (an `Embedding`)     |
//! | `pre_layrnorm.{weight,bias}` (sic)                         | `pre_layrnorm.{gamma,beta}` |
//! | `encoder.layers.N.self_attn.{q,k,v,out}_proj.*`            | same                      |
//! | `encoder.layers.N.layer_norm{1,2}.{weight,bias}`           | `….{gamma,beta}`          |
//! | `encoder.layers.N.mlp.{fc1,fc2}.*`                         | same                      |
//! | `post_layernorm.{weight,bias}`                             | `post_layernorm.{gamma,beta}` |
//! | `visual_projection.weight` (top level, optional)           | `visual_projection.weight`|
//! | `text_model.*`, `text_projection.*`, `logit_scale`, `*.position_ids` | ignored         |
//!
//! The config is read from a `CLIPVisionConfig` `config.json` or a `CLIPConfig`'s
//! `vision_config` (absent fields take HF's defaults, as HF saves `vision_config` as a diff).
//!
//! Limitations: square images of exactly `image_size` (no position interpolation); no
//! `output_hidden_states` / attentions; the text tower is not implemented.

mod attention;
mod config;
mod embeddings;
mod encoder;
mod model;

pub use attention::{ClipAttention, ClipAttentionConfig};
pub use config::{ClipActivation, ClipVisionConfig};
pub use embeddings::{ClipVisionEmbeddings, ClipVisionEmbeddingsConfig};
pub use encoder::{
    ClipEncoder, ClipEncoderConfig, ClipEncoderLayer, ClipEncoderLayerConfig, ClipMlp,
};
pub use model::{
    ClipVisionModel, ClipVisionOutput, HF_PREFIX, PROJECTION_KEY, key_mapping, linear_paths,
};
