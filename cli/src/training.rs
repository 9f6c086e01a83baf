//! The long-running loops of the stages, with progress: calibration, LoRA training and
//! evaluation of the sentence encoder (decoders: `causal.rs`).

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;
use emloc::{
    EmulatorConfig, EmulatorReport, attach_adapter_with_ids, attach_new_adapter,
    emulate_with_progress,
};
use emloc_models::bert::{BertModel, SentenceEncoder};
use emloc_models::classification::{self, ClassificationMetrics, ClassificationTask, LabeledText};
use emloc_models::retrieval::{self, QaPair, RetrievalMetrics};
use emloc_models::training::{Resume, StepInfo, TrainReport};

use crate::CliResult;
use crate::args::{BERT_LORA_TARGETS, TrainArgs};
use crate::checkpoint::TrainingCheckpoint;
use crate::progress::{self, progress, spinner};

/// Runs `stage` (emulation or spectra) over `texts` in calibration batches of 16, with a progress
/// bar. Every batch is tokenized first, so untokenizable data fails before any work.
pub fn with_calibration<T>(
    encoder: &SentenceEncoder,
    texts: &[String],
    stage: impl FnOnce(Vec<Vec<&str>>, &mut dyn FnMut(&BertModel, Vec<&str>)) -> T,
) -> CliResult<T> {
    let batches: Vec<Vec<&str>> =
        texts.chunks(16).map(|c| c.iter().map(String::as_str).collect()).collect();
    for batch in &batches {
        encoder.tokenize(batch)?;
    }
    let bar = progress(batches.len(), "calibration");
    let mut forward = |model: &BertModel, batch: Vec<&str>| {
        encoder.forward_with(model, encoder.inputs(&batch).expect("tokenized above"));
        bar.inc(1);
    };
    let result = stage(batches, &mut forward);
    bar.finish_and_clear();
    Ok(result)
}

/// Builds the emulator of `model` (consumed: pass a clone to keep the original) from `texts`, run
/// through `encoder`'s tokenizer and pooling (see [`with_calibration`]).
pub fn build_emulator(
    encoder: &SentenceEncoder,
    model: BertModel,
    texts: &[String],
    config: &EmulatorConfig,
) -> CliResult<(BertModel, EmulatorReport)> {
    let result = with_calibration(encoder, texts, |batches, forward| {
        let forward = |m: &BertModel, b| forward(m, b);
        emulate_with_progress(model, batches, forward, config, progress::factorization())
    })?;
    Ok(result?)
}

/// The per-step callback of a task's `finetune` (figures, model, optimizer).
pub type StepCallback<'a, M> = &'a mut dyn FnMut(&StepInfo, &M, &ModuleOptimizer);

/// Attaches LoRA on `targets` (seeded by `device`'s RNG) to `model`, or the adapter of `resume`
/// with its parameter ids, and trains it with `finetune` (a task's training loop), showing a
/// progress bar with loss and tokens/s. `on_step` sees each step with the optimizer (for
/// checkpoints); its first error stops the run.
#[allow(clippy::too_many_arguments)]
pub fn train_with_progress<M: Module>(
    model: M,
    device: &Device,
    args: &TrainArgs,
    targets: &[&str],
    label: &str,
    resume: Option<TrainingCheckpoint>,
    finetune: impl FnOnce(
        M,
        Option<Resume>,
        StepCallback<'_, M>,
    ) -> emloc_models::Result<(M, TrainReport)>,
    mut on_step: impl FnMut(usize, &M, &ModuleOptimizer) -> CliResult<()>,
) -> CliResult<(M, TrainReport)> {
    device.seed(args.seed);
    let bar = progress(args.steps, label);
    let (model, resume) = match resume {
        None => (attach_new_adapter(model, &args.lora_on(targets))?.0, None),
        Some(c) => {
            bar.set_position(c.state.step as u64);
            let model = attach_adapter_with_ids(model, &c.adapter, &c.state.param_ids)?;
            (model, Some(Resume { completed_steps: c.state.step, optimizer: c.optimizer }))
        }
    };
    let mut failure = None;
    let result =
        finetune(model, resume, &mut |info: &StepInfo, model: &M, optim: &ModuleOptimizer| {
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4}, {:.0} tok/s",
                info.loss,
                info.tokens as f64 / info.seconds
            ));
            if failure.is_none()
                && let Err(e) = on_step(info.step, model, optim)
            {
                failure = Some(e);
            }
        });
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(result?)
}

/// [`train_with_progress`] for the sentence encoder's retrieval task.
pub fn train_adapter(
    encoder: &SentenceEncoder,
    model: BertModel,
    train: &[QaPair],
    args: &TrainArgs,
    label: &str,
    resume: Option<TrainingCheckpoint>,
    on_step: impl FnMut(usize, &BertModel, &ModuleOptimizer) -> CliResult<()>,
) -> CliResult<(BertModel, TrainReport)> {
    let config = args.train();
    train_with_progress(
        model,
        encoder.device(),
        args,
        &BERT_LORA_TARGETS,
        label,
        resume,
        |model, resume, step| retrieval::finetune(encoder, model, train, &config, resume, step),
        on_step,
    )
}

/// [`train_with_progress`] for the sentence encoder's classification task.
#[allow(clippy::too_many_arguments)]
pub fn train_classifier(
    encoder: &SentenceEncoder,
    model: BertModel,
    task: &ClassificationTask,
    train: &[LabeledText],
    args: &TrainArgs,
    label: &str,
    resume: Option<TrainingCheckpoint>,
    on_step: impl FnMut(usize, &BertModel, &ModuleOptimizer) -> CliResult<()>,
) -> CliResult<(BertModel, TrainReport)> {
    let config = args.train();
    train_with_progress(
        model,
        encoder.device(),
        args,
        &BERT_LORA_TARGETS,
        label,
        resume,
        |model, resume, step| {
            classification::finetune(encoder, model, task, train, &config, resume, step)
        },
        on_step,
    )
}

/// Evaluates the classifier `model` on `validation` with a spinner.
pub fn evaluate_classes(
    encoder: &SentenceEncoder,
    model: &BertModel,
    task: &ClassificationTask,
    validation: &[LabeledText],
    label: &str,
) -> CliResult<ClassificationMetrics> {
    let spinner = spinner(format!("evaluating {label} on {} sentences", validation.len()));
    let metrics = classification::evaluate(encoder, model, task, validation);
    spinner.finish_and_clear();
    Ok(metrics?)
}

/// Evaluates `model` on `validation` with a spinner.
pub fn evaluate(
    encoder: &SentenceEncoder,
    model: &BertModel,
    validation: &[QaPair],
    label: &str,
) -> CliResult<RetrievalMetrics> {
    let spinner = spinner(format!("evaluating {label} on {} pairs", validation.len()));
    let metrics = retrieval::evaluate(encoder, model, validation);
    spinner.finish_and_clear();
    Ok(metrics?)
}

/// Trainable parameters (LoRA A and B) of `model`.
pub fn adapter_params(model: &BertModel) -> usize {
    let adapter = emloc::export_adapter(model);
    adapter
        .map(|a| a.layers.values().map(|l| l.lora_a.data.len() + l.lora_b.data.len()).sum())
        .unwrap_or(0)
}
