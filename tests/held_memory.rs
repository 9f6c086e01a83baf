//! What the fused layer's autograph holds between forward and backward, measured on the CubeCL
//! device's allocator (its own test binary: tests running beside it would allocate on the same
//! device and blur the count).
//!
//! The fused layer keeps `h_l = x A` (`[n, r]`) beside its output, `x` being the caller's, and
//! not `x W_v` (`[n, k]`), which it used to keep with `x A` in one `[n, k + r]` buffer. Burn's
//! autodiff of the unfused ops is as lean: it keeps `x A` for `B`'s gradient only.
//!
//! `cargo test -p emloc --features wgpu --test held_memory -- --nocapture`
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::tensor::{Device, Distribution, Tensor};
use emloc::ops::{self, ProductRoute};

fn device() -> Device {
    #[cfg(feature = "cuda")]
    return Device::cuda(0);
    #[cfg(not(feature = "cuda"))]
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

#[test]
fn backward_keeps_only_the_lora_bottleneck() {
    let device = device();
    let (n, d_in, k, r, d_out, scale) = (2048, 96, 256, 8, 80, 1.75);
    let ad = device.clone().autodiff();
    let in_use = || {
        device.sync().unwrap();
        device.memory_pool_usage().map(|u| u.bytes_in_use as i64)
    };
    if in_use().is_none() {
        println!("[emloc held_memory] no allocator report on this device: check skipped");
        return;
    }
    let normal = Distribution::Normal(0.0, 1.0);
    let random = |shape: [usize; 2]| Tensor::<2>::random(shape, normal, &ad);
    let (w_v, w_u, dy) = (random([d_in, k]), random([k, d_out]), random([n, d_out]));
    let x = random([n, d_in]).require_grad();
    let a = random([d_in, r]).require_grad();
    let b = random([r, d_out]).require_grad();
    let held = |fused: bool| {
        let before = in_use().unwrap();
        let y = if fused {
            let (w_v, w_u) = (w_v.clone(), w_u.clone());
            ops::lowrank_lora(x.clone(), None, w_v, w_u, a.clone(), b.clone(), None, scale)
        } else {
            let base = x.clone().matmul(w_v.clone()).matmul(w_u.clone());
            base + x.clone().matmul(a.clone()).matmul(b.clone()).mul_scalar(scale)
        };
        let held = in_use().unwrap() - before - (n * d_out * 4) as i64;
        // The graph still works after the measurement.
        let grads = (y * dy.clone()).sum().backward();
        assert!(a.grad(&grads).is_some() && x.grad(&grads).is_some());
        held
    };
    // Second runs: a kernel's first launch may leave caches (compiled kernels, matmul plans)
    // that are not the graph's.
    let twice = |f: &dyn Fn() -> i64| {
        f();
        f()
    };
    let tiled = ops::with_product_route(ProductRoute::Tiled, || twice(&|| held(true)));
    let matmul = ops::with_product_route(ProductRoute::Matmul, || twice(&|| held(true)));
    let unfused = twice(&|| held(false));
    let h_l = (n * r * 4) as i64;
    println!(
        "[emloc held_memory] n {n}, k {k}, r {r}: fused {tiled} B (tiled), {matmul} B (matmul \
         route), unfused Burn ops {unfused} B; h_l alone {h_l} B, x W_v {} B, the previous \
         fused state {} B",
        n * k * 4,
        n * (k + r) * 4
    );
    for (what, bytes) in [("tiled", tiled), ("matmul route", matmul)] {
        assert!(
            (h_l..=h_l + 4096).contains(&bytes),
            "{what}: the fused layer holds {bytes} B, expected h_l's {h_l} B (+ 4 KiB)"
        );
    }
}
