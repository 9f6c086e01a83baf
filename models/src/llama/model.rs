//! [`LlamaForCausalLM`]: embeddings, decoder layers, final norm and LM head, and loading it
//! from an HF directory.

use std::collections::BTreeSet;
use std::path::Path;

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::{Device, Int, Tensor};
use emloc::nn::{Linear, LinearConfig};

use super::cache::{KvCache, LayerKvCache};
use super::mask::{AttentionInputs, PaddingMask};
use super::{
    LlamaAttention, LlamaAttentionConfig, LlamaConfig, LlamaMlp, LlamaMlpConfig, RmsNorm,
    RmsNormConfig,
};
use crate::error::{ModelError, Result};
use crate::loading::{Checkpoint, KeyMapping, LoadReport};

/// Configuration of [`LlamaDecoderLayer`].
#[derive(Config, Debug)]
pub struct LlamaDecoderLayerConfig {
    /// The attention block (HF `self_attn`).
    pub attention: LlamaAttentionConfig,
    /// The feed-forward block (HF `mlp`).
    pub mlp: LlamaMlpConfig,
    /// Both norms (HF `input_layernorm`, `post_attention_layernorm`).
    pub norm: RmsNormConfig,
}

impl LlamaDecoderLayerConfig {
    /// The decoder-layer configuration of a [`LlamaConfig`] (every layer has the same).
    pub fn from_llama(config: &LlamaConfig) -> Self {
        Self::new(
            LlamaAttentionConfig::from_llama(config),
            LlamaMlpConfig::from_llama(config),
            RmsNormConfig::from_llama(config),
        )
    }

    /// Builds the layer on `device` (weights lazily initialised); it maps `[batch, seq, d]` to
    /// `[batch, seq, d]`.
    ///
    /// # Panics
    /// As [`LlamaAttentionConfig::init`].
    pub fn init(&self, device: &Device) -> LlamaDecoderLayer {
        LlamaDecoderLayer {
            self_attn: self.attention.init(device),
            mlp: self.mlp.init(device),
            input_layernorm: self.norm.init(device),
            post_attention_layernorm: self.norm.init(device),
        }
    }
}

/// HF `LlamaDecoderLayer` (pre-norm): `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    /// HF `self_attn`.
    pub self_attn: LlamaAttention,
    /// HF `mlp`.
    pub mlp: LlamaMlp,
    /// Norm before attention (HF `input_layernorm`).
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP (HF `post_attention_layernorm`).
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    ///
    /// # Panics
    /// As [`LlamaAttention::forward`].
    pub fn forward(&self, hidden: Tensor<3>, cache: Option<&mut LayerKvCache>) -> Tensor<3> {
        let h =
            hidden.clone() + self.self_attn.forward(self.input_layernorm.forward(hidden), cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// [`forward`](Self::forward) with the positions and blocked keys of `inputs` (padding).
    ///
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    ///
    /// # Panics
    /// As [`LlamaAttention::forward_with`].
    pub fn forward_with(
        &self,
        hidden: Tensor<3>,
        inputs: &AttentionInputs,
        cache: Option<&mut LayerKvCache>,
    ) -> Tensor<3> {
        let normed = self.input_layernorm.forward(hidden.clone());
        let h = hidden + self.self_attn.forward_with(normed, inputs, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// HF `LlamaModel` (module path `model`): token embeddings, decoder layers, final norm.
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// Token embeddings `[vocab, d]` (HF `embed_tokens`).
    pub embed_tokens: Embedding,
    /// The decoder layers (paths `layers.0`, `layers.1`, ...).
    pub layers: Vec<LlamaDecoderLayer>,
    /// Final norm (HF `norm`).
    pub norm: RmsNorm,
}

impl LlamaModel {
    /// Final hidden states (after the last norm), without padding. With a cache, the input
    /// continues the cached sequence (positions start at `cache.len()` for a cache filled
    /// without padding) and is appended to it.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, d]`
    ///
    /// # Panics
    /// If the cache has another number of layers or batch size; (depending on the backend) if an
    /// id is outside the vocabulary.
    pub fn forward(&self, input_ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        self.forward_padded(input_ids, PaddingMask::all_real(batch, seq), cache)
    }

    /// Final hidden states of a padded batch. `attention_mask` marks the real tokens (HF's
    /// `attention_mask`: an `Int` tensor with 1 = token, 0 = pad, a `Bool` tensor, or a
    /// [`PaddingMask`]). Each row's position ids count its real tokens only
    /// ([`PaddingMask::position_ids`]), continuing from the cache, so a left-padded row gets the
    /// positions (and outputs) of the unpadded sequence; no query attends a pad key except a
    /// pad query itself (see [`AttentionInputs`]), so pads never change real tokens' outputs
    /// and their own outputs stay finite (but are meaningless). With a cache, this call's
    /// keys, values and mask are appended to it.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`
    /// - output: `[batch, seq, d]`
    ///
    /// # Panics
    /// If the mask's shape differs from `input_ids`'s, or the cache has another number of
    /// layers or batch size; (depending on the backend) if an id (pads included) is outside
    /// the vocabulary.
    pub fn forward_padded(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<PaddingMask>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let mask = attention_mask.into();
        let [batch, seq] = input_ids.dims();
        assert_eq!(
            mask.dims(),
            [batch, seq],
            "LlamaModel::forward_padded: attention mask {:?} for input ids {:?}",
            mask.dims(),
            [batch, seq]
        );
        let device = input_ids.device();
        let mut hidden = self.embed_tokens.forward(input_ids);
        let Some(first) = self.layers.first() else {
            return self.norm.forward(hidden);
        };
        let rope = &first.self_attn.rope;
        match cache {
            Some(cache) => {
                assert_eq!(
                    cache.layers.len(),
                    self.layers.len(),
                    "LlamaModel::forward: cache has {} layers, model {}",
                    cache.layers.len(),
                    self.layers.len()
                );
                let state = cache.state(batch);
                let inputs = AttentionInputs::padded(rope, &state.0, &state.1, &mask, &device);
                for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    hidden = layer.forward_with(hidden, &inputs, Some(c));
                }
                cache.record(state, &mask);
            }
            None => {
                let inputs = AttentionInputs::uncached(rope, &mask, &device);
                for layer in &self.layers {
                    hidden = layer.forward_with(hidden, &inputs, None);
                }
            }
        }
        self.norm.forward(hidden)
    }
}

/// HF `LlamaForCausalLM` / `Qwen2ForCausalLM`, built from [`emloc::nn::Linear`] layers so
/// EMLoC applies to it unchanged. Module paths equal HF's parameter names.
///
/// `lm_head` is `None` when the head is tied to the embeddings (`tie_word_embeddings` and no
/// `lm_head.weight` in the checkpoint); logits are then `h Eᵀ` with the embedding matrix `E`.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    /// HF `model`.
    pub model: LlamaModel,
    /// HF `lm_head` `[d, vocab]`, no bias; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
}

impl LlamaConfig {
    /// Builds a model with fresh (lazily initialised) weights on `device`; the head is tied
    /// (`lm_head` is `None`) when `tied_head`.
    ///
    /// # Panics
    /// If the config is invalid (see [`validate`](Self::validate)).
    pub fn init(&self, tied_head: bool, device: &Device) -> LlamaForCausalLM {
        if let Err(problem) = self.validate() {
            panic!("invalid LlamaConfig: {problem}");
        }
        let d = self.hidden_size;
        let layer = LlamaDecoderLayerConfig::from_llama(self);
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, d).init(device),
                layers: (0..self.num_hidden_layers).map(|_| layer.init(device)).collect(),
                norm: RmsNormConfig::from_llama(self).init(device),
            },
            lm_head: (!tied_head)
                .then(|| LinearConfig::new(d, self.vocab_size).with_bias(false).init(device)),
        }
    }
}

impl LlamaForCausalLM {
    /// The model with only the decoder layers `kept`, in order (the layer-drop emulator of
    /// [`crate::layer_drop`]); embeddings, final norm and head unchanged. The kept layers are
    /// renumbered `model.layers.0`, `1`, ...: move an adapter trained on it back with
    /// `adapter.renumber_blocks("model.layers.", kept)`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] unless `kept` is non-empty, strictly increasing and within
    /// the layer count.
    pub fn keep_layers(mut self, kept: &[usize]) -> Result<Self> {
        self.model.layers =
            crate::layer_drop::take_blocks(std::mem::take(&mut self.model.layers), kept)?;
        Ok(self)
    }

    /// The model with each layer's MLP neurons cut to `kept[l]` (structured pruning, see
    /// [`crate::pruning`]): `gate_proj` and `up_proj` lose the other output features,
    /// `down_proj` the matching inputs; attention unchanged. Move an adapter trained on it back
    /// with [`emloc::peft::PeftAdapter::unprune_layer`] on the three projections.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] unless there is one list per layer, each valid for
    /// [`emloc::nn::Linear::keep_outputs`].
    pub fn prune_mlp(mut self, kept: &[Vec<usize>]) -> Result<Self> {
        if kept.len() != self.model.layers.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} kept-neuron lists for {} layers",
                kept.len(),
                self.model.layers.len()
            )));
        }
        for (l, (layer, neurons)) in self.model.layers.iter_mut().zip(kept).enumerate() {
            let at = |e: emloc::EmlocError| ModelError::InvalidInput(format!("layer {l}: {e}"));
            let mlp = &mut layer.mlp;
            let gate = mlp.gate_proj.clone().keep_outputs(neurons).map_err(at)?;
            let up = mlp.up_proj.clone().keep_outputs(neurons).map_err(at)?;
            let down = mlp.down_proj.clone().keep_inputs(neurons).map_err(at)?;
            (mlp.gate_proj, mlp.up_proj, mlp.down_proj) = (gate, up, down);
        }
        Ok(self)
    }

    /// Logits of every position.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    ///
    /// # Panics
    /// As [`LlamaModel::forward`].
    pub fn forward(&self, input_ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let hidden = self.model.forward(input_ids, cache);
        self.logits(hidden)
    }

    /// Logits of every position of a padded batch (see [`LlamaModel::forward_padded`]):
    /// `attention_mask` is HF's (`Int` 1 = token / 0 = pad, `Bool`, or a [`PaddingMask`]);
    /// real positions get the logits of their unpadded sequences; pads' logits are finite but
    /// meaningless.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    ///
    /// # Panics
    /// As [`LlamaModel::forward_padded`].
    pub fn forward_padded(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<PaddingMask>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let hidden = self.model.forward_padded(input_ids, attention_mask, cache);
        self.logits(hidden)
    }

    /// Applies the LM head (or the tied embeddings) to hidden states.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, d]`
    /// - output: `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            // emloc's product reads the transposed embeddings in place; Burn's `linear` on
            // Flex made a contiguous copy of the 49 k × 576 matrix at every call (SmolLM2).
            None => {
                emloc::ops::linear(hidden, self.model.embed_tokens.weight.val().transpose(), None)
            }
        }
    }

    /// An empty KV cache for this model (for any batch size; the first forward call fixes it).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.model.layers.len())
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.model.embed_tokens.weight.shape().dims::<2>()[0]
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Loads a model from an HF directory: `config.json` plus `model.safetensors` (or the
    /// shards of `model.safetensors.index.json`), any float dtype (converted to `f32`). The head
    /// is tied when `tie_word_embeddings` is true and the checkpoint has no `lm_head.weight`;
    /// RoPE `inv_freq` buffers of old checkpoints are ignored.
    ///
    /// # Errors
    /// [`ModelError::MissingConfigField`] / [`ModelError::InvalidConfig`] /
    /// [`ModelError::ConfigValue`] for the config (naming the field), [`ModelError::MissingFile`] / [`ModelError::Checkpoint`] for the weights, and
    /// [`ModelError::KeyMismatch`] listing every missing, unexpected or mis-shaped key.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, LlamaConfig)> {
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
    ) -> Result<(Self, LlamaConfig, LoadReport)> {
        Self::load_skipping(dir, device, &BTreeSet::new())
    }

    /// [`load_with_report`](Self::load_with_report), leaving out the parameters at the module
    /// paths in `skip` (never read nor materialised; see
    /// [`Checkpoint::load_into_skipping`]): how an emulator loads without the original's
    /// replaced dense weights.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_skipping(
        dir: impl AsRef<Path>,
        device: &Device,
        skip: &BTreeSet<String>,
    ) -> Result<(Self, LlamaConfig, LoadReport)> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        let tied = config.tie_word_embeddings && !checkpoint.contains("lm_head.weight");
        let mut model = config.init(tied, device);
        let report = checkpoint.load_into_skipping(&mut model, &key_mapping(), skip)?;
        Ok((model, config, report))
    }
}

/// Checkpoint → module-path mapping for Llama-family checkpoints: the names are the same; the
/// rotary `inv_freq` buffers some checkpoints carry are ignored.
pub fn key_mapping() -> KeyMapping {
    KeyMapping {
        to_burn: Vec::new(),
        to_checkpoint: Vec::new(),
        ignore: vec![r"\.rotary_emb\.inv_freq$".to_string()],
    }
}

/// Module paths of every `emloc::nn::Linear` layer of a [`LlamaForCausalLM`] with `config`
/// (`lm_head` included unless `tied_head`), in HF naming: what LoRA adapters and emulator
/// rules key on.
pub fn linear_paths(config: &LlamaConfig, tied_head: bool) -> Vec<String> {
    let mut paths = Vec::new();
    for l in 0..config.num_hidden_layers {
        for sub in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            paths.push(format!("model.layers.{l}.{sub}"));
        }
    }
    if !tied_head {
        paths.push("lm_head".into());
    }
    paths
}

/// Checks that every id is below `vocab_size`.
///
/// # Errors
/// [`ModelError::InvalidInput`] naming the first id outside the vocabulary.
pub fn check_ids(ids: &[u32], vocab_size: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(ModelError::InvalidInput(format!(
            "token id {id} is outside the vocabulary (vocab_size {vocab_size})"
        ))),
        None => Ok(()),
    }
}
