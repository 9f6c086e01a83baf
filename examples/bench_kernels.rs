//! emloc's kernels against Burn's own ops on the device you pick: a quick side-by-side table.
//!
//! ```sh
//! cargo run --example bench_kernels                           # Flex (CPU)
//! cargo run --example bench_kernels --features wgpu -- wgpu   # emloc's CubeCL kernels over wgpu
//! cargo run --release --example bench_kernels --features cuda -- cuda 4096
//! ```
//!
//! Arguments: the device (`flex`, `wgpu` or `cuda`; default `flex`) and the layer width `d`
//! (default 512). Each row times one operation both ways on the same inputs, median of 5 after a
//! warm-up, synchronising the device after each call:
//! - the calibration statistic `XᵀX` of `[4d, d]` inputs: `emloc::ops::gram` (f32 accumulation,
//!   lower tiles only) vs Burn's `x.transpose().matmul(x)`;
//! - an emulator layer with its adapter, forward and backward (`emloc::ops::lowrank_lora`, one
//!   fused op on CubeCL devices) vs the same maths as unfused Burn ops, keep-ratio 0.4, r = 8;
//! - whitening's Cholesky `G = L Lᵀ` (`emloc::ops::cholesky`) vs faer's `llt` on the host in f64.
//!
//! For statistically careful numbers (criterion, several sizes and dtypes) use
//! `cargo bench -p emloc --features wgpu --bench kernels`; the results are in BENCHMARKS.md.

use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, Tensor};
use emloc::ops;

fn pick_device(name: &str) -> Result<Device, String> {
    let missing = || format!("device `{name}` needs `--features {name}`");
    match name {
        "flex" => Ok(Device::flex()),
        "wgpu" => wgpu().ok_or_else(missing),
        "cuda" => cuda().ok_or_else(missing),
        other => Err(format!("unknown device `{other}` (flex, wgpu or cuda)")),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Option<Device> {
    Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Option<Device> {
    None
}

#[cfg(feature = "cuda")]
fn cuda() -> Option<Device> {
    Some(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Option<Device> {
    None
}

/// Median wall time of `f` over 5 runs after one warm-up, the device synchronised after each.
fn median(device: &Device, mut f: impl FnMut()) -> Duration {
    f();
    device.sync().expect("device sync");
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            device.sync().expect("device sync");
            start.elapsed()
        })
        .collect();
    times.sort();
    times[2]
}

fn row(name: &str, emloc: Duration, burn: Duration, peer: &str) {
    let ratio = emloc.as_secs_f64() / burn.as_secs_f64();
    println!("{name:<28} {:>10.2} ms {:>10.2} ms {ratio:>7.2}×  ({peer})", ms(emloc), ms(burn));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = pick_device(args.first().map_or("flex", String::as_str))?;
    let d: usize = args.get(1).map_or(Ok(512), |s| s.parse()).map_err(|e| format!("width: {e}"))?;
    let normal = Distribution::Normal(0.0, 1.0);
    println!(
        "device {device:?}, d = {d}\n{:<28} {:>13} {:>13} {:>8}",
        "operation", "emloc", "peer", "ratio"
    );

    // Gram of [4d, d] inputs.
    let x = Tensor::<2>::random([4 * d, d], normal, &device);
    let emloc_gram = median(&device, || drop(ops::gram(x.clone())));
    let burn_gram = median(&device, || drop(x.clone().transpose().matmul(x.clone())));
    row("gram XᵀX", emloc_gram, burn_gram, "Burn matmul");

    // Emulator layer (k = 0.2 d, keep-ratio 0.4 of a square layer) + LoRA r = 8, fwd + bwd.
    let (k, r, scale) = (d / 5, 8, 2.0);
    let train = device.clone().autodiff();
    let weights = |shape: [usize; 2]| {
        Tensor::<2>::random(shape, normal, &train).mul_scalar(1.0 / (shape[0] as f64).sqrt())
    };
    let (w_v, w_u) = (weights([d, k]), weights([k, d]));
    let (a, b) = (weights([d, r]).require_grad(), weights([r, d]).require_grad());
    let input = Tensor::<2>::random([4 * d, d], normal, &train).require_grad();
    let fused = || {
        let y = ops::lowrank_lora(
            input.clone(),
            None,
            w_v.clone(),
            w_u.clone(),
            a.clone(),
            b.clone(),
            None,
            scale,
        );
        drop(y.sum().backward());
    };
    let unfused = || {
        let base = input.clone().matmul(w_v.clone()).matmul(w_u.clone());
        let y = base + input.clone().matmul(a.clone()).matmul(b.clone()).mul_scalar(scale);
        drop(y.sum().backward());
    };
    row(
        "low-rank + LoRA fwd+bwd",
        median(&device, fused),
        median(&device, unfused),
        "Burn ops, unfused",
    );

    // Cholesky of a well-conditioned Gram, on the device vs faer on the host in f64.
    let g = ops::gram(x.clone()).div_scalar((4 * d) as f64);
    let host: Vec<f32> = g.to_data().try_to_vec().expect("f32");
    let emloc_chol = median(&device, || drop(ops::cholesky(g.clone(), 0.0, 0.0).expect("SPD")));
    let faer_g = faer::Mat::<f64>::from_fn(d, d, |i, j| host[i * d + j] as f64);
    let faer_time = median(&device, || drop(faer_g.llt(faer::Side::Lower).expect("SPD")));
    row("Cholesky", emloc_chol, faer_time, "faer f64 on the host");
    Ok(())
}
