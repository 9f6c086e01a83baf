//! [`ClipVisionEmbeddings`]: bias-free patch convolution, class embedding and learned positions.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Device, Tensor};

use super::ClipVisionConfig;
use crate::vit::patch_tokens;

/// HF `CLIPVisionEmbeddings` (no position interpolation): the class token followed by one token
/// per patch (row-major over the patch grid), plus positions. Unlike ViT there is no dropout
/// and the patch convolution has no bias.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings {
    /// HF `class_embedding` `[d]`.
    pub class_embedding: Param<Tensor<1>>,
    /// HF `patch_embedding`: `Conv2d` with kernel = stride = patch, weight
    /// `[d, channels, patch, patch]` (PyTorch layout, loaded as is), no bias.
    pub patch_embedding: Conv2d,
    /// HF `position_embedding`: an `Embedding` with weight `[num_patches + 1, d]`, added to the
    /// tokens in order (HF's `position_ids` are `0..num_patches + 1`).
    pub position_embedding: Embedding,
    /// Expected image side in pixels.
    pub image_size: usize,
}

impl ClipVisionEmbeddings {
    /// Builds the embeddings of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ClipVisionConfig, device: &Device) -> Self {
        let (d, p) = (config.hidden_size, config.patch_size);
        Self {
            class_embedding: Initializer::Normal { mean: 0.0, std: 0.02 }.init([d], device),
            patch_embedding: Conv2dConfig::new([config.num_channels, d], [p, p])
                .with_stride([p, p])
                .with_bias(false)
                .init(device),
            position_embedding: EmbeddingConfig::new(config.num_patches() + 1, d).init(device),
            image_size: config.image_size,
        }
    }

    /// # Shapes
    /// - `pixels`: `[batch, channels, image_size, image_size]`
    /// - output: `[batch, num_patches + 1, d]` (class token first)
    ///
    /// # Panics
    /// If the image is not `image_size` × `image_size` or has the wrong number of channels.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [batch, _, h, w] = pixels.dims();
        assert!(
            h == self.image_size && w == self.image_size,
            "ClipVisionEmbeddings::forward: image is {h}x{w}, the model takes {0}x{0}",
            self.image_size
        );
        let patches = patch_tokens(&self.patch_embedding, pixels); // [b, n, d]
        let d = patches.dims()[2];
        let class = self.class_embedding.val().reshape([1, 1, d]).expand([batch, 1, d]);
        let positions = self.position_embedding.weight.val().unsqueeze_dim::<3>(0);
        Tensor::cat(vec![class, patches], 1) + positions
    }
}
