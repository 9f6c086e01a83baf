//! `emloc run --recipe qwen-coder-scale`: the paper's central comparison on a real model pair.
//! With the memory that LoRA fine-tuning of a *small* model of a family needs, fine-tune the
//! *large* one through its emulator, and compare both on the eight BIG-bench tasks of the LLM
//! recipe ([`crate::run_causal`], whose rows and scoring this reuses). Rows: zero-shot small and
//! large; LoRA on the small model (whose measured fine-tuning memory is the budget); LoRA on
//! the large model (the upper bound); QLoRA-style LoRA on the large model (its projections in
//! the GGUF's quantized blocks, unless `--rows headline`); EMLoC on the large model with the
//! largest uniform ρ whose
//! emulator fits the budget (sized from the measured rows: [`emloc::emulator::largest_ratio`]),
//! corrected and uncorrected; and the constructions `--constructions` asks for at that size.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::module::Module;
use emloc::EmulatorConfig;
use emloc::emulator::{LayerRule, largest_ratio};
use emloc_models::causal_lm::{self, CausalLm, Example};
use emloc_models::gguf::load_gguf_quantized;
use emloc_models::llama::LlamaForCausalLM;
use serde::Serialize;

use crate::CliResult;
use crate::args::{ModelArgs, TrainArgs};
use crate::causal::{build_emulator, build_emulator_streaming, calibration_sequences};
use crate::memory::{Phase, param_bytes};
use crate::output::write_report;
use crate::run::{Rows, RunArgs, Variant, construction_variants, log_emulator};
use crate::run_causal::{
    Context, Row, Scores, TaskData, cut_model_row, default_model_path, full_lora_row, gain_share,
    inference_bytes, print_table, split_tasks, train_correct_score, zero_shot_row,
};

/// How the emulator was sized to the small model's fine-tuning memory.
#[derive(Debug, Serialize)]
struct Sizing {
    /// Heap LoRA fine-tuning of the small model needs (the budget).
    budget_bytes: usize,
    /// What LoRA training of the large model allocated besides its parameters (activations,
    /// gradients, adapter and optimizer state), assumed the same for its emulator.
    training_overhead_bytes: usize,
    /// Bytes per frozen parameter of the large model (its `--dtype`).
    bytes_per_param: f64,
    /// Parameters the emulator may keep: `(budget − overhead) / bytes per parameter`.
    max_params: usize,
    /// The largest ρ that fits with the embeddings and the output head dense (the paper's rules).
    ratio_head_dense: Option<f64>,
    /// The largest ρ that fits with the output head emulated too (only the embeddings dense).
    ratio_head_emulated: Option<f64>,
}

/// The large model emulated at `ratio`: every linear layer but the embeddings (and the output
/// head unless `emulate_head`).
fn scale_config(ratio: f64, emulate_head: bool, base: &EmulatorConfig) -> EmulatorConfig {
    let dense = if emulate_head { r"(?i).*embed.*" } else { r"(?i).*(embed|lm_head).*" };
    EmulatorConfig {
        rules: vec![LayerRule::full(dense), LayerRule::ratio(".*", ratio)],
        ..base.clone()
    }
}

/// One model of the pair, loaded, with its inference memory.
struct Loaded {
    path: PathBuf,
    lm: CausalLm,
    original: LlamaForCausalLM,
    inference: usize,
    /// `small model (0.49 B)`: the role and the parameter count.
    label: String,
}

/// Refuses a model path that does not exist, saying how to fetch it.
fn require(path: &Path, role: &str) -> CliResult<()> {
    if path.exists() {
        return Ok(());
    }
    let (fetch, option) =
        if role == "small" { ("0.5b", "--small-model") } else { ("1.5b", "--model") };
    Err(format!(
        "{}: no such model (the {role} model); fetch it with scripts/fetch_qwen_coder.sh {fetch}, \
         or name a Llama-family GGUF file or HF directory with {option}",
        path.display()
    )
    .into())
}

/// Loads the `role` model at `path` and measures its inference memory on the largest batch.
fn load(
    args: &RunArgs,
    path: PathBuf,
    role: &str,
    train: &[Example],
    batch: usize,
) -> CliResult<Loaded> {
    let model_args = ModelArgs { model: Some(path.clone()), ..args.model.clone() };
    let lm = model_args.load_decoder(&BTreeSet::new())?;
    let original = model_args.device.cast(lm.model.clone());
    let inference = inference_bytes(&lm, &original, train, batch)?;
    let params = original.num_params() as f64;
    let size = if params >= 1e9 {
        format!("{:.2} B", params / 1e9)
    } else {
        format!("{:.1} M", params / 1e6)
    };
    let label = format!("{role} model ({size})");
    eprintln!(
        "{label}: {}; running it on the largest training batch needs {} MiB",
        path.display(),
        inference >> 20
    );
    Ok(Loaded { path, lm, original, inference, label })
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    recipe: &'static str,
    small_model: String,
    large_model: String,
    split_seed: u64,
    validation_per_task: usize,
    train_per_task: Vec<(&'static str, usize)>,
    train: &'a TrainArgs,
    small_inference_bytes: usize,
    large_inference_bytes: usize,
    sizing: Sizing,
    rows: Vec<Row>,
    emulators: Vec<(String, emloc::EmulatorReport)>,
    corrections: Vec<(String, emloc::CorrectionReport)>,
}

/// Checks the recipe's own options before any work.
fn validate(args: &RunArgs, train_args: &TrainArgs) -> CliResult<()> {
    if args.data.data.is_some() || args.emulator.config.is_some() {
        return Err("--recipe qwen-coder-scale reads the eight embedded BIG-bench tasks and \
                    sizes its emulator to the small model's memory; --data and --config are \
                    for the other recipes"
            .into());
    }
    if train_args.batch_size == 0 || train_args.steps == 0 {
        return Err("--steps and --batch-size must be at least 1".into());
    }
    Ok(())
}

/// The context of one model's rows.
fn context<'a>(
    model: &'a Loaded,
    tasks: &'a [TaskData],
    train: &'a [Example],
    args: &'a RunArgs,
    train_args: &'a TrainArgs,
) -> Context<'a> {
    Context {
        lm: &model.lm,
        original: &model.original,
        tasks,
        train,
        args,
        train_args,
        inference: model.inference,
    }
}

/// LoRA on the large model with its projections kept in the GGUF's own quantized blocks and
/// decoded layer by layer on the fly (QLoRA-style, [`load_gguf_quantized`]): the same frozen
/// values as the dequantized original, so the row trains what LoRA on the large model trains,
/// in less memory. The adapter is merged into the dequantized original.
fn qlora_row(
    args: &RunArgs,
    cx: &Context<'_>,
    large: &Loaded,
    recovered: &dyn Fn(&Scores) -> Option<f64>,
) -> CliResult<Row> {
    let row_phase = Phase::start();
    let (model, _) = load_gguf_quantized(&large.path, &args.model.device()?)?;
    let model = args.model.device.cast(model);
    let name =
        format!("QLoRA-style LoRA on the {} (projections in the GGUF's blocks)", large.label);
    cut_model_row(cx, &name, model, Ok, "large-qlora", &row_phase, recovered)
}

/// Sizes the large model's emulator to `budget` bytes of fine-tuning: what LoRA training of the
/// large model (`lora`, its row) allocated besides the frozen weights is taken as the emulator's
/// too, and the rest buys frozen parameters at the large model's bytes per parameter.
fn size_emulator(
    large: &LlamaForCausalLM,
    budget: usize,
    lora: &Row,
    base: &EmulatorConfig,
) -> CliResult<Sizing> {
    let large_bytes = param_bytes(large);
    let trained = lora.finetune_bytes.expect("a trained row has its memory");
    let overhead = trained.saturating_sub(large_bytes);
    let bytes_per_param = large_bytes as f64 / large.num_params() as f64;
    let max_params = (budget.saturating_sub(overhead) as f64 / bytes_per_param) as usize;
    let fit = |emulate_head: bool| {
        largest_ratio(large, |r| scale_config(r, emulate_head, base), max_params)
    };
    Ok(Sizing {
        budget_bytes: budget,
        training_overhead_bytes: overhead,
        bytes_per_param,
        max_params,
        ratio_head_dense: fit(false)?,
        ratio_head_emulated: fit(true)?,
    })
}

/// Runs the recipe with `train_args` (its defaults applied) and prints the table.
pub fn run(args: &RunArgs, train_args: &TrainArgs) -> CliResult<()> {
    validate(args, train_args)?;
    let (tasks, train) = split_tasks(args.data.validation, args.data.split_seed, args.train_pairs)?;
    let large_path = args.model.model.clone().unwrap_or_else(|| {
        default_model_path("EMLOC_QWEN_CODER_1_5B_GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    });
    let small_path = args.small_model.clone().unwrap_or_else(|| {
        default_model_path("EMLOC_QWEN_CODER_0_5B_GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    });
    require(&large_path, "large")?;
    require(&small_path, "small")?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let batch = train_args.batch_size;
    let mut rows = Vec::new();

    // The small model's rows first: its fine-tuning memory is the budget. It is dropped after.
    let (budget, small_label, small_inference) = {
        let small = load(args, small_path.clone(), "small", &train, batch)?;
        let cx = context(&small, &tasks, &train, args, train_args);
        let zero_shot = zero_shot_row(&cx, &format!("zero-shot, {}", small.label))?;
        let lora = full_lora_row(&cx, &format!("LoRA on the {}", small.label), "small-lora")?;
        let budget = lora.finetune_bytes.expect("a trained row has its memory");
        rows.extend([zero_shot, lora]);
        (budget, small.label, small.inference)
    };

    let large = load(args, large_path.clone(), "large", &train, batch)?;
    let calibration = calibration_sequences(&large.lm, &train, args.emulator.calibration_pairs)?;
    let cx = context(&large, &tasks, &train, args, train_args);
    let zero_shot = zero_shot_row(&cx, &format!("zero-shot, {}", large.label))?;
    let mut lora = full_lora_row(&cx, &format!("LoRA on the {}", large.label), "large-lora")?;
    let recovered = gain_share(&zero_shot, &lora);
    lora.gain_recovered = recovered(&lora.scores);

    let options = args.emulator.config()?;
    let base = EmulatorConfig { sequential: options.sequential, ..Default::default() }
        .with_whitening(options.whitening.method);
    let sizing = size_emulator(&large.original, budget, &lora, &base)?;
    eprintln!(
        "budget: {} MiB ({small_label}'s LoRA); the large model's training allocates {} MiB \
         besides its weights, which leaves {} parameters; largest ρ with the output head dense: \
         {}, with the head emulated too: {}",
        budget >> 20,
        sizing.training_overhead_bytes >> 20,
        sizing.max_params,
        sizing.ratio_head_dense.map_or_else(|| "none".into(), |r| format!("{r:.3}")),
        sizing.ratio_head_emulated.map_or_else(|| "none".into(), |r| format!("{r:.3}")),
    );
    rows.extend([zero_shot, lora]);
    if args.rows != Rows::Headline && causal_lm::is_gguf(&large.path) {
        rows.push(qlora_row(args, &cx, &large, &recovered)?);
    }

    let mut variants = Vec::new();
    let chosen = match (sizing.ratio_head_dense, sizing.ratio_head_emulated) {
        (Some(ratio), _) => Some((ratio, false)),
        (None, Some(ratio)) => Some((ratio, true)),
        (None, None) => None,
    };
    if let Some((ratio, emulate_head)) = chosen {
        // Three decimals, rounded down: still within the budget.
        let ratio = (ratio * 1000.0).floor() / 1000.0;
        let config = scale_config(ratio, emulate_head, &base);
        let head = if emulate_head { ", head emulated" } else { "" };
        let name = format!("EMLoC on the {} ρ = {ratio}{head}", large.label);
        variants.push(Variant {
            name,
            dir: format!("emloc-rho{ratio}"),
            ratio: Some(ratio),
            config: config.clone(),
            uncorrected_too: true,
            weighted_too: false,
        });
        let last = large.original.model.layers.len().saturating_sub(1);
        variants.extend(construction_variants(
            &args.constructions,
            &config,
            &format!("ρ = {ratio}"),
            &large.original,
            &format!(r"model\.layers\.(0|{last})"),
            &format!("model.layers.{last}.mlp.down_proj"),
        )?);
    } else {
        eprintln!(
            "no EMLoC row: the large model's dense embeddings alone leave no rank ≥ 1 for its \
             layers within {} MiB",
            budget >> 20
        );
    }
    let mut emulators = Vec::new();
    let mut corrections = Vec::new();
    for variant in &variants {
        let row_phase = Phase::start();
        // Block by block from the file unless calibration is sequential (whole model): the
        // whole-model calibration would hold every layer's Gram (28 × 8960² floats for the
        // down projections of a 1.5 B Qwen2) beside the original.
        let (emulator, report) = if variant.config.sequential.is_some() {
            build_emulator(large.original.clone(), &calibration, &variant.config)?
        } else {
            build_emulator_streaming(
                &large.lm.source,
                &args.model.device()?,
                &calibration,
                &variant.config,
                args.model.device.float_dtype(),
            )?
        };
        log_emulator(&variant.name, &report, row_phase.elapsed_seconds());
        emulators.push((variant.name.clone(), report));
        let trained =
            train_correct_score(&cx, variant, emulator, &row_phase, &recovered, &mut corrections)?;
        for row in &trained {
            if let Some(bytes) = row.finetune_bytes.filter(|&b| b > budget) {
                eprintln!(
                    "{}: needs {} MiB, above the {} MiB budget",
                    row.method,
                    bytes >> 20,
                    budget >> 20
                );
            }
        }
        rows.extend(trained);
    }

    print_table(&rows, &tasks);
    let report = Report {
        recipe: "qwen-coder-scale",
        small_model: small_path.display().to_string(),
        large_model: large.path.display().to_string(),
        split_seed: args.data.split_seed,
        validation_per_task: args.data.validation,
        train_per_task: tasks.iter().map(|t| (t.task.short, t.train)).collect(),
        train: train_args,
        small_inference_bytes: small_inference,
        large_inference_bytes: large.inference,
        sizing,
        rows,
        emulators,
        corrections,
    };
    write_report(&args.out, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_emulator_keeps_the_embeddings_dense_and_the_head_as_asked() {
        let base = EmulatorConfig::default();
        for emulate_head in [false, true] {
            let config = scale_config(0.5, emulate_head, &base);
            let rank = |path: &str| config.rank_of(path, 64, 256).unwrap();
            assert_eq!(rank("model.embed_tokens"), None);
            assert_eq!(rank("lm_head").is_some(), emulate_head);
            assert_eq!(rank("model.layers.3.mlp.down_proj"), Some(25));
        }
    }
}
