//! [`finetune`]: supervised fine-tuning of a causal LM's trainable parameters (LoRA adapters)
//! with the completion-only loss.

use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use super::checkpointed::{HEAD_CHUNK_POSITIONS, completion_gradients_checkpointed};
use super::data::Example;
use super::task::{CausalLmTask, Tokenized, completion_loss};
use crate::error::{ModelError, Result};
use crate::llama::LlamaForCausalLM;
use crate::training::{
    MicroBatchGradients, Resume, StepInfo, TrainConfig, TrainReport, train, train_with_gradients,
};

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
/// completion-only loss ([`completion_loss`]), AdamW and a warmup + cosine schedule; with
/// `config.gradient_checkpointing`, by recomputation ([`completion_gradients_checkpointed`]). `on_step`
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
    let batch_of = |indices: &[usize]| {
        let items: Vec<Tokenized> = indices.iter().map(|&i| tokenized[i].clone()).collect();
        task.batch(&items, &train_device)
    };
    if config.gradient_checkpointing {
        let scale = 1.0 / config.grad_accumulation as f64;
        let gradients_of = |model: &LlamaForCausalLM, indices: &[usize]| {
            let batch = batch_of(indices);
            let (loss, grads) =
                completion_gradients_checkpointed(model, &batch, scale, HEAD_CHUNK_POSITIONS);
            Ok(MicroBatchGradients { loss, grads, tokens: batch.tokens })
        };
        return train_with_gradients(
            model,
            tokenized.len(),
            config,
            resume,
            &device,
            gradients_of,
            on_step,
        );
    }
    let loss_of = |model: &LlamaForCausalLM, indices: &[usize]| {
        let batch = batch_of(indices);
        Ok((completion_loss(model, &batch), batch.tokens))
    };
    train(model, tokenized.len(), config, resume, &device, loss_of, on_step)
}
