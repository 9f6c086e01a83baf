//! Model zoo for emloc: architectures written with [`emloc::nn::Linear`], so emulation, LoRA and
//! correction apply to them with no extra code.

#![warn(missing_docs)]

pub mod bert;
pub mod causal_lm;
pub mod checkpointing;
pub mod classification;
pub mod clip;
pub mod error;
pub mod gguf;
mod jsonl;
pub mod layer_drop;
pub mod llama;
pub mod loading;
pub mod pruning;
pub mod retrieval;
pub mod rng;
pub mod tiny;
pub mod training;
pub mod vit;

pub use error::{ConfigProblem, ModelError, Result};
