//! [`RmsNorm`]: HF `LlamaRMSNorm` (parameter `weight`, so checkpoints load under HF's names).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, FloatDType, Tensor};

use super::LlamaConfig;

/// Configuration of [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Width `d` of the normalised features.
    pub hidden_size: usize,
    /// ε added to the mean square (HF `rms_norm_eps`).
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl RmsNormConfig {
    /// The norm configuration of a [`LlamaConfig`] (every norm of the model has the same).
    pub fn from_llama(config: &LlamaConfig) -> Self {
        Self::new(config.hidden_size).with_eps(config.rms_norm_eps)
    }

    /// Builds the norm on `device`: a scale `weight` of shape `[d]`, lazily initialised to ones.
    pub fn init(&self, device: &Device) -> RmsNorm {
        RmsNorm { weight: Initializer::Ones.init([self.hidden_size], device), eps: self.eps }
    }
}

/// Root-mean-square normalisation with a learned scale: `weight · x / √(mean(x²) + ε)`.
///
/// Burn's own `RmsNorm` names its scale `gamma`; this one keeps HF's `weight`, so module paths
/// and checkpoint keys agree (`model.norm.weight`, `model.layers.N.input_layernorm.weight`).
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale `[d]` (HF `weight`), initialised to ones.
    pub weight: Param<Tensor<1>>,
    /// ε added to the mean square.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises over the last dimension.
    ///
    /// # Shapes
    /// - input, output: `[..., d]`
    ///
    /// # Panics
    /// If the last dimension is not `d`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let d = self.weight.shape().dims::<1>()[0];
        let got = x.dims()[D - 1];
        assert_eq!(got, d, "RmsNorm::forward: input has {got} features, norm has {d}");
        // In f32 whatever the input's dtype, as HF does (a no-op for f32 inputs).
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let rms = x.clone().powi_scalar(2).mean_dim(D - 1).add_scalar(self.eps).sqrt();
        let mut shape = [1; D];
        shape[D - 1] = d;
        (x / rms).cast(dtype) * self.weight.val().reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn unit_scale_gives_unit_root_mean_square() {
        let device = Device::default();
        let norm = RmsNormConfig::new(4).with_eps(1e-6).init(&device);
        let x = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, -2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5], [2, 4]),
            &device,
        );
        let y: Vec<f32> = norm.forward(x).into_data().iter::<f32>().collect();
        for row in y.chunks(4) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            assert!((ms - 1.0).abs() < 1e-4, "{ms}");
        }
        assert!((y[4] - 1.0).abs() < 1e-4);
    }
}
