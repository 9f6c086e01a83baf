//! BERT encoder (HF `BertModel`) and sentence-transformers style sentence embeddings.
//!
//! Reference checkpoint: all-MiniLM-L6-v2 (`scripts/fetch_minilm.sh`).
//!
//! ```no_run
//! # fn main() -> emloc_models::Result<()> {
//! use emloc_models::bert::SentenceEncoder;
//! let device = burn::tensor::Device::default();
//! let encoder = SentenceEncoder::load("/path/to/all-MiniLM-L6-v2", &device)?;
//! let embeddings = encoder.embed(&["A man is eating food.", "A man eats."])?; // unit norm
//! # Ok(()) }
//! ```
//!
//! # Module paths and checkpoint keys
//!
//! Module paths (what LoRA adapters, emulator rules and `emloc::linear_layers` use) are HF's
//! parameter names, with two exceptions (no `bert.` prefix; `layer_norm` for `LayerNorm`):
//!
//! | HF checkpoint key                               | Burn module path                     |
//! |-------------------------------------------------|--------------------------------------|
//! | `bert.` prefix (`BertFor*` saves), or none      | no prefix                            |
//! | `embeddings.{word,position,token_type}_embeddings.weight` | same                       |
//! | `encoder.layer.N.attention.self.{query,key,value}.*` | same (field `self_attn`, path `self`) |
//! | `encoder.layer.N.attention.output.dense.*`      | same                                 |
//! | `encoder.layer.N.{intermediate,output}.dense.*` | same                                 |
//! | `pooler.dense.*`                                | same                                 |
//! | `*.LayerNorm.weight` / `.bias` (or `.gamma` / `.beta`) | `*.layer_norm.gamma` / `.beta` |
//! | `embeddings.position_ids`, `token_type_ids` (buffers) | ignored                        |
//!
//! `self` is a Rust keyword, so the field of [`BertAttention`] is `self_attn`; its hand-written
//! `Module` impl visits it under the name `self`, so paths and PEFT adapter keys match HF's.
//!
//! Linear weights are transposed from PyTorch's `[out, in]` to `[in, out]` on load. Any other
//! checkpoint key (e.g. a masked-LM head `cls.*`) is reported as unexpected.

mod attention;
mod checkpointed;
mod config;
mod embeddings;
mod encoder;
mod model;
mod sentence;

pub use attention::{
    BertAttention, BertAttentionConfig, BertSelfAttention, BertSelfOutput, SELF_ATTENTION_PATH,
};
pub use checkpointed::CheckpointedForward;
pub use config::{BertConfig, HiddenAct, REQUIRED_FIELDS};
pub use embeddings::{BertEmbeddings, BertEmbeddingsConfig};
pub use encoder::{BertEncoder, BertEncoderConfig, BertIntermediate, BertLayer, BertOutput};
pub use model::{
    BertInput, BertModel, BertModelOutput, BertPooler, BertPoolerConfig, MASK_BIAS,
    attention_mask_bias, key_mapping, linear_paths,
};
pub use sentence::{Encoded, Pooling, SentenceEncoder, l2_normalize, mean_pooling};

/// The prefix of BERT keys inside task checkpoints (`BertFor*`).
pub const HF_PREFIX: &str = "bert.";
