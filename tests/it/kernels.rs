//! emloc's backend extension ([`emloc::ops`]): the CubeCL kernels against an `f64` host
//! reference and against Flex, on sizes that are not multiples of the tiles, in f32 and f16;
//! the fused layer's gradients against autodiff of the unfused math.
//!
//! The Flex tests always run. The Cube tests need `--features wgpu` (CI: Mesa lavapipe) or
//! `--features cuda`, and print the adapter they ran on, so a silent fallback shows in the log
//! (`cargo test -p emloc --features wgpu -- kernels --nocapture`).

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use emloc::ops;

/// Deterministic values in `[-1, 1)` (a 64-bit LCG), so failures reproduce.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn matrix(rows: usize, cols: usize, seed: u64, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values(rows * cols, seed), [rows, cols]), device)
}

fn host(t: Tensor<2>) -> (Vec<f64>, [usize; 2]) {
    let dims = t.dims();
    let v = t.cast(FloatDType::F32).into_data().try_to_vec::<f32>().unwrap();
    (v.into_iter().map(f64::from).collect(), dims)
}

/// `XᵀX` in f64 on the host.
fn gram_f64(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut g = vec![0.0; d * d];
    for t in 0..n {
        let row = &x[t * d..(t + 1) * d];
        for i in 0..d {
            for j in 0..d {
                g[i * d + j] += row[i] * row[j];
            }
        }
    }
    g
}

/// Largest absolute difference, relative to the reference's largest magnitude.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs())) / scale
}

fn assert_close(what: &str, got: Tensor<2>, want: &[f64], tol: f64) {
    let (got, _) = host(got);
    let err = rel_err(&got, want);
    println!("{what}: relative error {err:.2e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// Sizes that are not multiples of the 64/128 tiles nor of the 16-deep slabs, plus edge cases.
const GRAM_SIZES: &[(usize, usize)] = &[(1, 1), (37, 5), (300, 67), (129, 130), (2000, 97)];

fn check_gram(device: &Device, dtype: FloatDType, tol: f64) {
    for (i, &(n, d)) in GRAM_SIZES.iter().enumerate() {
        let x = matrix(n, d, 11 + i as u64, device).cast(dtype);
        // The reference sees exactly the (possibly rounded) values the kernel sees.
        let (xh, _) = host(x.clone());
        let g = ops::gram(x);
        assert_eq!(g.dtype(), burn::tensor::DType::F32, "the Gram matrix is always f32");
        assert_close(&format!("gram {dtype:?} n={n} d={d}"), g, &gram_f64(&xh, n, d), tol);
    }
}

fn check_gram_accumulate(device: &Device) {
    let (n1, n2, d) = (45, 70, 33);
    let x1 = matrix(n1, d, 1, device);
    let x2 = matrix(n2, d, 2, device);
    let (h1, _) = host(x1.clone());
    let (h2, _) = host(x2.clone());
    let want1 = gram_f64(&h1, n1, d);
    let want: Vec<f64> = want1.iter().zip(gram_f64(&h2, n2, d)).map(|(a, b)| a + b).collect();

    // Uniquely held accumulator: updated in place.
    let g = ops::gram_accumulate(None, x1.clone());
    let g = ops::gram_accumulate(Some(g), x2.clone());
    assert_close("gram_accumulate (in place)", g, &want, 1e-5);

    // Shared accumulator: the caller's copy must stay as it was.
    let g1 = ops::gram(x1);
    let g = ops::gram_accumulate(Some(g1.clone()), x2.clone());
    assert_close("gram_accumulate (copy)", g, &want, 1e-5);
    assert_close("gram_accumulate leaves a shared accumulator alone", g1, &want1, 1e-5);

    // A transposed (non-contiguous) input is read through its strides.
    let xt = matrix(d, n2, 3, device);
    let (ht, _) = host(xt.clone().transpose());
    assert_close(
        "gram of a transposed view",
        ops::gram(xt.transpose()),
        &gram_f64(&ht, n2, d),
        1e-5,
    );
}

/// Shapes of one fused-layer case: tokens, d_in, k, r, d_out.
const LAYER_SIZES: &[(usize, usize, usize, usize, usize)] =
    &[(1, 3, 2, 1, 4), (37, 65, 19, 3, 70), (300, 96, 40, 8, 130)];

struct Layer {
    x: Tensor<2>,
    w_v: Tensor<2>,
    w_u: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    bias: Tensor<1>,
    dy: Tensor<2>,
}

impl Layer {
    fn new(sizes: (usize, usize, usize, usize, usize), seed: u64, device: &Device) -> Self {
        let (n, d_in, k, r, d_out) = sizes;
        // Scaled so every activation stays O(1) (f16-safe).
        let s_in = 1.0 / (d_in as f64).sqrt();
        Self {
            x: matrix(n, d_in, seed, device),
            w_v: matrix(d_in, k, seed + 1, device).mul_scalar(s_in),
            w_u: matrix(k, d_out, seed + 2, device).mul_scalar(1.0 / (k as f64).sqrt()),
            a: matrix(d_in, r, seed + 3, device).mul_scalar(s_in),
            b: matrix(r, d_out, seed + 4, device),
            bias: matrix(1, d_out, seed + 5, device).reshape([d_out]),
            dy: matrix(n, d_out, seed + 6, device),
        }
    }

    fn to(&self, device: &Device, dtype: FloatDType) -> Self {
        let m = |t: &Tensor<2>| t.clone().to_device(device).cast(dtype);
        Self {
            x: m(&self.x),
            w_v: m(&self.w_v),
            w_u: m(&self.w_u),
            a: m(&self.a),
            b: m(&self.b),
            bias: self.bias.clone().to_device(device).cast(dtype),
            dy: m(&self.dy),
        }
    }
}

const SCALE: f64 = 1.75;

/// The unfused math with stock tensor ops (autodiff tracks it op by op).
fn unfused(
    l: &Layer,
    x: Tensor<2>,
    x_lora: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    bias: Tensor<1>,
) -> Tensor<2> {
    let base = x.matmul(l.w_v.clone()).matmul(l.w_u.clone());
    let lora = x_lora.matmul(a).matmul(b).mul_scalar(SCALE);
    base + lora + bias.unsqueeze::<2>()
}

/// Forward of the fused op vs the f64 host reference, and against the Flex implementation.
fn check_forward(device: &Device, dtype: FloatDType, tol: f64) {
    let flex = Device::flex();
    for (i, &sizes) in LAYER_SIZES.iter().enumerate() {
        let l = Layer::new(sizes, 100 + 10 * i as u64, device).to(device, dtype);
        let fused = ops::lowrank_lora(
            l.x.clone(),
            None,
            l.w_v.clone(),
            l.w_u.clone(),
            l.a.clone(),
            l.b.clone(),
            Some(l.bias.clone()),
            SCALE,
        );
        assert_eq!(fused.dims(), [sizes.0, sizes.4]);
        // Reference: unfused, in f32 on Flex, from the same (rounded) inputs.
        let lf = l.to(&flex, FloatDType::F32);
        let want =
            unfused(&lf, lf.x.clone(), lf.x.clone(), lf.a.clone(), lf.b.clone(), lf.bias.clone());
        let (want, _) = host(want);
        assert_close(&format!("lowrank_lora forward {dtype:?} {sizes:?}"), fused, &want, tol);
    }
}

/// Gradients of the fused op under autodiff on `device` vs autodiff of the unfused math in f32
/// on Flex from the same (rounded) values (Burn's own f32 matmul may run as TF32 on CUDA, so the
/// reference never runs there); with and without a separate LoRA input (dropout) and a
/// trainable bias.
fn check_grads(device: &Device, dtype: FloatDType, tol: f64) {
    let flex = Device::flex().autodiff();
    for (i, &sizes) in LAYER_SIZES.iter().enumerate() {
        for separate_lora_input in [false, true] {
            let seed = 200 + 10 * i as u64;
            let ad = device.clone().autodiff();
            let on_device = Layer::new(sizes, seed, &ad).to(&ad, dtype);
            // The same values, rounded to `dtype` and back.
            let reference =
                Layer::new(sizes, seed, &flex).to(&flex, dtype).to(&flex, FloatDType::F32);
            let run = |l: &Layer, fused: bool| {
                let x = l.x.clone().require_grad();
                let a = l.a.clone().require_grad();
                let b = l.b.clone().require_grad();
                let bias = l.bias.clone().require_grad();
                // Stand-in for dropout: any differentiable function of x.
                let x_lora = separate_lora_input.then(|| x.clone().mul_scalar(0.5).tanh());
                let y = if fused {
                    ops::lowrank_lora(
                        x.clone(),
                        x_lora.clone(),
                        l.w_v.clone(),
                        l.w_u.clone(),
                        a.clone(),
                        b.clone(),
                        Some(bias.clone()),
                        SCALE,
                    )
                } else {
                    let xl = x_lora.clone().unwrap_or_else(|| x.clone());
                    unfused(l, x.clone(), xl, a.clone(), b.clone(), bias.clone())
                };
                let loss = (y.clone() * l.dy.clone()).sum();
                let grads = loss.backward();
                let g2 = |t: &Tensor<2>| t.grad(&grads).expect("missing gradient");
                assert!(l.w_v.grad(&grads).is_none(), "frozen W_v must get no gradient");
                (y.inner(), g2(&x), g2(&a), g2(&b), bias.grad(&grads).expect("bias gradient"))
            };
            let (y1, gx1, ga1, gb1, gbias1) = run(&on_device, true);
            let (y2, gx2, ga2, gb2, gbias2) = run(&reference, false);
            let tag = format!("{dtype:?} {sizes:?} separate_lora_input={separate_lora_input}");
            assert_close(&format!("fused y {tag}"), y1, &host(y2).0, tol);
            assert_close(&format!("grad x {tag}"), gx1, &host(gx2).0, tol);
            assert_close(&format!("grad A {tag}"), ga1, &host(ga2).0, tol);
            assert_close(&format!("grad B {tag}"), gb1, &host(gb2).0, tol);
            let d_out = sizes.4;
            assert_close(
                &format!("grad bias {tag}"),
                gbias1.reshape([1, d_out]),
                &host(gbias2.reshape([1, d_out])).0,
                tol,
            );
        }
    }
}

/// A 3-D input is flattened to tokens and restored; frozen factors stay gradient-free.
fn check_batched_input(device: &Device) {
    let l = Layer::new((10, 12, 5, 2, 7), 300, device);
    let x3: Tensor<3> = l.x.clone().reshape([2, 5, 12]);
    let y3 = ops::lowrank_lora(
        x3,
        None,
        l.w_v.clone(),
        l.w_u.clone(),
        l.a.clone(),
        l.b.clone(),
        None,
        SCALE,
    );
    assert_eq!(y3.dims(), [2, 5, 7]);
    let y2 = ops::lowrank_lora(
        l.x.clone(),
        None,
        l.w_v.clone(),
        l.w_u.clone(),
        l.a.clone(),
        l.b.clone(),
        None,
        SCALE,
    );
    assert_close("3-D input", y3.reshape([10, 7]), &host(y2).0, 1e-6);
}

#[test]
fn flex_gram_matches_f64() {
    check_gram(&Device::flex(), FloatDType::F32, 1e-5);
}

#[test]
fn flex_gram_accumulate() {
    check_gram_accumulate(&Device::flex());
}

#[test]
fn flex_lowrank_lora_forward() {
    check_forward(&Device::flex(), FloatDType::F32, 1e-5);
}

#[test]
fn flex_lowrank_lora_grads_match_unfused_autodiff() {
    check_grads(&Device::flex(), FloatDType::F32, 1e-5);
}

#[test]
fn flex_lowrank_lora_grads_with_gradient_checkpointing() {
    // The fused op keeps its own state (x, h): same gradients under balanced checkpointing.
    let grads = |device: Device| {
        let l = Layer::new((29, 17, 6, 3, 11), 600, &device);
        let x = l.x.clone().require_grad();
        let a = l.a.clone().require_grad();
        let b = l.b.clone().require_grad();
        let h = x.clone().tanh(); // a recomputable op before the fused one
        let y = ops::lowrank_lora(
            h,
            None,
            l.w_v.clone(),
            l.w_u.clone(),
            a.clone(),
            b.clone(),
            None,
            SCALE,
        );
        let g = (y.tanh() * l.dy.clone()).sum().backward();
        [x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap()]
    };
    let plain = grads(Device::flex().autodiff());
    let checkpointed = grads(Device::flex().autodiff().gradient_checkpointing());
    for (name, (got, want)) in ["x", "A", "B"].iter().zip(checkpointed.into_iter().zip(plain)) {
        assert_close(&format!("checkpointed grad {name}"), got, &host(want).0, 1e-6);
    }
}

#[test]
fn flex_lowrank_lora_batched_input() {
    check_batched_input(&Device::flex());
}

#[test]
fn flex_bf16_inputs() {
    // bf16 inputs: the Gram's products are exact in its f32 output; the layer stores h and y
    // in bf16 (8-bit mantissa), so it is held to bf16's rounding.
    let flex = Device::flex();
    check_gram(&flex, FloatDType::BF16, 1e-5);
    check_forward(&flex, FloatDType::BF16, 3e-2);
}

/// `ops::matmul` (faer on Flex) against an f64 host product, on contiguous operands, transposed
/// views and sliced views (an offset into a larger buffer), below and above the size where the
/// product goes parallel; in f32 and f64.
#[test]
fn flex_matmul_matches_f64_on_strided_views() {
    let device = Device::flex();
    for (n, k, m) in [(7, 5, 3), (150, 130, 120), (1, 33, 1)] {
        let lhs = matrix(n, k, 11, &device);
        let rhs = matrix(k, m, 12, &device);
        let (l, _) = host(lhs.clone());
        let (r, _) = host(rhs.clone());
        let want: Vec<f64> = (0..n * m)
            .map(|o| (0..k).map(|i| l[(o / m) * k + i] * r[i * m + o % m]).sum())
            .collect();
        let tag = format!("[{n}, {k}] · [{k}, {m}]");
        assert_close(&format!("matmul {tag}"), ops::matmul(lhs.clone(), rhs.clone()), &want, 1e-6);
        // The same operands as a transpose of a transpose and as a slice of a wider buffer.
        let lhs_t = lhs.clone().transpose().into_data();
        let lhs_view = Tensor::<2>::from_data(lhs_t, &device).transpose();
        let wide = Tensor::cat(vec![matrix(k, 3, 13, &device), rhs.clone()], 1);
        let rhs_view = wide.slice([0..k, 3..3 + m]);
        assert_close(
            &format!("matmul of views {tag}"),
            ops::matmul(lhs_view, rhs_view),
            &want,
            1e-6,
        );
        let f64_product = ops::matmul(lhs.cast(FloatDType::F64), rhs.cast(FloatDType::F64));
        let got = f64_product.into_data().try_to_vec::<f64>().expect("an f64 product");
        let err = rel_err(&got, &want);
        assert!(err <= 1e-12, "matmul f64 {tag}: relative error {err:.3e}");
    }
}

/// `ops::linear`'s gradients against autodiff of Burn's own `x.matmul(w) + b` (a different
/// product implementation); a frozen weight gets none.
#[test]
fn flex_linear_grads_match_burn_matmul() {
    let device = Device::flex().autodiff();
    let x = Tensor::<3>::from_data(TensorData::new(values(2 * 9 * 6, 21), [2, 9, 6]), &device);
    let w = matrix(6, 4, 22, &device);
    let bias = Tensor::<1>::from_data(TensorData::new(values(4, 23), [4]), &device);
    let dy = Tensor::<3>::from_data(TensorData::new(values(2 * 9 * 4, 24), [2, 9, 4]), &device);
    let run = |ours: bool, weight_trainable: bool| {
        let x = x.clone().require_grad();
        let w = if weight_trainable { w.clone().require_grad() } else { w.clone() };
        let bias = bias.clone().require_grad();
        let y = if ours {
            ops::linear(x.clone(), w.clone(), Some(bias.clone()))
        } else {
            x.clone().matmul(w.clone().unsqueeze()) + bias.clone().unsqueeze()
        };
        let grads = (y.clone() * dy.clone()).sum().backward();
        let flat = |t: Tensor<3>| t.reshape([18, -1]);
        (
            flat(y.inner()),
            flat(x.grad(&grads).expect("x gradient")),
            w.grad(&grads),
            bias.grad(&grads).expect("bias gradient").unsqueeze::<2>(),
        )
    };
    for weight_trainable in [false, true] {
        let (y1, gx1, gw1, gb1) = run(true, weight_trainable);
        let (y2, gx2, gw2, gb2) = run(false, weight_trainable);
        assert_close("linear y", y1, &host(y2).0, 1e-6);
        assert_close("linear grad x", gx1, &host(gx2).0, 1e-6);
        assert_close("linear grad bias", gb1, &host(gb2).0, 1e-6);
        match (gw1, gw2) {
            (Some(g1), Some(g2)) => assert_close("linear grad W", g1, &host(g2).0, 1e-6),
            (None, None) => assert!(!weight_trainable),
            (g1, g2) => {
                panic!("weight gradient present: ours {}, Burn's {}", g1.is_some(), g2.is_some())
            }
        }
    }
}

/// `ops::gelu` against Burn's GELU (libm's `erf`) in f64, and its gradient against central
/// differences of that f64 GELU (Burn's own GELU backward is the tanh approximation's).
#[test]
fn flex_gelu_and_its_gradient_match_f64() {
    let device = Device::flex().autodiff();
    let raw: Vec<f32> = values(4096, 31).into_iter().map(|v| 12.0 * v).collect();
    let x = Tensor::<2>::from_data(TensorData::new(raw.clone(), [64, 64]), &device).require_grad();
    let y = ops::gelu(x.clone());
    let grads = y.clone().sum().backward();
    let dx = x.grad(&grads).expect("gelu gradient");
    // The same values in f64 (exact: they are f32), shifted by `shift` in f64.
    let exact = |shift: f64| {
        let t = Tensor::<2>::from_data(TensorData::new(raw.clone(), [64, 64]), &Device::flex());
        let t = t.cast(FloatDType::F64).add_scalar(shift);
        burn::tensor::activation::gelu(t).into_data().try_to_vec::<f64>().unwrap()
    };
    let h = 1e-4;
    let (plus, minus) = (exact(h), exact(-h));
    let slope: Vec<f64> = plus.iter().zip(&minus).map(|(p, m)| (p - m) / (2.0 * h)).collect();
    // f32 rounding of values up to 12 plus the rational erf's 5e-7.
    assert_close("gelu", y.inner(), &exact(0.0), 1e-6);
    assert_close("gelu gradient", dx, &slope, 2e-6);
}

#[test]
fn product_route_parses_and_scopes() {
    use emloc::ops::ProductRoute;
    assert_eq!(ProductRoute::parse("Matmul").unwrap(), ProductRoute::Matmul);
    assert_eq!(ProductRoute::parse("tiled").unwrap(), ProductRoute::Tiled);
    let err = ProductRoute::parse("cublas").unwrap_err().to_string();
    assert!(err.contains("auto, tiled or matmul"), "{err}");
    let outer = ProductRoute::current();
    let inner = ops::with_product_route(ProductRoute::Tiled, || {
        ops::with_product_route(ProductRoute::Matmul, ProductRoute::current)
    });
    assert_eq!(inner, ProductRoute::Matmul);
    // Restored on the way out, also after a panic inside.
    let caught = std::panic::catch_unwind(|| {
        ops::with_product_route(ProductRoute::Tiled, || panic!("inside"));
    });
    assert!(caught.is_err());
    assert_eq!(ProductRoute::current(), outer);
}

/// The CubeCL device the kernel tests run on (CUDA with `--features cuda`, else wgpu), with
/// what it is printed once.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn cube_device() -> Device {
    use std::sync::OnceLock;
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            #[cfg(feature = "cuda")]
            {
                let device = Device::cuda(0);
                println!("[emloc kernels] CubeCL runtime: CUDA device 0 ({device:?})");
                device
            }
            #[cfg(not(feature = "cuda"))]
            {
                match Device::wgpu_options().init_with_setup() {
                    Ok((device, setup)) => {
                        let info = setup.adapter.get_info();
                        println!(
                            "[emloc kernels] wgpu adapter: {} ({:?}, {:?}, driver {} {})",
                            info.name,
                            info.backend,
                            info.device_type,
                            info.driver,
                            info.driver_info
                        );
                        device
                    }
                    Err(err) => {
                        // Another test initialised the default device first.
                        println!("[emloc kernels] wgpu adapter: already initialised ({err})");
                        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
                    }
                }
            }
        })
        .clone()
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn f16_supported(device: &Device) -> bool {
    let ok = device.supports_dtype(burn::tensor::DType::F16);
    if !ok {
        println!("[emloc kernels] f16 unsupported on this adapter: f16 checks skipped");
    }
    ok
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube {
    use super::*;

    #[test]
    fn gram_f32_matches_f64() {
        check_gram(&cube_device(), FloatDType::F32, 1e-5);
    }

    #[test]
    fn gram_f16_input_accumulates_in_f32() {
        let device = cube_device();
        if f16_supported(&device) {
            // Inputs are f16 but products and sums are f32: as exact as the f32 case.
            check_gram(&device, FloatDType::F16, 1e-5);
        }
    }

    #[test]
    fn gram_vector_loads_match_f64() {
        // Feature counts that are multiples of 4 take the kernels' 4-wide vector loads (the
        // sizes above are not, and take the scalar loads); still not multiples of the tiles.
        // Both the one-pass path (37×8) and the token-split path run, in f32 and f16.
        // EMLOC_KERNELS_LOG=1 prints each launch's vector sizes.
        let device = cube_device();
        let mut dtypes = vec![(FloatDType::F32, 1e-5)];
        if f16_supported(&device) {
            dtypes.push((FloatDType::F16, 1e-5));
        }
        for (dtype, tol) in dtypes {
            for (i, &(n, d)) in [(37, 8), (300, 132), (2000, 100), (129, 260)].iter().enumerate() {
                let x = matrix(n, d, 40 + i as u64, &device).cast(dtype);
                let (xh, _) = host(x.clone());
                let what = format!("gram {dtype:?} n={n} d={d}");
                assert_close(&what, ops::gram(x), &gram_f64(&xh, n, d), tol);
            }
            // A transposed view is contiguous along the tokens only: scalar loads.
            let (n, d) = (72, 36);
            let xt = matrix(d, n, 50, &device).cast(dtype);
            let (xh, _) = host(xt.clone().transpose());
            let what = format!("gram {dtype:?} of a transposed view");
            assert_close(&what, ops::gram(xt.transpose()), &gram_f64(&xh, n, d), tol);
        }
    }

    #[test]
    fn gram_accumulate_in_place_copy_and_strided() {
        check_gram_accumulate(&cube_device());
    }

    #[test]
    fn gram_is_exactly_symmetric() {
        // The upper triangle is mirrored from the lower one, never computed separately.
        let (g, [d, _]) = host(ops::gram(matrix(301, 150, 5, &cube_device())));
        for i in 0..d {
            for j in 0..i {
                assert_eq!(
                    g[i * d + j].to_bits(),
                    g[j * d + i].to_bits(),
                    "G[{i},{j}] != G[{j},{i}]"
                );
            }
        }
    }

    #[test]
    fn large_outputs_use_the_wide_register_tiles() {
        // Outputs with enough 128-wide tiles to fill the device take the 8×8 register tiles
        // (EMLOC_KERNELS_LOG=1 prints each launch's plan).
        let device = cube_device();
        let flex = Device::flex();
        let x = matrix(40, 1030, 21, &device);
        let (xh, _) = host(x.clone());
        assert_close("gram 40x1030", ops::gram(x), &gram_f64(&xh, 40, 1030), 1e-5);

        let l = Layer::new((1100, 64, 13, 4, 1040), 500, &device);
        let y = ops::lowrank_lora(
            l.x.clone(),
            None,
            l.w_v.clone(),
            l.w_u.clone(),
            l.a.clone(),
            l.b.clone(),
            Some(l.bias.clone()),
            SCALE,
        );
        let lf = l.to(&flex, FloatDType::F32);
        let want =
            unfused(&lf, lf.x.clone(), lf.x.clone(), lf.a.clone(), lf.b.clone(), lf.bias.clone());
        assert_close("lowrank_lora 1100x1040", y, &host(want).0, 1e-5);
    }

    #[test]
    fn gram_matches_flex() {
        let device = cube_device();
        let x = matrix(513, 77, 9, &device);
        let want = ops::gram(x.clone().to_device(&Device::flex()));
        assert_close("gram cube vs flex", ops::gram(x), &host(want).0, 1e-5);
    }

    #[test]
    fn lowrank_lora_forward_f32() {
        check_forward(&cube_device(), FloatDType::F32, 1e-5);
    }

    #[test]
    fn lowrank_lora_forward_f16() {
        let device = cube_device();
        if f16_supported(&device) {
            // f16 storage of h and y (11-bit mantissa), f32 accumulation.
            check_forward(&device, FloatDType::F16, 4e-3);
        }
    }

    #[test]
    fn lowrank_lora_grads_match_unfused_autodiff_f32() {
        check_grads(&cube_device(), FloatDType::F32, 1e-5);
    }

    #[test]
    fn lowrank_lora_grads_match_unfused_autodiff_f16() {
        let device = cube_device();
        if f16_supported(&device) {
            check_grads(&device, FloatDType::F16, 1e-2);
        }
    }

    #[test]
    fn lowrank_lora_batched_input() {
        check_batched_input(&cube_device());
    }

    /// Every fused-layer and Gram check under one route (`f16` where the adapter has it).
    fn check_route(route: ops::ProductRoute) {
        ops::with_product_route(route, || {
            let device = cube_device();
            println!("[emloc kernels] route {route:?}");
            // Burn's matmul runs f32 as TF32 on CUDA tensor cores (10-bit mantissa).
            let tf32 = cfg!(feature = "cuda") && route == ops::ProductRoute::Matmul;
            let f32_tol = if tf32 { 5e-3 } else { 1e-5 };
            check_gram(&device, FloatDType::F32, f32_tol);
            if !tf32 {
                check_gram_accumulate(&device);
            }
            check_forward(&device, FloatDType::F32, f32_tol);
            check_grads(&device, FloatDType::F32, f32_tol);
            check_batched_input(&device);
            if f16_supported(&device) {
                check_gram(&device, FloatDType::F16, 1e-5);
                check_forward(&device, FloatDType::F16, 4e-3);
                check_grads(&device, FloatDType::F16, 1e-2);
            }
        });
    }

    #[test]
    fn tiled_route_matches_f64_and_unfused_autodiff() {
        check_route(ops::ProductRoute::Tiled);
    }

    #[test]
    fn matmul_route_matches_f64_and_unfused_autodiff() {
        // Burn's matmul: tensor cores where the device has them (CUDA), unit kernels elsewhere.
        check_route(ops::ProductRoute::Matmul);
    }

    #[test]
    fn lowrank_lora_large_depth_uses_split_k() {
        // dA and dB reduce over 3000 tokens with tiny outputs: the split-K path.
        let device = cube_device();
        let flex = Device::flex();
        let grads_on = |dev: &Device| {
            let ad = dev.clone().autodiff();
            let l = Layer::new((3001, 40, 9, 4, 33), 400, &ad);
            let a = l.a.clone().require_grad();
            let b = l.b.clone().require_grad();
            let y = ops::lowrank_lora(
                l.x.clone(),
                None,
                l.w_v.clone(),
                l.w_u.clone(),
                a.clone(),
                b.clone(),
                None,
                SCALE,
            );
            let grads = (y * l.dy.clone()).sum().backward();
            (a.grad(&grads).unwrap(), b.grad(&grads).unwrap())
        };
        let (ga, gb) = grads_on(&device);
        let (wa, wb) = grads_on(&flex);
        assert_close("split-K grad A", ga, &host(wa).0, 1e-5);
        assert_close("split-K grad B", gb, &host(wb).0, 1e-5);
    }
}
