//! [`ClipVisionEmbeddings`]: bias-free patch convolution, class embedding and learned positions.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::{Device, Tensor};

use super::ClipVisionConfig;
use crate::vit::patch_tokens;

/// Configuration of [`ClipVisionEmbeddings`].
#[derive(Config, Debug)]
pub struct ClipVisionEmbeddingsConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Input channels.
    #[config(default = 3)]
    pub num_channels: usize,
    /// Side of the (square) input image in pixels.
    #[config(default = 224)]
    pub image_size: usize,
    /// Side of a (square) patch; must divide `image_size`.
    #[config(default = 32)]
    pub patch_size: usize,
}

impl ClipVisionEmbeddingsConfig {
    /// The embedding configuration of a [`ClipVisionConfig`].
    pub fn from_clip(config: &ClipVisionConfig) -> Self {
        Self::new(config.hidden_size)
            .with_num_channels(config.num_channels)
            .with_image_size(config.image_size)
            .with_patch_size(config.patch_size)
    }

    /// Builds the embeddings on `device` (weights lazily initialised): `class_embedding` `[d]`,
    /// `patch_embedding` weight `[d, num_channels, patch_size, patch_size]` (no bias) and
    /// `position_embedding` `[num_patches + 1, d]`, with `num_patches = (image_size /
    /// patch_size)²`.
    ///
    /// # Panics
    /// If `patch_size` is zero or does not divide `image_size`.
    pub fn init(&self, device: &Device) -> ClipVisionEmbeddings {
        let (d, p) = (self.hidden_size, self.patch_size);
        assert!(
            p > 0 && self.image_size.is_multiple_of(p),
            "ClipVisionEmbeddingsConfig: image_size {} is not a multiple of patch_size {p}",
            self.image_size
        );
        let num_patches = (self.image_size / p).pow(2);
        ClipVisionEmbeddings {
            class_embedding: Initializer::Normal { mean: 0.0, std: 0.02 }.init([d], device),
            patch_embedding: Conv2dConfig::new([self.num_channels, d], [p, p])
                .with_stride([p, p])
                .with_bias(false)
                .init(device),
            position_embedding: EmbeddingConfig::new(num_patches + 1, d).init(device),
            image_size: self.image_size,
        }
    }
}

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
