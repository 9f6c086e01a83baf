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
//!
//! `bench_kernels DEVICE --sweep gpu|quick` instead times every shape and dtype of
//! `benches/gpu_sizes.json` (the sizes `benches/peers/gpu_peer.py` gives PyTorch) and prints one
//! JSON object per line: the Gram, the fused layer's forward + backward on each
//! [`ops::ProductRoute`] and as unfused Burn ops, the bytes the layer's autograph holds between
//! forward and backward (measured on the device's allocator), Cholesky + solve, and a bf16 Gram
//! past 2³² elements checked against its known value (64-bit addressing). `benches/gpu.sh`
//! runs it on the lent GPU.

use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use emloc::ops::{self, ProductRoute};
use serde_json::{Value, json};

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
fn median(device: &Device, f: impl FnMut()) -> Duration {
    Duration::from_secs_f64(median_of(device, 5, f))
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
    if args.get(1).is_some_and(|a| a == "--sweep") {
        let name = args.get(2).ok_or("--sweep needs a size set: gpu or quick")?;
        return sweep(&device, name);
    }
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
    let layer = LayerBench::new(&device, FloatDType::F32, d, 4 * d, d / 5, 8);
    row(
        "low-rank + LoRA fwd+bwd",
        median(&device, || layer.step(true)),
        median(&device, || layer.step(false)),
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

/// Median time of `f` over `repeats` runs after one warm-up (device synchronised after each).
fn median_of(device: &Device, repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    device.sync().expect("device sync");
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            device.sync().expect("device sync");
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn dtype_of(name: &str) -> Result<FloatDType, String> {
    match name {
        "f32" => Ok(FloatDType::F32),
        "f16" => Ok(FloatDType::F16),
        "bf16" => Ok(FloatDType::BF16),
        other => Err(format!("unknown dtype `{other}` in gpu_sizes.json")),
    }
}

fn pairs(set: &Value, key: &str) -> Vec<(usize, usize)> {
    set[key]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|p| Some((p[0].as_u64()? as usize, p[1].as_u64()? as usize)))
                .collect()
        })
        .unwrap_or_default()
}

fn emit(line: Value) {
    println!("{line}");
}

const ROUTES: [(&str, ProductRoute); 3] = [
    ("emloc_auto", ProductRoute::Auto),
    ("emloc_tiled", ProductRoute::Tiled),
    ("emloc_matmul", ProductRoute::Matmul),
];

/// The sweep of `benches/gpu_sizes.json`'s set `name`, as JSON lines on stdout.
fn sweep(device: &Device, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Value = serde_json::from_str(include_str!("../benches/gpu_sizes.json"))?;
    let set = &sizes[name];
    if set.is_null() {
        return Err(format!("no size set `{name}` in benches/gpu_sizes.json").into());
    }
    let repeats = set["repeats"].as_u64().unwrap_or(5) as usize;
    let keep = set["keep"].as_f64().unwrap_or(0.4);
    let rank = set["rank"].as_u64().unwrap_or(16) as usize;
    let normal = Distribution::Normal(0.0, 1.0);
    emit(json!({"op": "device", "device": format!("{device:?}")}));
    for dtype_name in set["dtypes"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let dtype = dtype_of(dtype_name)?;
        if !device.supports_dtype(dtype) {
            emit(json!({"op": "skip", "dtype": dtype_name, "why": "unsupported on this device"}));
            continue;
        }
        for (d, tokens) in pairs(set, "gram") {
            let x = Tensor::<2>::random([tokens, d], normal, device).cast(dtype);
            let flops = 2.0 * tokens as f64 * (d * d) as f64;
            let row = |imp: &str, seconds: f64| {
                emit(json!({"op": "gram", "impl": imp, "dtype": dtype_name, "d": d,
                    "tokens": tokens, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12}));
            };
            for (imp, route) in ROUTES {
                let t = ops::with_product_route(route, || {
                    median_of(device, repeats, || drop(ops::gram(x.clone())))
                });
                row(imp, t);
            }
            let t = median_of(device, repeats, || drop(x.clone().transpose().matmul(x.clone())));
            row("burn_matmul", t);
        }
        for (d, tokens) in pairs(set, "layer") {
            layer_rows(device, dtype, dtype_name, d, tokens, keep, rank, repeats);
        }
    }
    for d in set["cholesky"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
        let d = d as usize;
        let x = Tensor::<2>::random([4 * d, d], normal, device);
        let g = ops::gram(x).div_scalar((4 * d) as f64);
        let rhs = Tensor::<2>::random([d / 4, d], normal, device);
        let t = median_of(device, repeats, || {
            let l = ops::cholesky(g.clone(), 0.0, 0.0).expect("SPD").l;
            drop(ops::solve_lower_right(rhs.clone(), l, false).expect("solve"));
        });
        emit(json!({"op": "cholesky_solve", "impl": "emloc", "dtype": "f32", "d": d,
            "ms": t * 1e3}));
    }
    if let Some(large) = set["large_gram"].as_array() {
        let dim = |i: usize| large[i].as_u64().unwrap_or(0) as usize;
        large_gram(device, dim(0), dim(1));
    }
    Ok(())
}

/// An emulator layer `[d, d]` of rank `k` with a rank-`r` adapter on an autodiff device, its
/// input (`tokens` rows, tracked) and an output gradient.
struct LayerBench {
    input: Tensor<2>,
    w_v: Tensor<2>,
    w_u: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    bias: Tensor<1>,
    dy: Tensor<2>,
}

impl LayerBench {
    const SCALE: f64 = 2.0;

    fn new(
        device: &Device,
        dtype: FloatDType,
        d: usize,
        tokens: usize,
        k: usize,
        r: usize,
    ) -> Self {
        let normal = Distribution::Normal(0.0, 1.0);
        let train = device.clone().autodiff();
        let random = |shape: [usize; 2], scale: f64| {
            Tensor::<2>::random(shape, normal, &train).mul_scalar(scale).cast(dtype)
        };
        let weights = |shape: [usize; 2]| random(shape, 1.0 / (shape[0] as f64).sqrt());
        Self {
            w_v: weights([d, k]),
            w_u: weights([k, d]),
            a: weights([d, r]).require_grad(),
            b: weights([r, d]).require_grad(),
            bias: Tensor::<1>::zeros([d], &train).cast(dtype),
            input: random([tokens, d], 1.0).require_grad(),
            dy: random([tokens, d], 1.0),
        }
    }

    /// `(x W_v) W_u + s (x A) B + b`: emloc's fused op, or the same maths as Burn ops.
    fn forward(&self, fused: bool) -> Tensor<2> {
        let (x, s) = (self.input.clone(), Self::SCALE);
        let (w_v, w_u, a, b) = (self.w_v.clone(), self.w_u.clone(), self.a.clone(), self.b.clone());
        if fused {
            ops::lowrank_lora(x, None, w_v, w_u, a, b, Some(self.bias.clone()), s)
        } else {
            let base = x.clone().matmul(w_v).matmul(w_u);
            base + x.matmul(a).matmul(b).mul_scalar(s) + self.bias.clone().unsqueeze::<2>()
        }
    }

    /// Forward and backward (gradients for x, A and B).
    fn step(&self, fused: bool) {
        drop((self.forward(fused) * self.dy.clone()).sum().backward());
    }
}

/// The fused layer, fwd + bwd, on each route and as unfused Burn ops; then the bytes its
/// autograph holds between forward and backward.
#[allow(clippy::too_many_arguments)]
fn layer_rows(
    device: &Device,
    dtype: FloatDType,
    dtype_name: &str,
    d: usize,
    tokens: usize,
    keep: f64,
    rank: usize,
    repeats: usize,
) {
    let (k, r) = (((keep * d as f64) as usize).max(1), rank);
    let layer = LayerBench::new(device, dtype, d, tokens, k, r);
    // Forward products x W_v, h_v W_u, x A, h_l B; the backward's (dh, dx, dA, dB) about as many.
    let n = tokens as f64;
    let flops = 2.0 * n * (2.0 * (d * k) as f64 + 2.0 * (d * r) as f64) * 2.0;
    let row = |imp: &str, seconds: f64| {
        emit(json!({"op": "layer_fwd_bwd", "impl": imp, "dtype": dtype_name, "d": d,
            "tokens": tokens, "k": k, "r": r, "ms": seconds * 1e3,
            "tflops": flops / seconds / 1e12}));
    };
    for (imp, route) in ROUTES {
        let time = || median_of(device, repeats, || layer.step(true));
        row(imp, ops::with_product_route(route, time));
    }
    row("burn_unfused", median_of(device, repeats, || layer.step(false)));

    // Held bytes: allocator's bytes in use after the forward, less the output (second run).
    let in_use = || {
        device.sync().expect("device sync");
        device.memory_pool_usage().map(|u| u.bytes_in_use as i64)
    };
    let elem = burn::tensor::DType::from(dtype).size();
    for (imp, fused) in [("emloc_auto", true), ("burn_unfused", false)] {
        let mut held = None;
        for _ in 0..2 {
            let Some(before) = in_use() else { break };
            let y = layer.forward(fused);
            held = in_use().map(|after| after - before - (tokens * d * elem) as i64);
            drop(y);
        }
        if let Some(bytes) = held {
            emit(json!({"op": "layer_held_bytes", "impl": imp, "dtype": dtype_name, "d": d,
                "tokens": tokens, "k": k, "r": r, "bytes": bytes,
                "h_l_bytes": tokens * r * elem,
                "previous_emloc_bytes": tokens * (k + r) * elem}));
        }
    }
}

/// A half-precision (bf16, else f16) Gram over more than 2³² elements on the tiled core (64-bit
/// indices), against its known value: the last row is ones and every other row zero, so `G` is
/// all ones; 32-bit indices would wrap the last row onto the first and give zeros.
fn large_gram(device: &Device, tokens: usize, d: usize) {
    let elements = tokens * d;
    let Some((dtype, name)) = [(FloatDType::BF16, "bf16"), (FloatDType::F16, "f16")]
        .into_iter()
        .find(|(dtype, _)| device.supports_dtype(*dtype))
    else {
        emit(json!({"op": "large_gram", "skip": "no half-precision dtype on this device"}));
        return;
    };
    let x = Tensor::<2>::zeros([tokens, d], device).cast(dtype);
    let ones = Tensor::<2>::ones([1, d], device).cast(dtype);
    let x = x.slice_assign([tokens - 1..tokens, 0..d], ones);
    let start = Instant::now();
    let g = ops::with_product_route(ProductRoute::Tiled, || ops::gram(x.clone()));
    let values: Vec<f32> = g.into_data().try_to_vec().expect("an f32 Gram");
    let seconds = start.elapsed().as_secs_f64();
    let max_err = values.iter().fold(0.0f32, |m, v| m.max((v - 1.0).abs()));
    emit(json!({"op": "large_gram", "impl": "emloc_tiled", "dtype": name, "tokens": tokens,
        "d": d, "elements": elements, "past_u32": elements > u32::MAX as usize,
        "max_abs_error": max_err, "ok": max_err == 0.0, "seconds": seconds}));
}
