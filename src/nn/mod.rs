//! Neural-network building blocks: the drop-in [`Linear`] and [`Conv2d`] and what they carry.

mod conv2d;
pub(crate) mod hooks;
mod linear;
mod lora;
mod low_rank;

pub use conv2d::{Conv2d, Conv2dConfig};
pub use linear::{Linear, LinearConfig};
pub use lora::{LoraAdapter, LoraConfig, lora_scale};
pub(crate) use lora::check_lora_rank;
pub use low_rank::LowRankFactors;
