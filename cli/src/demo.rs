//! `emloc demo`: the main job on its embedded default (a tiny transformer and a synthetic task),
//! comparing every way of fine-tuning it under one seed, step count and set of hyperparameters.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use clap::Args;
use emloc::{
    CorrectionConfig, EmulatorConfig, LoraConfig, WhiteningMethod, correct, emulate,
    export_adapter, merge_adapter, merge_attached_adapter,
};
use emloc_models::tiny::{SyntheticTask, TinyTransformer, TinyTransformerConfig, lora_targets};
use serde::Serialize;

use crate::progress::progress;

/// Options of `emloc demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep-ratio ρ of the emulator.
    #[arg(long, default_value_t = 0.4)]
    ratio: f64,
    /// LoRA rank (α = 2r).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Training steps for every fine-tuning row.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Strength of the task's planted change.
    #[arg(long, default_value_t = 0.5)]
    strength: f64,
    /// Random seed (model, task and adapter init).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Correction clamp L.
    #[arg(long, default_value_t = 3.0)]
    clamp: f64,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One row of the result table.
#[derive(Debug, Serialize)]
struct Row {
    method: String,
    held_out_mse: f32,
    /// Parameters of the model that was trained (frozen weights + adapters).
    training_model_params: usize,
    trainable_params: usize,
    wall_seconds: f64,
}

fn trainable(model: &TinyTransformer) -> usize {
    model
        .layers
        .iter()
        .flat_map(|b| [&b.query, &b.key, &b.value, &b.output, &b.up, &b.down])
        .filter_map(|l| l.lora.as_ref())
        .map(|l| {
            l.a.val().dims().iter().product::<usize>() + l.b.val().dims().iter().product::<usize>()
        })
        .sum()
}

/// Runs the demo and prints the table.
pub fn run(args: &DemoArgs) -> emloc::Result<()> {
    let device = Device::flex();
    device.seed(args.seed);
    let original = TinyTransformerConfig::new().init(&device);
    let task = SyntheticTask::new(&original, 2, args.strength, 12).with_skew(0.0);
    let lora = LoraConfig::new(args.rank)
        .with_alpha(2.0 * args.rank as f64)
        .with_target_modules(lora_targets());
    let calibration: Vec<_> = (0..4).map(|i| task.batch(16, 10_000 + i, &device)).collect();
    let mut rows = Vec::new();

    let finetune =
        |model: TinyTransformer, label: &str| -> emloc::Result<(TinyTransformer, usize, usize)> {
            let bar = progress(args.steps, label);
            device.seed(args.seed + 1);
            let tuned = task.finetune(model, &lora, args.steps, args.lr, &device, |_, loss| {
                bar.inc(1);
                bar.set_message(format!("loss {loss:.5}"));
            })?;
            bar.finish_and_clear();
            let params = tuned.num_params();
            let trained = trainable(&tuned);
            Ok((tuned, params, trained))
        };

    let started = Instant::now();
    rows.push(Row {
        method: "zero-shot (original model)".into(),
        held_out_mse: task.held_out_loss(&original, 8, &device),
        training_model_params: 0,
        trainable_params: 0,
        wall_seconds: started.elapsed().as_secs_f64(),
    });

    let started = Instant::now();
    let (tuned, params, trained) = finetune(original.clone(), "LoRA on the full model")?;
    rows.push(Row {
        method: "LoRA on the full model".into(),
        held_out_mse: task.held_out_loss(&merge_attached_adapter(tuned), 8, &device),
        training_model_params: params,
        trainable_params: trained,
        wall_seconds: started.elapsed().as_secs_f64(),
    });

    for (whitening, name) in
        [(WhiteningMethod::Cholesky, "EMLoC"), (WhiteningMethod::None, "plain SVD")]
    {
        let started = Instant::now();
        let config = EmulatorConfig::uniform(args.ratio).with_whitening(whitening);
        let (emulator, report) = emulate(
            original.clone(),
            calibration.clone(),
            |m: &TinyTransformer, batch| {
                m.forward(batch.tokens);
            },
            &config,
        )?;
        eprintln!(
            "{name} emulator at ρ = {}: {} layers, {} → {} parameters, mean relative whitened error {:.3}",
            args.ratio,
            report.layers.len(),
            report.params_original(),
            report.params_kept(),
            report.layers.iter().map(|l| l.relative_whitened_error).sum::<f64>()
                / report.layers.len() as f64
        );
        let (tuned, params, trained) = finetune(emulator, &format!("LoRA on the {name} emulator"))?;
        let build_and_train = started.elapsed().as_secs_f64();
        let variants: &[(bool, &str)] = if whitening == WhiteningMethod::Cholesky {
            &[(true, "corrected"), (false, "uncorrected")]
        } else {
            &[(true, "corrected")]
        };
        for &(corrected, label) in variants {
            let started = Instant::now();
            let adapter = if corrected {
                correct(&original, &tuned, &CorrectionConfig { clamp: args.clamp })?.0
            } else {
                export_adapter(&tuned)?
            };
            let merged = merge_adapter(original.clone(), &adapter)?;
            rows.push(Row {
                method: format!("{name} ρ={} {label}, merged into the original", args.ratio),
                held_out_mse: task.held_out_loss(&merged, 8, &device),
                training_model_params: params,
                trainable_params: trained,
                wall_seconds: build_and_train + started.elapsed().as_secs_f64(),
            });
        }
    }

    println!("| method | held-out MSE | params of the trained model | trainable | wall s |");
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.5} | {} | {} | {:.1} |",
            row.method,
            row.held_out_mse,
            row.training_model_params,
            row.trainable_params,
            row.wall_seconds
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&rows).expect("rows serialize");
        emloc::io::write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}
