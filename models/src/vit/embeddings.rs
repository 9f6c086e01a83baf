//! [`ViTEmbeddings`]: patch projection (a strided convolution), `[CLS]` token and learned
//! positions.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};

use super::ViTConfig;

/// HF `ViTPatchEmbeddings`: a `Conv2d` with kernel and stride `patch_size`, flattened to one
/// token per patch (row-major over the patch grid).
#[derive(Module, Debug)]
pub struct ViTPatchEmbeddings {
    /// HF `projection`, weight `[d, channels, patch, patch]` (PyTorch layout, loaded as is).
    pub projection: Conv2d,
}

impl ViTPatchEmbeddings {
    /// # Shapes
    /// - `pixels`: `[batch, channels, height, width]`
    /// - output: `[batch, (height / patch) · (width / patch), d]`
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        patch_tokens(&self.projection, pixels)
    }
}

/// Applies a patch projection (a `Conv2d` with kernel = stride = patch) and flattens the patch
/// grid row-major into tokens. Shared by ViT and the CLIP vision tower ([`crate::clip`]).
///
/// # Shapes
/// - `pixels`: `[batch, channels, height, width]`
/// - output: `[batch, (height / patch) · (width / patch), d]`
pub fn patch_tokens(projection: &Conv2d, pixels: Tensor<4>) -> Tensor<3> {
    let x = projection.forward(pixels); // [b, d, h/p, w/p]
    let [b, d, gh, gw] = x.dims();
    x.reshape([b, d, gh * gw]).swap_dims(1, 2)
}

/// Configuration of [`ViTEmbeddings`].
#[derive(Config, Debug)]
pub struct ViTEmbeddingsConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Side of the (square) input image in pixels.
    pub image_size: usize,
    /// Side of a (square) patch; must divide `image_size`.
    pub patch_size: usize,
    /// Input channels.
    #[config(default = 3)]
    pub num_channels: usize,
    /// Dropout on the embeddings (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl ViTEmbeddingsConfig {
    /// The embedding configuration of a [`ViTConfig`].
    pub fn from_vit(config: &ViTConfig) -> Self {
        Self::new(config.hidden_size, config.image_size, config.patch_size)
            .with_num_channels(config.num_channels)
            .with_dropout(config.hidden_dropout_prob)
    }

    /// Builds the embeddings on `device` (weights lazily initialised): `cls_token` `[1, 1, d]`,
    /// `position_embeddings` `[1, num_patches + 1, d]` and the patch projection, weight
    /// `[d, num_channels, patch_size, patch_size]` with bias, where `num_patches =
    /// (image_size / patch_size)²`.
    ///
    /// # Panics
    /// If `patch_size` is zero or does not divide `image_size`.
    pub fn init(&self, device: &Device) -> ViTEmbeddings {
        let (d, p) = (self.hidden_size, self.patch_size);
        assert!(
            p > 0 && self.image_size.is_multiple_of(p),
            "ViTEmbeddingsConfig: image_size {} is not a multiple of patch_size {p}",
            self.image_size
        );
        let num_patches = (self.image_size / p).pow(2);
        let init = Initializer::Normal { mean: 0.0, std: 0.02 };
        ViTEmbeddings {
            cls_token: init.init([1, 1, d], device),
            position_embeddings: init.init([1, num_patches + 1, d], device),
            patch_embeddings: ViTPatchEmbeddings {
                projection: Conv2dConfig::new([self.num_channels, d], [p, p])
                    .with_stride([p, p])
                    .init(device),
            },
            dropout: DropoutConfig::new(self.dropout).init(),
            image_size: self.image_size,
        }
    }
}

/// HF `ViTEmbeddings` (no interpolation of positions, no mask token).
#[derive(Module, Debug)]
pub struct ViTEmbeddings {
    /// The `[CLS]` token `[1, 1, d]` (HF `cls_token`).
    pub cls_token: Param<Tensor<3>>,
    /// Learned positions `[1, num_patches + 1, d]` (HF `position_embeddings`).
    pub position_embeddings: Param<Tensor<3>>,
    /// HF `patch_embeddings`.
    pub patch_embeddings: ViTPatchEmbeddings,
    /// Dropout (training only).
    pub dropout: Dropout,
    /// Expected image side in pixels.
    pub image_size: usize,
}

impl ViTEmbeddings {
    /// `[CLS]` followed by one token per patch, plus positions.
    ///
    /// # Shapes
    /// - `pixels`: `[batch, channels, image_size, image_size]`
    /// - output: `[batch, num_patches + 1, d]`
    ///
    /// # Panics
    /// If the image is not `image_size` × `image_size` or has the wrong number of channels.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [batch, _, h, w] = pixels.dims();
        assert!(
            h == self.image_size && w == self.image_size,
            "ViTEmbeddings::forward: image is {h}x{w}, the model takes {0}x{0}",
            self.image_size
        );
        let patches = self.patch_embeddings.forward(pixels);
        let d = patches.dims()[2];
        let cls = self.cls_token.val().expand([batch, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1) + self.position_embeddings.val();
        self.dropout.forward(x)
    }
}
