//! `emloc bench-correction`: P6, the time of the closed-form correction per 100 M parameters of
//! adapted layers, on square random layers (the correction's cost depends on the shapes, the
//! emulator rank and the LoRA rank, not on the weights' values).

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;
use emloc::nn::{Linear, LinearConfig};
use emloc::{CorrectionConfig, EmulatorConfig, LoraConfig, attach_lora, correct, emulate};

use crate::common::CliResult;

/// Options of `emloc bench-correction`.
#[derive(Args, Debug)]
pub struct BenchCorrectionArgs {
    /// Number of square layers.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Width of each layer (d_in = d_out).
    #[arg(long, default_value_t = 2048)]
    dim: usize,
    /// Emulator keep-ratio ρ.
    #[arg(long, default_value_t = 0.4)]
    ratio: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Independent square layers, each fed the same input.
#[derive(Module, Debug)]
struct Stack {
    layers: Vec<Linear>,
}

/// Builds, emulates and adapts the stack, then times `correct`.
pub fn bench_correction(args: &BenchCorrectionArgs) -> CliResult<()> {
    if args.layers == 0 || args.dim < 2 || args.repeats == 0 {
        return Err("--layers and --repeats must be at least 1, --dim at least 2".into());
    }
    let device = Device::flex();
    device.seed(1);
    let original = Stack { layers: (0..args.layers).map(|_| LinearConfig::new(args.dim, args.dim).init(&device)).collect() };
    let calibration: Vec<Tensor<2>> =
        (0..2).map(|_| Tensor::random([args.dim, args.dim], Distribution::Normal(0.0, 1.0), &device)).collect();
    eprintln!("building the emulator of {} layers {}×{} ...", args.layers, args.dim, args.dim);
    let (emulator, _) = emulate(
        original.clone(),
        calibration,
        |m: &Stack, x| {
            for layer in &m.layers {
                layer.forward(x.clone());
            }
        },
        &EmulatorConfig::all_layers(args.ratio),
    )?;
    let (mut tuned, _) = attach_lora(emulator, &LoraConfig::new(args.rank).with_alpha(2.0 * args.rank as f64))?;
    // A trained adapter has B ≠ 0; random values cost the same as trained ones.
    for layer in &mut tuned.layers {
        let lora = layer.lora.as_mut().expect("attached");
        let dims = lora.b.val().dims();
        lora.b = Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.01), &device));
    }
    let mut seconds: Vec<f64> = (0..args.repeats)
        .map(|_| correct(&original, &tuned, &CorrectionConfig::default()).map(|(_, report)| report.seconds))
        .collect::<emloc::Result<_>>()?;
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    let params = args.layers * args.dim * args.dim;
    println!(
        "correction of {} layers {}×{} ({:.1} M parameters, ρ {}, LoRA r {}): median {:.3} s of {:?} → {:.3} s per 100 M parameters",
        args.layers,
        args.dim,
        args.dim,
        params as f64 / 1e6,
        args.ratio,
        args.rank,
        median,
        seconds,
        median * 1e8 / params as f64
    );
    Ok(())
}
