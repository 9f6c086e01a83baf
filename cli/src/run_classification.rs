//! `emloc run`'s default recipe: sentence classification (MultiEmo sentiment by default) with a
//! sentence encoder, where zero-shot leaves room for fine-tuning to show. Rows: zero-shot, LoRA on
//! the full model, EMLoC corrected and uncorrected, the plain-SVD emulator, the global rank
//! allocation at the uniform emulator's size, the paper's baselines at that size
//! (Offsite-Tuning's layer drop, structured pruning of FFN neurons) and the emulator
//! constructions `--constructions` asks for (`--rows` selects fewer); one seed, step count and
//! set of hyperparameters for every row.

use std::collections::BTreeMap;

use burn::module::Module;
use emloc::emulator::{Objective, config_for_ranks, global_ranks, whitened_spectra};
use emloc::peft::PeftAdapter;
use emloc::{EmulatorConfig, WhiteningMethod, export_adapter, merge_attached_adapter};
use emloc_models::bert::{BertModel, SentenceEncoder};
use emloc_models::classification::{ClassificationMetrics, ClassificationTask, LabeledText};
use emloc_models::layer_drop::blocks_at_emulator_size;
use emloc_models::pruning::{neurons_for_params, strongest_neurons, unprune_adapter};
use serde::Serialize;

use crate::CliResult;
use crate::args::{EmulatorArgs, TrainArgs};
use crate::data::{DataArgs, classification_calibration_texts};
use crate::memory::{Phase, PhaseStats, param_bytes};
use crate::output::write_report;
use crate::run::{
    Rows, RunArgs, Variant, construction_variants, log_emulator, score_merged_adapters,
};
use crate::training::{
    adapter_params, build_emulator, evaluate_classes, train_classifier, with_calibration,
};

/// One row of the table.
#[derive(Debug, Serialize)]
struct Row {
    method: String,
    metrics: ClassificationMetrics,
    /// Share of full-model LoRA's accuracy gain over zero-shot.
    accuracy_gain_recovered: Option<f64>,
    trainable_params: usize,
    /// Parameters of the model the adapter was trained on (0 for zero-shot).
    trained_model_params: usize,
    /// Training loss of the first and the last step.
    training_loss: Option<(f64, f64)>,
    /// The emulator itself on the validation split, before any training (its distance from
    /// the original's zero-shot row is what the emulator loses before LoRA starts).
    emulator_before_training: Option<ClassificationMetrics>,
    /// Heap fine-tuning needs as the `finetune` stage holds it: the trained model's parameters
    /// plus what training allocated (adapter, optimizer state, activations, gradients); not the
    /// original this process keeps for the correction.
    finetune_bytes: Option<usize>,
    /// `finetune_bytes` over what running the original on the largest training batch needs.
    finetune_vs_inference: Option<f64>,
    /// Peaks and wall time of fine-tuning (for zero-shot: of evaluating the original).
    training: PhaseStats,
    /// Wall time of the whole row in seconds (emulation, training, correction, merge, eval).
    row_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    recipe: &'static str,
    model: String,
    data: &'a DataArgs,
    emulator: &'a EmulatorArgs,
    train: &'a TrainArgs,
    max_seq_length: usize,
    labels: &'a [String],
    label_descriptions: &'a [String],
    train_examples: usize,
    validation_examples: usize,
    /// Heap running the original on the largest training batch needs (its parameters included).
    inference_bytes: usize,
    rows: Vec<Row>,
    emulators: Vec<(String, emloc::EmulatorReport)>,
    corrections: Vec<(String, emloc::CorrectionReport)>,
}

/// What every trained row needs.
struct Context<'a> {
    encoder: &'a SentenceEncoder,
    original: &'a BertModel,
    task: &'a ClassificationTask,
    train: &'a [LabeledText],
    validation: &'a [LabeledText],
    args: &'a RunArgs,
    train_args: &'a TrainArgs,
    inference_bytes: usize,
    /// The calibration texts every emulator (and the pruning's neuron norms) is built from.
    calibration: &'a [String],
}

impl Context<'_> {
    /// The original's input Gram matrices on the calibration texts of the layers `select`
    /// accepts, by path.
    fn grams(&self, select: impl Fn(&str) -> bool) -> CliResult<BTreeMap<String, emloc::Matrix>> {
        let stats = with_calibration(self.encoder, self.calibration, |batches, forward| {
            emloc::calibrate(self.original, batches, |m: &BertModel, b| forward(m, b), select)
        })??;
        Ok(stats.into_iter().map(|s| (s.path, s.gram)).collect())
    }

    /// `finetune_bytes` and `finetune_vs_inference` of a row whose training ran on a model of
    /// `model_bytes` with peaks `stats`.
    fn needed(&self, model_bytes: usize, stats: &PhaseStats) -> (Option<usize>, Option<f64>) {
        let bytes = stats.needed_bytes(model_bytes);
        (Some(bytes), Some(bytes as f64 / self.inference_bytes as f64))
    }
}

/// Heap a forward pass of `original` needs on what one training step embeds at most: the
/// `batch_size` longest training sentences and the label descriptions, counted like
/// [`PhaseStats::needed_bytes`].
fn inference_bytes(
    encoder: &SentenceEncoder,
    original: &BertModel,
    task: &ClassificationTask,
    train: &[LabeledText],
    batch_size: usize,
) -> CliResult<usize> {
    let texts: Vec<&str> = train.iter().map(|t| t.input.as_str()).collect();
    let lengths: Vec<usize> = encoder.tokenize(&texts)?.iter().map(|e| e.ids.len()).collect();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let longest: Vec<&str> = order.iter().take(batch_size).map(|&i| texts[i]).collect();
    let descriptions: Vec<&str> = task.descriptions.iter().map(String::as_str).collect();
    let forward = || -> CliResult<bool> {
        let sentences = encoder.forward_with(original, encoder.inputs(&longest)?);
        let labels = encoder.forward_with(original, encoder.inputs(&descriptions)?);
        Ok(sentences.sum().into_scalar::<f32>().is_finite()
            && labels.sum().into_scalar::<f32>().is_finite())
    };
    // Once unmeasured: a thread's first product allocates faer's packing buffer for the thread's
    // life, which the training phases measured later do not meet either.
    forward()?;
    let phase = Phase::start();
    let finite = forward()?;
    let stats = phase.finish();
    if !finite {
        return Err("the original's embeddings of the longest training batch are not finite".into());
    }
    Ok(stats.needed_bytes(param_bytes(original)))
}

/// Runs the classification recipe with `train_args` (the recipe's defaults applied) and prints
/// the table.
pub fn run(args: &RunArgs, train_args: &TrainArgs, max_seq_length: usize) -> CliResult<()> {
    let phase = Phase::start();
    let (task, split) = args.data.split_classes()?;
    let mut train = split.train;
    if args.train_pairs > 0 {
        train.truncate(args.train_pairs);
    }
    let calibration =
        classification_calibration_texts(&task, &train, args.emulator.calibration_pairs)?;
    let (encoder, model_dir) = args.model.load()?;
    let encoder = encoder.with_max_seq_length(max_seq_length)?;
    let original = encoder.model.clone();
    let load = phase.finish();
    eprintln!(
        "model {} loaded in {:.1}s; {} labels {:?}; {} training sentences, {} validation sentences, {} calibration texts",
        model_dir.display(),
        load.wall_seconds,
        task.labels.len(),
        task.descriptions,
        train.len(),
        split.validation.len(),
        calibration.len()
    );
    let inference_bytes =
        inference_bytes(&encoder, &original, &task, &train, train_args.batch_size)?;
    eprintln!(
        "running the original on the largest training batch needs {} MiB",
        inference_bytes >> 20
    );
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let context = Context {
        encoder: &encoder,
        original: &original,
        task: &task,
        train: &train,
        validation: &split.validation,
        args,
        train_args,
        inference_bytes,
        calibration: &calibration,
    };

    let mut rows = Vec::new();
    let phase = Phase::start();
    let zero_shot = evaluate_classes(&encoder, &original, &task, &split.validation, "zero-shot")?;
    let stats = phase.finish();
    eprintln!(
        "zero-shot: accuracy {:.4}, macro-F1 {:.4}, loss {:.4} ({:.1}s)",
        zero_shot.accuracy, zero_shot.macro_f1, zero_shot.loss, stats.wall_seconds
    );
    rows.push(Row {
        method: "zero-shot (original model)".into(),
        metrics: zero_shot.clone(),
        accuracy_gain_recovered: None,
        trainable_params: 0,
        trained_model_params: 0,
        training_loss: None,
        emulator_before_training: None,
        finetune_bytes: None,
        finetune_vs_inference: None,
        training: stats,
        row_seconds: stats.wall_seconds,
    });

    let row_phase = Phase::start();
    let phase = Phase::start();
    let (tuned, report) = train_classifier(
        &encoder,
        original.clone(),
        &task,
        &train,
        train_args,
        "LoRA on the full model",
        None,
        |_, _, _| Ok(()),
    )?;
    let training = phase.finish();
    let (finetune_bytes, finetune_vs_inference) = context.needed(param_bytes(&original), &training);
    let trainable = adapter_params(&tuned);
    let trained_params = tuned.num_params() - trainable;
    export_adapter(&tuned)?.save(&args.out.join("adapter-full-lora"))?;
    let metrics = evaluate_classes(
        &encoder,
        &merge_attached_adapter(tuned),
        &task,
        &split.validation,
        "LoRA",
    )?;
    eprintln!(
        "LoRA on the full model: accuracy {:.4}, macro-F1 {:.4}, loss {:.4} (training loss {:.3} → {:.3})",
        metrics.accuracy, metrics.macro_f1, metrics.loss, report.first_loss, report.last_loss
    );
    let full_gain = metrics.accuracy - zero_shot.accuracy;
    // A share of a gain only means something when there is a gain.
    let recovered = |m: &ClassificationMetrics| {
        (full_gain > 1e-12).then(|| (m.accuracy - zero_shot.accuracy) / full_gain)
    };
    rows.push(Row {
        method: "LoRA on the full model".into(),
        accuracy_gain_recovered: recovered(&metrics),
        metrics,
        trainable_params: trainable,
        trained_model_params: trained_params,
        training_loss: Some((report.first_loss, report.last_loss)),
        emulator_before_training: None,
        finetune_bytes,
        finetune_vs_inference,
        training,
        row_seconds: row_phase.elapsed_seconds(),
    });

    let base = args.emulator.config()?;
    let sizing = match &args.emulator.config {
        Some(path) => format!(
            "({})",
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ),
        None => format!("ρ = {}", args.emulator.ratio),
    };
    let with_whitening = |method| EmulatorConfig {
        whitening: emloc::emulator::WhiteningConfig { method, ..base.whitening.clone() },
        ..base.clone()
    };
    let mut emulators = Vec::new();
    let mut corrections = Vec::new();
    let mut variants = vec![Variant {
        name: format!("EMLoC {sizing}"),
        dir: "emulator-whitened".into(),
        ratio: None,
        config: with_whitening(WhiteningMethod::Cholesky),
        uncorrected_too: true,
        weighted_too: true,
    }];
    if args.rows == Rows::All {
        variants.push(Variant {
            name: format!("plain-SVD emulator {sizing}"),
            dir: "emulator-plain-svd".into(),
            ratio: None,
            config: with_whitening(WhiteningMethod::None),
            uncorrected_too: false,
            weighted_too: false,
        });
    }
    let last = original.encoder.layer.len().saturating_sub(1);
    variants.extend(construction_variants(
        &args.constructions,
        &variants[0].config,
        &sizing,
        &original,
        &format!(r"encoder\.layer\.(0|{last})"),
        &format!("encoder.layer.{last}.output.dense"),
    )?);
    for variant in &variants {
        let row_phase = Phase::start();
        let (emulator, report) =
            build_emulator(&encoder, original.clone(), &calibration, &variant.config)?;
        log_emulator(&variant.name, &report, row_phase.elapsed_seconds());
        emloc::save_emulator(
            &emulator,
            &emloc::EmulatorDescription::new(variant.config.clone(), report.clone()),
            &args.out.join(&variant.dir),
        )?;
        emulators.push((variant.name.clone(), report));
        rows.extend(train_correct_score(
            &context,
            variant,
            emulator,
            row_phase,
            &recovered,
            &mut corrections,
        )?);
    }

    if args.rows == Rows::All {
        let (config, size) = (&variants[0].config, emulators[0].1.params_kept());
        let (name, report, global_rows) =
            global_allocation_rows(&context, config, size, &recovered, &mut corrections)?;
        emulators.push((name, report));
        rows.extend(global_rows);
    }
    // The paper's baselines at the EMLoC emulator's size: Offsite-Tuning's layer drop and
    // structured pruning of FFN neurons.
    if args.rows != Rows::Headline {
        rows.push(layer_drop_row(&context, &emulators[0].1, &recovered)?);
        rows.push(pruning_row(&context, &emulators[0].1, &recovered)?);
    }

    print_table(&rows);
    let report = Report {
        recipe: "multiemo-classification",
        model: model_dir.display().to_string(),
        data: &args.data,
        emulator: &args.emulator,
        train: train_args,
        max_seq_length,
        labels: &task.labels,
        label_descriptions: &task.descriptions,
        train_examples: train.len(),
        validation_examples: split.validation.len(),
        inference_bytes,
        rows,
        emulators,
        corrections,
    };
    write_report(&args.out, &report)
}

/// The global allocation at `size` factor parameters (the uniform emulator's): ranks by
/// whitened spectrum under `whitened` (as `emloc plan` computes them), then the same pipeline as
/// the EMLoC rows. Returns the emulator's name and report and its rows.
fn global_allocation_rows(
    cx: &Context<'_>,
    whitened: &EmulatorConfig,
    size: usize,
    recovered: &dyn Fn(&ClassificationMetrics) -> Option<f64>,
    corrections: &mut Vec<(String, emloc::CorrectionReport)>,
) -> CliResult<(String, emloc::EmulatorReport, Vec<Row>)> {
    let row_phase = Phase::start();
    let spectra = with_calibration(cx.encoder, cx.calibration, |batches, forward| {
        whitened_spectra(cx.original, batches, |m: &BertModel, b| forward(m, b), whitened)
    })??;
    let config = config_for_ranks(&global_ranks(&spectra, size, Objective::Relative)?, whitened);
    let global = Variant {
        name: format!("global allocation, {size} factor params"),
        dir: "emulator-global".into(),
        ratio: None,
        config,
        uncorrected_too: false,
        weighted_too: false,
    };
    let (emulator, report) =
        build_emulator(cx.encoder, cx.original.clone(), cx.calibration, &global.config)?;
    log_emulator(&global.name, &report, row_phase.elapsed_seconds());
    emloc::save_emulator(
        &emulator,
        &emloc::EmulatorDescription::new(global.config.clone(), report.clone()),
        &cx.args.out.join(&global.dir),
    )?;
    let rows = train_correct_score(cx, &global, emulator, row_phase, recovered, corrections)?;
    Ok((global.name, report, rows))
}

/// Offsite-Tuning's layer-drop emulator with as many encoder layers as come closest to the
/// parameters `emulator` keeps in its layers (first and last kept, the rest spread evenly), LoRA
/// on every kept layer, the adapter moved onto the original's matching layers and merged.
fn layer_drop_row(
    cx: &Context<'_>,
    emulator: &emloc::EmulatorReport,
    recovered: &dyn Fn(&ClassificationMetrics) -> Option<f64>,
) -> CliResult<Row> {
    let row_phase = Phase::start();
    let total = cx.original.encoder.layer.len();
    let kept = blocks_at_emulator_size(emulator, total)?;
    let name = format!("layer drop (Offsite-Tuning), layers {kept:?} of {total}");
    let dropped = cx.original.clone().keep_layers(&kept)?;
    let moved = |adapter: PeftAdapter| Ok(adapter.renumber_blocks("encoder.layer.", &kept)?);
    cut_model_row(cx, &name, dropped, moved, "adapter-layer-drop", row_phase, recovered)
}

/// Scores `model` (a cut of the original) before training, trains LoRA on it, moves the adapter
/// onto the original with `move_back`, saves it as `OUT/{dir}`, merges it and scores the result.
fn cut_model_row(
    cx: &Context<'_>,
    name: &str,
    model: BertModel,
    move_back: impl FnOnce(PeftAdapter) -> CliResult<PeftAdapter>,
    dir: &str,
    row_phase: Phase,
    recovered: &dyn Fn(&ClassificationMetrics) -> Option<f64>,
) -> CliResult<Row> {
    let before = evaluate_classes(cx.encoder, &model, cx.task, cx.validation, name)?;
    eprintln!("{name} before training: accuracy {:.4}, loss {:.4}", before.accuracy, before.loss);
    let model_bytes = param_bytes(&model);
    let phase = Phase::start();
    let (tuned, report) = train_classifier(
        cx.encoder,
        model,
        cx.task,
        cx.train,
        cx.train_args,
        &format!("LoRA on the {name}"),
        None,
        |_, _, _| Ok(()),
    )?;
    let training = phase.finish();
    let (finetune_bytes, finetune_vs_inference) = cx.needed(model_bytes, &training);
    let trainable = adapter_params(&tuned);
    let trained_params = tuned.num_params() - trainable;
    let adapter = move_back(export_adapter(&tuned)?)?;
    adapter.save(&cx.args.out.join(dir))?;
    let merged = emloc::merge_adapter(cx.original.clone(), &adapter)?;
    let metrics = evaluate_classes(cx.encoder, &merged, cx.task, cx.validation, name)?;
    eprintln!(
        "{name}: accuracy {:.4}, macro-F1 {:.4}, loss {:.4} (training loss {:.3} → {:.3})",
        metrics.accuracy, metrics.macro_f1, metrics.loss, report.first_loss, report.last_loss
    );
    Ok(Row {
        method: format!("{name}, merged into the original"),
        accuracy_gain_recovered: recovered(&metrics),
        metrics,
        trainable_params: trainable,
        trained_model_params: trained_params,
        training_loss: Some((report.first_loss, report.last_loss)),
        emulator_before_training: Some(before),
        finetune_bytes,
        finetune_vs_inference,
        training,
        row_seconds: row_phase.elapsed_seconds(),
    })
}

/// Structured pruning at the size `emulator` keeps in its layers: every layer keeps the same
/// number of FFN neurons, those of largest activation norm on the calibration texts (attention
/// unpruned), LoRA on the pruned model, the adapter moved back with zeros for pruned neurons.
fn pruning_row(
    cx: &Context<'_>,
    emulator: &emloc::EmulatorReport,
    recovered: &dyn Fn(&ClassificationMetrics) -> Option<f64>,
) -> CliResult<Row> {
    let row_phase = Phase::start();
    let layers = cx.original.encoder.layer.len();
    let ffn = &cx.original.encoder.layer[0].intermediate.dense;
    let (d_model, width) = (ffn.d_input(), ffn.d_output());
    let attention_params = emulator.params_original().saturating_sub(2 * d_model * width * layers);
    // At least the LoRA rank, which a layer of fewer features cannot hold.
    let keep = neurons_for_params(
        emulator.params_kept().saturating_sub(attention_params),
        layers,
        2 * d_model,
        width,
    )
    .max(cx.train_args.rank.min(width));
    let ffn_output = |l: usize| format!("encoder.layer.{l}.output.dense");
    let wanted: Vec<String> = (0..layers).map(ffn_output).collect();
    let grams = cx.grams(|p| wanted.iter().any(|w| w == p))?;
    let kept: Vec<Vec<usize>> =
        wanted.iter().map(|path| strongest_neurons(&grams[path], keep)).collect();
    let name = format!("structured pruning, {keep} of {width} FFN neurons per layer");
    let pruned = cx.original.clone().prune_ffn(&kept)?;
    let moved = |adapter: PeftAdapter| {
        let writers = |l: usize| vec![format!("encoder.layer.{l}.intermediate.dense")];
        Ok(unprune_adapter(adapter, &kept, width, writers, ffn_output)?)
    };
    cut_model_row(cx, &name, pruned, moved, "adapter-pruned", row_phase, recovered)
}

/// Trains LoRA on `emulator`, then scores the corrected (and, if asked, the uncorrected) adapter
/// merged into the original: one row each.
fn train_correct_score(
    cx: &Context<'_>,
    variant: &Variant,
    emulator: BertModel,
    row_phase: Phase,
    recovered: &dyn Fn(&ClassificationMetrics) -> Option<f64>,
    corrections: &mut Vec<(String, emloc::CorrectionReport)>,
) -> CliResult<Vec<Row>> {
    let before = evaluate_classes(cx.encoder, &emulator, cx.task, cx.validation, "the emulator")?;
    eprintln!(
        "{} before training: accuracy {:.4}, macro-F1 {:.4}, loss {:.4}",
        variant.name, before.accuracy, before.macro_f1, before.loss
    );
    let model_bytes = param_bytes(&emulator);
    let phase = Phase::start();
    let label = format!("LoRA on the {}", variant.name);
    let (tuned, report) = train_classifier(
        cx.encoder,
        emulator,
        cx.task,
        cx.train,
        cx.train_args,
        &label,
        None,
        |_, _, _| Ok(()),
    )?;
    let training = phase.finish();
    let (finetune_bytes, finetune_vs_inference) = cx.needed(model_bytes, &training);
    let trainable = adapter_params(&tuned);
    let trained_params = tuned.num_params() - trainable;
    let built_and_trained = row_phase.elapsed_seconds();
    let mut rows = Vec::new();
    let mut phase = Phase::start();
    let mut score = |which: &str, merged: BertModel| -> CliResult<()> {
        let metrics = evaluate_classes(cx.encoder, &merged, cx.task, cx.validation, which)?;
        eprintln!(
            "{} {which}: accuracy {:.4}, macro-F1 {:.4}, loss {:.4} (training loss {:.3} → {:.3})",
            variant.name,
            metrics.accuracy,
            metrics.macro_f1,
            metrics.loss,
            report.first_loss,
            report.last_loss
        );
        rows.push(Row {
            method: format!("{} {which}, merged into the original", variant.name),
            accuracy_gain_recovered: recovered(&metrics),
            metrics,
            trainable_params: trainable,
            trained_model_params: trained_params,
            training_loss: Some((report.first_loss, report.last_loss)),
            emulator_before_training: Some(before.clone()),
            finetune_bytes,
            finetune_vs_inference,
            training,
            row_seconds: built_and_trained + phase.elapsed_seconds(),
        });
        phase = Phase::start();
        Ok(())
    };
    score_merged_adapters(
        cx.original,
        &tuned,
        variant,
        cx.args.clamp,
        &cx.args.out,
        corrections,
        &mut score,
    )?;
    if variant.weighted_too {
        score_weighted_corrections(cx, variant, &tuned, corrections, &mut score)?;
    }
    Ok(rows)
}

/// Scores `tuned` (trained on `variant`'s emulator) under the data-weighted correction
/// (`emloc::correct_weighted`), with the paper's clamp and without it.
fn score_weighted_corrections(
    cx: &Context<'_>,
    variant: &Variant,
    tuned: &BertModel,
    corrections: &mut Vec<(String, emloc::CorrectionReport)>,
    score: &mut dyn FnMut(&str, BertModel) -> CliResult<()>,
) -> CliResult<()> {
    let adapted: Vec<String> = export_adapter(tuned)?.layers.into_keys().collect();
    let grams = cx.grams(|p| adapted.iter().any(|a| a == p))?;
    for (which, clamp, dir) in [
        ("data-weighted corrected", cx.args.clamp, "weighted"),
        ("data-weighted corrected, no clamp", f64::INFINITY, "weighted-no-clamp"),
    ] {
        let config = emloc::CorrectionConfig { clamp };
        let (adapter, correction) = emloc::correct_weighted(cx.original, tuned, &grams, &config)?;
        eprintln!("{} {which}: {}", variant.name, correction.summary());
        corrections.push((format!("{} {which}", variant.name), correction));
        adapter.save(&cx.args.out.join(format!("adapter-{}-{dir}", variant.dir)))?;
        score(which, emloc::merge_adapter(cx.original.clone(), &adapter)?)?;
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "| method | accuracy | macro-F1 | val. loss | accuracy gain recovered | params trained on | fine-tune MiB (× inference) | fine-tune s | row s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {} | {} | {} | {:.1} | {:.1} |",
            row.method,
            row.metrics.accuracy,
            row.metrics.macro_f1,
            row.metrics.loss,
            row.accuracy_gain_recovered
                .map_or_else(|| "-".into(), |r| format!("{:.0} %", 100.0 * r)),
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
