//! [`finetune`]: supervised fine-tuning of a causal LM's trainable parameters (LoRA adapters)
//! with the completion-only loss.

use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use super::data::Example;
use super::task::{CausalLmTask, Tokenized, completion_loss};
use crate::error::{ModelError, Result};
use crate::llama::LlamaForCausalLM;
use crate::training::{Resume, StepInfo, TrainConfig, TrainReport, train};

/// Tokenizes every example (so bad data fails before any training).
///
/// # Errors
/// As [`CausalLmTask::encode`], naming the example's index.
pub fn tokenize_all(task: &CausalLmTask, examples: &[Example]) -> Result<Vec<Tokenized>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            task.encode(e).map_err(|err| ModelError::InvalidInput(format!("example {i}: {err}")))
        })
        .collect()
}

/// Trains the trainable parameters of `model` (LoRA adapters attached with
/// [`emloc::attach_new_adapter`], on the original model or on its emulator) on `examples` with the
/// completion-only loss ([`completion_loss`]), AdamW and a warmup + cosine schedule. `on_step`
/// sees every optimizer step with the model and the optimizer (to log or checkpoint them).
/// Returns the model in inference mode.
///
/// Deterministic for a given seed on a deterministic backend (see [`train`]), so a run resumed
/// from `resume` reaches the adapters of an uninterrupted one.
///
/// # Errors
/// [`ModelError::InvalidInput`] for a bad config, fewer examples than `batch_size`, an example
/// that does not tokenize, or a loss that becomes NaN or infinite (naming the step).
pub fn finetune(
    task: &CausalLmTask,
    model: LlamaForCausalLM,
    examples: &[Example],
    config: &TrainConfig,
    resume: Option<Resume>,
    on_step: impl FnMut(&StepInfo, &LlamaForCausalLM, &ModuleOptimizer),
) -> Result<(LlamaForCausalLM, TrainReport)> {
    config.validate()?;
    let tokenized = tokenize_all(task, examples)?;
    let device: Device = model.device();
    let train_device = device.clone().autodiff();
    let loss_of = |model: &LlamaForCausalLM, indices: &[usize]| {
        let items: Vec<Tokenized> = indices.iter().map(|&i| tokenized[i].clone()).collect();
        let batch = task.batch(&items, &train_device);
        Ok((completion_loss(model, &batch), batch.tokens))
    };
    train(model, tokenized.len(), config, resume, &device, loss_of, on_step)
}
