//! The pipeline stages for decoder LMs (the causal-LM task): `emulate`, `finetune`, `correct`
//! and `eval` on a Llama-family model from an HF directory or a GGUF file. `stages.rs` sends a
//! stage here when `--model` is a decoder.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use emloc::peft::PeftAdapter;
use emloc::{
    CorrectionConfig, EmulatorDescription, EmulatorReport, attach_adapter, correct,
    emulate_with_progress, export_adapter, load_emulator,
};
use emloc_models::causal_lm::{self, CausalLm, CausalLmMetrics, EvalConfig, Example};
use emloc_models::llama::{GenerationConfig, LlamaForCausalLM};
use emloc_models::training::TrainReport;
use serde::Serialize;

use crate::CliResult;
use crate::args::{DECODER_LORA_TARGETS, ModelArgs, TrainArgs};
use crate::checkpoint;
use crate::memory::{Phase, PhaseStats};
use crate::output::StagedDir;
use crate::progress::{self, progress};
use crate::source::check_emulator_source;
use crate::stages::{
    CorrectArgs, EmulateArgs, EvalArgs, FinetuneArgs, check_out, finish, finish_staged,
    save_emulator,
};
use crate::training::train_with_progress;

/// PEFT's task type of the adapters written for decoders.
const PEFT_TASK_TYPE: &str = "CAUSAL_LM";

/// The module paths of the weights an emulator replaces (never read when loading it).
pub(crate) fn replaced_weights(description: &EmulatorDescription) -> BTreeSet<String> {
    description.report.layers.iter().map(|l| format!("{}.weight", l.path)).collect()
}

/// Loads the decoder, or its emulator (the replaced dense weights never read) when
/// `emulator_dir` is given.
pub fn load(
    model: &ModelArgs,
    emulator_dir: Option<&Path>,
) -> CliResult<(CausalLm, Option<EmulatorDescription>)> {
    match emulator_dir {
        None => {
            let mut lm = model.load_decoder(&BTreeSet::new())?;
            lm.model = model.device.cast(lm.model);
            Ok((lm, None))
        }
        Some(dir) => {
            // Checked first, so a bad emulator directory fails before the checkpoint is read.
            let description = emloc::read_emulator_description(dir)?;
            let mut lm = model.load_decoder(&replaced_weights(&description))?;
            check_emulator_source(&description, dir, &lm.source)?;
            let (emulated, description) = load_emulator(lm.model, dir)?;
            lm.model = model.device.cast(emulated);
            Ok((lm, Some(description)))
        }
    }
}

/// The calibration sequences: prompt + training target of the first `count` training examples,
/// each tokenized (so bad data fails before any work).
pub fn calibration_sequences(
    lm: &CausalLm,
    train: &[Example],
    count: usize,
) -> CliResult<Vec<Vec<u32>>> {
    if count == 0 || count > train.len() {
        return Err(format!("--calibration-pairs {count} must be in 1..={}", train.len()).into());
    }
    let tokenized = causal_lm::tokenize_all(&lm.task, &train[..count])?;
    Ok(tokenized.into_iter().map(|t| t.prompt.into_iter().chain(t.completion).collect()).collect())
}

/// Runs `model` on one token sequence (batch of one): the calibration forward pass.
pub fn forward_sequence(model: &LlamaForCausalLM, ids: &[u32]) {
    let data = TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, ids.len()]);
    model.forward(Tensor::<2, Int>::from_data(data, &model.device()), None);
}

/// Calibrates `model` (consumed) on `sequences`, one sequence per forward pass (no padding
/// enters the Gram matrices), and builds its emulator.
pub fn build_emulator(
    model: LlamaForCausalLM,
    sequences: &[Vec<u32>],
    config: &emloc::EmulatorConfig,
) -> CliResult<(LlamaForCausalLM, EmulatorReport)> {
    let bar = progress(sequences.len(), "calibration");
    let result = emulate_with_progress(
        model,
        sequences.iter(),
        |m: &LlamaForCausalLM, ids: &Vec<u32>| {
            forward_sequence(m, ids);
            bar.inc(1);
        },
        config,
        progress::factorization(),
    );
    bar.finish_and_clear();
    Ok(result?)
}

/// `emloc emulate` for a decoder.
pub fn emulate(args: &EmulateArgs) -> CliResult<()> {
    let phase = Phase::start();
    let staged = StagedDir::begin(&args.out)?;
    let config = args.emulator.config()?;
    let split = args.data.split_examples()?;
    let path = args.model.model.as_deref().ok_or("--model is required for a decoder")?;
    // Tokenizer, template and config only: the weights are read block by block below.
    let lm = args.model.load_decoder(&causal_lm::parameter_paths(path)?)?;
    check_out(&args.out, &lm.source)?;
    let sequences = calibration_sequences(&lm, &split.train, args.emulator.calibration_pairs)?;
    let (emulator, report) = if config.sequential.is_some() {
        // Sequential calibration replays the data through the emulated prefix: whole model.
        let lm = args.model.load_decoder(&Default::default())?;
        build_emulator(args.model.device.cast(lm.model), &sequences, &config)?
    } else {
        build_emulator_streaming(
            &lm.source,
            &args.model.device()?,
            &sequences,
            &config,
            args.model.device.float_dtype(),
        )?
    };
    save_emulator(&emulator, config, report, args.provenance(&lm.source)?, phase, staged)
}

/// Builds the emulator of the decoder at `path` block by block
/// ([`causal_lm::emulate_streaming`]: one dense block in memory at a time, the same emulator
/// as [`build_emulator`] on the loaded original), with a bar over the blocks and one over the
/// factored layers.
pub fn build_emulator_streaming(
    path: &Path,
    device: &burn::tensor::Device,
    sequences: &[Vec<u32>],
    config: &emloc::EmulatorConfig,
    dtype: burn::tensor::FloatDType,
) -> CliResult<(LlamaForCausalLM, EmulatorReport)> {
    let mut blocks = None;
    let mut factorization = progress::factorization();
    let result =
        causal_lm::emulate_streaming(path, device, sequences, config, dtype, |event| match event {
            causal_lm::StreamingProgress::Part { done, total } => {
                let bar = blocks.get_or_insert_with(|| progress(total, "blocks (load, calibrate)"));
                bar.set_position(done as u64);
            }
            causal_lm::StreamingProgress::Layer(layer) => factorization(layer),
        });
    if let Some(bar) = blocks {
        bar.finish_and_clear();
    }
    Ok(result?)
}

/// Marks an adapter as a causal-LM adapter of the model at `source` (what PEFT's
/// `AutoPeftModelForCausalLM` reads).
fn describe_adapter(mut adapter: PeftAdapter, source: &Path) -> PeftAdapter {
    adapter.config.task_type = Some(PEFT_TASK_TYPE.into());
    adapter.config.base_model_name_or_path = Some(crate::output::absolute(source));
    adapter
}

/// Attaches LoRA (or the resumed adapter) and trains it with a progress bar.
pub fn train_adapter(
    lm: &CausalLm,
    model: LlamaForCausalLM,
    train: &[Example],
    args: &TrainArgs,
    label: &str,
    resume: Option<checkpoint::TrainingCheckpoint>,
    on_step: impl FnMut(usize, &LlamaForCausalLM, &burn::optim::ModuleOptimizer) -> CliResult<()>,
) -> CliResult<(LlamaForCausalLM, TrainReport)> {
    let config = args.train();
    train_with_progress(
        model,
        &lm.model.device(),
        args,
        &DECODER_LORA_TARGETS,
        label,
        resume,
        |model, resume, step| causal_lm::finetune(&lm.task, model, train, &config, resume, step),
        on_step,
    )
}

/// `emloc finetune` for a decoder.
pub fn finetune(args: &FinetuneArgs) -> CliResult<()> {
    let phase = Phase::start();
    let split = args.data.split_examples()?;
    let (lm, emulator) = load(&args.model, args.emulator.as_deref())?;
    check_out(&args.out, &lm.source)?;
    let label = if emulator.is_some() { "LoRA on the emulator" } else { "LoRA on the model" };
    let inputs = args.inputs(&lm.source)?;
    let resume = checkpoint::resume(&args.out, &args.train, &inputs, args.resume)?;
    let every = args.checkpoint_every;
    let (tuned, report) = train_adapter(
        &lm,
        lm.model.clone(),
        &split.train,
        &args.train,
        label,
        resume,
        |step, model, optim| {
            if every > 0 && step % every == 0 {
                checkpoint::save(&args.out, step, &args.train, &inputs, model, optim)?;
            }
            Ok(())
        },
    )?;
    describe_adapter(export_adapter(&tuned)?, &lm.source).save(&args.out)?;
    eprintln!("loss {:.4} → {:.4}", report.first_loss, report.last_loss);
    finish("finetune", phase, &args.out, &report)
}

/// `emloc correct` for a decoder.
pub fn correct_adapter(args: &CorrectArgs) -> CliResult<()> {
    let phase = Phase::start();
    let staged = StagedDir::begin(&args.out)?;
    let adapter = PeftAdapter::load(&args.adapter)?;
    let lm = args.model.load_decoder(&BTreeSet::new())?;
    check_out(&args.out, &lm.source)?;
    check_emulator_source(
        &emloc::read_emulator_description(&args.emulator)?,
        &args.emulator,
        &lm.source,
    )?;
    let (emulator, _) = load_emulator(lm.model.clone(), &args.emulator)?;
    let tuned = attach_adapter(emulator, &adapter)?;
    let (corrected, report) = crate::progress::with_spinner("correcting the adapter", || {
        correct(&lm.model, &tuned, &CorrectionConfig { clamp: args.clamp })
    })?;
    eprintln!("{}", report.summary());
    describe_adapter(corrected, &lm.source).save(staged.path())?;
    finish_staged("correct", phase, staged, &report)
}

/// Evaluates `model` on `examples` with a progress bar.
pub fn evaluate(
    lm: &CausalLm,
    model: &LlamaForCausalLM,
    examples: &[Example],
    config: &EvalConfig,
    label: &str,
) -> CliResult<CausalLmMetrics> {
    let bar = progress(0, label);
    let metrics = causal_lm::evaluate(&lm.task, model, examples, config, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok(metrics?)
}

/// `emloc eval` for a decoder: prints `loss`, `exact_match` and (multiple-choice data)
/// `accuracy` as JSON.
pub fn eval(args: &EvalArgs) -> CliResult<()> {
    let phase = Phase::start();
    let split = args.data.split_examples()?;
    let (lm, _) = load(&args.model, args.emulator.as_deref())?;
    let context = lm.config.max_position_embeddings;
    GenerationConfig::greedy(args.max_new_tokens).check_context(0, context)?;
    let mut model = lm.model.clone();
    if let Some(dir) = &args.adapter {
        model = attach_adapter(model, &PeftAdapter::load(dir)?)?;
    }
    let config =
        EvalConfig { batch_size: args.eval_batch_size, max_new_tokens: args.max_new_tokens };
    let metrics = evaluate(&lm, &model, &split.validation, &config, "evaluating")?;
    #[derive(Serialize)]
    struct Output {
        #[serde(flatten)]
        metrics: CausalLmMetrics,
        #[serde(flatten)]
        stats: PhaseStats,
    }
    println!("{}", serde_json::to_string_pretty(&Output { metrics, stats: phase.finish() })?);
    Ok(())
}
