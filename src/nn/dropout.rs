//! A drop-in for `burn::nn::Dropout` whose masks are cheap on the CPU.
//!
//! Burn's dropout draws one `f32` per element through ChaCha (`Tensor::random`, Bernoulli) and
//! multiplies twice: about a tenth of a MiniLM training step on Flex (BENCHMARKS.md). This one
//! draws one seed from the device's generator per call (so `device.seed(..)` still fixes every
//! mask, and resumed runs stay exact) and expands it with SplitMix64, two 32-bit draws per
//! output, into a mask already scaled by `1 / (1 - prob)`: one multiply. On other backends it
//! is Burn's dropout.

use burn::config::Config;
use burn::module::{Flag, Module, Param};
use burn::tensor::{Device, Distribution, Tensor, TensorData};

/// Configuration of [`Dropout`], as `burn::nn::DropoutConfig`.
#[derive(Config, Debug)]
pub struct DropoutConfig {
    /// Probability of zeroing each element during training.
    pub prob: f64,
}

impl DropoutConfig {
    /// A [`Dropout`] layer, in training mode.
    ///
    /// # Panics
    /// If `prob` is not in `[0, 1)`.
    pub fn init(&self) -> Dropout {
        assert!(
            self.prob.is_finite() && (0.0..1.0).contains(&self.prob),
            "Dropout probability must be finite and in the range [0, 1), but got {}",
            self.prob
        );
        Dropout { prob: self.prob, training: Param::from_bool(true) }
    }
}

/// Zeroes each element with probability `prob` during training and scales the others by
/// `1 / (1 - prob)`; the identity in inference, outside autodiff, or when frozen. Same fields,
/// record and behaviour as `burn::nn::Dropout`; the masks differ.
#[derive(Module, Debug)]
pub struct Dropout {
    /// Probability of zeroing each element during training.
    pub prob: f64,
    /// Whether to behave as during training (cleared by `freeze`).
    pub training: Param<Flag>,
}

impl Dropout {
    /// Applies dropout.
    ///
    /// # Shapes
    /// - input: `[..., any]`; output: the same.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let device = input.device();
        if !self.training.is_enabled() || !device.is_autodiff() || self.prob == 0.0 {
            return input;
        }
        if device.clone().without_autodiff() != Device::flex() {
            let burn = burn::nn::Dropout { prob: self.prob, training: self.training.clone() };
            return burn.forward(input);
        }
        let shape = input.shape();
        let mask = host_mask(device_seed(&device), shape.num_elements(), 1.0 - self.prob);
        input * Tensor::from_data(TensorData::new(mask, shape), &device)
    }
}

/// One 48-bit seed from `device`'s generator (two uniform `f32` draws of 24 bits each): what
/// each [`Dropout`] call draws, so `device.seed(..)` fixes it.
pub fn device_seed(device: &Device) -> u64 {
    let draws = Tensor::<1>::random([2], Distribution::Default, device).into_data();
    let draws = draws.try_to_vec::<f32>().expect("f32 draws");
    let bits = |u: f32| (f64::from(u) * f64::from(1u32 << 24)) as u64;
    bits(draws[0]) << 24 | bits(draws[1])
}

/// SplitMix64's output for counter `i` of stream `seed`.
pub fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` values, each `1 / keep` with probability `keep` (quantised to 2⁻³²) and 0 otherwise.
fn host_mask(seed: u64, len: usize, keep: f64) -> Vec<f32> {
    let threshold = (keep * 4_294_967_296.0) as u64;
    let kept = (1.0 / keep) as f32;
    let mut mask = Vec::with_capacity(len);
    for pair in 0..len.div_ceil(2) {
        let draws = splitmix64(seed, pair as u64);
        for draw in [draws & 0xFFFF_FFFF, draws >> 32] {
            if mask.len() < len {
                mask.push(if draw < threshold { kept } else { 0.0 });
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_right_share_scaled() {
        let (len, keep) = (1 << 20, 0.9);
        let mask = host_mask(7, len, keep);
        assert_eq!(mask.len(), len);
        let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64;
        // Binomial: 4 standard deviations.
        let sd = (len as f64 * keep * (1.0 - keep)).sqrt();
        assert!((kept - len as f64 * keep).abs() < 4.0 * sd, "kept {kept} of {len}");
        assert!(mask.iter().all(|&m| m == 0.0 || m == (1.0 / keep) as f32));
        assert_ne!(host_mask(8, 64, keep), host_mask(7, 64, keep), "seeds give other masks");
    }

    #[test]
    fn forward_is_seeded_by_the_device_and_the_identity_outside_autodiff() {
        let device = Device::flex().autodiff();
        let layer = DropoutConfig::new(0.5).init();
        let x = Tensor::<2>::ones([64, 32], &device);
        let run = |seed: u64| {
            device.seed(seed);
            layer.forward(x.clone()).into_data().try_to_vec::<f32>().unwrap()
        };
        // The device RNG is process-wide: a test on another thread drawing between our seed and
        // our draw changes the mask, so a few tries are allowed (an unseeded mask of 2,048
        // entries never repeats).
        assert!((0..5).any(|_| run(3) == run(3)), "the device seed fixes the mask");
        assert_ne!(run(3), run(4));
        let y = run(3);
        assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
        assert!(y.contains(&0.0) && y.contains(&2.0));
        let inference = Tensor::<2>::ones([4, 4], &Device::flex());
        assert_eq!(layer.forward(inference.clone()).into_data(), inference.into_data());
    }
}
