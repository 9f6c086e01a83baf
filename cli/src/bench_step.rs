//! `emloc bench-step`: the CPU training step of the main job (LoRA on all-MiniLM-L6-v2, MultiEmo
//! sentence classification) in emloc, on the full model and on its emulator, then the same
//! step in HF PEFT on PyTorch (`benches/peers/peft_step.py`, embedded), on the same batches, in
//! one run; prints the step times, their ratios and the peaks, and writes `OUT/report.json`.
//! With a decoder as `--model`, the decoder's step (`bench_step_causal.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use emloc::EmulatorConfig;
use emloc_models::bert::BertModel;
use emloc_models::training::{TrainConfig, TrainReport, batch_order};
use serde::{Deserialize, Serialize};

use crate::CliResult;
use crate::args::{ModelArgs, ModelKind, TrainArgs};
use crate::data::{DataArgs, EmbeddedData, classification_calibration_texts};
use crate::memory::{Phase, PhaseStats};
use crate::output::write_json;
use crate::peer::{PeerScript, run_peer};
use crate::training::{build_emulator, train_classifier};

/// The PEFT peer, shipped inside the binary so that the command runs from any directory.
const PEER: PeerScript = PeerScript {
    name: "peft_step.py",
    text: include_str!("../../benches/peers/peft_step.py"),
    what: "the PEFT peer",
    needs: "torch transformers peft",
};

/// Options of `emloc bench-step`.
#[derive(Args, Debug, Clone)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Optimizer steps timed per row; the first is a warm-up and not in the median.
    #[arg(long, default_value_t = 6)]
    pub(crate) steps: usize,
    /// Examples per step. Default: the recipes' batch, 32 sentences for an encoder (the main
    /// job), 8 sequences for a decoder (`smollm2-bigbench`).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub(crate) rank: usize,
    /// LoRA α.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) alpha: f64,
    /// AdamW learning rate (constant after one warm-up step; speed does not depend on it).
    #[arg(long, default_value_t = 1e-3)]
    pub(crate) lr: f64,
    /// Emulator keep-ratio ρ of the emulator row.
    #[arg(long, default_value_t = 0.4)]
    pub(crate) ratio: f64,
    /// Calibration pairs (two sentences each) for the emulator.
    #[arg(long, default_value_t = 32)]
    pub(crate) calibration_pairs: usize,
    /// Threads PyTorch may use (emloc's pool takes every core: set RAYON_NUM_THREADS to match).
    #[arg(long, default_value_t = default_threads())]
    pub(crate) threads: usize,
    /// Python with torch, transformers and peft for the peer.
    #[arg(long, default_value = "python3")]
    pub(crate) python: PathBuf,
    /// Skip the PyTorch + PEFT peer (emloc's rows only).
    #[arg(long)]
    pub(crate) no_peer: bool,
    /// Directory for `report.json`.
    #[arg(long, default_value = "emloc-bench-step")]
    pub(crate) out: PathBuf,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// One timed row.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Row {
    method: String,
    /// Wall seconds of every step, the warm-up first.
    step_seconds: Vec<f64>,
    /// Median over the steps after the warm-up.
    median_step_seconds: f64,
    /// Peak RSS of the row's training (for the peer: of its whole process).
    peak_rss_bytes: Option<u64>,
    /// Peak live heap of the row's training (emloc rows; it includes the original model the
    /// command keeps for the next row).
    peak_heap_bytes: Option<usize>,
    /// Median step time over the PEFT peer's.
    ratio_to_peft: Option<f64>,
    /// Loss of the first step: the same batch and adapter start (B = 0) in every row on the
    /// full model, so without dropout (a Llama) emloc's and the peer's agree to f32 rounding
    /// when they compute the same step; BERT's dropout masks differ between the two.
    first_loss: Option<f64>,
}

/// What either peer prints.
#[derive(Debug, Deserialize)]
pub(crate) struct PeerResult {
    seconds: Vec<f64>,
    losses: Vec<f64>,
    peak_rss_bytes: u64,
    torch: String,
    transformers: String,
    peft: String,
    threads: usize,
}

/// What the peer reads: the model, the label descriptions and the exact batches.
#[derive(Debug, Serialize)]
struct PeerSpec<'a> {
    model: String,
    descriptions: &'a [String],
    batches: Vec<PeerBatch<'a>>,
    rank: usize,
    alpha: f64,
    lr: f64,
    scale: f64,
    max_length: usize,
    threads: usize,
}

#[derive(Debug, Serialize)]
struct PeerBatch<'a> {
    texts: Vec<&'a str>,
    labels: Vec<usize>,
}

#[derive(Debug, Serialize)]
struct Report {
    command: Vec<String>,
    model: String,
    batch_size: usize,
    max_seq_length: usize,
    steps: usize,
    ratio: f64,
    threads: usize,
    rayon_threads: usize,
    peer_versions: Option<String>,
    rows: Vec<Row>,
}

pub(crate) fn median_after_warmup(seconds: &[f64]) -> f64 {
    let mut timed: Vec<f64> = seconds.iter().skip(1).copied().collect();
    timed.sort_by(f64::total_cmp);
    match timed.len() {
        0 => seconds.first().copied().unwrap_or(f64::NAN),
        n if n % 2 == 1 => timed[n / 2],
        n => 0.5 * (timed[n / 2 - 1] + timed[n / 2]),
    }
}

/// What one row's training measured.
pub(crate) struct TimedTraining {
    /// Wall seconds of every step, the warm-up first.
    pub seconds: Vec<f64>,
    /// The training's peaks.
    pub stats: PhaseStats,
    /// Loss of the first step.
    pub first_loss: f64,
}

/// Runs `train(on_step)` (a training run that calls `on_step` after every step) and times it.
pub(crate) fn timed_training<M>(
    train: impl FnOnce(&mut dyn FnMut()) -> CliResult<(M, TrainReport)>,
) -> CliResult<TimedTraining> {
    let phase = Phase::start();
    let mut last = Instant::now();
    let mut seconds = Vec::new();
    let (_, report) = train(&mut || {
        seconds.push(last.elapsed().as_secs_f64());
        last = Instant::now();
    })?;
    Ok(TimedTraining { seconds, stats: phase.finish(), first_loss: report.first_loss })
}

/// Runs the benchmark: the decoder's step when `--model` is a decoder, else the main job's.
pub fn bench_step(args: &BenchStepArgs) -> CliResult<()> {
    if args.steps < 2 || args.batch_size == Some(0) || args.threads == 0 {
        return Err(
            "--steps must be at least 2 (one warm-up), --batch-size and --threads at least 1"
                .into(),
        );
    }
    let config = EmulatorConfig::uniform(args.ratio);
    config.validate()?;
    if args.model.model.is_some() && args.model.task()?.0 == ModelKind::Decoder {
        return crate::bench_step_causal::bench_step_causal(args, &config);
    }
    let mut data = args.data.clone();
    data.embedded = EmbeddedData::MultiEmo;
    let (task, split) = data.split_classes()?;
    let train = split.train;
    let calibration = classification_calibration_texts(&task, &train, args.calibration_pairs)?;
    let (encoder, model_dir) = args.model.load()?;
    let max_seq_length = args.model.encoder_max_seq_length();
    let train_args = args.train_args(32);
    eprintln!(
        "{} steps of {} sentences (≤ {max_seq_length} tokens), LoRA r {} on {}; emloc on {} threads, PyTorch on {}",
        args.steps,
        train_args.batch_size,
        args.rank,
        model_dir.display(),
        rayon_threads(),
        args.threads
    );

    let timed = |model: BertModel, train_args: &TrainArgs, label: &str| {
        timed_training(|on_step| {
            train_classifier(&encoder, model, &task, &train, train_args, label, None, |_, _, _| {
                on_step();
                Ok(())
            })
        })
    };
    let mut rows = Vec::new();
    let original = encoder.model.clone();
    let full = timed(original.clone(), &train_args, "emloc LoRA")?;
    rows.push(emloc_row("emloc, LoRA on the full model", full));
    let (emulator, _) = build_emulator(&encoder, original, &calibration, &config)?;
    let label = format!("emloc, LoRA on the emulator (ρ = {})", args.ratio);
    rows.push(emloc_row(&label, timed(emulator.clone(), &train_args, "emloc emulator")?));
    // What `finetune` runs by default: the same step with the layers recomputed.
    let checkpointed = TrainArgs { gradient_checkpointing: true, ..train_args.clone() };
    let ckpt = timed(emulator, &checkpointed, "emloc checkpointed")?;
    rows.push(emloc_row(&format!("{label}, gradient checkpointing"), ckpt));

    let mut peer = None;
    if !args.no_peer {
        let order = args.batch_order(&train_args, train.len());
        let spec = PeerSpec {
            model: model_dir.display().to_string(),
            descriptions: &task.descriptions,
            batches: order
                .iter()
                .map(|indices| PeerBatch {
                    texts: indices.iter().map(|&i| train[i].input.as_str()).collect(),
                    labels: indices.iter().map(|&i| train[i].label).collect(),
                })
                .collect(),
            rank: args.rank,
            alpha: args.alpha,
            lr: args.lr,
            scale: task.scale,
            max_length: max_seq_length,
            threads: args.threads,
        };
        peer = Some(run_peer(&args.python, &PEER, &spec)?);
    }
    finish(args, &model_dir, train_args.batch_size, max_seq_length, rows, peer)
}

impl BenchStepArgs {
    /// The training options of every emloc row: `default_batch` unless `--batch-size`, one
    /// warm-up step, seed 0, no checkpointing (the checkpointed row sets it).
    pub(crate) fn train_args(&self, default_batch: usize) -> TrainArgs {
        TrainArgs {
            rank: self.rank,
            alpha: self.alpha,
            steps: self.steps,
            batch_size: self.batch_size.unwrap_or(default_batch),
            grad_accumulation: 1,
            lr: self.lr,
            warmup_steps: 1,
            seed: 0,
            gradient_checkpointing: false,
        }
    }

    /// The example indices of every step, as emloc's training draws them (the peer's batches).
    pub(crate) fn batch_order(&self, train_args: &TrainArgs, examples: usize) -> Vec<Vec<usize>> {
        let config = TrainConfig {
            steps: train_args.steps,
            batch_size: train_args.batch_size,
            seed: train_args.seed,
            ..TrainConfig::default()
        };
        batch_order(&config, examples)
    }
}

/// Adds the peer's row and every row's ratio to it, prints the table and writes the report.
pub(crate) fn finish(
    args: &BenchStepArgs,
    model: &Path,
    batch_size: usize,
    max_seq_length: usize,
    mut rows: Vec<Row>,
    peer: Option<PeerResult>,
) -> CliResult<()> {
    let mut peer_versions = None;
    if let Some(peer) = peer {
        peer_versions = Some(format!(
            "torch {}, transformers {}, peft {}, {} threads",
            peer.torch, peer.transformers, peer.peft, peer.threads
        ));
        let peft = median_after_warmup(&peer.seconds);
        for row in &mut rows {
            row.ratio_to_peft = Some(row.median_step_seconds / peft);
        }
        rows.push(Row {
            method: "HF PEFT on PyTorch, LoRA on the full model".into(),
            median_step_seconds: peft,
            step_seconds: peer.seconds,
            peak_rss_bytes: Some(peer.peak_rss_bytes),
            peak_heap_bytes: None,
            ratio_to_peft: Some(1.0),
            first_loss: peer.losses.first().copied(),
        });
    }
    println!("| row | median step s | × PEFT | peak RSS MiB | first loss |");
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.3} | {} | {} | {} |",
            row.method,
            row.median_step_seconds,
            row.ratio_to_peft.map_or_else(|| "-".into(), |r| format!("{r:.2}")),
            row.peak_rss_bytes
                .map_or_else(|| "-".into(), |b| format!("{:.0}", b as f64 / 1048576.0)),
            row.first_loss.map_or_else(|| "-".into(), |l| format!("{l:.4}")),
        );
    }
    let report = Report {
        command: std::env::args().collect(),
        model: model.display().to_string(),
        batch_size,
        max_seq_length,
        steps: args.steps,
        ratio: args.ratio,
        threads: args.threads,
        rayon_threads: rayon_threads(),
        peer_versions,
        rows,
    };
    let path = args.out.join("report.json");
    write_json(&path, &report)?;
    eprintln!("report in {}", path.display());
    Ok(())
}

pub(crate) fn emloc_row(method: &str, timed: TimedTraining) -> Row {
    let TimedTraining { seconds: step_seconds, stats, first_loss } = timed;
    Row {
        method: method.into(),
        median_step_seconds: median_after_warmup(&step_seconds),
        step_seconds,
        peak_rss_bytes: stats.peak_rss_bytes,
        peak_heap_bytes: Some(stats.peak_heap_bytes),
        ratio_to_peft: None,
        first_loss: Some(first_loss),
    }
}

/// Threads of emloc's CPU pool (Burn's Flex backend and gemm use rayon's global pool).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(default_threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_step_is_left_out_of_the_median() {
        assert_eq!(median_after_warmup(&[9.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(median_after_warmup(&[9.0, 1.0, 3.0]), 2.0);
        assert_eq!(median_after_warmup(&[9.0]), 9.0);
    }
}
