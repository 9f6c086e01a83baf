//! `emloc bench-correction`: P6, the time of the closed-form correction per 100 M parameters of
//! adapted layers, on square random layers (the correction's cost depends on the shapes, the
//! emulator rank and the LoRA rank, not on the weights' values).

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;
use emloc::nn::{Linear, LinearConfig};
use emloc::{CorrectionConfig, EmulatorConfig, LoraConfig, attach_new_adapter, correct, emulate};

use crate::CliResult;

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
    let original = Stack {
        layers: (0..args.layers)
            .map(|_| LinearConfig::new(args.dim, args.dim).init(&device))
            .collect(),
    };
    let calibration: Vec<Tensor<2>> = (0..2)
        .map(|_| Tensor::random([args.dim, args.dim], Distribution::Normal(0.0, 1.0), &device))
        .collect();
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
    let (mut tuned, _) = attach_new_adapter(
        emulator,
        &LoraConfig::new(args.rank).with_alpha(2.0 * args.rank as f64),
    )?;
    // A trained adapter has B ≠ 0; random values cost the same as trained ones.
    for layer in &mut tuned.layers {
        let lora = layer.lora.as_mut().expect("attached");
        let dims = lora.b.val().dims();
        lora.b = Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.01), &device));
    }
    let mut seconds: Vec<f64> = (0..args.repeats)
        .map(|_| {
            correct(&original, &tuned, &CorrectionConfig::default())
                .map(|(_, report)| report.seconds)
        })
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

/// Options of `emloc bench-svd`.
#[derive(Args, Debug)]
pub struct BenchSvdArgs {
    /// Layer widths (square layers d × d).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 2048])]
    dims: Vec<usize>,
    /// Keep-ratio ρ (rank ⌊ρ d / 2⌋ for a square layer).
    #[arg(long, default_value_t = 0.4)]
    ratio: f64,
    /// Oversampling of the randomized SVD.
    #[arg(long, default_value_t = 10)]
    oversample: usize,
    /// Power iterations of the randomized SVD.
    #[arg(long, default_value_t = 2)]
    power_iterations: usize,
}

/// P2: whitening (Cholesky) + truncated SVD of one layer, exact vs randomized, side by side.
/// The peer script `benches/peers/svd_peer.py` times numpy/scipy on the same construction.
pub fn bench_svd(args: &BenchSvdArgs) -> CliResult<()> {
    use emloc::Matrix;
    use emloc::emulator::{SvdMethod, WhiteningConfig, factorize_layer};
    println!(
        "| d | rank | exact s | randomized s | speed-up | exact rel. error | randomized rel. error |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &d in &args.dims {
        let rank = ((args.ratio * (d * d) as f64 / (2 * d) as f64).floor() as usize).max(1);
        let device = Device::flex();
        device.seed(d as u64);
        // Weight N(0, 1/d); calibration tokens with unequal column scales, as real activations.
        let weight = Tensor::<2>::random(
            [d, d],
            Distribution::Normal(0.0, 1.0 / (d as f64).sqrt()),
            &device,
        );
        let scales = Tensor::<1>::from_data(
            (0..d).map(|j| 1.0 + 8.0 / (1.0 + j as f32)).collect::<Vec<_>>().as_slice(),
            &device,
        );
        let x = Tensor::<2>::random([2 * d, d], Distribution::Normal(0.0, 1.0), &device)
            * scales.unsqueeze::<2>();
        let gram = Matrix::from_tensor(x.clone().transpose().matmul(x));
        let weight = Matrix::from_tensor(weight);
        let time = |config: &WhiteningConfig| -> CliResult<(f64, f64)> {
            let started = std::time::Instant::now();
            let f = factorize_layer("bench", &weight, &gram, rank, config)?;
            Ok((started.elapsed().as_secs_f64(), f.whitened_error / f.whitened_norm))
        };
        let (exact_s, exact_err) = time(&WhiteningConfig::default())?;
        let randomized = WhiteningConfig {
            svd: SvdMethod::Randomized {
                oversample: args.oversample,
                power_iterations: args.power_iterations,
            },
            ..WhiteningConfig::default()
        };
        let (fast_s, fast_err) = time(&randomized)?;
        println!(
            "| {d} | {rank} | {exact_s:.2} | {fast_s:.2} | {:.1}× | {exact_err:.5} | {fast_err:.5} (+{:.2} %) |",
            exact_s / fast_s,
            100.0 * (fast_err / exact_err - 1.0)
        );
    }
    Ok(())
}

/// Options of `emloc bench-layer`.
#[derive(Args, Debug)]
pub struct BenchLayerArgs {
    /// Input features.
    #[arg(long, default_value_t = 2048)]
    d_in: usize,
    /// Output features.
    #[arg(long, default_value_t = 2048)]
    d_out: usize,
    /// Tokens per batch (rows of x).
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Emulator keep-ratio ρ.
    #[arg(long, default_value_t = 0.4)]
    ratio: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Timed repetitions of each variant, interleaved (the medians are reported).
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    /// `flex` (the CPU backend), or `auto`: Burn's default device, which `BURN_DEVICE` picks
    /// (e.g. `BURN_DEVICE=cuda` in a build with `--features emloc/cuda`); on a CubeCL device the
    /// emulator layer runs emloc's fused kernel.
    #[arg(long, default_value = "flex", value_parser = ["flex", "auto"])]
    device: String,
}

/// P3: one training step's forward + backward through one layer with LoRA (gradients for the
/// input, `A` and `B`; the base weight frozen), the emulator layer (ρ) against the dense layer,
/// timed alternately in one run on the same input and output gradient.
pub fn bench_layer(args: &BenchLayerArgs) -> CliResult<()> {
    if args.d_in == 0 || args.d_out == 0 || args.tokens == 0 || args.rank == 0 || args.repeats == 0
    {
        return Err("--d-in, --d-out, --tokens, --rank and --repeats must be at least 1".into());
    }
    if !(args.ratio > 0.0 && args.ratio <= 1.0) {
        return Err(format!("--ratio {} must be in (0, 1]", args.ratio).into());
    }
    let device = if args.device == "auto" { Device::default() } else { Device::flex() };
    eprintln!("device: {device:?}");
    device.seed(3);
    let dense = Stack { layers: vec![LinearConfig::new(args.d_in, args.d_out).init(&device)] };
    let calibration: Vec<Tensor<2>> = vec![Tensor::random(
        [args.tokens.max(args.d_in), args.d_in],
        Distribution::Normal(0.0, 1.0),
        &device,
    )];
    let (emulator, report) = emulate(
        dense.clone(),
        calibration,
        |m: &Stack, x| {
            m.layers[0].forward(x);
        },
        &EmulatorConfig::all_layers(args.ratio),
    )?;
    let lora = LoraConfig::new(args.rank).with_alpha(2.0 * args.rank as f64);
    let train_device = device.clone().autodiff();
    let dense = attach_new_adapter(dense, &lora)?.0.train();
    let emulator = attach_new_adapter(emulator, &lora)?.0.train();
    let x = Tensor::<2>::random(
        [args.tokens, args.d_in],
        Distribution::Normal(0.0, 1.0),
        &train_device,
    );
    let upstream = Tensor::<2>::random(
        [args.tokens, args.d_out],
        Distribution::Normal(0.0, 1.0),
        &train_device,
    );
    // One step: y = layer(x), loss = Σ y ⊙ g (so dL/dy = g), backward, read the gradients.
    let step = |model: &Stack| -> f64 {
        let started = std::time::Instant::now();
        let input = x.clone().detach().require_grad();
        let y = model.layers[0].forward(input.clone());
        let grads = (y * upstream.clone()).sum().backward();
        let lora = model.layers[0].lora.as_ref().expect("attached");
        let grad_x = input.grad(&grads).expect("x is tracked");
        let grad_a = lora.a.grad(&grads).expect("A is trainable");
        let grad_b = lora.b.grad(&grads).expect("B is trainable");
        // Reading a value waits for any asynchronous backend.
        std::hint::black_box((
            grad_x.sum().into_scalar::<f32>(),
            grad_a.sum().into_scalar::<f32>(),
            grad_b.sum().into_scalar::<f32>(),
        ));
        started.elapsed().as_secs_f64()
    };
    step(&dense);
    step(&emulator);
    let (mut dense_s, mut emulator_s) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        dense_s.push(step(&dense));
        emulator_s.push(step(&emulator));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (dense_s, emulator_s) = (median(dense_s), median(emulator_s));
    println!(
        "layer {}×{} (d_in × d_out), {} tokens, LoRA r {}, forward + backward (grad x, A, B), median of {}:",
        args.d_in, args.d_out, args.tokens, args.rank, args.repeats
    );
    println!("| variant | ms | × dense |");
    println!("|---|---:|---:|");
    println!("| dense frozen layer + LoRA | {:.1} | 1.00 |", dense_s * 1e3);
    println!(
        "| emulator layer (ρ {}, rank {}) + LoRA | {:.1} | {:.2} |",
        args.ratio,
        report.layers[0].rank,
        emulator_s * 1e3,
        emulator_s / dense_s
    );
    Ok(())
}
