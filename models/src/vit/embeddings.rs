//! [`ViTEmbeddings`]: patch projection (a strided convolution), `[CLS]` token and learned
//! positions.

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
    /// Builds the embeddings of `config` on `device` (weights lazily initialised).
    pub fn new(config: &ViTConfig, device: &Device) -> Self {
        let (d, p) = (config.hidden_size, config.patch_size);
        let init = Initializer::Normal { mean: 0.0, std: 0.02 };
        Self {
            cls_token: init.init([1, 1, d], device),
            position_embeddings: init.init([1, config.num_patches() + 1, d], device),
            patch_embeddings: ViTPatchEmbeddings {
                projection: Conv2dConfig::new([config.num_channels, d], [p, p])
                    .with_stride([p, p])
                    .init(device),
            },
            dropout: DropoutConfig::new(config.hidden_dropout_prob).init(),
            image_size: config.image_size,
        }
    }

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
