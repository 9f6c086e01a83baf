//! Llama-family decoders (HF `LlamaForCausalLM`, also TinyLlama, SmolLM, Llama 3 with
//! `rope_scaling`, and `Qwen2ForCausalLM` with its q/k/v biases): grouped-query attention with
//! RoPE, SwiGLU MLPs, RMSNorm, a KV cache, padded batches, and greedy / nucleus generation of
//! one prompt or a batch of prompts.
//!
//! ```no_run
//! # fn main() -> emloc_models::Result<()> {
//! use emloc_models::llama::{GenerationConfig, LlamaForCausalLM, LlamaTokenizer};
//! let device = burn::tensor::Device::default();
//! let (model, config) = LlamaForCausalLM::load("/path/to/SmolLM-135M", &device)?;
//! let tokenizer = LlamaTokenizer::from_dir("/path/to/SmolLM-135M")?;
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! let settings = GenerationConfig::greedy(16).with_eos_token_ids(config.eos_token_ids());
//! let ids = model.generate(&prompt, &settings)?;
//! println!("{}", tokenizer.decode(&ids, true)?);
//! # Ok(()) }
//! ```
//!
//! # Module paths and checkpoint keys
//!
//! Module paths are exactly HF's parameter names, so checkpoints load without renaming and
//! PEFT adapter keys match:
//!
//! | HF checkpoint key / module path                                   |
//! |-------------------------------------------------------------------|
//! | `model.embed_tokens.weight`                                       |
//! | `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}`           |
//! | `model.layers.N.mlp.{gate,up,down}_proj.{weight,bias}`            |
//! | `model.layers.N.{input,post_attention}_layernorm.weight`          |
//! | `model.norm.weight`                                               |
//! | `lm_head.weight` (absent and tied when `tie_word_embeddings`)     |
//!
//! Biases exist where the config says (Llama: `attention_bias`, `mlp_bias`; Qwen2: q/k/v
//! only). `*.rotary_emb.inv_freq` buffers are ignored; any other extra key is reported.
//!
//! # Padded batches
//!
//! [`LlamaForCausalLM::forward_padded`] takes HF's `attention_mask` (1 = token, 0 = pad; or a
//! [`PaddingMask`]). Position ids count each row's real tokens (HF's `cumsum(mask) - 1`), so
//! left- and right-padded rows give the logits of their unpadded sequences; no query attends a
//! pad key (a pad query attends only itself, so its outputs stay finite); the [`KvCache`]
//! remembers which cached positions were pads and each row's next position.
//! [`LlamaForCausalLM::generate_batch`] left-pads several prompts and decodes them together,
//! each row stopping at its own stop id:
//!
//! ```no_run
//! # fn main() -> emloc_models::Result<()> {
//! # use emloc_models::llama::{GenerationConfig, LlamaForCausalLM};
//! # let device = burn::tensor::Device::default();
//! # let (model, config) = LlamaForCausalLM::load("/path/to/SmolLM-135M", &device)?;
//! let settings = GenerationConfig::greedy(16).with_eos_token_ids(config.eos_token_ids());
//! let prompts = vec![vec![1, 415, 5565], vec![1, 22557]];
//! let continuations = model.generate_batch(&prompts, &settings, 0)?; // pad id 0
//! # Ok(()) }
//! ```
//!
//! Limitations: no sliding-window attention; RoPE scalings `default`, `linear` and `llama3`
//! only.

mod attention;
mod cache;
mod config;
mod generate;
mod mask;
mod mlp;
mod model;
mod rms_norm;
mod rope;
mod tokenizer;

pub use crate::rng::XorShiftRng;
pub use attention::{
    CAUSAL_MASK_BIAS, LlamaAttention, LlamaAttentionConfig, causal_mask_bias, mask_value,
};
pub use cache::{KvCache, LayerKvCache};
pub use config::{LlamaConfig, LlamaFamily, REQUIRED_FIELDS, TokenIds};
pub use generate::{GenerationConfig, argmax, check_logits, sample_token};
pub use mask::{AttentionInputs, PaddingMask};
pub use mlp::{LlamaMlp, LlamaMlpConfig};
pub use model::{
    LlamaDecoderLayer, LlamaDecoderLayerConfig, LlamaForCausalLM, LlamaModel, check_ids,
    key_mapping, linear_paths,
};
pub use rms_norm::{RmsNorm, RmsNormConfig};
pub use rope::{RopeScaling, RotaryEmbedding, inverse_frequencies};
pub use tokenizer::LlamaTokenizer;
