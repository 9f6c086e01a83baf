//! [`finetune`]: supervised fine-tuning of a causal LM's trainable parameters (LoRA adapters)
//! with the completion-only loss.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::Device;

use super::data::Example;
use super::task::{CausalLmTask, Tokenized, completion_loss};
use crate::error::{ModelError, Result};
use crate::llama::LlamaForCausalLM;
use crate::training::{Resume, StepInfo, TrainConfig, TrainReport, batch_order, rng};

/// Tokenizes every example (so bad data fails before any training).
///
/// # Errors
/// As [`CausalLmTask::encode`], naming the example's index.
pub fn tokenize_all(task: &CausalLmTask, examples: &[Example]) -> Result<Vec<Tokenized>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| task.encode(e).map_err(|err| ModelError::InvalidInput(format!("example {i}: {err}"))))
        .collect()
}

/// Trains the trainable parameters of `model` (LoRA adapters attached with
/// [`emloc::attach_lora`], on the original model or on its emulator) on `examples` with the
/// completion-only loss ([`completion_loss`]), AdamW and a warmup + cosine schedule. `on_step`
/// sees every optimizer step with the model and the optimizer (to log or checkpoint them).
/// Returns the model in inference mode.
///
/// Deterministic for a given seed on a deterministic backend: the batch order comes from
/// [`batch_order`] and the schedule from the step index, so a run resumed from `resume`
/// reaches the adapters of an uninterrupted one.
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
    mut on_step: impl FnMut(&StepInfo, &LlamaForCausalLM, &ModuleOptimizer),
) -> Result<(LlamaForCausalLM, TrainReport)> {
    config.validate()?;
    let completed = resume.as_ref().map_or(0, |r| r.completed_steps);
    if completed >= config.steps {
        return Err(ModelError::InvalidInput(format!(
            "the run to resume already completed {completed} of {} steps",
            config.steps
        )));
    }
    if examples.len() < config.batch_size {
        return Err(ModelError::InvalidInput(format!(
            "{} training examples are fewer than batch_size {}",
            examples.len(),
            config.batch_size
        )));
    }
    let tokenized = tokenize_all(task, examples)?;
    let order = batch_order(config, tokenized.len());
    let device: Device = model.device();
    let train_device = device.clone().autodiff();
    let mut model = model.train();
    let mut optim = AdamWConfig::new().with_weight_decay(config.weight_decay as f32).init();
    if let Some(resume) = resume {
        optim = optim.load_record(resume.optimizer);
    }
    let started = Instant::now();
    let mut report = TrainReport { first_loss: f64::NAN, last_loss: f64::NAN, tokens: 0, seconds: 0.0 };
    for (step, micro_batches) in order.chunks(config.grad_accumulation).enumerate().skip(completed) {
        let step_started = Instant::now();
        // Adapter dropout draws from the device RNG: reseeded per step, as in retrieval.
        device.seed(rng(config.seed ^ (step as u64).wrapping_mul(0x9E37_79B9)).next_u64());
        let mut accumulator = GradientsAccumulator::new();
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        for indices in micro_batches {
            let items: Vec<Tokenized> = indices.iter().map(|&i| tokenized[i].clone()).collect();
            let batch = task.batch(&items, &train_device);
            tokens += batch.tokens;
            let loss = completion_loss(&model, &batch).div_scalar(config.grad_accumulation as f64);
            loss_sum += f64::from(loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        if !loss_sum.is_finite() {
            return Err(ModelError::InvalidInput(format!("the loss became {loss_sum} at step {}", step + 1)));
        }
        let lr = config.learning_rate(step);
        model = optim.step(lr, model, accumulator.grads());
        if step == completed {
            report.first_loss = loss_sum;
        }
        report.last_loss = loss_sum;
        report.tokens += tokens;
        let info = StepInfo { step: step + 1, loss: loss_sum, lr, tokens, seconds: step_started.elapsed().as_secs_f64() };
        on_step(&info, &model, &optim);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok((model.valid(), report))
}
