//! Vision Transformer encoder (HF `ViTModel`): patch embeddings, pre-LN encoder, final
//! LayerNorm, `[CLS]` output and pooler.
//!
//! ```no_run
//! # fn main() -> emloc_models::Result<()> {
//! use emloc_models::vit::ViTModel;
//! let device = burn::tensor::Device::default();
//! let (model, config) = ViTModel::load("/path/to/vit-base-patch16-224-in21k", &device)?;
//! let s = config.image_size;
//! let pixels = burn::tensor::Tensor::<4>::zeros([1, config.num_channels, s, s], &device);
//! let out = model.forward(pixels);
//! let cls = out.cls(); // [1, d]
//! # Ok(()) }
//! ```
//!
//! # Module paths and checkpoint keys
//!
//! | HF checkpoint key                                          | Burn module path        |
//! |------------------------------------------------------------|-------------------------|
//! | `vit.` prefix (`ViTFor*` saves), or none                   | no prefix               |
//! | `embeddings.cls_token`, `embeddings.position_embeddings`   | same                    |
//! | `embeddings.patch_embeddings.projection.{weight,bias}`     | same (a `Conv2d`)       |
//! | `encoder.layer.N.attention.attention.{query,key,value}.*`  | same                    |
//! | `encoder.layer.N.attention.output.dense.*`                 | same                    |
//! | `encoder.layer.N.{intermediate,output}.dense.*`            | same                    |
//! | `encoder.layer.N.layernorm_{before,after}.{weight,bias}`   | `….{gamma,beta}`        |
//! | `layernorm.{weight,bias}`                                  | `layernorm.{gamma,beta}`|
//! | `pooler.dense.*`                                           | same                    |
//!
//! Limitations: square images of exactly `image_size` (no position interpolation), no
//! `bool_masked_pos`. CLIP vision towers (HF `CLIPVisionModel`, the same pre-LN encoder under
//! other names, plus a LayerNorm before the encoder) are in [`crate::clip`], which reuses
//! [`patch_tokens`] and [`multi_head_attention`].

mod attention;
mod config;
mod embeddings;
mod encoder;
mod model;

pub use attention::{
    ViTAttention, ViTAttentionConfig, ViTSelfAttention, ViTSelfOutput, multi_head_attention,
};
pub use config::{REQUIRED_FIELDS, ViTConfig};
pub use embeddings::{ViTEmbeddings, ViTEmbeddingsConfig, ViTPatchEmbeddings, patch_tokens};
pub use encoder::{
    ViTEncoder, ViTEncoderConfig, ViTIntermediate, ViTLayer, ViTLayerConfig, ViTOutput,
};
pub use model::{
    HF_PREFIX, ViTModel, ViTModelOutput, ViTPooler, ViTPoolerConfig, key_mapping, linear_paths,
};
