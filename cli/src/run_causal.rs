//! `emloc run --recipe smollm2-bigbench`: the LLM experiment. Supervised fine-tuning of a
//! Llama-family decoder (SmolLM2-135M-Instruct by default) on eight BIG-bench tasks mixed,
//! scored per task on validation items carved out of each task's train split: exact match for
//! the seven generation tasks, choice accuracy for MathQA. Rows: zero-shot, LoRA on the full
//! model, EMLoC corrected and uncorrected over a ρ sweep (with, as a diagnostic, the adapter
//! scored on the emulator it was trained on), the plain-SVD emulator, the global rank
//! allocation and the paper's baselines (layer drop, structured pruning) at the headline ρ's
//! size, and the emulator constructions `--constructions` asks for; one seed, step count and
//! set of hyperparameters for every row.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Module;
use emloc::emulator::{Objective, config_for_ranks, global_ranks, whitened_spectra};
use emloc::peft::PeftAdapter;
use emloc::{EmulatorConfig, WhiteningMethod, export_adapter, merge_adapter};
use emloc_models::causal_lm::{self, CausalLm, EvalConfig, Example};
use emloc_models::layer_drop::blocks_at_emulator_size;
use emloc_models::llama::LlamaForCausalLM;
use emloc_models::pruning::{neurons_for_params, strongest_neurons, unprune_adapter};
use emloc_models::retrieval;
use emloc_models::rng::XorShiftRng;
use serde::Serialize;

use crate::CliResult;
use crate::args::{EmulatorArgs, TrainArgs};
use crate::causal::{build_emulator, calibration_sequences, forward_sequence, train_adapter};
use crate::data::{BIGBENCH_TASKS, BigbenchTask, Scoring};
use crate::memory::{Phase, PhaseStats, param_bytes};
use crate::output::write_report;
use crate::run::{
    Rows, RunArgs, Variant, construction_variants, log_emulator, score_merged_adapters,
};

/// Most tokens generated per example when scoring exact match: every accepted target of the
/// seven generation tasks fits in fewer.
const MAX_NEW_TOKENS: usize = 8;

/// A recipe's model without `--model`: `$var` if set, else `~/.cache/emloc/{file}` (where the
/// fetch scripts write).
pub(crate) fn default_model_path(var: &str, file: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/emloc").join(file)
}

/// Where the recipe looks for SmolLM2 without `--model`: `$EMLOC_SMOLLM2_GGUF`, else the
/// path `scripts/fetch_smollm2.sh` writes to.
fn default_gguf() -> PathBuf {
    default_model_path("EMLOC_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// One task's held-out items and its training share.
pub(crate) struct TaskData {
    pub(crate) task: &'static BigbenchTask,
    validation: Vec<Example>,
    pub(crate) train: usize,
}

/// Reads the embedded tasks, carves `validation` items out of each with `split_seed` (the same
/// split for every row and seed), keeps up to `train_per_task` of the rest (0 = all), and mixes
/// the training items in one fixed-seed order. Generation tasks lose their choices, so that they
/// are scored by exact match only.
pub(crate) fn split_tasks(
    validation: usize,
    split_seed: u64,
    train_per_task: usize,
) -> CliResult<(Vec<TaskData>, Vec<Example>)> {
    let mut tasks = Vec::new();
    let mut train = Vec::new();
    for task in &BIGBENCH_TASKS {
        let mut examples = causal_lm::parse_jsonl(task.text, Path::new(task.file))?;
        if task.scoring == Scoring::ExactMatch {
            examples.iter_mut().for_each(|e| e.choices = None);
        }
        let split = retrieval::split(examples, validation, split_seed)
            .map_err(|e| format!("{}: {e}", task.file))?;
        let mut task_train = split.train;
        if train_per_task > 0 {
            task_train.truncate(train_per_task);
        }
        tasks.push(TaskData { task, validation: split.validation, train: task_train.len() });
        train.extend(task_train);
    }
    // Mixed, so that the calibration sequences (the first ones) cover every task.
    let order = XorShiftRng::new(split_seed ^ 0x6d69_7865).permutation(train.len());
    let mut slots: Vec<Option<Example>> = train.into_iter().map(Some).collect();
    let mixed = order.iter().map(|&i| slots[i].take().expect("a permutation")).collect();
    Ok((tasks, mixed))
}

/// One task's result.
#[derive(Debug, Clone, Serialize)]
struct TaskScore {
    task: &'static str,
    /// `exact_match` or `accuracy`.
    metric: &'static str,
    score: f64,
    /// Mean NLL per completion token of the training targets.
    loss: f64,
}

/// A model's results over all tasks.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Scores {
    /// Mean of the task scores (each task counts once).
    pub(crate) mean_score: f64,
    /// Mean of the task losses.
    mean_loss: f64,
    tasks: Vec<TaskScore>,
}

/// Scores `model` on every task's validation items.
fn score(
    lm: &CausalLm,
    model: &LlamaForCausalLM,
    tasks: &[TaskData],
    label: &str,
) -> CliResult<Scores> {
    let mut scores = Vec::new();
    for data in tasks {
        let config = EvalConfig {
            batch_size: 8,
            max_new_tokens: match data.task.scoring {
                Scoring::ExactMatch => MAX_NEW_TOKENS,
                Scoring::Choice => 0,
            },
        };
        let label = format!("{label}: {}", data.task.short);
        let metrics = crate::causal::evaluate(lm, model, &data.validation, &config, &label)?;
        let (metric, score) = match data.task.scoring {
            Scoring::ExactMatch => ("exact_match", metrics.exact_match),
            Scoring::Choice => ("accuracy", metrics.accuracy),
        };
        let score = score.ok_or_else(|| format!("{}: no {metric} computed", data.task.file))?;
        scores.push(TaskScore { task: data.task.short, metric, score, loss: metrics.loss });
    }
    let n = scores.len() as f64;
    Ok(Scores {
        mean_score: scores.iter().map(|s| s.score).sum::<f64>() / n,
        mean_loss: scores.iter().map(|s| s.loss).sum::<f64>() / n,
        tasks: scores,
    })
}

/// Mean over the tasks of `model`'s validation loss (NLL per completion token), without
/// generating: the emulator's own quality before training.
fn validation_loss(
    lm: &CausalLm,
    model: &LlamaForCausalLM,
    tasks: &[TaskData],
    label: &str,
) -> CliResult<f64> {
    let config = EvalConfig { batch_size: 8, max_new_tokens: 0 };
    let mut total = 0.0;
    for data in tasks {
        let label = format!("{label} before training: {}", data.task.short);
        total += crate::causal::evaluate(lm, model, &data.validation, &config, &label)?.loss;
    }
    Ok(total / tasks.len().max(1) as f64)
}

/// Heap a forward pass of the original needs on the batch of the `batch_size` longest training
/// sequences (the largest batch training can meet), counted like [`PhaseStats::needed_bytes`].
pub(crate) fn inference_bytes(
    lm: &CausalLm,
    original: &LlamaForCausalLM,
    train: &[Example],
    batch_size: usize,
) -> CliResult<usize> {
    let mut tokenized = causal_lm::tokenize_all(&lm.task, train)?;
    tokenized.sort_by_key(|t| std::cmp::Reverse(t.len()));
    tokenized.truncate(batch_size);
    let batch = lm.task.batch(&tokenized, &original.device());
    let nll = || causal_lm::token_nll(original, &batch).sum().into_scalar::<f32>();
    // Once unmeasured: a thread's first product allocates faer's packing buffer for the thread's
    // life, which the training phases measured later do not meet either.
    nll();
    let phase = Phase::start();
    let nll = nll();
    let stats = phase.finish();
    if !nll.is_finite() {
        return Err("the original's loss on the longest training batch is not finite".into());
    }
    Ok(stats.needed_bytes(param_bytes(original)))
}

/// One row of the table.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) method: String,
    /// The emulator's keep-ratio, if the row trains on an emulator built with one.
    pub(crate) ratio: Option<f64>,
    pub(crate) scores: Scores,
    /// Share of full-model LoRA's mean-score gain over zero-shot.
    pub(crate) gain_recovered: Option<f64>,
    trainable_params: usize,
    /// Parameters of the model the adapter was trained on (0 for zero-shot).
    pub(crate) trained_model_params: usize,
    /// Training loss of the first and the last step.
    training_loss: Option<(f64, f64)>,
    /// Mean validation loss (over tasks) of the emulator itself before any training: its gap to
    /// the zero-shot row's loss is what the emulator loses before LoRA starts.
    emulator_loss_before_training: Option<f64>,
    /// Heap fine-tuning needs: the trained model's parameters plus what training allocated
    /// (adapter, optimizer state, activations, gradients).
    pub(crate) finetune_bytes: Option<usize>,
    /// `finetune_bytes` over what running the original on the largest training batch needs.
    finetune_vs_inference: Option<f64>,
    /// Wall time and peaks of fine-tuning (for zero-shot: of evaluating the original).
    training: PhaseStats,
    /// Wall time of the whole row in seconds (emulation, training, correction, merge, scoring).
    row_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    recipe: &'static str,
    model: String,
    split_seed: u64,
    validation_per_task: usize,
    train_per_task: Vec<(&'static str, usize)>,
    emulator: &'a EmulatorArgs,
    ratios: &'a [f64],
    train: &'a TrainArgs,
    inference_bytes: usize,
    rows: Vec<Row>,
    emulators: Vec<(String, emloc::EmulatorReport)>,
    corrections: Vec<(String, emloc::CorrectionReport)>,
}

/// What every trained row needs.
pub(crate) struct Context<'a> {
    pub(crate) lm: &'a CausalLm,
    pub(crate) original: &'a LlamaForCausalLM,
    pub(crate) tasks: &'a [TaskData],
    pub(crate) train: &'a [Example],
    pub(crate) args: &'a RunArgs,
    pub(crate) train_args: &'a TrainArgs,
    pub(crate) inference: usize,
}

impl Context<'_> {
    /// Trains LoRA on `model`; returns the tuned model and what the rows it gives share.
    fn train(
        &self,
        model: LlamaForCausalLM,
        label: &str,
    ) -> CliResult<(LlamaForCausalLM, Trained)> {
        let model_bytes = param_bytes(&model);
        let trained_model_params = model.num_params();
        let phase = Phase::start();
        let (tuned, report) =
            train_adapter(self.lm, model, self.train, self.train_args, label, None, |_, _, _| {
                Ok(())
            })?;
        let stats = phase.finish();
        let bytes = stats.needed_bytes(model_bytes);
        let trainable_params = tuned.num_params() - trained_model_params;
        eprintln!(
            "{label}: loss {:.3} → {:.3} in {:.0}s; needs {} MiB ({:.2}× inference)",
            report.first_loss,
            report.last_loss,
            stats.wall_seconds,
            bytes >> 20,
            bytes as f64 / self.inference as f64
        );
        Ok((
            tuned,
            Trained {
                trainable_params,
                trained_model_params,
                training_loss: (report.first_loss, report.last_loss),
                bytes,
                stats,
                emulator_loss_before_training: None,
            },
        ))
    }
}

/// What a training run contributes to its rows.
struct Trained {
    trainable_params: usize,
    trained_model_params: usize,
    training_loss: (f64, f64),
    bytes: usize,
    stats: PhaseStats,
    /// The trained-on emulator's mean validation loss before training (`None`: the original).
    emulator_loss_before_training: Option<f64>,
}

/// Checks the recipe's own options before any work.
fn validate(args: &RunArgs, train_args: &TrainArgs) -> CliResult<()> {
    if args.data.data.is_some() {
        return Err("--recipe smollm2-bigbench reads its eight embedded BIG-bench tasks; \
                    --data is for the other recipes"
            .into());
    }
    if args.emulator.config.is_some() {
        return Err("--recipe smollm2-bigbench sizes its emulators with --ratio and --ratios; \
                    --config is for the other recipes"
            .into());
    }
    for &ratio in std::iter::once(&args.emulator.ratio).chain(&args.ratios) {
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(format!("keep-ratio {ratio} must be in (0, 1)").into());
        }
    }
    if args.rows == Rows::All && !args.ratios.contains(&args.emulator.ratio) {
        return Err(format!(
            "--ratio {} (the plain-SVD and global-allocation rows' size) must be one of --ratios {:?}",
            args.emulator.ratio, args.ratios
        )
        .into());
    }
    if train_args.batch_size == 0 || train_args.steps == 0 {
        return Err("--steps and --batch-size must be at least 1".into());
    }
    Ok(())
}

/// Runs the recipe with `train_args` (its defaults applied) and prints the table.
pub fn run(args: &RunArgs, train_args: &TrainArgs) -> CliResult<()> {
    validate(args, train_args)?;
    let phase = Phase::start();
    let (tasks, train) = split_tasks(args.data.validation, args.data.split_seed, args.train_pairs)?;
    let mut model_args = args.model.clone();
    let path = model_args.model.get_or_insert_with(default_gguf).clone();
    if !path.exists() {
        return Err(format!(
            "{}: no such model; fetch SmolLM2-135M-Instruct with scripts/fetch_smollm2.sh, or \
             name a Llama-family GGUF file or HF directory with --model (or $EMLOC_SMOLLM2_GGUF)",
            path.display()
        )
        .into());
    }
    let lm = model_args.load_decoder(&BTreeSet::new())?;
    let calibration = calibration_sequences(&lm, &train, args.emulator.calibration_pairs)?;
    let original = model_args.device.cast(lm.model.clone());
    let inference = inference_bytes(&lm, &original, &train, train_args.batch_size)?;
    eprintln!(
        "model {} loaded in {:.1}s; {} tasks, {} validation items each, {} mixed training items, \
         {} calibration sequences; running the original on the largest training batch needs {} MiB",
        path.display(),
        phase.elapsed_seconds(),
        tasks.len(),
        args.data.validation,
        train.len(),
        calibration.len(),
        inference >> 20
    );
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let cx = Context {
        lm: &lm,
        original: &original,
        tasks: &tasks,
        train: &train,
        args,
        train_args,
        inference,
    };

    let zero_shot = zero_shot_row(&cx, "zero-shot (original model)")?;
    let lora = full_lora_row(&cx, "LoRA on the full model", "full-lora")?;
    let recovered = gain_share(&zero_shot, &lora);
    let mut rows = vec![zero_shot, lora];
    rows[1].gain_recovered = recovered(&rows[1].scores);

    let options = args.emulator.config()?;
    let whitening = options.whitening.method;
    let at = |ratio: f64, method: WhiteningMethod| -> CliResult<EmulatorConfig> {
        let config = EmulatorConfig {
            sequential: options.sequential,
            ..EmulatorConfig::uniform(ratio).with_whitening(method)
        };
        config.validate()?;
        Ok(config)
    };
    let ratios: Vec<f64> = match args.rows {
        Rows::All => args.ratios.clone(),
        Rows::Headline | Rows::Baselines => vec![args.emulator.ratio],
    };
    let mut variants = Vec::new();
    for &ratio in &ratios {
        variants.push(Variant {
            name: format!("EMLoC ρ = {ratio}"),
            dir: format!("emloc-rho{ratio}"),
            ratio: Some(ratio),
            config: at(ratio, whitening)?,
            uncorrected_too: true,
            weighted_too: true,
        });
    }
    if args.rows == Rows::All {
        let ratio = args.emulator.ratio;
        variants.push(Variant {
            name: format!("plain-SVD emulator ρ = {ratio}"),
            dir: format!("plain-svd-rho{ratio}"),
            ratio: Some(ratio),
            config: at(ratio, WhiteningMethod::None)?,
            uncorrected_too: false,
            weighted_too: false,
        });
    }
    let last = original.model.layers.len().saturating_sub(1);
    variants.extend(construction_variants(
        &args.constructions,
        &at(args.emulator.ratio, whitening)?,
        &format!("ρ = {}", args.emulator.ratio),
        &original,
        &format!(r"model\.layers\.(0|{last})"),
        &format!("model.layers.{last}.mlp.down_proj"),
    )?);
    let mut emulators = Vec::new();
    let mut corrections = Vec::new();
    for variant in &variants {
        let row_phase = Phase::start();
        let (emulator, report) = build_emulator(original.clone(), &calibration, &variant.config)?;
        log_emulator(&variant.name, &report, row_phase.elapsed_seconds());
        emulators.push((variant.name.clone(), report));
        rows.extend(train_correct_score(
            &cx,
            variant,
            emulator,
            &row_phase,
            &recovered,
            &mut corrections,
        )?);
    }

    if args.rows == Rows::All {
        // The global allocation at the headline EMLoC emulator's size: ranks by whitened
        // spectrum (as `emloc plan` computes them), then the same pipeline.
        let row_phase = Phase::start();
        let headline = at(args.emulator.ratio, whitening)?;
        let size = emulators
            .iter()
            .zip(&variants)
            .find(|(_, v)| v.ratio == Some(args.emulator.ratio) && v.uncorrected_too)
            .map(|((_, report), _)| report.params_kept())
            .expect("--ratio is one of --ratios (validated)");
        let bar = crate::progress::progress(calibration.len(), "spectra");
        let spectra = whitened_spectra(
            &original,
            calibration.iter(),
            |m: &LlamaForCausalLM, ids: &Vec<u32>| {
                forward_sequence(m, ids);
                bar.inc(1);
            },
            &headline,
        )?;
        bar.finish_and_clear();
        let global = Variant {
            name: format!("global allocation, {size} factor params"),
            dir: "global".into(),
            ratio: None,
            config: config_for_ranks(
                &global_ranks(&spectra, size, Objective::Relative)?,
                &headline,
            ),
            uncorrected_too: false,
            weighted_too: false,
        };
        let (emulator, report) = build_emulator(original.clone(), &calibration, &global.config)?;
        log_emulator(&global.name, &report, row_phase.elapsed_seconds());
        emulators.push((global.name.clone(), report));
        rows.extend(train_correct_score(
            &cx,
            &global,
            emulator,
            &row_phase,
            &recovered,
            &mut corrections,
        )?);
    }

    if args.rows != Rows::Headline {
        // The paper's baselines at the headline EMLoC emulator's size.
        let (_, headline) = emulators
            .iter()
            .zip(&variants)
            .find(|(_, v)| v.ratio == Some(args.emulator.ratio) && v.uncorrected_too)
            .map(|(emulator, _)| emulator)
            .expect("the headline ratio has an EMLoC row");
        let headline = headline.clone();
        rows.push(layer_drop_row(&cx, &headline, &recovered)?);
        rows.push(pruning_row(&cx, &headline, &calibration, &recovered)?);
    }

    print_table(&rows, &tasks);
    let report = Report {
        recipe: "smollm2-bigbench",
        model: path.display().to_string(),
        split_seed: args.data.split_seed,
        validation_per_task: args.data.validation,
        train_per_task: tasks.iter().map(|t| (t.task.short, t.train)).collect(),
        emulator: &args.emulator,
        ratios: &ratios,
        train: train_args,
        inference_bytes: inference,
        rows,
        emulators,
        corrections,
    };
    write_report(&args.out, &report)
}

/// The share of `lora`'s mean-score gain over `zero_shot` that a row recovers (`None` when
/// LoRA gained nothing: a share of no gain means nothing).
pub(crate) fn gain_share(zero_shot: &Row, lora: &Row) -> impl Fn(&Scores) -> Option<f64> + use<> {
    let (base, gain) =
        (zero_shot.scores.mean_score, lora.scores.mean_score - zero_shot.scores.mean_score);
    move |s: &Scores| (gain > 1e-12).then(|| (s.mean_score - base) / gain)
}

/// The original scored as it is, with no training: the `method` row.
pub(crate) fn zero_shot_row(cx: &Context<'_>, method: &str) -> CliResult<Row> {
    let phase = Phase::start();
    let scores = score(cx.lm, cx.original, cx.tasks, method)?;
    let stats = phase.finish();
    log_scores(method, &scores);
    Ok(Row {
        method: method.into(),
        ratio: None,
        scores,
        gain_recovered: None,
        trainable_params: 0,
        trained_model_params: 0,
        training_loss: None,
        emulator_loss_before_training: None,
        finetune_bytes: None,
        finetune_vs_inference: None,
        training: stats,
        row_seconds: stats.wall_seconds,
    })
}

/// LoRA trained on the whole original, saved as `OUT/adapter-{dir}`, merged and scored: the
/// `method` row (its `gain_recovered` left for the caller, who knows the reference).
pub(crate) fn full_lora_row(cx: &Context<'_>, method: &str, dir: &str) -> CliResult<Row> {
    let row_phase = Phase::start();
    let (tuned, trained) = cx.train(cx.original.clone(), method)?;
    let adapter = export_adapter(&tuned)?;
    adapter.save(&cx.args.out.join(format!("adapter-{dir}")))?;
    let scores = score(cx.lm, &merge_adapter(cx.original.clone(), &adapter)?, cx.tasks, method)?;
    log_scores(method, &scores);
    Ok(trained_row(cx, method.into(), None, scores, &trained, &|_| None, &row_phase))
}

fn trained_row(
    cx: &Context<'_>,
    method: String,
    ratio: Option<f64>,
    scores: Scores,
    trained: &Trained,
    recovered: &dyn Fn(&Scores) -> Option<f64>,
    row_phase: &Phase,
) -> Row {
    Row {
        method,
        ratio,
        gain_recovered: recovered(&scores),
        scores,
        trainable_params: trained.trainable_params,
        trained_model_params: trained.trained_model_params,
        training_loss: Some(trained.training_loss),
        emulator_loss_before_training: trained.emulator_loss_before_training,
        finetune_bytes: Some(trained.bytes),
        finetune_vs_inference: Some(trained.bytes as f64 / cx.inference as f64),
        training: trained.stats,
        row_seconds: row_phase.elapsed_seconds(),
    }
}

/// Trains LoRA on `emulator`, then scores the corrected (and, if asked, the uncorrected)
/// adapter merged into the original: one row each.
pub(crate) fn train_correct_score(
    cx: &Context<'_>,
    variant: &Variant,
    emulator: LlamaForCausalLM,
    row_phase: &Phase,
    recovered: &dyn Fn(&Scores) -> Option<f64>,
    corrections: &mut Vec<(String, emloc::CorrectionReport)>,
) -> CliResult<Vec<Row>> {
    let before = validation_loss(cx.lm, &emulator, cx.tasks, &variant.name)?;
    eprintln!("{} before training: mean validation loss {before:.4}", variant.name);
    let (tuned, mut trained) = cx.train(emulator, &format!("LoRA on the {}", variant.name))?;
    trained.emulator_loss_before_training = Some(before);
    let mut rows = Vec::new();
    if variant.uncorrected_too {
        // Diagnostic: how well the adapter does on the model it was trained on, which separates
        // what the emulator cannot learn from what is lost moving the adapter to the original.
        let label = format!("{} adapter on the emulator itself", variant.name);
        let scores = score(cx.lm, &tuned, cx.tasks, &label)?;
        log_scores(&label, &scores);
        rows.push(trained_row(
            cx,
            format!("{label} (diagnostic)"),
            variant.ratio,
            scores,
            &trained,
            recovered,
            row_phase,
        ));
    }
    score_merged_adapters(
        cx.original,
        &tuned,
        variant,
        cx.args.clamp,
        &cx.args.out,
        corrections,
        |which, merged| {
            let label = format!("{} {which}", variant.name);
            let scores = score(cx.lm, &merged, cx.tasks, &label)?;
            log_scores(&label, &scores);
            rows.push(trained_row(
                cx,
                format!("{label}, merged into the original"),
                variant.ratio,
                scores,
                &trained,
                recovered,
                row_phase,
            ));
            Ok(())
        },
    )?;
    Ok(rows)
}

/// Offsite-Tuning's layer-drop emulator with as many decoder layers as come closest to the
/// parameters `emulator` keeps in its layers (first and last kept, the rest spread evenly), LoRA
/// on every kept layer, the adapter moved onto the original's matching layers and merged.
fn layer_drop_row(
    cx: &Context<'_>,
    emulator: &emloc::EmulatorReport,
    recovered: &dyn Fn(&Scores) -> Option<f64>,
) -> CliResult<Row> {
    let row_phase = Phase::start();
    let total = cx.original.model.layers.len();
    let kept = blocks_at_emulator_size(emulator, total)?;
    let name = format!("layer drop (Offsite-Tuning), {} of {total} layers", kept.len());
    let dropped = cx.original.clone().keep_layers(&kept)?;
    let moved = |adapter: PeftAdapter| Ok(adapter.renumber_blocks("model.layers.", &kept)?);
    cut_model_row(cx, &name, dropped, moved, "layer-drop", &row_phase, recovered)
}

/// Structured pruning at the size `emulator` keeps in its layers: every layer keeps the same
/// number of MLP neurons, those of largest activation norm (the diagonal of `down_proj`'s
/// calibration Gram) on the `calibration` sequences, attention unpruned; LoRA on the pruned
/// model, the adapter moved back with zeros for pruned neurons.
fn pruning_row(
    cx: &Context<'_>,
    emulator: &emloc::EmulatorReport,
    calibration: &[Vec<u32>],
    recovered: &dyn Fn(&Scores) -> Option<f64>,
) -> CliResult<Row> {
    let row_phase = Phase::start();
    let layers = cx.original.model.layers.len();
    let first = &cx.original.model.layers[0].mlp.down_proj;
    let (width, d_model) = (first.d_input(), first.d_output());
    let attention_params = emulator.params_original().saturating_sub(3 * d_model * width * layers);
    let mlp_budget = emulator.params_kept().saturating_sub(attention_params);
    // At least the LoRA rank, which a layer of fewer features cannot hold.
    let keep = neurons_for_params(mlp_budget, layers, 3 * d_model, width)
        .max(cx.train_args.rank.min(width));
    let down = |l: usize| format!("model.layers.{l}.mlp.down_proj");
    let wanted: Vec<String> = (0..layers).map(down).collect();
    let bar = crate::progress::progress(calibration.len(), "neuron norms");
    let stats = emloc::calibrate(
        cx.original,
        calibration.iter(),
        |m: &LlamaForCausalLM, ids: &Vec<u32>| {
            forward_sequence(m, ids);
            bar.inc(1);
        },
        |p| wanted.iter().any(|w| w == p),
    )?;
    bar.finish_and_clear();
    let grams: BTreeMap<String, emloc::Matrix> =
        stats.into_iter().map(|s| (s.path, s.gram)).collect();
    let kept: Vec<Vec<usize>> =
        wanted.iter().map(|path| strongest_neurons(&grams[path], keep)).collect();
    let name = format!("structured pruning, {keep} of {width} MLP neurons per layer");
    let pruned = cx.original.clone().prune_mlp(&kept)?;
    let moved = |adapter: PeftAdapter| {
        let writers = |l: usize| {
            ["gate_proj", "up_proj"].map(|p| format!("model.layers.{l}.mlp.{p}")).to_vec()
        };
        Ok(unprune_adapter(adapter, &kept, width, writers, down)?)
    };
    cut_model_row(cx, &name, pruned, moved, "pruned", &row_phase, recovered)
}

/// Scores `model` (a cut or another form of the original) before training, trains LoRA on it,
/// moves the adapter onto the original with `move_back`, saves it as `OUT/adapter-{dir}`,
/// merges it and scores the result.
pub(crate) fn cut_model_row(
    cx: &Context<'_>,
    name: &str,
    model: LlamaForCausalLM,
    move_back: impl FnOnce(PeftAdapter) -> CliResult<PeftAdapter>,
    dir: &str,
    row_phase: &Phase,
    recovered: &dyn Fn(&Scores) -> Option<f64>,
) -> CliResult<Row> {
    let before = validation_loss(cx.lm, &model, cx.tasks, name)?;
    eprintln!("{name} before training: mean validation loss {before:.4}");
    let (tuned, mut trained) = cx.train(model, &format!("LoRA on the {name}"))?;
    trained.emulator_loss_before_training = Some(before);
    let adapter = move_back(export_adapter(&tuned)?)?;
    adapter.save(&cx.args.out.join(format!("adapter-{dir}")))?;
    let scores = score(cx.lm, &merge_adapter(cx.original.clone(), &adapter)?, cx.tasks, name)?;
    log_scores(name, &scores);
    Ok(trained_row(
        cx,
        format!("{name}, merged into the original"),
        None,
        scores,
        &trained,
        recovered,
        row_phase,
    ))
}

fn log_scores(label: &str, scores: &Scores) {
    let tasks: Vec<String> =
        scores.tasks.iter().map(|t| format!("{} {:.2}", t.task, t.score)).collect();
    eprintln!(
        "{label}: mean score {:.4}, mean loss {:.4} ({})",
        scores.mean_score,
        scores.mean_loss,
        tasks.join(", ")
    );
}

pub(crate) fn print_table(rows: &[Row], tasks: &[TaskData]) {
    let names: Vec<&str> = tasks.iter().map(|t| t.task.short).collect();
    println!(
        "| method | mean score | {} | val. loss | gain recovered | params trained on | fine-tune MiB (× inference) | fine-tune s | row s |",
        names.join(" | ")
    );
    println!("|---|---:|{}---:|---:|---:|---:|---:|", "---:|".repeat(names.len()));
    for row in rows {
        let tasks: Vec<String> =
            row.scores.tasks.iter().map(|t| format!("{:.2}", t.score)).collect();
        println!(
            "| {} | {:.4} | {} | {:.4} | {} | {} | {} | {:.1} | {:.1} |",
            row.method,
            row.scores.mean_score,
            tasks.join(" | "),
            row.scores.mean_loss,
            row.gain_recovered.map_or_else(|| "-".into(), |r| format!("{:.0} %", 100.0 * r)),
            row.trained_model_params,
            match (row.finetune_bytes, row.finetune_vs_inference) {
                (Some(b), Some(x)) => format!("{} ({x:.2}×)", b >> 20),
                _ => "-".into(),
            },
            row.training.wall_seconds,
            row.row_seconds
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_is_split_apart_and_the_training_mix_covers_them_all() {
        let (tasks, train) = split_tasks(5, 3, 40).unwrap();
        assert_eq!(tasks.len(), 8);
        assert_eq!(train.len(), 8 * 40);
        for data in &tasks {
            assert_eq!(data.validation.len(), 5);
            assert_eq!(data.train, 40);
            for example in &data.validation {
                assert!(
                    !train.contains(example),
                    "{}: a validation item is trained on",
                    data.task.file
                );
                // Generation tasks are scored by exact match only; MathQA by its choices.
                assert_eq!(example.choices.is_some(), data.task.scoring == Scoring::Choice);
            }
        }
        // The first 64 (the calibration sequences) hold items of every task: the mix is shuffled.
        let covered = tasks
            .iter()
            .filter(|d| {
                let all = causal_lm::parse_jsonl(d.task.text, Path::new(d.task.file)).unwrap();
                train[..64].iter().any(|e| all.iter().any(|a| a.prompt == e.prompt))
            })
            .count();
        assert_eq!(covered, 8);
        // The same seed gives the same split; another seed another one.
        let (again, _) = split_tasks(5, 3, 40).unwrap();
        assert_eq!(again[0].validation, tasks[0].validation);
        let (other, _) = split_tasks(5, 4, 40).unwrap();
        assert_ne!(other[0].validation, tasks[0].validation);
    }
}
