//! # emloc
//!
//! EMLoC — **E**mulator-based **M**emory-efficient fine-tuning with **Lo**RA **C**orrection — for
//! [Burn](https://burn.dev): fine-tune a model within the memory it takes to run it.
//!
//! 1. [`emulate`]: run the original model on a few downstream samples, accumulate every
//!    [`nn::Linear`]'s input Gram matrix (an [`nn::Conv2d`]'s: of its unfolded patches), and
//!    replace the layers by activation-aware low-rank factors (whitened truncated SVD).
//!    [`emulate_part`] does this for one part of a model (a decoder block), so that an emulator
//!    can be built block by block without ever holding the whole original (for Llama-family
//!    checkpoints: `emloc_models::causal_lm::emulate_streaming`).
//! 2. [`attach_new_adapter`]: put LoRA adapters on the emulator and train them with any Burn
//!    loop; the emulator layer computes `(x W_v) W_u + s (x A) B` without building a dense matrix.
//! 3. [`correct`]: fix each adapter in closed form for the emulator/original mismatch, then
//!    [`merge_adapter`] into the original model (or [`attach_adapter`] to serve it unmerged).
//!    Adapters travel in HF PEFT's format ([`peft`]).
//!
//! ## Converting a model
//!
//! A model converts when its layers are emloc's drop-ins for Burn's: [`nn::Linear`],
//! [`nn::Conv2d`] and the composite modules built on `Linear` ([`nn::MultiHeadAttention`],
//! [`nn::PositionWiseFeedForward`], [`nn::SwiGlu`]). They have the same fields, configs,
//! forward signatures and record layout as Burn's, so a change of `use` lines is enough and
//! checkpoints load unchanged. Layers left as stock `burn::nn::Linear` stay dense and are listed
//! in [`EmulatorReport::stock_layers`]; adapters can still be served on them or merged into them
//! (through Burn's own LoRA reparameterization).
//!
//! ## How the transform works
//!
//! A Burn `ModuleMapper` sees parameters, never the module around them, and cannot change a
//! module's structure, so no mapper can turn a dense layer into a factored one inside a user's
//! model. emloc's layers therefore implement `Module` by hand: their `visit`/`map` first call a
//! thread-local hook. [`emulate`], [`attach_new_adapter`], [`correct`] and the other transforms
//! install it for one traversal of the model and receive every emloc layer with its module path (dot-
//! joined field names, as in Burn's records); outside those calls the hook does nothing.
//! During calibration, each layer's forward also adds its input's Gram matrix `XᵀX` (in f32,
//! through [`ops::gram_accumulate`]) to the statistics of the session that [`emulate`] or
//! [`calibrate`] opened on the calling thread (the forward passes must run on that thread).
//! The kernels behind [`ops`] are a Burn backend extension: emloc's CubeCL
//! kernels on CubeCL devices, plain tensor ops on Flex with the dense products through faer.
//! [`DeviceChoice`] names the device a pipeline runs on. Design notes: the repository's
//! `docs/DESIGN.md`; the method and the corrections to the official release that emloc follows:
//! its `README.md` and `EXPERIMENTS.md`.

#![warn(missing_docs)]

pub mod adapter;
mod atomic;
mod backends;
mod calibration;
pub mod correction;
pub mod device;
pub mod emulator;
pub mod error;
mod identity;
pub mod io;
mod matrix;
mod merge_file;
pub mod nn;
pub mod ops;
pub mod peft;
mod stock;

pub use adapter::{
    AdapterParamIds, adapter_param_ids, attach_adapter, attach_adapter_with_ids,
    attach_new_adapter, cast_frozen, export_adapter, linear_layers, merge_adapter,
    merge_attached_adapter,
};
pub use correction::{CorrectionConfig, CorrectionReport, correct, correct_weighted};
pub use device::DeviceChoice;
pub use emulator::{
    EmulatorConfig, EmulatorDescription, EmulatorReport, FactorizationProgress, Keep, LayerRule,
    Provenance, WhiteningMethod, calibrate, emulate, emulate_part, emulate_with_progress,
    load_emulator, read_emulator_description, save_emulator,
};
pub use error::{EmlocError, Result};
pub use matrix::Matrix;
pub use merge_file::{MergedFiles, merge_adapter_into_safetensors};
pub use nn::{Conv2d, Conv2dConfig, Linear, LinearConfig, LoraConfig};
