//! GGUF: llama.cpp's single-file model format, read natively.
//!
//! A GGUF file holds a header of typed metadata (architecture hyper-parameters under
//! `{arch}.*`, the tokenizer under `tokenizer.ggml.*`, the chat template, ...) followed by
//! tensors, each stored as `F32`, `F16`, `BF16` or a block-quantized ggml type. This module
//!
//! - parses the container ([`GgufFile`]: versions 2 and 3, every metadata value type, tensor
//!   infos, `general.alignment`), validating every count, length and offset against the file
//!   size before allocating, and reading each tensor's bytes only when asked;
//! - dequantizes `F32`, `F16`, `BF16`, `Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q4_K`, `Q5_K`
//!   and `Q6_K` to `f32` ([`dequantize`], [`SUPPORTED_TYPES`]), bit for bit as the `gguf` Python
//!   package;
//! - loads Llama-family decoders (`llama`, `qwen2`) as [`LlamaForCausalLM`]
//!   ([`LlamaForCausalLM::load_gguf`], [`llama_config`]), undoing llama.cpp's Q/K row
//!   permutation (see [`llama`]'s docs), or writes them out as an HF directory
//!   ([`gguf_to_hf_dir`]);
//! - builds the byte-level BPE tokenizer transformers builds for the file
//!   ([`LlamaTokenizer::from_gguf`], [`tokenizer_json`]) and exposes its special tokens and chat
//!   template ([`GgufTokenizerInfo`]).
//!
//! ```no_run
//! # fn main() -> emloc_models::Result<()> {
//! use emloc_models::gguf::{GgufFile, GgufTokenizerInfo};
//! use emloc_models::llama::{GenerationConfig, LlamaForCausalLM, LlamaTokenizer};
//! let device = burn::tensor::Device::default();
//! let path = "SmolLM2-135M-Instruct.Q4_1.gguf";
//! let (model, _config) = LlamaForCausalLM::load_gguf(path, &device)?;
//! let file = GgufFile::open(path)?;
//! let tokenizer = LlamaTokenizer::from_gguf(&file)?;
//! let info = GgufTokenizerInfo::from_gguf(&file)?;
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! let settings = GenerationConfig::greedy(16).with_eos_token_ids(info.eos_token_ids());
//! println!("{}", tokenizer.decode(&model.generate(&prompt, &settings)?, true)?);
//! # Ok(()) }
//! ```
//!
//! # Errors
//! Malformed files are [`ModelError::Checkpoint`](crate::ModelError::Checkpoint) naming the file
//! and the key or tensor at fault (a tensor of a type that cannot be dequantized is an error
//! only when that tensor is read; loading a model names each such type once, with its tensor
//! count); unsupported hyper-parameters
//! [`ModelError::InvalidConfig`](crate::ModelError::InvalidConfig), and values the Llama config
//! rejects [`ModelError::ConfigValue`](crate::ModelError::ConfigValue); tensors that do not fit the
//! model [`ModelError::KeyMismatch`](crate::ModelError::KeyMismatch) listing every one; tokenizer
//! problems [`ModelError::Tokenizer`](crate::ModelError::Tokenizer); file system errors
//! [`ModelError::Io`](crate::ModelError::Io).

mod dequant;
mod export;
pub mod llama;
mod quantized;
mod reader;
mod tokenizer;

pub use dequant::{GgmlType, SUPPORTED_TYPES, dequantize};
pub use export::{HfExport, config_json, gguf_to_hf_dir};
pub use llama::{HfTensor, hf_tensor_name, hf_tensors, llama_config, unpermute_rows};
pub use quantized::load_gguf_quantized;
pub use reader::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufArray, GgufFile, GgufTensorInfo, GgufValue, MAX_ARRAY_DEPTH,
    MAX_DIMS,
};
pub use tokenizer::{
    END_TOKENS, GgufTokenizerInfo, SpecialToken, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED,
    tokenizer_json,
};

#[allow(unused_imports)] // for the docs' links
use crate::llama::{LlamaForCausalLM, LlamaTokenizer};
