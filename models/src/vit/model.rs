//! [`ViTModel`]: embeddings, encoder, final LayerNorm and optional pooler, and loading it from
//! an HF directory.

use std::path::Path;

use burn::config::Config;
use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::activation::tanh;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::{ViTConfig, ViTEmbeddings, ViTEncoder};
use crate::error::Result;
use crate::loading::{Checkpoint, KeyMapping, LoadReport};

/// The prefix of ViT keys inside task checkpoints (`ViTForImageClassification`).
pub const HF_PREFIX: &str = "vit.";

/// Configuration of [`ViTPooler`].
#[derive(Config, Debug)]
pub struct ViTPoolerConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
}

impl ViTPoolerConfig {
    /// The pooler configuration of a [`ViTConfig`].
    pub fn from_vit(config: &ViTConfig) -> Self {
        Self::new(config.hidden_size)
    }

    /// Builds the pooler on `device` (weights lazily initialised): `dense` `[d, d]` with bias.
    pub fn init(&self, device: &Device) -> ViTPooler {
        ViTPooler { dense: LinearConfig::new(self.hidden_size, self.hidden_size).init(device) }
    }
}

/// HF `ViTPooler`: `tanh(dense(hidden[:, 0]))`.
#[derive(Module, Debug)]
pub struct ViTPooler {
    /// `[d, d]` projection.
    pub dense: Linear,
}

impl ViTPooler {
    /// # Shapes
    /// - `hidden`: `[batch, seq, d]`
    /// - output: `[batch, d]` (from the `[CLS]` token)
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<2> {
        let [batch, _, d] = hidden.dims();
        tanh(self.dense.forward(hidden.slice([0..batch, 0..1, 0..d]).reshape([batch, d])))
    }
}

/// The outputs of [`ViTModel::forward`], as in HF.
#[derive(Debug, Clone)]
pub struct ViTModelOutput {
    /// Token states after the final LayerNorm, `[batch, num_patches + 1, d]` (`[CLS]` first).
    pub last_hidden_state: Tensor<3>,
    /// Pooler output `[batch, d]`, if the model has a pooler.
    pub pooler_output: Option<Tensor<2>>,
}

impl ViTModelOutput {
    /// The `[CLS]` token's final state.
    ///
    /// # Shapes
    /// - output: `[batch, d]`
    pub fn cls(&self) -> Tensor<2> {
        let [batch, _, d] = self.last_hidden_state.dims();
        self.last_hidden_state.clone().slice([0..batch, 0..1, 0..d]).reshape([batch, d])
    }
}

/// HF `ViTModel`: patch embeddings, pre-LN encoder, final LayerNorm and optional pooler, built
/// from [`emloc::nn::Linear`] layers (the patch projection is a `Conv2d`, which the emulator
/// leaves dense like every embedding). Module paths equal HF's parameter names, except that
/// LayerNorm scales and shifts are `gamma` / `beta` (HF `weight` / `bias`).
#[derive(Module, Debug)]
pub struct ViTModel {
    /// HF `embeddings`.
    pub embeddings: ViTEmbeddings,
    /// HF `encoder`.
    pub encoder: ViTEncoder,
    /// HF `layernorm` (final).
    pub layernorm: LayerNorm,
    /// HF `pooler` (absent in checkpoints saved without one).
    pub pooler: Option<ViTPooler>,
}

impl ViTModel {
    /// Encodes images.
    ///
    /// # Shapes
    /// - `pixels`: `[batch, num_channels, image_size, image_size]` (already normalised)
    /// - `last_hidden_state`: `[batch, num_patches + 1, d]`; `pooler_output`: `[batch, d]`
    ///
    /// # Panics
    /// If the image size or channel count differs from the config.
    pub fn forward(&self, pixels: Tensor<4>) -> ViTModelOutput {
        let hidden = self.encoder.forward(self.embeddings.forward(pixels));
        let last_hidden_state = self.layernorm.forward(hidden);
        let pooler_output = self.pooler.as_ref().map(|p| p.forward(last_hidden_state.clone()));
        ViTModelOutput { last_hidden_state, pooler_output }
    }

    /// Loads a model from an HF directory: `config.json` plus `model.safetensors` (or shards),
    /// keys with or without a `vit.` prefix, any float dtype (converted to `f32`). The pooler is
    /// built when the checkpoint has `pooler.dense.weight`.
    ///
    /// # Errors
    /// [`ModelError::MissingConfigField`](crate::ModelError::MissingConfigField) /
    /// [`InvalidConfig`](crate::ModelError::InvalidConfig) /
    /// [`ConfigValue`](crate::ModelError::ConfigValue) for the config,
    /// [`MissingFile`](crate::ModelError::MissingFile) /
    /// [`Checkpoint`](crate::ModelError::Checkpoint) for the weights, and
    /// [`KeyMismatch`](crate::ModelError::KeyMismatch) listing every missing, unexpected (e.g. a
    /// `classifier.*` head) or mis-shaped key.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, ViTConfig)> {
        let (model, config, _) = Self::load_with_report(dir, device)?;
        Ok((model, config))
    }

    /// [`load`](Self::load), also returning what was loaded.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with_report(
        dir: impl AsRef<Path>,
        device: &Device,
    ) -> Result<(Self, ViTConfig, LoadReport)> {
        let dir = dir.as_ref();
        let config = ViTConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        let prefixed = checkpoint.keys().any(|k| k.starts_with(HF_PREFIX));
        let has_pooler = checkpoint
            .keys()
            .any(|k| k.strip_prefix(HF_PREFIX).unwrap_or(k) == "pooler.dense.weight");
        let mut model = config.init(has_pooler, device);
        let report = checkpoint.load_into(&mut model, &key_mapping(prefixed))?;
        Ok((model, config, report))
    }
}

/// Module paths of every `emloc::nn::Linear` layer of a [`ViTModel`] with `config` (pooler
/// included when `with_pooler`), in HF naming.
pub fn linear_paths(config: &ViTConfig, with_pooler: bool) -> Vec<String> {
    let mut paths = Vec::new();
    for l in 0..config.num_hidden_layers {
        for sub in [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ] {
            paths.push(format!("encoder.layer.{l}.{sub}"));
        }
    }
    if with_pooler {
        paths.push("pooler.dense".into());
    }
    paths
}

/// Checkpoint → module-path mapping for ViT checkpoints: a `vit.` prefix is dropped (and put
/// back on missing keys when `prefixed`); LayerNorm `weight`/`bias` become `gamma`/`beta` by
/// burn-store's PyTorch adapter, and are named back in errors.
pub fn key_mapping(prefixed: bool) -> KeyMapping {
    let mut to_checkpoint = vec![
        (r"(layernorm[a-z_]*)\.gamma$".to_string(), "$1.weight".to_string()),
        (r"(layernorm[a-z_]*)\.beta$".to_string(), "$1.bias".to_string()),
    ];
    if prefixed {
        to_checkpoint.push(("^".to_string(), HF_PREFIX.to_string()));
    }
    KeyMapping {
        to_burn: vec![(r"^vit\.".to_string(), String::new())],
        to_checkpoint,
        ignore: Vec::new(),
    }
}
