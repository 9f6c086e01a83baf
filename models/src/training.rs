//! What every fine-tuning task of the zoo shares: hyperparameters, the warmup + cosine schedule,
//! the seeded batch order, per-step reports and resumption.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{
    AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer, OptimizerRecord,
};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::bert::{BertInput, BertModel, SentenceEncoder};
use crate::error::{ModelError, Result};
use crate::rng::XorShiftRng;

/// The generator of splits, batch orders and per-step dropout seeds: [`XorShiftRng`] with the
/// crate's seeding, kept so that splits and results stay those already published.
pub(crate) fn rng(seed: u64) -> XorShiftRng {
    XorShiftRng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
}

/// Hyperparameters of a fine-tuning run ([`retrieval::finetune`](crate::retrieval::finetune),
/// [`causal_lm::finetune`](crate::causal_lm::finetune)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch (for retrieval: pairs, the in-batch negatives).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed per optimizer step.
    pub grad_accumulation: usize,
    /// Peak learning rate of AdamW.
    pub lr: f64,
    /// Steps of linear warmup from 0 to `lr`; cosine decay to 0 afterwards.
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Logit scale of the retrieval task's contrastive loss (sentence-transformers uses 20);
    /// other tasks ignore it.
    pub scale: f64,
    /// Seed of the batch order.
    pub seed: u64,
    /// Recompute activations layer by layer instead of keeping them ([`crate::checkpointing`]):
    /// in [`causal_lm::finetune`](crate::causal_lm::finetune) (the LM head in chunks too),
    /// [`retrieval::finetune`](crate::retrieval::finetune) and
    /// [`classification::finetune`](crate::classification::finetune). The same gradients
    /// within f32 rounding (dropout masks are drawn per layer) for about one more forward
    /// pass, in a fraction of the memory. Off by default in the library.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 16,
            grad_accumulation: 1,
            lr: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.0,
            scale: 20.0,
            seed: 0,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(ModelError::InvalidInput(format!("training config: {what}")));
        if self.steps == 0 {
            return bad("steps must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.grad_accumulation == 0 {
            return bad("grad_accumulation must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be positive");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be non-negative");
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad("scale must be positive");
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based): linear warmup over
    /// `warmup_steps`, then cosine decay from `lr` to 0 at `steps`.
    pub fn learning_rate(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = (self.steps - self.warmup_steps.min(self.steps)).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}

/// What a fine-tuning run reports after each optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Tokens (padding excluded) the step processed.
    pub tokens: usize,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

/// Summary of a fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Loss of the first optimizer step of this run.
    pub first_loss: f64,
    /// Loss of the last optimizer step.
    pub last_loss: f64,
    /// Tokens processed, padding excluded.
    pub tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// The micro-batches of one training run, in order: `steps · grad_accumulation` batches of
/// `batch_size` distinct pair indices, from epoch-wise permutations of `0..pairs` under `seed`.
pub fn batch_order(config: &TrainConfig, pairs: usize) -> Vec<Vec<usize>> {
    let mut rng = rng(config.seed);
    let mut pool: Vec<usize> = Vec::new();
    (0..config.steps * config.grad_accumulation)
        .map(|_| {
            if pool.len() < config.batch_size {
                pool = rng.permutation(pairs);
                pool.reverse();
            }
            pool.split_off(pool.len() - config.batch_size)
        })
        .collect()
}

/// Where an interrupted fine-tuning run continues: the steps it completed and its optimizer
/// state. The adapters must carry their original parameter ids
/// ([`emloc::attach_adapter_with_ids`]), which the optimizer state is keyed by.
#[derive(Debug)]
pub struct Resume {
    /// Optimizer steps already done.
    pub completed_steps: usize,
    /// AdamW's state after them.
    pub optimizer: OptimizerRecord,
}

/// What one micro-batch gives an optimizer step in [`train_with_gradients`].
pub struct MicroBatchGradients {
    /// The micro-batch's loss, already divided by `grad_accumulation` (its share of the step's).
    pub loss: f64,
    /// Its gradients, scaled as `loss`.
    pub grads: GradientsParams,
    /// Tokens (padding excluded) it processed.
    pub tokens: usize,
}

/// The training loop every task shares: trains the trainable parameters of `model` (e.g. LoRA
/// adapters) with AdamW and [`TrainConfig::learning_rate`]'s schedule over [`batch_order`]'s
/// micro-batches of `0..items`, summing `config.grad_accumulation` micro-batch gradients per
/// optimizer step. `micro_batch_loss` gives the loss of the items it is handed (on the model in
/// training mode) and the number of tokens it processed; `on_step` sees every optimizer step.
/// Before each step the RNG of `device` (dropout) is reseeded from the seed and the step, so a
/// run resumed from `resume` reaches the same parameters as an uninterrupted one, bit for bit (on
/// a backend whose RNG is per device). Returns the model in inference mode.
///
/// # Errors
/// [`ModelError::InvalidInput`] for a bad config, a run to resume that is already complete,
/// fewer items than `batch_size`, or a loss that becomes NaN or infinite (naming the step);
/// whatever `micro_batch_loss` returns.
pub fn train<M: Module>(
    model: M,
    items: usize,
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &Device,
    mut micro_batch_loss: impl FnMut(&M, &[usize]) -> Result<(Tensor<1>, usize)>,
    on_step: impl FnMut(&StepInfo, &M, &ModuleOptimizer),
) -> Result<(M, TrainReport)> {
    let micro_batch_gradients = |model: &M, indices: &[usize]| {
        let (loss, tokens) = micro_batch_loss(model, indices)?;
        let loss = loss.div_scalar(config.grad_accumulation as f64);
        let value = f64::from(loss.clone().into_scalar::<f32>());
        Ok(MicroBatchGradients {
            loss: value,
            grads: GradientsParams::from_grads(loss.backward(), model),
            tokens,
        })
    };
    train_with_gradients(model, items, config, resume, device, micro_batch_gradients, on_step)
}

/// [`train`] for tasks that compute their gradients themselves (e.g. by recomputation,
/// [`causal_lm::completion_gradients_checkpointed`](crate::causal_lm::completion_gradients_checkpointed)):
/// `micro_batch_gradients` returns a micro-batch's loss and gradients, both divided by
/// `config.grad_accumulation`, and its token count.
///
/// # Errors
/// As [`train`].
pub fn train_with_gradients<M: Module>(
    model: M,
    items: usize,
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &Device,
    mut micro_batch_gradients: impl FnMut(&M, &[usize]) -> Result<MicroBatchGradients>,
    mut on_step: impl FnMut(&StepInfo, &M, &ModuleOptimizer),
) -> Result<(M, TrainReport)> {
    config.validate()?;
    let completed = resume.as_ref().map_or(0, |r| r.completed_steps);
    if completed >= config.steps {
        return Err(ModelError::InvalidInput(format!(
            "the run to resume already completed {completed} of {} steps",
            config.steps
        )));
    }
    if items < config.batch_size {
        return Err(ModelError::InvalidInput(format!(
            "{items} training examples are fewer than batch_size {}",
            config.batch_size
        )));
    }
    let order = batch_order(config, items);
    let mut model = model.train();
    let mut optim = AdamWConfig::new().with_weight_decay(config.weight_decay as f32).init();
    if let Some(resume) = resume {
        optim = optim.load_record(resume.optimizer);
    }
    let started = Instant::now();
    let mut report =
        TrainReport { first_loss: f64::NAN, last_loss: f64::NAN, tokens: 0, seconds: 0.0 };
    for (step, micro_batches) in order.chunks(config.grad_accumulation).enumerate().skip(completed)
    {
        let step_started = Instant::now();
        // Dropout draws from the device RNG: reseeding it from (seed, step) makes every step's
        // masks a function of the step alone, so a resumed run matches an uninterrupted one.
        device.seed(rng(config.seed ^ (step as u64).wrapping_mul(0x9E37_79B9)).next_u64());
        let mut accumulator = GradientsAccumulator::new();
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        for indices in micro_batches {
            let micro = micro_batch_gradients(&model, indices)?;
            tokens += micro.tokens;
            loss_sum += micro.loss;
            accumulator.accumulate(&model, micro.grads);
        }
        if !loss_sum.is_finite() {
            return Err(ModelError::InvalidInput(format!(
                "the loss became {loss_sum} at step {}",
                step + 1
            )));
        }
        let lr = config.learning_rate(step);
        model = optim.step(lr, model, accumulator.grads());
        if step == completed {
            report.first_loss = loss_sum;
        }
        report.last_loss = loss_sum;
        report.tokens += tokens;
        let info = StepInfo {
            step: step + 1,
            loss: loss_sum,
            lr,
            tokens,
            seconds: step_started.elapsed().as_secs_f64(),
        };
        on_step(&info, &model, &optim);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok((model.valid(), report))
}

/// The loop of the sentence-embedding tasks ([`retrieval`](crate::retrieval),
/// [`classification`](crate::classification)): each micro-batch is two padded batches
/// (`prepare` also gives the loss's extra input and the token count) embedded through `model`
/// and `encoder`'s pooling, and `loss` of the two embeddings. With
/// `config.gradient_checkpointing`, through
/// [`SentenceEncoder::gradients_checkpointed`]; otherwise through [`train`].
///
/// # Errors
/// As [`train`]; whatever `prepare` returns.
#[allow(clippy::too_many_arguments)] // the shared loop's arguments plus the task's two
pub(crate) fn train_embedding_pairs<X>(
    encoder: &SentenceEncoder,
    model: BertModel,
    items: usize,
    config: &TrainConfig,
    resume: Option<Resume>,
    prepare: impl Fn(&[usize]) -> Result<([BertInput; 2], X, usize)>,
    loss: impl Fn(Tensor<2>, Tensor<2>, X) -> Tensor<1>,
    on_step: impl FnMut(&StepInfo, &BertModel, &ModuleOptimizer),
) -> Result<(BertModel, TrainReport)> {
    let device = encoder.device();
    if config.gradient_checkpointing {
        let weight = 1.0 / config.grad_accumulation as f64;
        let gradients_of = |model: &BertModel, indices: &[usize]| {
            let (inputs, extra, tokens) = prepare(indices)?;
            let (loss, grads) = encoder
                .gradients_checkpointed(model, inputs, |a, b| loss(a, b, extra).mul_scalar(weight));
            Ok(MicroBatchGradients { loss, grads, tokens })
        };
        return train_with_gradients(model, items, config, resume, device, gradients_of, on_step);
    }
    let loss_of = |model: &BertModel, indices: &[usize]| {
        let ([a, b], extra, tokens) = prepare(indices)?;
        let (a, b) = (encoder.forward_with(model, a), encoder.forward_with(model, b));
        Ok((loss(a, b, extra), tokens))
    };
    train(model, items, config, resume, device, loss_of, on_step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let c = TrainConfig { steps: 10, warmup_steps: 2, lr: 1.0, ..Default::default() };
        let lrs: Vec<f64> = (0..10).map(|s| c.learning_rate(s)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert_eq!(lrs[2], 1.0);
        assert!(lrs.windows(2).skip(2).all(|w| w[1] < w[0]), "{lrs:?}");
        assert!((c.learning_rate(10) - 0.0).abs() < 1e-12);
    }

    #[test]
    fn batches_cover_each_epoch_without_repeats() {
        let c = TrainConfig { steps: 5, batch_size: 4, grad_accumulation: 2, ..Default::default() };
        let order = batch_order(&c, 20);
        assert_eq!(order.len(), 10);
        let first_epoch: Vec<usize> = order[..5].concat();
        let mut sorted = first_epoch.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_eq!(batch_order(&c, 20), order);
    }
}
