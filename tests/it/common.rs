//! Small models and deterministic data shared by the integration tests.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use emloc::nn::{Linear, LinearConfig};

/// Deterministic values in [-1, 1) (xorshift), independent of any backend RNG.
pub fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

pub fn tensor(seed: u64, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(noise(seed, shape[0] * shape[1]), shape), device)
}

/// A two-layer MLP `l2(gelu(l1(x)))` plus a stock `burn::nn::Linear` side branch, named so that
/// rules can select each part.
#[derive(Module, Debug)]
pub struct Mlp {
    pub l1: Linear,
    pub l2: Linear,
    pub stock: burn::nn::Linear,
}

impl Mlp {
    pub fn new(d_in: usize, d_hidden: usize, d_out: usize, device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(d_in, d_hidden).init(device),
            l2: LinearConfig::new(d_hidden, d_out).init(device),
            stock: burn::nn::LinearConfig::new(d_in, d_out).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = burn::tensor::activation::gelu(self.l1.forward(x.clone()));
        self.l2.forward(h) + self.stock.forward(x)
    }
}

/// Calibration inputs `[rows, d]` confined to a `dim`-dimensional subspace of R^d.
pub fn subspace_batches(
    d: usize,
    dim: usize,
    rows: usize,
    n: usize,
    device: &Device,
) -> Vec<Tensor<2>> {
    let basis = tensor(99, [dim, d], device);
    (0..n).map(|i| tensor(200 + i as u64, [rows, dim], device).matmul(basis.clone())).collect()
}

/// max |a − b| / max |b|.
pub fn rel_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(f32::MIN_POSITIVE);
    (a - b).abs().max().into_scalar::<f32>() / scale
}
