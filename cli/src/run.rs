//! `emloc run`: the main job. The whole pipeline on a real sentence encoder (all-MiniLM-L6-v2 by
//! default), against zero-shot and LoRA on the full model, with one seed, step count and set of
//! hyperparameters for every row. Three recipes: MultiEmo sentence classification (the default, in
//! [`crate::run_classification`]), GSM8K question → answer retrieval (here) and the LLM
//! experiment on BIG-bench (in [`crate::run_causal`]).

use std::path::PathBuf;

use burn::module::Module;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use emloc::emulator::{Refit, with_dense_layers};
use emloc::{
    CorrectionConfig, EmulatorConfig, WhiteningMethod, correct, export_adapter, merge_adapter,
    merge_attached_adapter,
};
use emloc_models::retrieval::RetrievalMetrics;
use serde::Serialize;

use crate::CliResult;
use crate::args::{EmulatorArgs, ModelArgs, Task, TrainArgs};
use crate::data::{DataArgs, EmbeddedData, calibration_texts};
use crate::memory::{Phase, PhaseStats};
use crate::output::write_report;
use crate::training::{adapter_params, build_emulator, evaluate, train_adapter};

/// Options of `emloc run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// What runs without --data, with its defaults: `multiemo-classification` (MultiEmo
    /// sentiment, shipped in data/multiemo; --validation 500, --steps 36, --batch-size 32,
    /// --warmup-steps 4, --max-seq-length 48 unless given), `gsm8k-retrieval` (the GSM8K
    /// table) or `smollm2-bigbench` (the LLM experiment on eight embedded BIG-bench tasks:
    /// --validation 20 per task, --train-pairs 300 per task, --steps 80, --batch-size 8,
    /// --lr 2e-3, --warmup-steps 5 unless given; --model defaults to $EMLOC_SMOLLM2_GGUF or
    /// the path scripts/fetch_smollm2.sh writes) or `qwen-coder-scale` (the paper's comparison
    /// on a real model pair: the large model through its emulator in the small one's fine-tuning
    /// memory, on the same tasks: --validation 10, --train-pairs 100, --steps 40, --batch-size 4,
    /// --lr 2e-3, --warmup-steps 3 unless given; --model and --small-model default to the
    /// Qwen2.5-Coder-1.5B and 0.5B files of scripts/fetch_qwen_coder.sh). With --data the task
    /// follows the data's fields.
    #[arg(long, value_enum, default_value_t = Recipe::MultiemoClassification)]
    pub(crate) recipe: Recipe,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) emulator: EmulatorArgs,
    #[command(flatten)]
    pub(crate) train: TrainArgs,
    /// Training examples used (the first N of the shuffled training split, per task for
    /// smollm2-bigbench; 0 = all).
    #[arg(long, default_value_t = 0)]
    pub(crate) train_pairs: usize,
    /// LLM recipe: the keep-ratios of the EMLoC sweep (corrected and uncorrected rows); --ratio
    /// must be one of them and sizes the plain-SVD and global-allocation rows.
    #[arg(long, value_delimiter = ',', default_values_t = [0.2, 0.4, 0.6])]
    pub(crate) ratios: Vec<f64>,
    /// Which rows run (`headline` for extra seeds); the classification and LLM recipes.
    #[arg(long, value_enum, default_value_t = Rows::All)]
    pub(crate) rows: Rows,
    /// Emulator constructions measured beside the paper's, each at the EMLoC emulator's size
    /// with a corrected and an uncorrected row (comma-separated; `none` for none).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Construction::None])]
    pub(crate) constructions: Vec<Construction>,
    /// Correction clamp L.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) clamp: f64,
    /// qwen-coder-scale: the small model of the family, whose LoRA fine-tuning memory the large
    /// model's emulator must stay within (default: $EMLOC_QWEN_CODER_0_5B_GGUF or the path
    /// `scripts/fetch_qwen_coder.sh 0.5b` writes).
    #[arg(long)]
    pub(crate) small_model: Option<PathBuf>,
    /// Directory for the artifacts (emulators, adapters) and `report.json`.
    #[arg(long, default_value = "emloc-run")]
    pub(crate) out: PathBuf,
}

/// `--recipe` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Recipe {
    /// MultiEmo sentence classification: zero-shot leaves room for fine-tuning.
    MultiemoClassification,
    /// GSM8K question → answer retrieval (at MiniLM's zero-shot ceiling).
    Gsm8kRetrieval,
    /// The LLM experiment: SmolLM2-135M-Instruct (or --model) fine-tuned on eight BIG-bench
    /// tasks mixed, scored per task.
    Smollm2Bigbench,
    /// The paper's central comparison on the same tasks: LoRA on a small model of a family
    /// (Qwen2.5-Coder-0.5B, or --small-model) against EMLoC on a large one (Qwen2.5-Coder-1.5B,
    /// or --model) through an emulator sized to the small model's fine-tuning memory.
    QwenCoderScale,
}

/// `--rows` values (the LLM recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Rows {
    /// Every row: zero-shot, LoRA, EMLoC over --ratios, plain SVD, the global allocation, layer
    /// drop and structured pruning.
    All,
    /// Zero-shot, LoRA and EMLoC at --ratio, corrected and uncorrected (for more seeds).
    Headline,
    /// The headline rows and the paper's baselines at the EMLoC emulator's size: layer drop
    /// (Offsite-Tuning) and structured pruning of MLP neurons.
    Baselines,
}

/// `--constructions` values: emulator constructions besides the paper's one-shot calibration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Construction {
    /// No extra construction.
    None,
    /// Sequential calibration: each block calibrated on the emulated prefix's outputs.
    Sequential,
    /// Sequential calibration with the least-squares refit of each layer's output factor.
    SequentialRefit,
    /// Sequential calibration with the best rank-k least-squares fit (both factors).
    SequentialRefitBoth,
    /// The first and the last block dense, every other layer's ratio lowered to the same size.
    DenseEnds,
    /// The last block's FFN output projection dense (as the paper's release), the rest lowered
    /// to the same size.
    DenseLastDown,
}

/// The variants `constructions` ask for, built from `base` (the EMLoC rows' config, named by
/// `sizing`) on `model`, whose first and last blocks are `end_blocks` (a regex over their paths'
/// block part, e.g. `encoder\.layer\.(0|5)`) and whose last FFN output projection is
/// `last_down` (a path).
pub(crate) fn construction_variants<M: Module>(
    constructions: &[Construction],
    base: &EmulatorConfig,
    sizing: &str,
    model: &M,
    end_blocks: &str,
    last_down: &str,
) -> CliResult<Vec<Variant>> {
    let mut variants = Vec::new();
    for &construction in constructions {
        let (name, dir, config) = match construction {
            Construction::None => continue,
            Construction::Sequential => {
                ("sequential calibration", "sequential", base.clone().with_sequential(Refit::None))
            }
            Construction::SequentialRefit => (
                "sequential calibration + refit",
                "sequential-refit",
                base.clone().with_sequential(Refit::Output),
            ),
            Construction::SequentialRefitBoth => (
                "sequential calibration + refit of both factors",
                "sequential-refit-both",
                base.clone().with_sequential(Refit::Both),
            ),
            Construction::DenseEnds => (
                "dense first and last blocks",
                "dense-ends",
                with_dense_layers(model, base, &[&format!(r"{end_blocks}\..*")])?.0,
            ),
            Construction::DenseLastDown => (
                "dense last FFN output",
                "dense-last-down",
                with_dense_layers(model, base, &[&regex_escape(last_down)])?.0,
            ),
        };
        variants.push(Variant {
            name: format!("EMLoC {sizing}, {name}"),
            dir: format!("emulator-{dir}"),
            ratio: None,
            config,
            uncorrected_too: true,
            weighted_too: false,
        });
    }
    Ok(variants)
}

/// `path` as a regex matching only itself.
fn regex_escape(path: &str) -> String {
    path.replace('.', r"\.")
}

/// Options a recipe sets when the command line leaves them at their generic default.
pub(crate) struct RecipeDefaults {
    pub(crate) validation: usize,
    pub(crate) steps: usize,
    pub(crate) batch_size: usize,
    pub(crate) warmup_steps: usize,
    /// `None`: the generic default stays.
    pub(crate) lr: Option<f64>,
    /// `None`: the generic default stays.
    pub(crate) train_pairs: Option<usize>,
}

impl RecipeDefaults {
    /// Applies the defaults to `args` and `train` where `given(option id)` is false.
    fn apply(&self, args: &mut RunArgs, train: &mut TrainArgs, given: impl Fn(&str) -> bool) {
        for (id, field, value) in [
            ("validation", &mut args.data.validation, Some(self.validation)),
            ("steps", &mut train.steps, Some(self.steps)),
            ("batch_size", &mut train.batch_size, Some(self.batch_size)),
            ("warmup_steps", &mut train.warmup_steps, Some(self.warmup_steps)),
            ("train_pairs", &mut args.train_pairs, self.train_pairs),
        ] {
            if let Some(value) = value.filter(|_| !given(id)) {
                *field = value;
            }
        }
        if let Some(lr) = self.lr.filter(|_| !given("lr")) {
            train.lr = lr;
        }
    }
}

/// The LLM recipe's defaults (about 40 minutes for all rows on a 2-core CPU, EXPERIMENTS.md).
pub(crate) const BIGBENCH_DEFAULTS: RecipeDefaults = RecipeDefaults {
    validation: 20,
    steps: 80,
    batch_size: 8,
    warmup_steps: 5,
    lr: Some(2e-3),
    train_pairs: Some(300),
};

/// The scale recipe's defaults: the LLM recipe cut so that one seed of a 1.5 B model's rows
/// fits in about 90 minutes on a 2-core CPU (EXPERIMENTS.md).
pub(crate) const SCALE_DEFAULTS: RecipeDefaults = RecipeDefaults {
    validation: 10,
    steps: 40,
    batch_size: 4,
    warmup_steps: 3,
    lr: Some(2e-3),
    train_pairs: Some(100),
};

/// The classification recipe's defaults, sized to finish in about 10 minutes on a 2-core CPU
/// (EXPERIMENTS.md).
const CLASSIFICATION_DEFAULTS: RecipeDefaults = RecipeDefaults {
    validation: 500,
    steps: 36,
    batch_size: 32,
    warmup_steps: 4,
    lr: None,
    train_pairs: None,
};

/// The classification recipe's token limit unless --max-seq-length is given.
const CLASSIFICATION_MAX_SEQ_LENGTH: usize = 48;

/// Runs the recipe of `args`; `matches` (of the `run` subcommand) tells which options were given
/// on the command line, so that the recipe's defaults replace only the others.
pub fn run_recipe(args: &RunArgs, matches: &ArgMatches) -> CliResult<()> {
    let mut args = args.clone();
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    if args.small_model.is_some() && args.recipe != Recipe::QwenCoderScale {
        return Err("--small-model is for --recipe qwen-coder-scale".into());
    }
    if args.recipe == Recipe::MultiemoClassification {
        args.data.embedded = EmbeddedData::MultiEmo;
    }
    if args.recipe == Recipe::Smollm2Bigbench {
        let mut train = args.train.clone();
        BIGBENCH_DEFAULTS.apply(&mut args, &mut train, given);
        return crate::run_causal::run(&args, &train);
    }
    if args.recipe == Recipe::QwenCoderScale {
        let mut train = args.train.clone();
        SCALE_DEFAULTS.apply(&mut args, &mut train, given);
        return crate::run_scale::run(&args, &train);
    }
    match args.model.task_for(&args.data)?.1 {
        Task::Classification => {
            let mut train = args.train.clone();
            if args.recipe == Recipe::MultiemoClassification {
                CLASSIFICATION_DEFAULTS.apply(&mut args, &mut train, given);
            }
            let max_seq_length = args.model.max_seq_length.unwrap_or(CLASSIFICATION_MAX_SEQ_LENGTH);
            crate::run_classification::run(&args, &train, max_seq_length)
        }
        Task::Retrieval => run(&args),
        Task::CausalLm => Err(
            "emloc run works on sentence encoders; for decoders run the stages (see docs/CLI.md)"
                .into(),
        ),
    }
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct Row {
    method: String,
    metrics: RetrievalMetrics,
    /// Share of full-model LoRA's Recall@1 gain over zero-shot.
    recall_gain_recovered: Option<f64>,
    trainable_params: usize,
    /// Parameters of the model that was fine-tuned (0 for zero-shot).
    trained_model_params: usize,
    /// Peak RSS and wall time of fine-tuning (for zero-shot: of evaluating the original).
    training: PhaseStats,
    /// Wall time of the whole row in seconds (emulation, training, correction, merge, eval).
    row_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    model: String,
    data: &'a DataArgs,
    emulator: &'a EmulatorArgs,
    train: &'a TrainArgs,
    train_pairs: usize,
    validation_pairs: usize,
    rows: Vec<Row>,
    emulators: Vec<(String, emloc::EmulatorReport)>,
    corrections: Vec<emloc::CorrectionReport>,
}

fn count_params(model: &emloc_models::bert::BertModel) -> usize {
    use burn::module::Module;
    model.num_params()
}

/// Runs the retrieval experiment and prints the table.
pub fn run(args: &RunArgs) -> CliResult<()> {
    let phase = Phase::start();
    let (encoder, model_dir) = args.model.load()?;
    let split = args.data.split()?;
    let mut train = split.train;
    if args.train_pairs > 0 {
        train.truncate(args.train_pairs);
    }
    let calibration = calibration_texts(&train, args.emulator.calibration_pairs)?;
    let original = encoder.model.clone();
    let load = phase.finish();
    eprintln!(
        "model {} loaded in {:.1}s; {} training pairs, {} validation pairs, {} calibration texts",
        model_dir.display(),
        load.wall_seconds,
        train.len(),
        split.validation.len(),
        calibration.len()
    );
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;

    let mut rows = Vec::new();
    let phase = Phase::start();
    let zero_shot = evaluate(&encoder, &original, &split.validation, "zero-shot")?;
    let stats = phase.finish();
    rows.push(Row {
        method: "zero-shot (original model)".into(),
        metrics: zero_shot,
        recall_gain_recovered: None,
        trainable_params: 0,
        trained_model_params: 0,
        training: stats,
        row_seconds: stats.wall_seconds,
    });
    eprintln!(
        "zero-shot: Recall@1 {:.4}, MRR {:.4}, loss {:.4} ({:.1}s)",
        zero_shot.recall_at_1, zero_shot.mrr, zero_shot.loss, stats.wall_seconds
    );

    let row_phase = Phase::start();
    let phase = Phase::start();
    let (tuned, train_report) = train_adapter(
        &encoder,
        original.clone(),
        &train,
        &args.train,
        "LoRA on the full model",
        None,
        |_, _, _| Ok(()),
    )?;
    let training = phase.finish();
    let trainable = adapter_params(&tuned);
    let trained_params = count_params(&tuned) - trainable;
    export_adapter(&tuned)?.save(&args.out.join("adapter-full-lora"))?;
    let metrics = evaluate(&encoder, &merge_attached_adapter(tuned), &split.validation, "LoRA")?;
    eprintln!(
        "LoRA on the full model: Recall@1 {:.4}, validation loss {:.4} (training loss {:.3} → {:.3})",
        metrics.recall_at_1, metrics.loss, train_report.first_loss, train_report.last_loss
    );
    let full_gain = metrics.recall_at_1 - zero_shot.recall_at_1;
    // A share of a gain only means something when there is a gain.
    let recovered = |m: &RetrievalMetrics| {
        (full_gain > 1e-12).then(|| (m.recall_at_1 - zero_shot.recall_at_1) / full_gain)
    };
    rows.push(Row {
        method: "LoRA on the full model".into(),
        metrics,
        recall_gain_recovered: recovered(&metrics),
        trainable_params: trainable,
        trained_model_params: trained_params,
        training,
        row_seconds: row_phase.elapsed_seconds(),
    });

    let base_config = args.emulator.config()?;
    let sizing = match &args.emulator.config {
        Some(path) => format!(
            "({})",
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ),
        None => format!("ρ={}", args.emulator.ratio),
    };
    let mut emulators = Vec::new();
    let mut corrections = Vec::new();
    for (method, name, dir) in [
        (WhiteningMethod::Cholesky, "EMLoC", "emulator-whitened"),
        (WhiteningMethod::None, "plain-SVD emulator", "emulator-plain-svd"),
    ] {
        let row_phase = Phase::start();
        let config = EmulatorConfig {
            whitening: emloc::emulator::WhiteningConfig { method, ..base_config.whitening.clone() },
            ..base_config.clone()
        };
        let (emulator, report) =
            build_emulator(&encoder, encoder.model.clone(), &calibration, &config)?;
        let emulate_seconds = row_phase.elapsed_seconds();
        log_emulator(name, &report, emulate_seconds);
        emloc::save_emulator(
            &emulator,
            &emloc::EmulatorDescription::new(config.clone(), report.clone()),
            &args.out.join(dir),
        )?;
        emulators.push((name.to_string(), report));

        let phase = Phase::start();
        let (tuned, train_report) = train_adapter(
            &encoder,
            emulator,
            &train,
            &args.train,
            &format!("LoRA on the {name}"),
            None,
            |_, _, _| Ok(()),
        )?;
        let training = phase.finish();
        let trainable = adapter_params(&tuned);
        let trained_params = count_params(&tuned) - trainable;
        eprintln!("{name}: loss {:.3} → {:.3}", train_report.first_loss, train_report.last_loss);
        let built_and_trained = row_phase.elapsed_seconds();

        let variants: &[bool] =
            if method == WhiteningMethod::Cholesky { &[true, false] } else { &[true] };
        for &corrected in variants {
            let phase = Phase::start();
            let adapter = if corrected {
                let (adapter, report) =
                    correct(&original, &tuned, &CorrectionConfig { clamp: args.clamp })?;
                corrections.push(report);
                adapter
            } else {
                export_adapter(&tuned)?
            };
            let label = if corrected { "corrected" } else { "uncorrected" };
            adapter.save(&args.out.join(format!("adapter-{dir}-{label}")))?;
            let merged = merge_adapter(original.clone(), &adapter)?;
            let metrics = evaluate(&encoder, &merged, &split.validation, label)?;
            eprintln!(
                "{name} {label}: Recall@1 {:.4}, MRR {:.4}, loss {:.4}",
                metrics.recall_at_1, metrics.mrr, metrics.loss
            );
            rows.push(Row {
                method: format!("{name} {sizing} {label}, merged into the original"),
                metrics,
                recall_gain_recovered: recovered(&metrics),
                trainable_params: trainable,
                trained_model_params: trained_params,
                training,
                row_seconds: built_and_trained + phase.elapsed_seconds(),
            });
        }
    }

    println!(
        "| method | Recall@1 | MRR | Recall@5 | val. loss | R@1 gain recovered | params trained on | fine-tune peak heap MiB | peak RSS MiB | fine-tune s | row s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} | {} | {} | {:.1} | {:.1} |",
            row.method,
            row.metrics.recall_at_1,
            row.metrics.mrr,
            row.metrics.recall_at_5,
            row.metrics.loss,
            row.recall_gain_recovered.map_or_else(|| "-".into(), |r| format!("{:.0} %", 100.0 * r)),
            row.trained_model_params,
            row.training.peak_heap_mib(),
            row.training.peak_mib(),
            row.training.wall_seconds,
            row.row_seconds
        );
    }
    let report = Report {
        model: model_dir.display().to_string(),
        data: &args.data,
        emulator: &args.emulator,
        train: &args.train,
        train_pairs: train.len(),
        validation_pairs: split.validation.len(),
        rows,
        emulators,
        corrections,
    };
    write_report(&args.out, &report)
}

/// Logs what an emulator build did: layers, parameters kept, mean relative whitened error, time.
pub(crate) fn log_emulator(name: &str, report: &emloc::EmulatorReport, seconds: f64) {
    eprintln!(
        "{name}: {} layers, {} → {} parameters in them, mean relative whitened error {:.3} ({seconds:.1}s)",
        report.layers.len(),
        report.params_original(),
        report.params_kept(),
        report.layers.iter().map(|l| l.relative_whitened_error).sum::<f64>()
            / report.layers.len().max(1) as f64,
    );
    if let Some(warning) = report.calibration_warning() {
        eprintln!("warning: {name}: {warning}");
    }
}

/// An emulator a recipe builds, trains LoRA on and scores.
pub(crate) struct Variant {
    /// The rows' name, e.g. `EMLoC ρ = 0.4`.
    pub name: String,
    /// The artifacts' name: adapters are saved as `OUT/adapter-{dir}-corrected`.
    pub dir: String,
    /// The emulator's keep-ratio, for reports (`None` for per-layer ranks).
    pub ratio: Option<f64>,
    /// How the emulator is built.
    pub config: EmulatorConfig,
    /// Whether the uncorrected adapter gets a row too.
    pub uncorrected_too: bool,
    /// Whether the data-weighted corrections get rows too.
    pub weighted_too: bool,
}

/// The corrected adapter of `tuned` (trained on `variant`'s emulator), then the uncorrected one
/// if the variant asks for it: each is saved as `out/adapter-{dir}-{which}`, merged into a copy
/// of `original` and handed to `score` with `which` (`"corrected"` or `"uncorrected"`). One
/// merged model is alive at a time. Correction reports go to `corrections` under the variant's
/// name.
pub(crate) fn score_merged_adapters<M: Module>(
    original: &M,
    tuned: &M,
    variant: &Variant,
    clamp: f64,
    out: &std::path::Path,
    corrections: &mut Vec<(String, emloc::CorrectionReport)>,
    mut score: impl FnMut(&'static str, M) -> CliResult<()>,
) -> CliResult<()> {
    for corrected in std::iter::once(true).chain(variant.uncorrected_too.then_some(false)) {
        let adapter = if corrected {
            let (adapter, report) = correct(original, tuned, &CorrectionConfig { clamp })?;
            eprintln!("{}: {}", variant.name, report.summary());
            corrections.push((variant.name.clone(), report));
            adapter
        } else {
            export_adapter(tuned)?
        };
        let which = if corrected { "corrected" } else { "uncorrected" };
        adapter.save(&out.join(format!("adapter-{}-{which}", variant.dir)))?;
        score(which, merge_adapter(original.clone(), &adapter)?)?;
    }
    Ok(())
}
