//! `emloc bench-step` on a decoder (`--model` a Llama-family GGUF file or HF directory): the
//! supervised fine-tuning step of the `smollm2-bigbench` recipe (LoRA r 8 on all seven
//! projections, 8 sequences of the BIG-bench mix, completion-only loss) in emloc, on the full
//! model and on its emulator, then in HF PEFT on PyTorch (`benches/peers/peft_causal_step.py`,
//! embedded) on the same token batches.

use std::collections::BTreeSet;

use burn::tensor::Device;
use emloc::EmulatorConfig;
use emloc_models::causal_lm::{self, CausalLm, Example};
use emloc_models::llama::LlamaForCausalLM;
use serde::Serialize;

use crate::CliResult;
use crate::args::{DECODER_MAX_SEQ_LENGTH, TrainArgs};
use crate::bench_step::{BenchStepArgs, PeerResult, emloc_row, finish, timed_training};
use crate::causal::{build_emulator, calibration_sequences, train_adapter};
use crate::peer::{PeerScript, run_peer};
use crate::run::BIGBENCH_DEFAULTS;
use crate::run_causal::split_tasks;

/// The decoder's PEFT peer, shipped inside the binary.
const PEER: PeerScript = PeerScript {
    name: "peft_causal_step.py",
    text: include_str!("../../benches/peers/peft_causal_step.py"),
    what: "the PEFT decoder peer",
    needs: "torch transformers peft gguf",
};

/// What the decoder peer reads: the model file and the exact token batches.
#[derive(Debug, Serialize)]
struct PeerSpec {
    model: String,
    batches: Vec<PeerBatch>,
    rank: usize,
    alpha: f64,
    lr: f64,
    threads: usize,
}

/// One step's batch as emloc builds it (`CausalLmTask::batch`).
#[derive(Debug, Serialize)]
struct PeerBatch {
    /// Right-padded input ids, one row per sequence.
    inputs: Vec<Vec<i64>>,
    /// Flat indices (`row · len + t`) of the scored positions.
    positions: Vec<i64>,
    /// The token each scored position predicts.
    targets: Vec<i64>,
}

/// The decoder's benchmark (see the module docs).
pub fn bench_step_causal(args: &BenchStepArgs, config: &EmulatorConfig) -> CliResult<()> {
    let (_, train) = split_tasks(
        BIGBENCH_DEFAULTS.validation,
        args.data.split_seed,
        BIGBENCH_DEFAULTS.train_pairs.unwrap_or(0),
    )?;
    let lm = args.model.load_decoder(&BTreeSet::new())?;
    let calibration = calibration_sequences(&lm, &train, args.calibration_pairs)?;
    let train_args = args.train_args(BIGBENCH_DEFAULTS.batch_size);
    let max_seq_length = args.model.max_seq_length.unwrap_or(DECODER_MAX_SEQ_LENGTH);
    eprintln!(
        "{} steps of {} sequences (≤ {max_seq_length} tokens) of the BIG-bench mix, LoRA r {} on \
         every projection of {}; PyTorch on {} threads",
        args.steps,
        train_args.batch_size,
        args.rank,
        lm.source.display(),
        args.threads
    );

    let timed = |model: LlamaForCausalLM, train_args: &TrainArgs, label: &str| {
        timed_training(|on_step| {
            train_adapter(&lm, model, &train, train_args, label, None, |_, _, _| {
                on_step();
                Ok(())
            })
        })
    };
    let mut rows = Vec::new();
    let original = lm.model.clone();
    rows.push(emloc_row(
        "emloc, LoRA on the full model",
        timed(original.clone(), &train_args, "LoRA")?,
    ));
    let (emulator, _) = build_emulator(original, &calibration, config)?;
    let label = format!("emloc, LoRA on the emulator (ρ = {})", args.ratio);
    rows.push(emloc_row(&label, timed(emulator.clone(), &train_args, "LoRA on the emulator")?));
    // What `finetune` runs by default: the layers recomputed, the head in chunks.
    let checkpointed = TrainArgs { gradient_checkpointing: true, ..train_args.clone() };
    let ckpt = timed(emulator, &checkpointed, "LoRA, checkpointed")?;
    rows.push(emloc_row(&format!("{label}, gradient checkpointing"), ckpt));

    let peer: Option<PeerResult> = if args.no_peer {
        None
    } else {
        let spec = PeerSpec {
            model: lm.source.display().to_string(),
            batches: peer_batches(&lm, &train, &args.batch_order(&train_args, train.len()))?,
            rank: args.rank,
            alpha: args.alpha,
            lr: args.lr,
            threads: args.threads,
        };
        Some(run_peer(&args.python, &PEER, &spec)?)
    };
    finish(args, &lm.source, train_args.batch_size, max_seq_length, rows, peer)
}

/// The batches of `order` exactly as emloc's training builds them, read back to the host.
fn peer_batches(
    lm: &CausalLm,
    train: &[Example],
    order: &[Vec<usize>],
) -> CliResult<Vec<PeerBatch>> {
    let device = Device::default();
    let ints = |t: burn::tensor::Tensor<1, burn::tensor::Int>| -> CliResult<Vec<i64>> {
        Ok(t.into_data().convert::<i64>().try_into_vec::<i64>().map_err(|e| format!("{e:?}"))?)
    };
    order
        .iter()
        .map(|indices| {
            let examples: Vec<Example> = indices.iter().map(|&i| train[i].clone()).collect();
            let items = causal_lm::tokenize_all(&lm.task, &examples)?;
            let batch = lm.task.batch(&items, &device);
            let [rows, len] = batch.inputs.dims();
            let flat = ints(batch.inputs.reshape([rows * len]))?;
            Ok(PeerBatch {
                inputs: flat.chunks(len).map(<[i64]>::to_vec).collect(),
                positions: ints(batch.completion_positions)?,
                targets: ints(batch.completion_targets)?,
            })
        })
        .collect()
}
