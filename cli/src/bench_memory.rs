//! `emloc bench-memory`: P5, the peak memory of fine-tuning on the emulator against the peak
//! memory of running the original model on the same batches.
//!
//! Every phase runs in its own child process (this binary, with `--phase`), so each peak is
//! the whole process's peak from its start, loading included, and no phase inherits another's
//! heap or allocator caches:
//!
//! 1. `inference`: the original model, forward passes only, on the training batches;
//! 2. `emulate`: calibration and emulator construction (the original is alive, by design),
//!    writing the emulator directory;
//! 3. `finetune-emulator`: the emulator loaded without the original's emulated weights (they
//!    are never read or materialised), LoRA trained with AdamW;
//! 4. `finetune-full`: the baseline, LoRA on the original model.
//!
//! Two models: MiniLM (the main job's checkpoint, data and training setup) and a Llama-family
//! decoder with random weights (default: Llama-3.2-1B's shapes, 1.24 B parameters, f32), trained
//! on next-token prediction of random tokens. Memory depends on shapes, not values, so random
//! weights measure what a real checkpoint of that shape would take.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use emloc::emulator::SvdMethod;
use emloc::{
    EmulatorConfig, EmulatorDescription, LoraConfig, attach_new_adapter, emulate, load_emulator,
    save_emulator,
};
use emloc_models::causal_lm::{
    self, CausalBatch, HEAD_CHUNK_POSITIONS, completion_gradients_checkpointed,
};
use emloc_models::llama::{LlamaConfig, LlamaForCausalLM};
use emloc_models::retrieval::batch_order;
use emloc_models::rng::XorShiftRng;
use serde::{Deserialize, Serialize};

use crate::CliResult;
use crate::args::{EmulatorArgs, ModelArgs, TrainArgs};
use crate::causal::{build_emulator_streaming, replaced_weights};
use crate::data::{DataArgs, calibration_texts};
use crate::memory::{Phase, PhaseStats};
use crate::progress::progress;
use crate::training::{build_emulator, train_adapter};

/// Which model `emloc bench-memory` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum BenchModel {
    /// all-MiniLM-L6-v2 on the main job's GSM8K retrieval task (the `--model` directory).
    Minilm,
    /// A Llama-family decoder with random weights (`--llama-*` shapes), next-token prediction.
    Llama,
}

/// One measured phase, run in its own process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum MemoryPhase {
    /// Forward passes of the original model on the training batches.
    Inference,
    /// Calibration and emulator construction with the whole original in memory; writes
    /// `OUT/emulator`.
    Emulate,
    /// Llama from `--model` only: streaming construction, one dense block at a time (what
    /// `emloc emulate` does for decoders); writes `OUT/emulator-streaming`.
    EmulateStreaming,
    /// LoRA fine-tuning on the emulator from `OUT/emulator`.
    FinetuneEmulator,
    /// LoRA fine-tuning on the original model.
    FinetuneFull,
}

impl MemoryPhase {
    const ALL: [MemoryPhase; 5] = [
        Self::Inference,
        Self::Emulate,
        Self::EmulateStreaming,
        Self::FinetuneEmulator,
        Self::FinetuneFull,
    ];

    /// A name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inference => "inference (original)",
            Self::Emulate => "emulator construction",
            Self::EmulateStreaming => "emulator construction, streaming",
            Self::FinetuneEmulator => "LoRA fine-tuning on the emulator",
            Self::FinetuneFull => "LoRA fine-tuning on the original",
        }
    }
}

/// Options of `emloc bench-memory`.
#[derive(Args, Debug, Clone, Serialize)]
pub struct BenchMemoryArgs {
    /// The model to measure.
    #[arg(long = "model-kind", value_enum, default_value_t = BenchModel::Minilm)]
    pub kind: BenchModel,
    #[command(flatten)]
    #[serde(skip)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Emulator keep-ratio ρ of every decoder/encoder layer.
    #[arg(long, default_value_t = 0.4)]
    pub ratio: f64,
    /// Rules file (JSON `EmulatorConfig`, e.g. from `emloc plan --out`); replaces --ratio, so
    /// a plan's real fine-tuning peak can be measured.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// MiniLM: training pairs used for calibration.
    #[arg(long, default_value_t = 64)]
    pub calibration_pairs: usize,
    /// LoRA rank r (α = 2r).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Training steps per fine-tuning phase (and forward passes of the inference phase).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Batch size: question/answer pairs (MiniLM) or sequences (Llama).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub llama: LlamaShape,
    /// Output directory: report.json and the emulator built by the `emulate` phase.
    #[arg(long, default_value = "emloc-bench-memory")]
    pub out: PathBuf,
    /// The phases to run, comma-separated (default: all; `emulate-streaming` only for a Llama
    /// read from `--model`).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub phases: Vec<MemoryPhase>,
    /// Fine-tune with gradient checkpointing, as `finetune` does by default: layers recomputed
    /// in the backward pass, a decoder's LM head in chunks; `false` keeps every activation.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// Internal: run only this phase and print its statistics as one JSON line.
    #[arg(long, value_enum, hide = true)]
    pub phase: Option<MemoryPhase>,
}

/// Shapes of the random Llama (defaults: Llama-3.2-1B, tied head).
#[derive(Args, Debug, Clone, Serialize)]
pub struct LlamaShape {
    /// Decoder layers.
    #[arg(long, default_value_t = 16)]
    pub llama_layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 2048)]
    pub llama_hidden: usize,
    /// SwiGLU width.
    #[arg(long, default_value_t = 8192)]
    pub llama_intermediate: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub llama_heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 8)]
    pub llama_kv_heads: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 128_256)]
    pub llama_vocab: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Calibration sequences (of `--seq-len` tokens).
    #[arg(long, default_value_t = 4)]
    pub calibration_sequences: usize,
}

impl LlamaShape {
    fn config(&self) -> LlamaConfig {
        let mut config = LlamaConfig::new(
            self.llama_vocab,
            self.llama_hidden,
            self.llama_intermediate,
            self.llama_layers,
            self.llama_heads,
        );
        config.num_key_value_heads = Some(self.llama_kv_heads);
        config.tie_word_embeddings = true;
        config
    }
}

/// The config of the measured Llama: `--model`'s, or the random shapes'.
fn llama_config(args: &BenchMemoryArgs) -> CliResult<LlamaConfig> {
    Ok(match args.model.model.as_deref() {
        Some(path) => causal_lm::read_config(path)?,
        None => args.llama.config(),
    })
}

/// Parameters of a Llama with `c` (a tied head's embedding counted once; no biases).
fn llama_params(c: &LlamaConfig) -> usize {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim();
    let kv = c.num_key_value_heads() * c.head_dim();
    let layer = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d;
    let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * d };
    c.vocab_size * d + head + c.num_hidden_layers * layer + d
}

/// What one phase measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseResult {
    /// The phase.
    pub phase: MemoryPhase,
    /// Wall time (seconds), whole-process peak RSS and peak heap (bytes).
    pub wall_seconds: f64,
    /// Peak resident set of the phase's process, from its start (`VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// Peak live heap bytes of the phase's process (counting allocator).
    pub peak_heap_bytes: usize,
    /// Fine-tuning phases: peak RSS while loading the model (up to the first step).
    pub load_peak_rss_bytes: Option<u64>,
    /// Fine-tuning phases: peak heap while loading the model.
    pub load_peak_heap_bytes: Option<usize>,
    /// Training loss of the first and last step (fine-tuning phases).
    pub losses: Option<(f32, f32)>,
}

/// Marks the statistics line a child prints on stdout.
const RESULT_PREFIX: &str = "EMLOC_BENCH_MEMORY_PHASE ";

/// Runs every phase in a child process (or, with `--phase`, one phase here) and prints the
/// table; writes `OUT/report.json`.
pub fn bench_memory(args: &BenchMemoryArgs) -> CliResult<()> {
    validate(args)?;
    if let Some(phase) = args.phase {
        let mut clock = Phase::start();
        let mut load = None;
        let losses = run_phase(args, phase, &mut || load = Some(clock.split()))?;
        let result = to_result(phase, load, clock.finish(), losses);
        println!("{RESULT_PREFIX}{}", serde_json::to_string(&result).map_err(|e| e.to_string())?);
        return Ok(());
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let bench_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut results = Vec::new();
    for phase in selected_phases(args) {
        eprintln!("== {} (own process)", phase.name());
        let result = run_phase_process(&bench_args, phase)?;
        eprintln!("   peak RSS {} MiB, {:.1} s", mib(result.peak_rss_bytes), result.wall_seconds);
        results.push(result);
    }
    print_table(args, &results)?;
    let report = serde_json::json!({
        "bench": "memory",
        "args": args,
        "model_params": model_params(args)?,
        "phases": results,
        "finetune_emulator_over_inference_rss": ratio(&results, MemoryPhase::FinetuneEmulator),
        "finetune_full_over_inference_rss": ratio(&results, MemoryPhase::FinetuneFull),
        "emulate_over_inference_rss": ratio(&results, MemoryPhase::Emulate),
        "emulate_streaming_over_inference_rss": ratio(&results, MemoryPhase::EmulateStreaming),
    });
    let mut json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    json.push('\n');
    emloc::io::write_atomic(&args.out.join("report.json"), json.as_bytes())?;
    eprintln!("report: {}", args.out.join("report.json").display());
    Ok(())
}

/// Runs `emloc BENCH_ARGS --phase PHASE` (where `bench_args` starts with `bench-memory`) in a
/// child process and reads the statistics it prints.
pub fn run_phase_process(bench_args: &[OsString], phase: MemoryPhase) -> CliResult<PhaseResult> {
    // `/proc/self/exe` still runs this binary if a rebuild replaced the file meanwhile.
    let exe = match PathBuf::from("/proc/self/exe") {
        p if p.exists() => p,
        _ => std::env::current_exe().map_err(|e| format!("cannot find the emloc binary: {e}"))?,
    };
    let mut command = Command::new(&exe);
    #[cfg(unix)]
    std::os::unix::process::CommandExt::arg0(&mut command, "emloc");
    let name = phase.to_possible_value().expect("no skipped variants").get_name().to_string();
    let output = command
        .args(bench_args)
        .args(["--phase", &name])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "phase `{}` failed ({}); its output:\n{stdout}",
            phase.name(),
            output.status
        )
        .into());
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .ok_or_else(|| format!("phase `{}` printed no statistics", phase.name()))?;
    Ok(serde_json::from_str(line).map_err(|e| e.to_string())?)
}

/// `--phases`, or every phase that applies (streaming construction needs a Llama checkpoint).
fn selected_phases(args: &BenchMemoryArgs) -> Vec<MemoryPhase> {
    if !args.phases.is_empty() {
        return args.phases.clone();
    }
    let streams = args.kind == BenchModel::Llama && args.model.model.is_some();
    MemoryPhase::ALL
        .into_iter()
        .filter(|&p| p != MemoryPhase::EmulateStreaming || streams)
        .collect()
}

fn validate(args: &BenchMemoryArgs) -> CliResult<()> {
    if args.steps == 0 || args.batch_size == 0 || args.rank == 0 {
        return Err("--steps, --batch-size and --rank must be at least 1".into());
    }
    if !(args.ratio > 0.0 && args.ratio <= 1.0) {
        return Err(format!("--ratio {} must be in (0, 1]", args.ratio).into());
    }
    if args.kind == BenchModel::Llama {
        if args.llama.seq_len < 2 || args.llama.calibration_sequences == 0 {
            return Err(
                "--seq-len must be at least 2 and --calibration-sequences at least 1".into()
            );
        }
        args.llama.config().validate().map_err(|e| format!("Llama shape: {e}"))?;
    }
    if selected_phases(args).contains(&MemoryPhase::EmulateStreaming)
        && (args.kind != BenchModel::Llama || args.model.model.is_none())
    {
        return Err("the emulate-streaming phase needs --model-kind llama and --model (an HF \
                    directory or a .gguf file)"
            .into());
    }
    Ok(())
}

fn to_result(
    phase: MemoryPhase,
    load: Option<PhaseStats>,
    rest: PhaseStats,
    losses: Option<(f32, f32)>,
) -> PhaseResult {
    let load_rss = load.and_then(|l| l.peak_rss_bytes);
    PhaseResult {
        phase,
        wall_seconds: rest.wall_seconds + load.map_or(0.0, |l| l.wall_seconds),
        peak_rss_bytes: rest.peak_rss_bytes.map(|r| r.max(load_rss.unwrap_or(0))),
        peak_heap_bytes: rest.peak_heap_bytes.max(load.map_or(0, |l| l.peak_heap_bytes)),
        load_peak_rss_bytes: load_rss,
        load_peak_heap_bytes: load.map(|l| l.peak_heap_bytes),
        losses,
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".into(), |b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
}

fn ratio(results: &[PhaseResult], phase: MemoryPhase) -> Option<f64> {
    let rss = |p: MemoryPhase| results.iter().find(|r| r.phase == p).and_then(|r| r.peak_rss_bytes);
    Some(rss(phase)? as f64 / rss(MemoryPhase::Inference)? as f64)
}

fn model_params(args: &BenchMemoryArgs) -> CliResult<usize> {
    Ok(match args.kind {
        BenchModel::Llama => llama_params(&llama_config(args)?),
        BenchModel::Minilm => {
            let (encoder, _) = args.model.load()?;
            encoder.model.num_params()
        }
    })
}

fn print_table(args: &BenchMemoryArgs, results: &[PhaseResult]) -> CliResult<()> {
    let what = match args.kind {
        BenchModel::Minilm => format!(
            "MiniLM, batch {} pairs × ≤{} tokens",
            args.batch_size,
            args.model.encoder_max_seq_length()
        ),
        BenchModel::Llama => format!(
            "{} ({:.2} B parameters, f32), batch {} × {} tokens",
            args.model
                .model
                .as_ref()
                .map_or_else(|| "random Llama".to_string(), |p| format!("Llama {}", p.display())),
            llama_params(&llama_config(args)?) as f64 / 1e9,
            args.batch_size,
            args.llama.seq_len
        ),
    };
    println!(
        "P5 memory, {what}, {}, LoRA r {}, {} steps; each phase in its own process",
        args.config
            .as_ref()
            .map_or_else(|| format!("ρ {}", args.ratio), |c| format!("rules {}", c.display())),
        args.rank,
        args.steps
    );
    println!("| phase | peak RSS MiB | × inference | peak heap MiB | wall s |");
    println!("|---|---:|---:|---:|---:|");
    for r in results {
        let vs = ratio(results, r.phase).map_or_else(|| "-".into(), |x| format!("{x:.2}"));
        println!(
            "| {} | {} | {vs} | {:.0} | {:.1} |",
            r.phase.name(),
            mib(r.peak_rss_bytes),
            r.peak_heap_bytes as f64 / (1024.0 * 1024.0),
            r.wall_seconds
        );
    }
    Ok(())
}

/// `--config`'s rules, or uniform `--ratio`.
fn emulator_config(args: &BenchMemoryArgs) -> CliResult<EmulatorConfig> {
    EmulatorArgs {
        ratio: args.ratio,
        config: args.config.clone(),
        whitening: emloc::WhiteningMethod::Cholesky,
        calibration_pairs: args.calibration_pairs,
        sequential: false,
        refit: None,
    }
    .config()
}

fn emulator_dir(args: &BenchMemoryArgs) -> PathBuf {
    args.out.join("emulator")
}

/// Runs one phase; fine-tuning phases call `loaded` once the model is loaded, so that loading
/// and training are measured apart.
fn run_phase(
    args: &BenchMemoryArgs,
    phase: MemoryPhase,
    loaded: &mut dyn FnMut(),
) -> CliResult<Option<(f32, f32)>> {
    match args.kind {
        BenchModel::Minilm => minilm_phase(args, phase, loaded),
        BenchModel::Llama => llama_phase(args, phase, loaded),
    }
}

fn train_args(args: &BenchMemoryArgs) -> TrainArgs {
    TrainArgs {
        rank: args.rank,
        alpha: 2.0 * args.rank as f64,
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accumulation: 1,
        lr: 1e-3,
        warmup_steps: 0,
        seed: 0,
        gradient_checkpointing: args.gradient_checkpointing,
    }
}

fn minilm_phase(
    args: &BenchMemoryArgs,
    phase: MemoryPhase,
    loaded: &mut dyn FnMut(),
) -> CliResult<Option<(f32, f32)>> {
    let split = args.data.split()?;
    let train = train_args(args);
    match phase {
        MemoryPhase::Inference => {
            let (encoder, _) = args.model.load()?;
            // The training batches, each question batch and answer batch as one forward pass.
            for batch in batch_order(&train.train(), split.train.len()) {
                let questions: Vec<&str> =
                    batch.iter().map(|&i| split.train[i].question.as_str()).collect();
                let answers: Vec<&str> =
                    batch.iter().map(|&i| split.train[i].answer.as_str()).collect();
                for texts in [questions, answers] {
                    let embeddings = encoder.forward_with(&encoder.model, encoder.inputs(&texts)?);
                    std::hint::black_box(embeddings.into_data());
                }
            }
            Ok(None)
        }
        MemoryPhase::Emulate => {
            let (mut encoder, _) = args.model.load()?;
            let texts = calibration_texts(&split.train, args.calibration_pairs)?;
            let config = emulator_config(args)?;
            let original = encoder.take_model();
            let (emulator, report) = build_emulator(&encoder, original, &texts, &config)?;
            save_emulator(
                &emulator,
                &EmulatorDescription::new(config, report),
                &emulator_dir(args),
            )?;
            Ok(None)
        }
        MemoryPhase::EmulateStreaming => Err("streaming construction is for decoders".into()),
        MemoryPhase::FinetuneEmulator | MemoryPhase::FinetuneFull => {
            let (encoder, label) = if phase == MemoryPhase::FinetuneEmulator {
                (args.model.load_emulated(&emulator_dir(args))?.0, "LoRA on the emulator")
            } else {
                (args.model.load()?.0, "LoRA on the model")
            };
            loaded();
            let model = encoder.model.clone();
            let (_, report) = train_adapter(
                &encoder,
                model,
                &split.train,
                &train,
                label,
                None,
                |_, _, _| Ok(()),
            )?;
            Ok(Some((report.first_loss as f32, report.last_loss as f32)))
        }
    }
}

/// `--config`'s rules, or uniform `--ratio` with the randomized SVD, which keeps a 1 B model's
/// construction to minutes on a small CPU.
fn llama_emulator_config(args: &BenchMemoryArgs) -> CliResult<EmulatorConfig> {
    let mut config = emulator_config(args)?;
    if args.config.is_none() {
        config.whitening.svd = SvdMethod::Randomized { oversample: 10, power_iterations: 2 };
    }
    Ok(config)
}

fn log_llama_emulator(report: &emloc::EmulatorReport) {
    eprintln!(
        "emulator: {} layers, {:.0} M → {:.0} M parameters in them, calibration {:.1} s, construction {:.1} s",
        report.layers.len(),
        report.params_original() as f64 / 1e6,
        report.params_kept() as f64 / 1e6,
        report.calibration_seconds,
        report.construction_seconds
    );
}

/// Llama LoRA targets: every projection of attention and MLP.
const LLAMA_LORA_TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// `batch` sequences of `seq` random token ids.
fn random_ids(
    rng: &mut XorShiftRng,
    batch: usize,
    seq: usize,
    vocab: usize,
    device: &Device,
) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..batch * seq).map(|_| (rng.next_u64() % vocab as u64) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}

/// Mean next-token cross-entropy of `logits` `[b, s, v]` against `ids` `[b, s]`.
/// `ids` as a [`CausalBatch`] that scores every next token, the loss of [`lm_loss`].
fn next_token_batch(ids: &Tensor<2, Int>) -> CausalBatch {
    let [rows, seq] = ids.dims();
    let values: Vec<i64> = ids.clone().into_data().convert::<i64>().try_to_vec().expect("ids");
    let (mut positions, mut targets, mut scored_rows) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..rows {
        for t in 0..seq - 1 {
            positions.push((row * seq + t) as i64);
            targets.push(values[row * seq + t + 1]);
            scored_rows.push(row);
        }
    }
    let n = positions.len();
    let device = ids.device();
    CausalBatch {
        inputs: ids.clone(),
        completion_positions: Tensor::from_data(TensorData::new(positions, [n]), &device),
        completion_targets: Tensor::from_data(TensorData::new(targets, [n]), &device),
        rows: scored_rows,
        tokens: rows * seq,
    }
}

fn lm_loss(logits: Tensor<3>, ids: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
    let targets = ids.slice([0..b, 1..s]).unsqueeze_dim::<3>(2);
    logp.gather(2, targets).mean().neg()
}

fn llama_phase(
    args: &BenchMemoryArgs,
    phase: MemoryPhase,
    loaded: &mut dyn FnMut(),
) -> CliResult<Option<(f32, f32)>> {
    let device = Device::flex();
    device.seed(7);
    let shape = &args.llama;
    let checkpoint = args.model.model.as_deref();
    let config = match checkpoint {
        Some(path) => causal_lm::read_config(path)?,
        None => shape.config(),
    };
    // A model read from `--model`, its parameters at `skip` left unread; or a freshly built one,
    // lazily initialised: a parameter is materialised (randomly) when first used, so the
    // emulator phase never creates the dense weights it replaces.
    let model = |skip: &BTreeSet<String>| -> CliResult<LlamaForCausalLM> {
        Ok(match checkpoint {
            Some(path) => causal_lm::load_weights_skipping(path, &device, skip)?,
            None => config.init(true, &device),
        })
    };
    let mut rng = XorShiftRng::new(11);
    match phase {
        MemoryPhase::Inference => {
            let model = model(&BTreeSet::new())?;
            let bar = progress(args.steps, "inference");
            for _ in 0..args.steps {
                let ids = random_ids(
                    &mut rng,
                    args.batch_size,
                    shape.seq_len,
                    config.vocab_size,
                    &device,
                );
                std::hint::black_box(model.forward(ids, None).into_data());
                bar.inc(1);
            }
            bar.finish_and_clear();
            Ok(None)
        }
        MemoryPhase::EmulateStreaming => {
            let path = checkpoint.ok_or("the emulate-streaming phase needs --model")?;
            let calibration: Vec<Vec<u32>> = (0..shape.calibration_sequences)
                .map(|_| {
                    (0..shape.seq_len)
                        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
                        .collect()
                })
                .collect();
            let emulator_config = llama_emulator_config(args)?;
            let (emulator, report) = build_emulator_streaming(
                path,
                &device,
                &calibration,
                &emulator_config,
                burn::tensor::FloatDType::F32,
            )?;
            log_llama_emulator(&report);
            save_emulator(
                &emulator,
                &EmulatorDescription::new(emulator_config, report),
                &args.out.join("emulator-streaming"),
            )?;
            Ok(None)
        }
        MemoryPhase::Emulate => {
            let model = model(&BTreeSet::new())?;
            let calibration: Vec<Tensor<2, Int>> = (0..shape.calibration_sequences)
                .map(|_| random_ids(&mut rng, 1, shape.seq_len, config.vocab_size, &device))
                .collect();
            let emulator_config = llama_emulator_config(args)?;
            let bar = progress(shape.calibration_sequences, "calibration");
            let (emulator, report) = emulate(
                model,
                calibration,
                |m: &LlamaForCausalLM, ids: Tensor<2, Int>| {
                    m.model.forward(ids, None);
                    bar.inc(1);
                },
                &emulator_config,
            )?;
            bar.finish_and_clear();
            log_llama_emulator(&report);
            save_emulator(
                &emulator,
                &EmulatorDescription::new(emulator_config, report),
                &emulator_dir(args),
            )?;
            Ok(None)
        }
        MemoryPhase::FinetuneEmulator => {
            let description = emloc::read_emulator_description(&emulator_dir(args))?;
            let (emulator, _) =
                load_emulator(model(&replaced_weights(&description))?, &emulator_dir(args))?;
            // The rest of the model (embeddings, norms) is materialised by the first step.
            loaded();
            llama_finetune(args, emulator, config.vocab_size, &mut rng, "LoRA on the emulator")
                .map(Some)
        }
        MemoryPhase::FinetuneFull => {
            let model = model(&BTreeSet::new())?;
            loaded();
            llama_finetune(args, model, config.vocab_size, &mut rng, "LoRA on the model").map(Some)
        }
    }
}

fn llama_finetune(
    args: &BenchMemoryArgs,
    model: LlamaForCausalLM,
    vocab: usize,
    rng: &mut XorShiftRng,
    label: &str,
) -> CliResult<(f32, f32)> {
    let lora = LoraConfig::new(args.rank)
        .with_alpha(2.0 * args.rank as f64)
        .with_target_modules(LLAMA_LORA_TARGETS.iter().map(|s| s.to_string()).collect());
    let (adapted, _) = attach_new_adapter(model, &lora)?;
    let device = Device::flex();
    let train_device = device.clone().autodiff();
    let mut model = adapted.train();
    let mut optim = AdamWConfig::new().init();
    let bar = progress(args.steps, label);
    let mut losses = Vec::new();
    // One fixed batch: the loss must fall, which checks that the adapter actually trains.
    let ids = random_ids(rng, args.batch_size, args.llama.seq_len, vocab, &train_device);
    let every_position = next_token_batch(&ids);
    for _ in 0..args.steps {
        let (value, grads) = if args.gradient_checkpointing {
            let (value, grads) = completion_gradients_checkpointed(
                &model,
                &every_position,
                1.0,
                HEAD_CHUNK_POSITIONS,
            );
            (value as f32, grads)
        } else {
            let loss = lm_loss(model.forward(ids.clone(), None), ids.clone());
            let value = loss.clone().into_scalar::<f32>();
            (value, GradientsParams::from_grads(loss.backward(), &model))
        };
        losses.push(value);
        bar.set_message(format!("loss {value:.4}"));
        model = optim.step(1e-3, model, grads);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = model.valid();
    Ok((losses[0], *losses.last().expect("steps ≥ 1")))
}
