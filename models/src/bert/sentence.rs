//! [`SentenceEncoder`]: sentence-transformers style embeddings (BERT, mean pooling over the
//! attention mask, L2 normalisation), with tokenisation by the `tokenizers` crate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::{BertConfig, BertInput, BertModel};
use crate::error::{ModelError, Result};
use crate::loading::read_json;

/// Mean of the hidden states over the unmasked positions (sentence-transformers' mean pooling).
///
/// # Shapes
/// - `last_hidden_state`: `[batch, seq, d]`
/// - `attention_mask`: `[batch, seq]`, 1 for tokens, 0 for padding
/// - output: `[batch, d]`
pub fn mean_pooling(last_hidden_state: Tensor<3>, attention_mask: Tensor<2, Int>) -> Tensor<2> {
    let [batch, _, d] = last_hidden_state.dims();
    let mask = attention_mask.float().unsqueeze_dim::<3>(2);
    let summed = (last_hidden_state * mask.clone()).sum_dim(1).reshape([batch, d]);
    let counts = mask.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
    summed / counts
}

/// Divides each row by its Euclidean norm (at least `1e-12`, as `torch.nn.functional.normalize`).
///
/// # Shapes
/// - input and output: `[batch, d]`
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// How token states become a sentence embedding (sentence-transformers' `1_Pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the tokens (the attention mask): all-MiniLM-L6-v2 and most models.
    Mean,
    /// The `[CLS]` (first) token's state.
    Cls,
}

/// One text after tokenisation: ids and segment ids, `[CLS]`/`[SEP]` included, truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Segment ids.
    pub type_ids: Vec<u32>,
}

/// A BERT sentence encoder: tokenizer + [`BertModel`] + pooling + L2 normalisation, as
/// sentence-transformers' `Transformer → Pooling → Normalize` pipeline.
pub struct SentenceEncoder {
    /// The encoder. Public so that it can be emulated, adapted or replaced
    /// ([`with_model`](Self::with_model)).
    pub model: BertModel,
    config: BertConfig,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    pooling: Pooling,
    max_seq_length: usize,
    batch_size: usize,
    device: Device,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("config", &self.config)
            .field("tokenizer", &self.tokenizer_path)
            .field("pooling", &self.pooling)
            .field("max_seq_length", &self.max_seq_length)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl SentenceEncoder {
    /// Texts per forward pass in [`embed`](Self::embed) unless changed.
    pub const DEFAULT_BATCH_SIZE: usize = 32;

    /// Loads a sentence-transformers (or plain HF BERT) directory: `config.json`, the
    /// safetensors weights (see [`BertModel::load`]) and `tokenizer.json`; optionally
    /// `sentence_bert_config.json` (`max_seq_length`, else `max_position_embeddings`) and
    /// `1_Pooling/config.json` (mean or CLS pooling, default mean). The tokenizer's own
    /// padding and truncation settings are replaced: texts are truncated to `max_seq_length`
    /// tokens (special tokens included) and padded per batch.
    ///
    /// # Errors
    /// Those of [`BertModel::load`]; [`ModelError::MissingFile`] without `tokenizer.json`;
    /// [`ModelError::Tokenizer`] if it cannot be parsed; [`ModelError::InvalidConfig`] for an
    /// unsupported pooling mode or a bad `max_seq_length`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_skipping(dir, device, &BTreeSet::new())
    }

    /// [`load`](Self::load), leaving the model parameters at the module paths in `skip`
    /// unloaded and unmaterialised (see [`BertModel::load_skipping`]): how an emulator is
    /// loaded without ever holding the original weights of the layers it replaces.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_skipping(
        dir: impl AsRef<Path>,
        device: &Device,
        skip: &BTreeSet<String>,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_path_buf(),
                expected: "tokenizer.json".into(),
            });
        }
        let (model, config, _) = BertModel::load_skipping(dir, device, skip)?;
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            ModelError::Tokenizer { path: tokenizer_path.clone(), message: e.to_string() }
        })?;
        let pooling = read_pooling(dir)?;
        let max_seq_length = read_max_seq_length(dir, &config)?;
        let mut encoder = Self {
            model,
            config,
            tokenizer,
            tokenizer_path,
            pooling,
            max_seq_length,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            device: device.clone(),
        };
        encoder.configure_tokenizer()?;
        Ok(encoder)
    }

    fn configure_tokenizer(&mut self) -> Result<()> {
        self.tokenizer.with_padding(None);
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: self.max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| ModelError::Tokenizer {
                path: self.tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Replaces the encoder (e.g. by its emulator, or a LoRA-adapted copy).
    pub fn with_model(mut self, model: BertModel) -> Self {
        self.model = model;
        self
    }

    /// Takes the encoder's model out, leaving a freshly built one of the same shape in its place
    /// whose weights are lazily initialised and so never materialised unless it is run. For
    /// consuming the model (e.g. [`emloc::emulate`], which then releases its dense weights
    /// layer by layer) while keeping the tokenizer and pooling; put a model back with
    /// [`with_model`](Self::with_model) before encoding with the encoder's own model.
    pub fn take_model(&mut self) -> BertModel {
        let skeleton = self.config.init(self.model.pooler.is_some(), &self.device);
        std::mem::replace(&mut self.model, skeleton)
    }

    /// Sets the number of texts per forward pass (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Sets the truncation length in tokens, special tokens included.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] if it is below 2 or above `max_position_embeddings`.
    pub fn with_max_seq_length(mut self, max_seq_length: usize) -> Result<Self> {
        if !(2..=self.config.max_position_embeddings).contains(&max_seq_length) {
            return Err(ModelError::InvalidInput(format!(
                "max_seq_length {max_seq_length} is outside 2..={}",
                self.config.max_position_embeddings
            )));
        }
        self.max_seq_length = max_seq_length;
        self.configure_tokenizer()?;
        Ok(self)
    }

    /// The model's config.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The tokenizer (padding off, truncation at [`max_seq_length`](Self::max_seq_length)).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The pooling mode.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Truncation length in tokens, special tokens included.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Texts per forward pass in [`embed`](Self::embed).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// The device the model and inputs live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenises `texts` (special tokens added, truncated, not padded) and checks every id
    /// against the model's vocabulary and token types.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if tokenisation fails; [`ModelError::InvalidInput`] if the
    /// tokenizer produces an id the model has no embedding for.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| {
            ModelError::Tokenizer { path: self.tokenizer_path.clone(), message: e.to_string() }
        })?;
        encodings
            .into_iter()
            .map(|e| {
                let encoded =
                    Encoded { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() };
                if let Some(id) =
                    encoded.ids.iter().find(|&&id| id as usize >= self.config.vocab_size)
                {
                    return Err(ModelError::InvalidInput(format!(
                        "tokenizer produced id {id}, beyond the model's vocab_size {}",
                        self.config.vocab_size
                    )));
                }
                if let Some(t) =
                    encoded.type_ids.iter().find(|&&t| t as usize >= self.config.type_vocab_size)
                {
                    return Err(ModelError::InvalidInput(format!(
                        "tokenizer produced token type {t}, beyond the model's type_vocab_size {}",
                        self.config.type_vocab_size
                    )));
                }
                Ok(encoded)
            })
            .collect()
    }

    /// Pads encoded texts into one batch: ids padded with `pad_token_id`, mask 0 on padding.
    ///
    /// # Shapes
    /// - every output tensor: `[encoded.len(), longest]`
    ///
    /// # Panics
    /// If `encoded` is empty.
    pub fn batch(&self, encoded: &[Encoded]) -> BertInput {
        assert!(!encoded.is_empty(), "SentenceEncoder::batch: no texts");
        let seq = encoded.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let pad = self.config.pad_token_id.unwrap_or(0) as i64;
        let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for e in encoded {
            let n = e.ids.len();
            ids.extend(e.ids.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad, seq - n)));
            types.extend(
                e.type_ids.iter().map(|&t| t as i64).chain(std::iter::repeat_n(0, seq - n)),
            );
            mask.extend(std::iter::repeat_n(1i64, n).chain(std::iter::repeat_n(0, seq - n)));
        }
        let shape = [encoded.len(), seq];
        let tensor =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, shape), &self.device);
        BertInput::new(tensor(ids))
            .with_token_type_ids(tensor(types))
            .with_attention_mask(tensor(mask))
    }

    /// Tokenises and pads `texts` into one batch (e.g. a calibration batch for
    /// [`emloc::emulate`]).
    ///
    /// # Errors
    /// As [`tokenize`](Self::tokenize); [`ModelError::InvalidInput`] if `texts` is empty.
    pub fn inputs(&self, texts: &[&str]) -> Result<BertInput> {
        if texts.is_empty() {
            return Err(ModelError::InvalidInput("no texts".into()));
        }
        Ok(self.batch(&self.tokenize(texts)?))
    }

    /// Pooled, L2-normalised embeddings of one padded batch.
    ///
    /// # Shapes
    /// - output: `[batch, d]`
    pub fn forward(&self, input: BertInput) -> Tensor<2> {
        self.forward_with(&self.model, input)
    }

    /// [`forward`](Self::forward) through `model` instead of the encoder's own model (e.g. its
    /// autodiff copy during training, or an emulator), with this encoder's pooling.
    ///
    /// # Shapes
    /// - output: `[batch, d]`
    pub fn forward_with(&self, model: &BertModel, input: BertInput) -> Tensor<2> {
        let mask = input.attention_mask_or_ones();
        self.pool(model.forward(input).last_hidden_state, mask)
    }

    /// This encoder's pooling of a model's last hidden states into unit-norm embeddings
    /// ([`forward_with`](Self::forward_with) after the model; apart for
    /// [`BertModel::forward_checkpointed`]).
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, d]`; `attention_mask`: `[batch, seq]` (1 = token)
    /// - output: `[batch, d]`
    pub fn pool(&self, hidden: Tensor<3>, attention_mask: Tensor<2, Int>) -> Tensor<2> {
        let mask = attention_mask;
        // Pooled (and compared) in f32 whatever the weights' dtype (`emloc::cast_frozen`).
        let hidden = hidden.cast(FloatDType::F32);
        let pooled = match self.pooling {
            Pooling::Mean => mean_pooling(hidden, mask),
            Pooling::Cls => {
                let [batch, _, d] = hidden.dims();
                hidden.slice([0..batch, 0..1, 0..d]).reshape([batch, d])
            }
        };
        l2_normalize(pooled)
    }

    /// Unit-norm sentence embeddings of `texts`, in order, one `Vec` of
    /// [`dim`](Self::dim) floats per text. Texts are sorted by token count and run in batches
    /// of [`batch_size`](Self::batch_size), each padded to its longest text.
    ///
    /// # Errors
    /// As [`tokenize`](Self::tokenize). An empty `texts` gives an empty result.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.embed_with(&self.model, texts)
    }

    /// [`embed`](Self::embed) through `model` instead of the encoder's own model.
    ///
    /// # Errors
    /// As [`tokenize`](Self::tokenize).
    pub fn embed_with(&self, model: &BertModel, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encoded = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].ids.len()));
        let mut out = vec![Vec::new(); encoded.len()];
        let d = self.dim();
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<Encoded> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let embeddings = self.forward_with(model, self.batch(&batch));
            let values: Vec<f32> = embeddings.into_data().iter::<f32>().collect();
            for (row, &i) in chunk.iter().enumerate() {
                out[i] = values[row * d..(row + 1) * d].to_vec();
            }
        }
        Ok(out)
    }
}

fn read_pooling(dir: &Path) -> Result<Pooling> {
    let path = dir.join("1_Pooling").join("config.json");
    if !path.is_file() {
        return Ok(Pooling::Mean);
    }
    let json = read_json(&path)?;
    let flag = |name: &str| json.get(name).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        "pooling_mode_cls_token",
        "pooling_mode_mean_tokens",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ];
    let on: Vec<&str> = modes.iter().copied().filter(|m| flag(m)).collect();
    match on.as_slice() {
        ["pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
        ["pooling_mode_cls_token"] => Ok(Pooling::Cls),
        other => Err(ModelError::InvalidConfig {
            path,
            message: format!(
                "unsupported pooling {other:?}: exactly one of mean or CLS pooling is supported"
            ),
        }),
    }
}

fn read_max_seq_length(dir: &Path, config: &BertConfig) -> Result<usize> {
    let path = dir.join("sentence_bert_config.json");
    if !path.is_file() {
        return Ok(config.max_position_embeddings);
    }
    let json = read_json(&path)?;
    match json.get("max_seq_length") {
        None | Some(Value::Null) => Ok(config.max_position_embeddings),
        Some(v) => match v.as_u64() {
            Some(n) if (2..=config.max_position_embeddings as u64).contains(&n) => Ok(n as usize),
            _ => Err(ModelError::InvalidConfig {
                path,
                message: format!(
                    "`max_seq_length` {v} must be an integer in 2..={}",
                    config.max_position_embeddings
                ),
            }),
        },
    }
}
