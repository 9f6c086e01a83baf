//! The pipeline one stage at a time: `emloc emulate`, `finetune`, `correct`, `merge` and `eval`.
//! Each stage checks its inputs before it starts working and writes its artifacts with a
//! `report.json` (wall time and peak RSS) into `--out`; `emulate`, `correct` and `merge` write a
//! staging directory renamed to `--out` at the end (see [`crate::output`]).

use std::path::{Path, PathBuf};

use burn::module::Module;
use clap::Args;
use emloc::peft::PeftAdapter;
use emloc::{
    CorrectionConfig, EmulatorConfig, EmulatorDescription, EmulatorReport, Provenance,
    attach_adapter, correct, export_adapter, load_emulator, merge_adapter_into_safetensors,
};
use emloc_models::loading::Checkpoint;
use serde::Serialize;

use crate::CliResult;
use crate::args::Task;
use crate::args::{EmulatorArgs, ModelArgs, TrainArgs};
use crate::data::{DataArgs, encoder_calibration_texts};
use crate::memory::{Phase, PhaseStats};
use crate::output::StagedDir;
use crate::output::{describe_encoder_adapter, write_json};
use crate::source::{check_emulator_source, emulator_identity, model_identity};
use crate::training::{
    build_emulator, evaluate, evaluate_classes, train_adapter, train_classifier,
};
use crate::{causal, checkpoint};

/// `report.json` of a stage: what it did, how long it took, its peak memory.
#[derive(Debug, Serialize)]
struct StageReport<T: Serialize> {
    stage: &'static str,
    #[serde(flatten)]
    stats: PhaseStats,
    details: T,
}

/// Writes `report.json` into `out` and prints the stage's summary.
pub(crate) fn finish<T: Serialize>(
    stage: &'static str,
    phase: Phase,
    out: &Path,
    details: T,
) -> CliResult<()> {
    let stats = write_report(stage, phase, out, details)?;
    print_summary(stage, &stats, out);
    Ok(())
}

/// Writes `report.json` into the staging directory, moves it to `--out` and prints the summary.
pub(crate) fn finish_staged<T: Serialize>(
    stage: &'static str,
    phase: Phase,
    staged: StagedDir,
    details: T,
) -> CliResult<()> {
    let stats = write_report(stage, phase, staged.path(), details)?;
    let out = staged.commit()?;
    print_summary(stage, &stats, &out);
    Ok(())
}

fn write_report<T: Serialize>(
    stage: &'static str,
    phase: Phase,
    dir: &Path,
    details: T,
) -> CliResult<PhaseStats> {
    let report = StageReport { stage, stats: phase.finish(), details };
    write_json(&dir.join("report.json"), &report)?;
    Ok(report.stats)
}

fn print_summary(stage: &str, stats: &PhaseStats, out: &Path) {
    eprintln!(
        "{stage}: {:.1}s, peak heap {} MiB, peak RSS {} MiB; report in {}",
        stats.wall_seconds,
        stats.peak_heap_mib(),
        stats.peak_mib(),
        out.join("report.json").display()
    );
}

/// Refuses to write into the model directory itself (its files would be replaced).
pub(crate) fn check_out(out: &Path, model_dir: &Path) -> CliResult<()> {
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(out, model_dir) {
        return Err(
            format!("--out {} is the model directory; choose another", out.display()).into()
        );
    }
    Ok(())
}

/// Options of `emloc emulate`.
#[derive(Args, Debug)]
pub struct EmulateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Calibration data: the training split of this JSONL file (see --validation).
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) emulator: EmulatorArgs,
    /// Output directory (new, or empty): emulator.safetensors, emulator.json, report.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Calibrates, builds and saves the emulator.
pub fn emulate(args: &EmulateArgs) -> CliResult<()> {
    let task = args.model.task_for(&args.data)?.1;
    if task == Task::CausalLm {
        return causal::emulate(args);
    }
    let phase = Phase::start();
    let staged = StagedDir::begin(&args.out)?;
    let config = args.emulator.config()?;
    let texts = encoder_calibration_texts(task, &args.data, args.emulator.calibration_pairs)?;
    let (mut encoder, model_dir) = args.model.load()?;
    check_out(&args.out, &model_dir)?;
    // Moved out, so that emulation releases the original's dense weights layer by layer.
    let original = encoder.take_model();
    let (emulator, report) = build_emulator(&encoder, original, &texts, &config)?;
    save_emulator(&emulator, config, report, args.provenance(&model_dir)?, phase, staged)
}

impl EmulateArgs {
    /// What `emloc emulate` records as the emulator's provenance: the model at `source`, the
    /// data and how calibration samples were drawn from it.
    pub(crate) fn provenance(&self, source: &Path) -> CliResult<Provenance> {
        let mut selection = self.data.selection();
        selection.insert("calibration_pairs".into(), self.emulator.calibration_pairs.into());
        Ok(Provenance {
            model: model_identity(source)?,
            data: vec![self.data.identity()?],
            selection,
        })
    }
}

/// Writes the emulator built from `config` with its `report.json` and moves it to `--out`: the
/// end of every model kind's `emloc emulate`.
pub(crate) fn save_emulator<M: Module>(
    emulator: &M,
    config: EmulatorConfig,
    report: EmulatorReport,
    provenance: Provenance,
    phase: Phase,
    staged: StagedDir,
) -> CliResult<()> {
    let description = EmulatorDescription::new(config, report).with_provenance(provenance);
    emloc::save_emulator(emulator, &description, staged.path())?;
    eprintln!(
        "emulator: {} layers, {} → {} parameters in them",
        description.report.layers.len(),
        description.report.params_original(),
        description.report.params_kept()
    );
    if let Some(warning) = description.report.calibration_warning() {
        eprintln!("warning: {warning}");
    }
    finish_staged("emulate", phase, staged, &description.report)
}

/// Options of `emloc finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Train on this emulator (from `emloc emulate`) instead of the original model.
    #[arg(long)]
    pub(crate) emulator: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) train: TrainArgs,
    /// Save a checkpoint (adapter, optimizer state, trainer state) to OUT/checkpoint-STEP every
    /// N steps (0 = never).
    #[arg(long, default_value_t = 0)]
    pub(crate) checkpoint_every: usize,
    /// Continue from the latest OUT/checkpoint-STEP (same options required); the result equals an
    /// uninterrupted run bit for bit on the CPU backend.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Output directory: the PEFT adapter (adapter_config.json, adapter_model.safetensors) and
    /// report.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

fn load_model(
    model: &ModelArgs,
    emulator: Option<&Path>,
) -> CliResult<(emloc_models::bert::SentenceEncoder, PathBuf, Option<EmulatorDescription>)> {
    match emulator {
        Some(emulator_dir) => {
            let (encoder, dir, description) = model.load_emulated(emulator_dir)?;
            Ok((encoder, dir, Some(description)))
        }
        None => {
            let (encoder, dir) = model.load()?;
            Ok((encoder, dir, None))
        }
    }
}

impl FinetuneArgs {
    /// What a checkpoint of this run records and a resumed run must match: the model at
    /// `source`, the emulator, the data and its split.
    pub(crate) fn inputs(&self, source: &Path) -> CliResult<checkpoint::TrainingInputs> {
        Ok(checkpoint::TrainingInputs {
            model: model_identity(source)?,
            emulator: self.emulator.as_deref().map(emulator_identity).transpose()?,
            data: self.data.identity()?,
            selection: self.data.selection(),
        })
    }
}

/// Trains LoRA adapters and writes them in PEFT format.
pub fn finetune(args: &FinetuneArgs) -> CliResult<()> {
    let task = args.model.task_for(&args.data)?.1;
    if task == Task::CausalLm {
        return causal::finetune(args);
    }
    let phase = Phase::start();
    // Parsed before the model is loaded, so bad data fails fast.
    let classes =
        if task == Task::Classification { Some(args.data.split_classes()?) } else { None };
    let split = if classes.is_none() { Some(args.data.split()?) } else { None };
    let (encoder, model_dir, emulator) = load_model(&args.model, args.emulator.as_deref())?;
    check_out(&args.out, &model_dir)?;
    let label = if emulator.is_some() { "LoRA on the emulator" } else { "LoRA on the model" };
    let inputs = args.inputs(&model_dir)?;
    let resume = checkpoint::resume(&args.out, &args.train, &inputs, args.resume)?;
    let every = args.checkpoint_every;
    let on_step =
        |step, model: &emloc_models::bert::BertModel, optim: &burn::optim::ModuleOptimizer| {
            if every > 0 && step % every == 0 {
                checkpoint::save(&args.out, step, &args.train, &inputs, model, optim)?;
            }
            Ok(())
        };
    let model = encoder.model.clone();
    let (tuned, report) = match (&classes, &split) {
        (Some((classes, split)), _) => train_classifier(
            &encoder,
            model,
            classes,
            &split.train,
            &args.train,
            label,
            resume,
            on_step,
        )?,
        (None, Some(split)) => {
            train_adapter(&encoder, model, &split.train, &args.train, label, resume, on_step)?
        }
        (None, None) => unreachable!("the retrieval split is read unless classification"),
    };
    describe_encoder_adapter(export_adapter(&tuned)?, &model_dir).save(&args.out)?;
    eprintln!("loss {:.4} → {:.4}", report.first_loss, report.last_loss);
    finish("finetune", phase, &args.out, &report)
}

/// Options of `emloc correct`.
#[derive(Args, Debug)]
pub struct CorrectArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The emulator the adapter was trained on.
    #[arg(long)]
    pub(crate) emulator: PathBuf,
    /// The adapter trained on the emulator (PEFT directory).
    #[arg(long)]
    pub(crate) adapter: PathBuf,
    /// Correction clamp L.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) clamp: f64,
    /// Output directory (new, or empty): the corrected PEFT adapter and report.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Corrects an emulator-trained adapter for the original model.
pub fn correct_adapter(args: &CorrectArgs) -> CliResult<()> {
    if args.model.task()?.1 == Task::CausalLm {
        return causal::correct_adapter(args);
    }
    let phase = Phase::start();
    let staged = StagedDir::begin(&args.out)?;
    let adapter = PeftAdapter::load(&args.adapter)?;
    let (encoder, model_dir) = args.model.load()?;
    check_out(&args.out, &model_dir)?;
    let original = encoder.model.clone();
    check_emulator_source(
        &emloc::read_emulator_description(&args.emulator)?,
        &args.emulator,
        &model_dir,
    )?;
    let (emulator, _) = load_emulator(original.clone(), &args.emulator)?;
    let tuned = attach_adapter(emulator, &adapter)?;
    let (corrected, report) = crate::progress::with_spinner("correcting the adapter", || {
        correct(&original, &tuned, &CorrectionConfig { clamp: args.clamp })
    })?;
    eprintln!("{}", report.summary());
    describe_encoder_adapter(corrected, &model_dir).save(staged.path())?;
    finish_staged("correct", phase, staged, &report)
}

/// Options of `emloc merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// HF model directory to merge into, or a `.gguf` file (the output is then an HF directory
    /// with f32 safetensors).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    pub(crate) adapter: PathBuf,
    /// Output directory (new, or empty; may be inside the model directory): a complete model
    /// directory, the merged safetensors with the model's configuration, tokenizer and
    /// documentation files (other weight formats, `.git` and the like are skipped and listed in
    /// report.json).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Merges an adapter into the checkpoint files, host-side, and copies the model's configuration,
/// tokenizer and documentation files (see [`copy_model_files`]).
pub fn merge(args: &MergeArgs) -> CliResult<()> {
    let phase = Phase::start();
    check_out(&args.out, &args.model)?;
    let staged = StagedDir::begin(&args.out)?;
    let adapter = PeftAdapter::load(&args.adapter)?;
    // A GGUF model is first written out as an HF directory (f32) in a staging directory beside
    // --out, removed afterwards; the merge then works on its safetensors as on any HF model.
    let gguf_staging = if emloc_models::causal_lm::is_gguf(&args.model) {
        let parent = staged.path().parent().unwrap_or(Path::new("."));
        let staging = tempfile::Builder::new().prefix(".emloc-gguf-").tempdir_in(parent)?;
        eprintln!("converting {} to an HF directory", args.model.display());
        crate::progress::with_spinner("converting the GGUF file", || {
            emloc_models::gguf::gguf_to_hf_dir(&args.model, staging.path().join("hf"))
        })?;
        Some(staging)
    } else {
        None
    };
    let model_dir = gguf_staging.as_ref().map_or(args.model.clone(), |s| s.path().join("hf"));
    let files = Checkpoint::open_dir(&model_dir)?.files();
    let merged =
        crate::progress::with_spinner(format!("merging into {} files", files.len()), || {
            merge_adapter_into_safetensors(&adapter, &files, staged.path())
        })?;
    let (copied, skipped) = copy_model_files(&model_dir, staged.path(), &files)?;
    eprintln!("merged {} weights; copied {} other files", merged.merged.len(), copied.len());
    if !skipped.is_empty() {
        eprintln!(
            "not copied from {}: {}",
            model_dir.display(),
            skipped.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    #[derive(Serialize)]
    struct Details {
        merged: Vec<(String, String)>,
        copied: Vec<String>,
        skipped: Vec<Skipped>,
    }
    finish_staged("merge", phase, staged, Details { merged: merged.merged, copied, skipped })
}

/// The top-level files of a model directory that `emloc merge` copies beside the merged weights
/// (besides `LICENSE*` and `*.safetensors.index.json`): configuration, tokenizer,
/// sentence-transformers and documentation files.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
];

fn is_model_file(name: &str) -> bool {
    MODEL_FILES.contains(&name)
        || name.starts_with("LICENSE")
        || name.ends_with(".safetensors.index.json")
}

/// A sentence-transformers module folder (`1_Pooling`, `2_Normalize`, `2_Dense`), which
/// `modules.json` names: its top-level files are copied too.
fn is_module_folder(name: &str) -> bool {
    name.split_once('_').is_some_and(|(index, module)| {
        !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
            && !module.is_empty()
            && module.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// An entry of the model directory that `emloc merge` did not copy, with the reason.
#[derive(Debug, Serialize)]
struct Skipped {
    name: String,
    reason: &'static str,
}

/// Copies the model files (see [`MODEL_FILES`]) of `from` into `to`, by streaming, and returns
/// the names copied and the entries skipped (`weights`, the merged checkpoint files, are neither).
///
/// Only an allow-list is copied: other weight formats (`pytorch_model.bin`, `onnx/`,
/// `original/`) would be stale unmerged weights beside the merged ones, and `.git` or an earlier
/// output inside the model directory do not belong in a model. Nothing is read recursively and a
/// symlinked directory is never followed; a symlink with an allowed name is copied as the
/// regular file it resolves to, wherever that is, because the Hugging Face cache stores every
/// file of a snapshot as a symlink into its `blobs/` folder. Special files (FIFOs, devices) are
/// never opened.
fn copy_model_files(
    from: &Path,
    to: &Path,
    weights: &[PathBuf],
) -> CliResult<(Vec<String>, Vec<Skipped>)> {
    let read_dir = |dir: &Path| -> CliResult<Vec<std::fs::DirEntry>> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .and_then(|d| d.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        Ok(entries)
    };
    let output = std::fs::canonicalize(to).ok();
    let (mut copied, mut skipped) = (Vec::new(), Vec::new());
    for entry in read_dir(from)? {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if weights.iter().any(|w| w == &path) || std::fs::canonicalize(&path).ok() == output {
            continue;
        }
        let kind = entry.file_type().map_err(|e| format!("{}: {e}", path.display()))?;
        let reason = if kind.is_symlink() && path.is_dir() {
            Some("symlinked directory, not followed")
        } else if kind.is_dir() && is_module_folder(&name) {
            let target = to.join(&name);
            std::fs::create_dir(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            for inner in read_dir(&path)? {
                let inner_name = format!("{name}/{}", inner.file_name().to_string_lossy());
                match copy_file(&inner.path(), &target.join(inner.file_name()))? {
                    None => copied.push(inner_name),
                    Some(reason) => skipped.push(Skipped { name: inner_name, reason }),
                }
            }
            continue;
        } else if kind.is_dir() {
            Some("directory, not a model file")
        } else if is_model_file(&name) {
            copy_file(&path, &to.join(&name))?
        } else {
            Some("not a configuration, tokenizer or documentation file")
        };
        match reason {
            None => copied.push(name),
            Some(reason) => skipped.push(Skipped { name, reason }),
        }
    }
    Ok((copied, skipped))
}

/// Streams `from` into the new file `to` when `from` is (or links to) a regular file; returns why
/// not otherwise. A symlinked directory is never followed.
fn copy_file(from: &Path, to: &Path) -> CliResult<Option<&'static str>> {
    let meta = match std::fs::metadata(from) {
        Err(_) if from.is_symlink() => return Ok(Some("broken symlink")),
        meta => meta.map_err(|e| format!("{}: {e}", from.display()))?,
    };
    if meta.is_dir() {
        return Ok(Some(if from.is_symlink() {
            "symlinked directory, not followed"
        } else {
            "directory, not a model file"
        }));
    }
    if !meta.is_file() {
        return Ok(Some("not a regular file"));
    }
    let mut source = std::fs::File::open(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let mut target = std::fs::File::create_new(to).map_err(|e| format!("{}: {e}", to.display()))?;
    std::io::copy(&mut source, &mut target)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    target.sync_all().map_err(|e| format!("{}: {e}", to.display()))?;
    Ok(None)
}

/// Options of `emloc eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Serve this PEFT adapter beside the model (unmerged).
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// Evaluate this emulator instead of the model.
    #[arg(long)]
    pub(crate) emulator: Option<PathBuf>,
    /// Evaluated on the validation split of this file.
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Decoders: most tokens generated per example for `exact_match` (0 skips generation).
    #[arg(long, default_value_t = 32)]
    pub(crate) max_new_tokens: usize,
    /// Decoders: sequences per forward pass when scoring.
    #[arg(long, default_value_t = 8)]
    pub(crate) eval_batch_size: usize,
}

/// Prints Recall@1, Recall@5 and MRR on the validation split as JSON (classification: accuracy,
/// macro-F1, loss and per-class counts; decoders: loss, exact match and choice accuracy).
pub fn eval(args: &EvalArgs) -> CliResult<()> {
    let task = args.model.task_for(&args.data)?.1;
    if task == Task::CausalLm {
        return causal::eval(args);
    }
    let phase = Phase::start();
    let classes =
        if task == Task::Classification { Some(args.data.split_classes()?) } else { None };
    let split = if classes.is_none() { Some(args.data.split()?) } else { None };
    let (encoder, _, _) = load_model(&args.model, args.emulator.as_deref())?;
    let mut model = encoder.model.clone();
    if let Some(dir) = &args.adapter {
        model = attach_adapter(model, &PeftAdapter::load(dir)?)?.valid();
    }
    if let Some((classes, split)) = &classes {
        let metrics = evaluate_classes(&encoder, &model, classes, &split.validation, "model")?;
        #[derive(Serialize)]
        struct Output {
            #[serde(flatten)]
            metrics: emloc_models::classification::ClassificationMetrics,
            #[serde(flatten)]
            stats: PhaseStats,
        }
        println!("{}", serde_json::to_string_pretty(&Output { metrics, stats: phase.finish() })?);
        return Ok(());
    }
    let split = split.expect("read above unless classification");
    let metrics = evaluate(&encoder, &model, &split.validation, "model")?;
    #[derive(Serialize)]
    struct Output {
        #[serde(flatten)]
        metrics: emloc_models::retrieval::RetrievalMetrics,
        #[serde(flatten)]
        stats: PhaseStats,
    }
    println!("{}", serde_json::to_string_pretty(&Output { metrics, stats: phase.finish() })?);
    Ok(())
}
