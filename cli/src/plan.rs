//! `emloc plan`: per-layer ranks for a parameter or memory budget, uniform ρ (the paper's rule)
//! against the global allocation by whitened spectrum, with the fine-tuning memory each implies.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use burn::module::Module;
use clap::Args;
use emloc::emulator::{
    LayerSpectrum, Objective, allocation_cost, config_for_ranks, global_ranks, uniform_ranks,
    whitened_spectra,
};
use emloc_models::bert::{BertConfig, BertModel};
use emloc_models::llama::LlamaForCausalLM;
use serde::Serialize;

use crate::CliResult;
use crate::args::{EmulatorArgs, ModelArgs, Task};
use crate::bench_memory::{MemoryPhase, PhaseResult, run_phase_process};
use crate::causal;
use crate::data::{DataArgs, encoder_calibration_texts};
use crate::output::write_json;
use crate::progress::progress;
use crate::training::with_calibration;

/// Options of `emloc plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// --ratio is the uniform plan (and, without --params/--budget, the size the global plan
    /// matches); --whitening and --calibration-pairs apply to both.
    #[command(flatten)]
    emulator: EmulatorArgs,
    /// Factor parameters the global plan may keep (default: as many as uniform ρ keeps).
    #[arg(long, conflicts_with = "budget")]
    params: Option<usize>,
    /// Memory budget in bytes for fine-tuning (estimate below); the global plan spends what the
    /// rest of the estimate leaves on factor parameters.
    #[arg(long)]
    budget: Option<u64>,
    /// Sequence length of the fine-tuning batches, for the activation estimate.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Sequences per fine-tuning batch (retrieval: questions + answers), for the activation
    /// estimate.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// LoRA rank, for the adapter and optimizer estimate.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// What the global plan minimises: the sum of each layer's relative squared whitened error
    /// (`relative`, default), or the summed absolute one (`absolute`).
    #[arg(long, value_enum, default_value_t = Objective::Relative)]
    objective: Objective,
    /// Write the global plan as an emulator rules file (for `emloc emulate --config`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure the global plan instead of trusting the estimate: build its emulator, then
    /// fine-tune it for 2 steps (--batch texts of ≤ --seq-len tokens), each in its own process
    /// (as `emloc bench-memory --config OUT` does), and report the peaks beside the estimate
    /// and the budget. Needs --out.
    #[arg(long, requires = "out")]
    measure: bool,
    /// Write both plans (ranks, errors, memory estimates) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One plan's figures.
#[derive(Debug, Serialize)]
struct Plan {
    name: String,
    factor_params: usize,
    /// Σ over layers of the squared whitened error.
    squared_whitened_error: f64,
    /// Σ over layers of the squared whitened error relative to the layer's ‖W S‖².
    relative_squared_error: f64,
    memory: MemoryEstimate,
    ranks: BTreeMap<String, usize>,
}

/// What the memory estimate needs to know of the architecture.
#[derive(Debug, Clone, Copy)]
struct Shape {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    layers: usize,
    /// Floats kept per token and layer for the feed-forward block, per intermediate unit: 2 for
    /// BERT's GELU MLP (its input and output), 4 for SwiGLU (gate, up, their activation and
    /// product).
    mlp_factor: usize,
}

/// Bytes of fine-tuning an emulator in f32 (an estimate; see `estimate`).
#[derive(Debug, Clone, Copy, Serialize)]
struct MemoryEstimate {
    frozen_weights: u64,
    adapters_and_optimizer: u64,
    activations: u64,
    total: u64,
}

/// Frozen weights: dense parameters plus factors, 4 bytes each. Adapters: `r (d_in + d_out)`
/// per emulated layer, with gradient and AdamW's two moments: 16 bytes each. Activations kept for
/// the backward pass, per token and layer: about `8·h + mlp_factor·intermediate` floats (inputs
/// of every projection, attention output, norms, the MLP's inner activations) plus
/// `2·heads·seq` for the attention probabilities — a coarse count of what autodiff keeps, stated
/// as such.
fn estimate(
    shape: &Shape,
    dense_params: usize,
    factor_params: usize,
    adapter_params: usize,
    seq: usize,
    batch: usize,
) -> MemoryEstimate {
    let frozen_weights = 4 * (dense_params + factor_params) as u64;
    let adapters_and_optimizer = 16 * adapter_params as u64;
    let per_token_layer =
        8 * shape.hidden + shape.mlp_factor * shape.intermediate + 2 * shape.heads * seq;
    let activations = 4 * (batch * seq * shape.layers * per_token_layer) as u64;
    MemoryEstimate {
        frozen_weights,
        adapters_and_optimizer,
        activations,
        total: frozen_weights + adapters_and_optimizer + activations,
    }
}

/// Computes both plans, prints them and optionally writes the global one.
pub fn plan(args: &PlanArgs) -> CliResult<()> {
    let config = args.emulator.config()?;
    let (spectra, num_params, shape) = match args.model.task_for(&args.data)?.1 {
        task @ (Task::Retrieval | Task::Classification) => {
            let texts =
                encoder_calibration_texts(task, &args.data, args.emulator.calibration_pairs)?;
            let (encoder, _) = args.model.load()?;
            let spectra = with_calibration(&encoder, &texts, |batches, forward| {
                whitened_spectra(&encoder.model, batches, |m: &BertModel, b| forward(m, b), &config)
            })??;
            let c: &BertConfig = encoder.config();
            let shape = Shape {
                hidden: c.hidden_size,
                intermediate: c.intermediate_size,
                heads: c.num_attention_heads,
                layers: c.num_hidden_layers,
                mlp_factor: 2,
            };
            (spectra, encoder.model.num_params(), shape)
        }
        Task::CausalLm => {
            if args.measure {
                return Err(
                    "--measure runs `bench-memory`, which measures sentence encoders only".into()
                );
            }
            let split = args.data.split_examples()?;
            let lm = args.model.load_decoder(&std::collections::BTreeSet::new())?;
            let sequences =
                causal::calibration_sequences(&lm, &split.train, args.emulator.calibration_pairs)?;
            let bar = progress(sequences.len(), "calibration");
            let spectra = whitened_spectra(
                &lm.model,
                sequences.iter(),
                |m: &LlamaForCausalLM, ids: &Vec<u32>| {
                    causal::forward_sequence(m, ids);
                    bar.inc(1);
                },
                &config,
            )?;
            bar.finish_and_clear();
            let c = &lm.config;
            let shape = Shape {
                hidden: c.hidden_size,
                intermediate: c.intermediate_size,
                heads: c.num_attention_heads,
                layers: c.num_hidden_layers,
                mlp_factor: 4,
            };
            (spectra, lm.model.num_params(), shape)
        }
    };

    let emulated_params: usize = spectra.iter().map(|s| s.d_in * s.d_out).sum();
    let dense_params = num_params - emulated_params;
    let adapter_params: usize = spectra.iter().map(|s| args.lora_rank * (s.d_in + s.d_out)).sum();
    let memory = |factor_params: usize| {
        estimate(&shape, dense_params, factor_params, adapter_params, args.seq_len, args.batch)
    };
    let make = |name: String, ranks: BTreeMap<String, usize>, spectra: &[LayerSpectrum]| {
        let (squared_whitened_error, factor_params) = allocation_cost(spectra, &ranks);
        let relative_squared_error = spectra
            .iter()
            .map(|s| {
                let total: f64 = s.singular_values.iter().map(|v| v * v).sum();
                if total > 0.0 { s.whitened_error(ranks[&s.path]).powi(2) / total } else { 0.0 }
            })
            .sum();
        Plan {
            name,
            factor_params,
            squared_whitened_error,
            relative_squared_error,
            memory: memory(factor_params),
            ranks,
        }
    };

    let uniform = make(
        format!("uniform ρ = {}", args.emulator.ratio),
        uniform_ranks(&spectra, args.emulator.ratio)?,
        &spectra,
    );
    let target = match (args.params, args.budget) {
        (Some(p), _) => p,
        (None, Some(budget)) => {
            let fixed = memory(0).total;
            if budget <= fixed {
                return Err(format!(
                    "--budget {budget} bytes is below what fine-tuning needs without any factor ({fixed} bytes: dense weights, adapters, optimizer, activations)"
                )
                .into());
            }
            ((budget - fixed) / 4) as usize
        }
        (None, None) => uniform.factor_params,
    };
    let objective = args.objective;
    let global = make(
        format!("global ({objective:?}), {target} factor parameters"),
        global_ranks(&spectra, target, objective)?,
        &spectra,
    );
    let original = estimate(
        &shape,
        dense_params + emulated_params,
        0,
        adapter_params,
        args.seq_len,
        args.batch,
    );

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "| plan | factor params | Σ squared whitened error | Σ relative squared error | frozen MiB | adapters+optimizer MiB | activations MiB | total MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| LoRA on the original (no emulator) | {emulated_params} | 0 | 0 | {:.1} | {:.1} | {:.1} | {:.1} |",
        mib(original.frozen_weights),
        mib(original.adapters_and_optimizer),
        mib(original.activations),
        mib(original.total)
    );
    for p in [&uniform, &global] {
        println!(
            "| {} | {} | {:.4} | {:.4} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.name,
            p.factor_params,
            p.squared_whitened_error,
            p.relative_squared_error,
            mib(p.memory.frozen_weights),
            mib(p.memory.adapters_and_optimizer),
            mib(p.memory.activations),
            mib(p.memory.total)
        );
    }
    if let Some(budget) = args.budget {
        let fits = global.memory.total <= budget;
        eprintln!(
            "budget {budget} bytes: the global plan's estimate {} bytes {}",
            global.memory.total,
            if fits { "fits" } else { "does not fit" }
        );
    }
    if let Some(out) = &args.out {
        write_json(out, &config_for_ranks(&global.ranks, &config))?;
        eprintln!(
            "global plan written to {} (use it with `emloc emulate --config` or `emloc run --config`)",
            out.display()
        );
    }
    if let Some(path) = &args.json {
        write_json(path, &[&uniform, &global])?;
    }
    if args.measure {
        measure(args, &global)?;
    }
    Ok(())
}

/// `--measure`: the global plan's emulator construction and fine-tuning peaks, measured.
fn measure(args: &PlanArgs, global: &Plan) -> CliResult<()> {
    let rules = args.out.as_ref().expect("clap: --measure requires --out");
    let work = rules.with_extension("measured");
    let mut bench: Vec<OsString> =
        vec!["bench-memory".into(), "--model".into(), args.model.resolve()?.into()];
    if let Some(data) = &args.data.data {
        bench.extend(["--data".into(), data.into()]);
    }
    for (flag, value) in [
        ("--max-seq-length", args.seq_len.to_string()),
        ("--validation", args.data.validation.to_string()),
        ("--split-seed", args.data.split_seed.to_string()),
        ("--calibration-pairs", args.emulator.calibration_pairs.to_string()),
        ("--batch-size", (args.batch / 2).max(1).to_string()),
        ("--rank", args.lora_rank.to_string()),
        ("--steps", "2".to_string()),
    ] {
        bench.extend([flag.into(), value.into()]);
    }
    bench.extend(["--config".into(), rules.into(), "--out".into(), work.clone().into()]);
    let built = run_phase_process(&bench, MemoryPhase::Emulate)?;
    let tuned = run_phase_process(&bench, MemoryPhase::FinetuneEmulator)?;
    let mib = |b: u64| format!("{:.0}", b as f64 / (1024.0 * 1024.0));
    let rss = |r: &PhaseResult| r.peak_rss_bytes.map_or_else(|| "-".into(), &mib);
    println!(
        "measured (each in its own process; emulator in {}):",
        work.join("emulator").display()
    );
    println!("| phase | estimate MiB | peak heap MiB | peak RSS MiB |");
    println!("|---|---:|---:|---:|");
    println!(
        "| emulator construction | - | {} | {} |",
        mib(built.peak_heap_bytes as u64),
        rss(&built)
    );
    println!(
        "| fine-tuning the global plan | {} | {} | {} |",
        mib(global.memory.total),
        mib(tuned.peak_heap_bytes as u64),
        rss(&tuned)
    );
    if let Some(budget) = args.budget {
        let measured = tuned.peak_rss_bytes.unwrap_or(tuned.peak_heap_bytes as u64);
        let what = if tuned.peak_rss_bytes.is_some() { "RSS" } else { "heap" };
        if measured <= budget {
            eprintln!(
                "budget {budget} bytes: measured fine-tuning peak {measured} bytes ({what}) fits"
            );
        } else {
            // What the estimate missed (activations, allocator and runtime overhead) is about
            // the same for every plan at this batch shape, so it comes off the budget.
            let missed = measured.saturating_sub(global.memory.total);
            eprintln!(
                "budget {budget} bytes: measured fine-tuning peak {measured} bytes ({what}) does NOT fit; the estimate missed {missed} bytes. {}",
                match budget.checked_sub(missed) {
                    Some(b) if b > global.memory.total - 4 * global.factor_params as u64 =>
                        format!("Plan again with --budget {b}."),
                    _ => "No plan fits at this batch shape: even without factors fine-tuning needs more; lower --batch or --seq-len.".into(),
                }
            );
        }
    }
    Ok(())
}
