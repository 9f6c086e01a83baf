//! [`BertModel`]: embeddings, encoder and optional pooler, and loading it from an HF directory.

use std::collections::BTreeSet;
use std::path::Path;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::tanh;
use burn::tensor::{Device, Int, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::{BertConfig, BertEmbeddings, BertEncoder};
use crate::error::Result;
use crate::loading::{Checkpoint, KeyMapping, LoadReport};

/// The additive bias HF puts on the attention scores of padded keys (`torch.finfo(f32).min`).
pub const MASK_BIAS: f32 = f32::MIN;

/// Turns an HF attention mask (1 = token, 0 = padding) into the additive score bias of
/// [`BertSelfAttention::forward`](super::BertSelfAttention::forward): 0 for tokens,
/// [`MASK_BIAS`] for padding (clamped to the float dtype's finite minimum, as HF's
/// `torch.finfo(dtype).min`). Filled, not multiplied: `0 · f32::MIN` is NaN in f16/bf16, where
/// `f32::MIN` rounds to −∞.
///
/// # Shapes
/// - `attention_mask`: `[batch, seq]`
/// - output: `[batch, 1, 1, seq]`
pub fn attention_mask_bias(attention_mask: Tensor<2, Int>) -> Tensor<4> {
    let [batch, seq] = attention_mask.dims();
    let zeros = Tensor::<2>::zeros([batch, seq], &attention_mask.device());
    let fill = crate::llama::mask_value(zeros.dtype()).max(f64::from(MASK_BIAS));
    zeros.mask_fill(attention_mask.equal_elem(0), fill).reshape([batch, 1, 1, seq])
}

/// Configuration of [`BertPooler`].
#[derive(Config, Debug)]
pub struct BertPoolerConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
}

impl BertPoolerConfig {
    /// The pooler configuration of a [`BertConfig`].
    pub fn from_bert(config: &BertConfig) -> Self {
        Self::new(config.hidden_size)
    }

    /// Builds the pooler on `device` (weights lazily initialised): `dense` `[d, d]` with bias.
    pub fn init(&self, device: &Device) -> BertPooler {
        BertPooler { dense: LinearConfig::new(self.hidden_size, self.hidden_size).init(device) }
    }
}

/// HF `BertPooler`: `tanh(dense(hidden[:, 0]))`.
#[derive(Module, Debug)]
pub struct BertPooler {
    /// `[d, d]` projection.
    pub dense: Linear,
}

impl BertPooler {
    /// # Shapes
    /// - `hidden`: `[batch, seq, d]`
    /// - output: `[batch, d]` (from the first token)
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<2> {
        let [batch, _, d] = hidden.dims();
        let first = hidden.slice([0..batch, 0..1, 0..d]).reshape([batch, d]);
        tanh(self.dense.forward(first))
    }
}

/// The inputs of [`BertModel::forward`], as in HF.
#[derive(Debug, Clone)]
pub struct BertInput {
    /// Token ids `[batch, seq]`.
    pub input_ids: Tensor<2, Int>,
    /// Segment ids `[batch, seq]`; all zeros when `None`.
    pub token_type_ids: Option<Tensor<2, Int>>,
    /// 1 for tokens, 0 for padding, `[batch, seq]`; attend everywhere when `None`.
    pub attention_mask: Option<Tensor<2, Int>>,
}

impl BertInput {
    /// Ids only: one segment, no padding.
    pub fn new(input_ids: Tensor<2, Int>) -> Self {
        Self { input_ids, token_type_ids: None, attention_mask: None }
    }

    /// Sets the segment ids.
    pub fn with_token_type_ids(mut self, token_type_ids: Tensor<2, Int>) -> Self {
        self.token_type_ids = Some(token_type_ids);
        self
    }

    /// Sets the attention mask.
    pub fn with_attention_mask(mut self, attention_mask: Tensor<2, Int>) -> Self {
        self.attention_mask = Some(attention_mask);
        self
    }

    /// The attention mask, or all ones (every position a token) when there is none.
    pub fn attention_mask_or_ones(&self) -> Tensor<2, Int> {
        self.attention_mask.clone().unwrap_or_else(|| {
            Tensor::<2, Int>::ones(self.input_ids.dims(), &self.input_ids.device())
        })
    }

    /// Moves every tensor to `device` (e.g. the autodiff device of a training loop).
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            input_ids: self.input_ids.to_device(device),
            token_type_ids: self.token_type_ids.map(|t| t.to_device(device)),
            attention_mask: self.attention_mask.map(|t| t.to_device(device)),
        }
    }
}

/// The outputs of [`BertModel::forward`], as in HF.
#[derive(Debug, Clone)]
pub struct BertModelOutput {
    /// Hidden states of the last layer, `[batch, seq, d]` (padded positions included).
    pub last_hidden_state: Tensor<3>,
    /// Pooler output `[batch, d]`, if the model has a pooler.
    pub pooler_output: Option<Tensor<2>>,
}

/// HF `BertModel`: embeddings, post-LN encoder and optional pooler, built from
/// [`emloc::nn::Linear`] layers so EMLoC applies to it unchanged.
///
/// Module paths equal HF's parameter names (without a `bert.` prefix) except for LayerNorms,
/// see the [module docs](super).
#[derive(Module, Debug)]
pub struct BertModel {
    /// HF `embeddings`.
    pub embeddings: BertEmbeddings,
    /// HF `encoder`.
    pub encoder: BertEncoder,
    /// HF `pooler` (absent in checkpoints saved without one).
    pub pooler: Option<BertPooler>,
}

impl BertModel {
    /// Runs the encoder.
    ///
    /// # Shapes
    /// - `input.input_ids`, `input.token_type_ids`, `input.attention_mask`: `[batch, seq]`
    /// - `last_hidden_state`: `[batch, seq, d]`; `pooler_output`: `[batch, d]`
    ///
    /// # Panics
    /// If `seq` exceeds `max_position_embeddings`, the input shapes differ, or (depending on the
    /// backend) an id is outside the vocabulary or the token types.
    pub fn forward(&self, input: BertInput) -> BertModelOutput {
        let BertInput { input_ids, token_type_ids, attention_mask } = input;
        let dims = input_ids.dims();
        let token_type_ids =
            token_type_ids.unwrap_or_else(|| Tensor::<2, Int>::zeros(dims, &input_ids.device()));
        let mask_bias = attention_mask.map(|mask| {
            assert_eq!(
                mask.dims(),
                dims,
                "BertModel::forward: attention_mask shape differs from input_ids"
            );
            attention_mask_bias(mask)
        });
        let hidden = self.embeddings.forward(input_ids, token_type_ids);
        let last_hidden_state = self.encoder.forward(hidden, mask_bias);
        let pooler_output = self.pooler.as_ref().map(|p| p.forward(last_hidden_state.clone()));
        BertModelOutput { last_hidden_state, pooler_output }
    }

    /// The model with only the encoder layers `kept`, in order (the layer-drop emulator of
    /// [`crate::layer_drop`]); embeddings and pooler unchanged. Its kept layers are renumbered
    /// `encoder.layer.0`, `1`, ...: move an adapter trained on it back onto this model with
    /// `adapter.renumber_blocks("encoder.layer.", kept)`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`](crate::ModelError::InvalidInput) unless `kept` is non-empty,
    /// strictly increasing and within the layer count.
    pub fn keep_layers(mut self, kept: &[usize]) -> Result<Self> {
        self.encoder.layer =
            crate::layer_drop::take_blocks(std::mem::take(&mut self.encoder.layer), kept)?;
        Ok(self)
    }

    /// The model with each layer's feed-forward neurons cut to `kept[l]` (structured pruning,
    /// LLM-Pruner / LORAM style): `intermediate.dense` loses the other output features (weight
    /// columns and bias entries) and `output.dense` the matching inputs; attention, embeddings
    /// and the pooler are unchanged. An adapter trained on it moves back onto this model with
    /// [`emloc::peft::PeftAdapter::unprune_layer`] (the two FFN layers of each block).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`](crate::ModelError::InvalidInput) unless there is one list
    /// per layer, each valid for [`emloc::nn::Linear::keep_outputs`] (non-empty, strictly
    /// increasing, below the FFN width; dense layers without adapters).
    pub fn prune_ffn(mut self, kept: &[Vec<usize>]) -> Result<Self> {
        let invalid = |m: String| crate::ModelError::InvalidInput(m);
        if kept.len() != self.encoder.layer.len() {
            return Err(invalid(format!(
                "{} kept-neuron lists for {} layers",
                kept.len(),
                self.encoder.layer.len()
            )));
        }
        for (l, (layer, neurons)) in self.encoder.layer.iter_mut().zip(kept).enumerate() {
            let at = |e: emloc::EmlocError| invalid(format!("layer {l}: {e}"));
            let up = layer.intermediate.dense.clone().keep_outputs(neurons).map_err(at)?;
            let down = layer.output.dense.clone().keep_inputs(neurons).map_err(at)?;
            (layer.intermediate.dense, layer.output.dense) = (up, down);
        }
        Ok(self)
    }

    /// Loads a model from an HF directory: `config.json` plus `model.safetensors` (or the
    /// shards of `model.safetensors.index.json`), keys with or without a `bert.` prefix, any
    /// float dtype (converted to `f32`). The pooler is built when the checkpoint has
    /// `pooler.dense.weight`. See [`Checkpoint::load_into`] for how memory is used.
    ///
    /// # Errors
    /// [`ModelError::MissingConfigField`](crate::ModelError::MissingConfigField) /
    /// [`InvalidConfig`](crate::ModelError::InvalidConfig) /
    /// [`ConfigValue`](crate::ModelError::ConfigValue) for the config,
    /// [`MissingFile`](crate::ModelError::MissingFile) /
    /// [`Checkpoint`](crate::ModelError::Checkpoint) for the weights, and
    /// [`KeyMismatch`](crate::ModelError::KeyMismatch) listing every missing, unexpected or
    /// mis-shaped key.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, BertConfig)> {
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
    ) -> Result<(Self, BertConfig, LoadReport)> {
        Self::load_skipping(dir, device, &BTreeSet::new())
    }

    /// [`load_with_report`](Self::load_with_report), leaving the parameters at the module paths
    /// in `skip` unloaded and unmaterialised (see [`Checkpoint::load_into_skipping`]); e.g. the
    /// dense weights of the layers an emulator replaces.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_skipping(
        dir: impl AsRef<Path>,
        device: &Device,
        skip: &BTreeSet<String>,
    ) -> Result<(Self, BertConfig, LoadReport)> {
        let dir = dir.as_ref();
        let config = BertConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        let prefixed = checkpoint.keys().any(|k| k.starts_with(super::HF_PREFIX));
        let has_pooler = checkpoint
            .keys()
            .any(|k| k.strip_prefix(super::HF_PREFIX).unwrap_or(k) == "pooler.dense.weight");
        let mut model = config.init(has_pooler, device);
        let report = checkpoint.load_into_skipping(&mut model, &key_mapping(prefixed), skip)?;
        Ok((model, config, report))
    }
}

/// Module paths of every `emloc::nn::Linear` layer of a [`BertModel`] with `config` (pooler
/// included when `with_pooler`), in HF naming: what LoRA adapters and emulator rules key on.
pub fn linear_paths(config: &BertConfig, with_pooler: bool) -> Vec<String> {
    let mut paths = Vec::new();
    for l in 0..config.num_hidden_layers {
        for sub in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
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

/// Checkpoint → module-path mapping for BERT checkpoints (see the [module docs](super));
/// `prefixed` when the checkpoint's keys start with `bert.` (e.g. `BertForMaskedLM` saves), so
/// that missing keys are reported with the prefix.
pub fn key_mapping(prefixed: bool) -> KeyMapping {
    let mut to_checkpoint = vec![
        (r"\.layer_norm\.gamma$".to_string(), ".LayerNorm.weight".to_string()),
        (r"\.layer_norm\.beta$".to_string(), ".LayerNorm.bias".to_string()),
    ];
    if prefixed {
        to_checkpoint.push(("^".to_string(), super::HF_PREFIX.to_string()));
    }
    KeyMapping {
        to_burn: vec![
            (r"^bert\.".to_string(), String::new()),
            (r"\.LayerNorm\.".to_string(), ".layer_norm.".to_string()),
        ],
        to_checkpoint,
        ignore: vec![
            r"(^|\.)embeddings\.position_ids$".to_string(),
            r"(^|\.)embeddings\.token_type_ids$".to_string(),
        ],
    }
}
