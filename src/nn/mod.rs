//! Neural-network building blocks: the drop-ins [`Linear`] and [`Conv2d`] and what they carry,
//! [`Dropout`] with cheap CPU masks,
//! and drop-ins for Burn's composite modules built on `Linear` ([`MultiHeadAttention`],
//! [`PositionWiseFeedForward`], [`SwiGlu`]).

pub mod attention;
mod conv2d;
mod dropout;
mod feed_forward;
pub(crate) mod hooks;
mod linear;
mod lora;
mod low_rank;
mod quantized;
mod swiglu;

pub use attention::{MhaCache, MhaInput, MhaOutput, MultiHeadAttention, MultiHeadAttentionConfig};
pub use conv2d::{Conv2d, Conv2dConfig};
pub use dropout::{Dropout, DropoutConfig, device_seed, splitmix64};
pub use feed_forward::{PositionWiseFeedForward, PositionWiseFeedForwardConfig};
pub use linear::{Linear, LinearConfig};
pub(crate) use lora::check_lora_rank;
pub use lora::{LoraAdapter, LoraConfig, lora_scale};
pub use low_rank::LowRankFactors;
pub use quantized::{QuantizedWeight, WeightDecoder, quantized_bytes};
pub use swiglu::{SwiGlu, SwiGluConfig};
