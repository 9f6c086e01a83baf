//! [`BertEmbeddings`]: word + position + token-type embeddings, LayerNorm, dropout.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Int, Tensor};
use emloc::nn::{Dropout, DropoutConfig};

use super::BertConfig;

/// Configuration of [`BertEmbeddings`].
#[derive(Config, Debug)]
pub struct BertEmbeddingsConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Number of token types.
    #[config(default = 2)]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[config(default = 1e-12)]
    pub layer_norm_eps: f64,
    /// Dropout probability (training only).
    #[config(default = 0.1)]
    pub dropout: f64,
}

impl BertEmbeddingsConfig {
    /// The embedding configuration of a [`BertConfig`].
    pub fn from_bert(config: &BertConfig) -> Self {
        Self::new(config.vocab_size, config.hidden_size, config.max_position_embeddings)
            .with_type_vocab_size(config.type_vocab_size)
            .with_layer_norm_eps(config.layer_norm_eps)
            .with_dropout(config.hidden_dropout_prob)
    }

    /// Builds the module on `device` (weights lazily initialised).
    pub fn init(&self, device: &Device) -> BertEmbeddings {
        let d = self.hidden_size;
        BertEmbeddings {
            word_embeddings: EmbeddingConfig::new(self.vocab_size, d).init(device),
            position_embeddings: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
            token_type_embeddings: EmbeddingConfig::new(self.type_vocab_size, d).init(device),
            layer_norm: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

/// HF `BertEmbeddings` with absolute positions: `LayerNorm(word + position + token_type)`.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    /// Token embeddings `[vocab_size, d]` (HF `word_embeddings`).
    pub word_embeddings: Embedding,
    /// Learned positions `[max_position_embeddings, d]` (HF `position_embeddings`).
    pub position_embeddings: Embedding,
    /// Segment embeddings `[type_vocab_size, d]` (HF `token_type_embeddings`).
    pub token_type_embeddings: Embedding,
    /// HF `LayerNorm`.
    pub layer_norm: LayerNorm,
    /// Dropout (training only).
    pub dropout: Dropout,
}

impl BertEmbeddings {
    /// Embeds a batch of token ids; positions are `0..seq`.
    ///
    /// # Shapes
    /// - `input_ids`, `token_type_ids`: `[batch, seq]`
    /// - output: `[batch, seq, d]`
    ///
    /// # Panics
    /// If `seq` exceeds `max_position_embeddings` or the shapes of the two inputs differ.
    /// (Ids outside the vocabulary are not checked here; callers that take ids from outside
    /// check them, e.g. [`SentenceEncoder`](super::SentenceEncoder).)
    pub fn forward(&self, input_ids: Tensor<2, Int>, token_type_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, seq] = input_ids.dims();
        assert_eq!(
            input_ids.dims(),
            token_type_ids.dims(),
            "BertEmbeddings::forward: input_ids and token_type_ids shapes differ"
        );
        let max_positions = self.position_embeddings.weight.shape().dims::<2>()[0];
        assert!(
            seq <= max_positions,
            "BertEmbeddings::forward: sequence length {seq} exceeds max_position_embeddings \
             {max_positions}"
        );
        let device = input_ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).unsqueeze::<2>();
        let x = self.word_embeddings.forward(input_ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(token_type_ids);
        self.dropout.forward(self.layer_norm.forward(x))
    }
}
