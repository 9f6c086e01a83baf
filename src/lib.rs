//! # emloc
//!
//! EMLoC — **E**mulator-based **M**emory-efficient fine-tuning with **Lo**RA **C**orrection — for
//! [Burn](https://burn.dev): fine-tune a model within the memory it takes to run it.
//!
//! 1. [`emulate`]: run the original model on a few downstream samples, accumulate every
//!    [`nn::Linear`]'s input Gram matrix (an [`nn::Conv2d`]'s: of its unfolded patches), and
//!    replace the layers by activation-aware low-rank factors (whitened truncated SVD).
//! 2. [`attach_lora`]: put LoRA adapters on the emulator and train them with any Burn loop; the
//!    emulator layer computes `(x W_v) W_u + s (x A) B` without building a dense matrix.
//! 3. [`correct`]: fix each adapter in closed form for the emulator/original mismatch, then
//!    [`merge_adapter`] into the original model (or [`attach_adapter`] to serve it unmerged).
//!    Adapters travel in HF PEFT's format ([`peft`]).
//!
//! The method and the corrections to the official release that emloc follows are documented
//! in the repository's `README.md`.

pub mod adapter;
pub mod atomic;
mod backends;
mod calibration;
pub mod correction;
pub mod emulator;
pub mod error;
mod identity;
pub mod matrix;
pub mod merge_file;
pub mod nn;
pub mod ops;
pub mod peft;

pub use adapter::{
    adapter_param_ids, attach_adapter, attach_adapter_with_ids, attach_lora, export_adapter, linear_layers, merge_adapter,
    merge_lora,
};
pub use correction::{CorrectionConfig, CorrectionReport, correct};
pub use emulator::{
    EmulatorConfig, EmulatorDescription, EmulatorReport, Keep, LayerRule, Provenance, WhiteningMethod, calibrate, emulate,
    load_emulator, read_emulator_description, save_emulator,
};
pub use error::{EmlocError, Result};
pub use identity::FileIdentity;
pub use merge_file::merge_into_safetensors;
pub use nn::{Conv2d, Conv2dConfig, Linear, LinearConfig, LoraConfig};
