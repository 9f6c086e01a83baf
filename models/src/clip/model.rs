//! [`ClipVisionModel`]: embeddings, pre-encoder LayerNorm, encoder, pooled output and optional
//! projection, and loading it from an HF directory.

use std::path::Path;

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::{Device, Tensor};
use emloc::nn::Linear;

use super::{ClipEncoder, ClipVisionConfig, ClipVisionEmbeddings};
use crate::error::Result;
use crate::loading::{Checkpoint, KeyMapping, LoadReport};

/// The prefix of the vision tower's keys in `CLIPVisionModel`, `CLIPVisionModelWithProjection`
/// and `CLIPModel` checkpoints.
pub const HF_PREFIX: &str = "vision_model.";

/// The key of the optional projection (top level, outside [`HF_PREFIX`]).
pub const PROJECTION_KEY: &str = "visual_projection.weight";

/// The outputs of [`ClipVisionModel::forward`], as in HF.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// Encoder output `[batch, num_patches + 1, d]`, class token first. As in HF, no final
    /// LayerNorm is applied to it.
    pub last_hidden_state: Tensor<3>,
    /// `post_layernorm(last_hidden_state[:, 0])`, `[batch, d]`.
    pub pooler_output: Tensor<2>,
    /// `visual_projection(pooler_output)`, `[batch, projection_dim]`, if the model has the
    /// projection (HF `image_embeds`, before CLIP's L2 normalisation).
    pub image_embeds: Option<Tensor<2>>,
}

/// HF `CLIPVisionTransformer` (the module under `vision_model.`), optionally with the
/// `visual_projection` of `CLIPVisionModelWithProjection` / `CLIPModel`, built from
/// [`emloc::nn::Linear`] layers (the patch projection is a bias-free `Conv2d` and the positions
/// an `Embedding`, which the emulator leaves dense). Module paths equal HF's parameter names
/// without the `vision_model.` prefix, except that LayerNorm scales and shifts are
/// `gamma` / `beta` (HF `weight` / `bias`).
#[derive(Module, Debug)]
pub struct ClipVisionModel {
    /// HF `embeddings`.
    pub embeddings: ClipVisionEmbeddings,
    /// HF `pre_layrnorm` (sic: HF's spelling), applied to the embeddings.
    pub pre_layrnorm: LayerNorm,
    /// HF `encoder`.
    pub encoder: ClipEncoder,
    /// HF `post_layernorm`, applied to the class token only.
    pub post_layernorm: LayerNorm,
    /// HF `visual_projection` `[d, projection_dim]`, no bias (absent in `CLIPVisionModel`
    /// checkpoints).
    pub visual_projection: Option<Linear>,
}

impl ClipVisionModel {
    /// Encodes images: patch + class + position embeddings → `pre_layrnorm` → pre-LN encoder.
    ///
    /// # Shapes
    /// - `pixels`: `[batch, num_channels, image_size, image_size]` (already normalised with
    ///   CLIP's mean and std)
    /// - `last_hidden_state`: `[batch, num_patches + 1, d]`; `pooler_output`: `[batch, d]`;
    ///   `image_embeds`: `[batch, projection_dim]`
    ///
    /// # Panics
    /// If the image size or channel count differs from the config.
    pub fn forward(&self, pixels: Tensor<4>) -> ClipVisionOutput {
        let hidden = self.pre_layrnorm.forward(self.embeddings.forward(pixels));
        let last_hidden_state = self.encoder.forward(hidden);
        let [batch, _, d] = last_hidden_state.dims();
        let class = last_hidden_state.clone().slice([0..batch, 0..1, 0..d]).reshape([batch, d]);
        let pooler_output = self.post_layernorm.forward(class);
        let image_embeds =
            self.visual_projection.as_ref().map(|p| p.forward(pooler_output.clone()));
        ClipVisionOutput { last_hidden_state, pooler_output, image_embeds }
    }

    /// Loads the vision tower from an HF directory: `config.json` (a `CLIPVisionConfig`, or a
    /// `CLIPConfig` whose `vision_config` is used) plus `model.safetensors` (or shards), keys
    /// with or without the `vision_model.` prefix, any float dtype (converted to `f32`).
    ///
    /// A full `CLIPModel` checkpoint loads too: `text_model.*`, `text_projection.*`,
    /// `logit_scale` and legacy `position_ids` buffers are skipped (listed in
    /// [`LoadReport::ignored`]). `visual_projection.weight`, when present (`CLIPModel`,
    /// `CLIPVisionModelWithProjection`), is loaded as [`visual_projection`](Self::visual_projection)
    /// and gives [`ClipVisionOutput::image_embeds`].
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`](crate::ModelError::InvalidConfig) /
    /// [`ConfigValue`](crate::ModelError::ConfigValue) for the config,
    /// [`MissingFile`](crate::ModelError::MissingFile) /
    /// [`Checkpoint`](crate::ModelError::Checkpoint) for the weights, and
    /// [`KeyMismatch`](crate::ModelError::KeyMismatch) listing, under the checkpoint's names,
    /// every missing, unexpected (e.g. a classifier head or an extra layer) or mis-shaped key.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, ClipVisionConfig)> {
        let (model, config, _) = Self::load_with_report(dir, device)?;
        Ok((model, config))
    }

    /// [`load`](Self::load), also returning what was loaded and ignored.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with_report(
        dir: impl AsRef<Path>,
        device: &Device,
    ) -> Result<(Self, ClipVisionConfig, LoadReport)> {
        let dir = dir.as_ref();
        let config = ClipVisionConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        let prefixed = checkpoint.keys().any(|k| k.starts_with(HF_PREFIX));
        let with_projection = checkpoint.contains(PROJECTION_KEY);
        let mut model = config.init(with_projection, device);
        let report = checkpoint.load_into(&mut model, &key_mapping(prefixed))?;
        Ok((model, config, report))
    }
}

/// Module paths of every `emloc::nn::Linear` layer of a [`ClipVisionModel`] with `config`
/// (`visual_projection` included when `with_projection`), in HF naming without the prefix.
pub fn linear_paths(config: &ClipVisionConfig, with_projection: bool) -> Vec<String> {
    let mut paths = Vec::new();
    for l in 0..config.num_hidden_layers {
        for sub in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            paths.push(format!("encoder.layers.{l}.{sub}"));
        }
    }
    if with_projection {
        paths.push("visual_projection".into());
    }
    paths
}

/// Checkpoint → module-path mapping for CLIP vision checkpoints: the `vision_model.` prefix is
/// dropped (and put back on missing keys when `prefixed`, except on `visual_projection`, which
/// HF keeps at the top level); LayerNorm `weight`/`bias` become `gamma`/`beta` by burn-store's
/// PyTorch adapter, and are named back in errors. The rest of a `CLIPModel` (text tower,
/// `text_projection`, `logit_scale`) and `position_ids` buffers are ignored.
pub fn key_mapping(prefixed: bool) -> KeyMapping {
    let norms = r"((?:pre_layrnorm|post_layernorm|layer_norm1|layer_norm2))";
    let mut to_checkpoint = vec![
        (format!(r"{norms}\.gamma$"), "$1.weight".to_string()),
        (format!(r"{norms}\.beta$"), "$1.bias".to_string()),
    ];
    if prefixed {
        to_checkpoint.push((
            r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.".to_string(),
            format!("{HF_PREFIX}$1."),
        ));
    }
    KeyMapping {
        to_burn: vec![(r"^vision_model\.".to_string(), String::new())],
        to_checkpoint,
        ignore: vec![
            r"^text_model\.".to_string(),
            r"^text_projection\.".to_string(),
            r"^logit_scale$".to_string(),
            r"(^|\.)position_ids$".to_string(),
        ],
    }
}
