//! The pipeline one stage at a time: `emloc emulate`, `finetune`, `correct`, `merge` and `eval`.
//! Each stage writes its artifacts atomically into `--out` with a `report.json` (wall time and
//! peak RSS), and checks its inputs before it starts working.

use std::path::{Path, PathBuf};

use burn::module::Module;
use clap::Args;
use emloc::peft::PeftAdapter;
use emloc::{CorrectionConfig, EmulatorConfig, EmulatorDescription, EmulatorReport, attach_adapter, correct, export_adapter, load_emulator, merge_into_safetensors};
use emloc_models::loading::Checkpoint;
use serde::Serialize;

use crate::common::{
    CliResult, DataArgs, EmulatorArgs, ModelArgs, TrainArgs, build_emulator, calibration_texts, describe_encoder_adapter,
    evaluate, train_adapter, write_json,
};
use crate::common::Task;
use crate::{causal, checkpoint};
use crate::memory::{Phase, PhaseStats};

/// `report.json` of a stage: what it did, how long it took, its peak memory.
#[derive(Debug, Serialize)]
struct StageReport<T: Serialize> {
    stage: &'static str,
    #[serde(flatten)]
    stats: PhaseStats,
    details: T,
}

pub(crate) fn finish<T: Serialize>(stage: &'static str, phase: Phase, out: &Path, details: T) -> CliResult<()> {
    let report = StageReport { stage, stats: phase.finish(), details };
    write_json(&out.join("report.json"), &report)?;
    eprintln!(
        "{stage}: {:.1}s, peak heap {} MiB, peak RSS {} MiB; report in {}",
        report.stats.wall_seconds,
        report.stats.peak_heap_mib(),
        report.stats.peak_mib(),
        out.join("report.json").display()
    );
    Ok(())
}

/// Refuses to write into the model directory itself (its files would be replaced).
pub(crate) fn check_out(out: &Path, model_dir: &Path) -> CliResult<()> {
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(out, model_dir) {
        return Err(format!("--out {} is the model directory; choose another", out.display()).into());
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
    /// Output directory: emulator.safetensors, emulator.json, report.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Calibrates, builds and saves the emulator.
pub fn emulate(args: &EmulateArgs) -> CliResult<()> {
    if args.model.task()?.1 == Task::CausalLm {
        return causal::emulate(args);
    }
    let phase = Phase::start();
    let config = args.emulator.config()?;
    let split = args.data.split()?;
    let texts = calibration_texts(&split.train, args.emulator.calibration_pairs)?;
    let (mut encoder, model_dir) = args.model.load()?;
    check_out(&args.out, &model_dir)?;
    // Moved out, so that emulation releases the original's dense weights layer by layer.
    let original = encoder.take_model();
    let (emulator, report) = build_emulator(&encoder, original, &texts, &config)?;
    save_emulator(&emulator, config, report, phase, &args.out)
}

/// Writes the emulator built from `config` into `out` with its `report.json`: the end of every
/// model kind's `emloc emulate`.
pub(crate) fn save_emulator<M: Module>(
    emulator: &M,
    config: EmulatorConfig,
    report: EmulatorReport,
    phase: Phase,
    out: &Path,
) -> CliResult<()> {
    let description = EmulatorDescription::new(config, report);
    emloc::save_emulator(emulator, &description, out)?;
    eprintln!(
        "emulator: {} layers, {} → {} parameters in them",
        description.report.layers.len(),
        description.report.params_original(),
        description.report.params_kept()
    );
    finish("emulate", phase, out, &description.report)
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

fn load_model(model: &ModelArgs, emulator: Option<&Path>) -> CliResult<(emloc_models::bert::SentenceEncoder, PathBuf, Option<EmulatorDescription>)> {
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

/// Trains LoRA adapters and writes them in PEFT format.
pub fn finetune(args: &FinetuneArgs) -> CliResult<()> {
    if args.model.task()?.1 == Task::CausalLm {
        return causal::finetune(args);
    }
    let phase = Phase::start();
    let split = args.data.split()?;
    let (encoder, model_dir, emulator) = load_model(&args.model, args.emulator.as_deref())?;
    check_out(&args.out, &model_dir)?;
    let label = if emulator.is_some() { "LoRA on the emulator" } else { "LoRA on the model" };
    let resume = checkpoint::resume(&args.out, &args.train, args.resume)?;
    let every = args.checkpoint_every;
    let (tuned, report) =
        train_adapter(&encoder, encoder.model.clone(), &split.train, &args.train, label, resume, |step, model, optim| {
            if every > 0 && step % every == 0 {
                checkpoint::save(&args.out, step, &args.train, model, optim)?;
            }
            Ok(())
        })?;
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
    /// Output directory: the corrected PEFT adapter and report.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Corrects an emulator-trained adapter for the original model.
pub fn correct_adapter(args: &CorrectArgs) -> CliResult<()> {
    if args.model.task()?.1 == Task::CausalLm {
        return causal::correct_adapter(args);
    }
    let phase = Phase::start();
    let adapter = PeftAdapter::load(&args.adapter)?;
    let (encoder, model_dir) = args.model.load()?;
    check_out(&args.out, &model_dir)?;
    let original = encoder.model.clone();
    let (emulator, _) = load_emulator(original.clone(), &args.emulator)?;
    let tuned = attach_adapter(emulator, &adapter)?;
    let (corrected, report) = correct(&original, &tuned, &CorrectionConfig { clamp: args.clamp })?;
    describe_encoder_adapter(corrected, &model_dir).save(&args.out)?;
    finish("correct", phase, &args.out, &report)
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
    /// Output directory: a complete model directory (merged safetensors, the other files copied).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Merges an adapter into the checkpoint files, host-side, and copies the model's other files.
pub fn merge(args: &MergeArgs) -> CliResult<()> {
    let phase = Phase::start();
    check_out(&args.out, &args.model)?;
    let adapter = PeftAdapter::load(&args.adapter)?;
    // A GGUF model is first written out as an HF directory (f32) in a staging directory beside
    // --out, removed afterwards; the merge then works on its safetensors as on any HF model.
    let staging = if emloc_models::causal_lm::is_gguf(&args.model) {
        let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let staging = tempfile::Builder::new().prefix(".emloc-gguf-").tempdir_in(parent)?;
        eprintln!("converting {} to an HF directory", args.model.display());
        emloc_models::gguf::gguf_to_hf_dir(&args.model, staging.path().join("hf"))?;
        Some(staging)
    } else {
        None
    };
    let model_dir = staging.as_ref().map_or(args.model.clone(), |s| s.path().join("hf"));
    let files = Checkpoint::open_dir(&model_dir)?.files();
    let merged = merge_into_safetensors(&adapter, &files, &args.out)?;
    let mut copied = Vec::new();
    copy_other_files(&model_dir, &args.out, &files, &mut copied)?;
    eprintln!("merged {} weights; copied {} other files", merged.merged.len(), copied.len());
    #[derive(Serialize)]
    struct Details {
        merged: Vec<(String, String)>,
        copied: Vec<String>,
    }
    finish("merge", phase, &args.out, Details { merged: merged.merged, copied })
}

/// Copies every file of `from` (recursively) that is not a weight file to `to`, atomically.
fn copy_other_files(from: &Path, to: &Path, weights: &[PathBuf], copied: &mut Vec<String>) -> CliResult<()> {
    let mut entries: Vec<_> = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_other_files(&path, &target, weights, copied)?;
        } else if !weights.iter().any(|w| w == &path) && entry.file_name() != "report.json" {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            emloc::atomic::write_atomic(&target, &bytes)?;
            copied.push(path.display().to_string());
        }
    }
    Ok(())
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

/// Prints Recall@1, Recall@5 and MRR on the validation split as JSON (decoders: loss, exact
/// match and choice accuracy).
pub fn eval(args: &EvalArgs) -> CliResult<()> {
    if args.model.task()?.1 == Task::CausalLm {
        return causal::eval(args);
    }
    let phase = Phase::start();
    let split = args.data.split()?;
    let (encoder, _, _) = load_model(&args.model, args.emulator.as_deref())?;
    let mut model = encoder.model.clone();
    if let Some(dir) = &args.adapter {
        model = attach_adapter(model, &PeftAdapter::load(dir)?)?.valid();
    }
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
