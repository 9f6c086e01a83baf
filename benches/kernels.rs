//! emloc's kernels against Burn's own ops on the same device, measured side by side:
//!
//! - `gram/*`: `emloc::ops::gram(x)` (lower tiles only, f32 accumulation) vs Burn's `xᵀ @ x`;
//! - `lowrank_lora/*`: the fused layer's forward + backward (`emloc::ops::lowrank_lora` under
//!   autodiff) vs the same math as unfused Burn ops, `(x W_v) W_u + s (x A) B + b`, also under
//!   autodiff, with gradients for `x`, `A` and `B` only;
//! - `cholesky/*`: whitening's Cholesky + solve, `G = L Lᵀ` then `Y = X L⁻¹` (`X` `[d/4, d]`),
//!   with emloc's kernels (`emloc::ops::cholesky` + `solve_lower_right`, f32; the status read
//!   is the one sync) on data already on the device (`emloc_device`) and from host memory to
//!   host memory (`emloc_with_transfer`: upload `G` and `X`, factor, solve, download `Y`), and
//!   the factorization alone (`emloc_device_cholesky_only`), vs faer's `llt` + triangular solve
//!   on the host in f64 (what the emulator uses) and f32. emloc computes in f32.
//!
//! Device: CUDA with `--features cuda`, else wgpu with `--features wgpu` (lavapipe on CI
//! machines), else Flex. Sizes: small by default; `EMLOC_BENCH_SIZES=gpu` for GPU-sized problems.
//! Throughput is reported as the flops of the *full* products, so both columns compare directly.
//!
//! ```sh
//! cargo bench -p emloc --features wgpu --bench kernels
//! EMLOC_BENCH_SIZES=gpu cargo bench -p emloc --features cuda --bench kernels
//! ```

use std::time::Duration;

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use emloc::ops;

fn device() -> Device {
    #[cfg(feature = "cuda")]
    let device = Device::cuda(0);
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    let device = match Device::wgpu_options().init_with_setup() {
        Ok((device, setup)) => {
            let info = setup.adapter.get_info();
            eprintln!(
                "[emloc bench] wgpu adapter: {} ({:?}, {:?})",
                info.name, info.backend, info.device_type
            );
            device
        }
        Err(_) => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    };
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let device = Device::flex();
    eprintln!("[emloc bench] device: {device:?}");
    device
}

fn gpu_sizes() -> bool {
    std::env::var("EMLOC_BENCH_SIZES").is_ok_and(|v| v == "gpu")
}

fn random(rows: usize, cols: usize, scale: f64, device: &Device) -> Tensor<2> {
    let mut state = (rows * 31 + cols) as u64 | 1;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32 * scale as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

fn sync(device: &Device) {
    device.sync().expect("device sync");
}

fn bench_gram(c: &mut Criterion) {
    let device = device();
    let sizes: &[(usize, usize)] = if gpu_sizes() {
        &[(16384, 1024), (8192, 4096), (65536, 768)]
    } else {
        &[(2048, 256), (4096, 512)]
    };
    let mut dtypes = vec![FloatDType::F32];
    if device.supports_dtype(DType::F16) {
        dtypes.push(FloatDType::F16);
    }
    let mut group = c.benchmark_group("gram");
    for &dtype in &dtypes {
        for &(n, d) in sizes {
            let x = random(n, d, 1.0, &device).cast(dtype);
            sync(&device);
            group.throughput(Throughput::Elements((2 * n * d * d) as u64));
            let id = format!("{dtype:?}/{n}x{d}");
            group.bench_function(BenchmarkId::new("emloc_gram", &id), |bench| {
                bench.iter(|| {
                    let g = ops::gram(x.clone());
                    sync(&device);
                    g
                })
            });
            // Burn's product in the input dtype (what a user would write), and the f32
            // accumulation the statistic needs.
            group.bench_function(BenchmarkId::new("burn_xt_x", &id), |bench| {
                bench.iter(|| {
                    let g = x.clone().transpose().matmul(x.clone());
                    sync(&device);
                    g
                })
            });
            if dtype != FloatDType::F32 {
                group.bench_function(BenchmarkId::new("burn_xt_x_cast_f32", &id), |bench| {
                    bench.iter(|| {
                        let x = x.clone().cast(FloatDType::F32);
                        let g = x.clone().transpose().matmul(x);
                        sync(&device);
                        g
                    })
                });
            }
        }
    }
    group.finish();
}

struct LayerInputs {
    x: Tensor<2>,
    w_v: Tensor<2>,
    w_u: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    bias: Tensor<1>,
    dy: Tensor<2>,
}

fn bench_lowrank_lora(c: &mut Criterion) {
    let device = device().autodiff();
    // (tokens, d_in, k, r, d_out): keep-ratio 0.4 of square layers (k = 0.2 d), r = 8/16.
    let sizes: &[(usize, usize, usize, usize, usize)] = if gpu_sizes() {
        &[(8192, 4096, 819, 16, 4096), (16384, 1024, 204, 8, 1024), (8192, 4096, 1146, 16, 14336)]
    } else {
        &[(1024, 512, 102, 8, 512), (2048, 768, 153, 8, 768)]
    };
    let mut dtypes = vec![FloatDType::F32];
    if device.supports_dtype(DType::F16) {
        dtypes.push(FloatDType::F16);
    }
    let scale = 2.0;
    let mut group = c.benchmark_group("lowrank_lora");
    for &dtype in &dtypes {
        for &(n, d_in, k, r, d_out) in sizes {
            let s_in = 1.0 / (d_in as f64).sqrt();
            let t = |t: Tensor<2>| t.cast(dtype);
            let l = LayerInputs {
                x: t(random(n, d_in, 1.0, &device)),
                w_v: t(random(d_in, k, s_in, &device)),
                w_u: t(random(k, d_out, 1.0 / (k as f64).sqrt(), &device)),
                a: t(random(d_in, r, s_in, &device)),
                b: t(random(r, d_out, 0.1, &device)),
                bias: t(random(1, d_out, 0.1, &device)).reshape([d_out]),
                dy: t(random(n, d_out, 1.0, &device)),
            };
            sync(&device);
            // Forward 2 GEMMs of n·d_in·(k+r)… counted as the unfused math's flops: forward
            // n(d_in k + k d_out + d_in r + r d_out), backward twice that (dx, dA, dB).
            let fwd = n * (d_in * k + k * d_out + d_in * r + r * d_out);
            group.throughput(Throughput::Elements((2 * 3 * fwd) as u64));
            let id = format!("{dtype:?}/n{n}_din{d_in}_k{k}_r{r}_dout{d_out}");
            let step = |fused: bool| {
                let x = l.x.clone().require_grad();
                let a = l.a.clone().require_grad();
                let b = l.b.clone().require_grad();
                let y = if fused {
                    ops::lowrank_lora(
                        x.clone(),
                        None,
                        l.w_v.clone(),
                        l.w_u.clone(),
                        a.clone(),
                        b.clone(),
                        Some(l.bias.clone()),
                        scale,
                    )
                } else {
                    x.clone().matmul(l.w_v.clone()).matmul(l.w_u.clone())
                        + x.clone().matmul(a.clone()).matmul(b.clone()).mul_scalar(scale)
                        + l.bias.clone().unsqueeze::<2>()
                };
                let grads = (y * l.dy.clone()).sum().backward();
                let out = (x.grad(&grads), a.grad(&grads), b.grad(&grads));
                sync(&device);
                out
            };
            group.bench_function(BenchmarkId::new("emloc_fused_fwd_bwd", &id), |bench| {
                bench.iter(|| step(true))
            });
            group.bench_function(BenchmarkId::new("burn_unfused_fwd_bwd", &id), |bench| {
                bench.iter(|| step(false))
            });
        }
    }
    group.finish();
}

/// A well-conditioned SPD matrix `AᵀA / d + I` (`[d, d]`, row-major `f32`) and an `X` `[k, d]`.
fn spd_and_rhs(d: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let flex = Device::flex();
    let a = random(d, d, 1.0, &flex);
    let g = a.clone().transpose().matmul(a).div_scalar(d as f64) + Tensor::<2>::eye(d, &flex);
    let x = random(k, d, 1.0, &flex);
    let host = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().expect("f32");
    (host(g), host(x))
}

/// faer's Cholesky and `Y = X L⁻¹` (as `L⁻ᵀ Xᵀ`, an upper-triangular solve), as in
/// `emloc::emulator::factorize`.
fn faer_cholesky_solve<T: faer::traits::RealField + Copy>(
    g: faer::MatRef<'_, T>,
    xt: faer::MatRef<'_, T>,
) -> faer::Mat<T> {
    let llt = g.llt(faer::Side::Lower).expect("SPD");
    let mut y = xt.to_owned();
    llt.L().transpose().solve_upper_triangular_in_place(&mut y);
    y
}

fn bench_cholesky(c: &mut Criterion) {
    let device = device();
    let sizes: &[usize] = if gpu_sizes() { &[1024, 2048, 4096] } else { &[256, 512, 1024] };
    let mut group = c.benchmark_group("cholesky");
    for &d in sizes {
        let k = d / 4;
        let (gh, xh) = spd_and_rhs(d, k);
        group.throughput(Throughput::Elements((d * d * d / 3 + k * d * d) as u64));
        let upload = |v: &[f32], rows: usize, cols: usize| {
            Tensor::<2>::from_data(TensorData::new(v.to_vec(), [rows, cols]), &device)
        };
        let (g, x) = (upload(&gh, d, d), upload(&xh, k, d));
        sync(&device);
        let id = format!("d{d}_k{k}");
        // The factorization alone (its status read is the sync), to split the time.
        group.bench_function(BenchmarkId::new("emloc_device_cholesky_only", &id), |bench| {
            bench.iter(|| ops::cholesky(g.clone(), 0.0, 1e-6).expect("SPD").l)
        });
        group.bench_function(BenchmarkId::new("emloc_device", &id), |bench| {
            bench.iter(|| {
                let l = ops::cholesky(g.clone(), 0.0, 1e-6).expect("SPD").l;
                let y = ops::solve_lower_right(x.clone(), l, false).expect("shapes");
                sync(&device);
                y
            })
        });
        group.bench_function(BenchmarkId::new("emloc_with_transfer", &id), |bench| {
            bench.iter(|| {
                let l = ops::cholesky(upload(&gh, d, d), 0.0, 1e-6).expect("SPD").l;
                let y = ops::solve_lower_right(upload(&xh, k, d), l, false).expect("shapes");
                y.into_data()
            })
        });
        let g64 = faer::Mat::from_fn(d, d, |i, j| gh[i * d + j] as f64);
        let xt64 = faer::Mat::from_fn(d, k, |i, j| xh[j * d + i] as f64);
        group.bench_function(BenchmarkId::new("faer_f64", &id), |bench| {
            bench.iter(|| faer_cholesky_solve(g64.as_ref(), xt64.as_ref()))
        });
        let g32 = faer::Mat::from_fn(d, d, |i, j| gh[i * d + j]);
        let xt32 = faer::Mat::from_fn(d, k, |i, j| xh[j * d + i]);
        group.bench_function(BenchmarkId::new("faer_f32", &id), |bench| {
            bench.iter(|| faer_cholesky_solve(g32.as_ref(), xt32.as_ref()))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_gram, bench_lowrank_lora, bench_cholesky
}
criterion_main!(benches);
