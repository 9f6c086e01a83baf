//! The transformer's position-wise feed-forward block built on
//! [`emloc::nn::Linear`](crate::nn::Linear): a drop-in for
//! `burn::nn::transformer::PositionWiseFeedForward`.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::activation::{Activation, ActivationConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::tensor::{Device, Tensor, assert_shape};

use super::{Linear, LinearConfig};
use crate::{EmlocError, Result};

/// Configuration of a [`PositionWiseFeedForward`] block; the same fields and defaults as
/// `burn::nn::transformer::PositionWiseFeedForwardConfig`.
#[derive(Config, Debug)]
pub struct PositionWiseFeedForwardConfig {
    /// The size of the input and output features.
    pub d_model: usize,
    /// The size of the hidden inner features.
    pub d_ff: usize,
    /// The dropout rate. Default: 0.1
    #[config(default = 0.1)]
    pub dropout: f64,
    /// Initializer of both linear layers' weights and biases; Burn's default.
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
    /// The activation between the two linear layers (Burn's type). Default: Gelu
    #[config(default = "ActivationConfig::Gelu")]
    pub activation: ActivationConfig,
}

impl PositionWiseFeedForwardConfig {
    /// Builds the block on `device`, exactly as Burn does (same shapes, same initializer calls in
    /// the same order).
    ///
    /// # Panics
    /// Where Burn's `init` panics: `dropout` outside `[0, 1)` or an activation config that Burn
    /// rejects. Use [`try_init`](Self::try_init) for a typed error on the dropout.
    pub fn init(&self, device: &Device) -> PositionWiseFeedForward {
        PositionWiseFeedForward {
            linear_inner: LinearConfig::new(self.d_model, self.d_ff)
                .with_initializer(self.initializer.clone())
                .init(device),
            linear_outer: LinearConfig::new(self.d_ff, self.d_model)
                .with_initializer(self.initializer.clone())
                .init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            activation: self.activation.init(device),
        }
    }

    /// Checks that `dropout` lies in `[0, 1)` (Burn's `init` panics otherwise).
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(EmlocError::InvalidConfig(format!(
                "PositionWiseFeedForwardConfig: dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// [`validate`](Self::validate)s the config, then [`init`](Self::init)s the block.
    pub fn try_init(&self, device: &Device) -> Result<PositionWiseFeedForward> {
        self.validate()?;
        Ok(self.init(device))
    }
}

/// `FFN(x) = linear_outer(dropout(activation(linear_inner(x))))`, from
/// [Attention Is All You Need](https://arxiv.org/pdf/1706.03762v7), with the same fields, forward
/// and record as `burn::nn::transformer::PositionWiseFeedForward` but built on
/// [`emloc::nn::Linear`](crate::nn::Linear).
///
/// # Params
/// - `linear_inner`: [`Linear`] with `d_model` input and `d_ff` output features.
/// - `linear_outer`: [`Linear`] with `d_ff` input and `d_model` output features.
///
/// # Notes
/// As in Burn, `activation` is `#[module(skip)]`: it is not part of the record and not visited by
/// module transforms. With a stateless activation (the default GELU, ReLU, ...) this changes
/// nothing. A `SwiGlu` activation is Burn's own layer (built from `ActivationConfig`), so its
/// weights are neither saved nor loaded (as in Burn) nor emulated or adapted by emloc; use
/// [`SwiGlu`](crate::nn::SwiGlu) as a separate field instead.
///
/// Should be created with [`PositionWiseFeedForwardConfig`].
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct PositionWiseFeedForward {
    /// Linear layer with `d_model` input features and `d_ff` output features.
    pub linear_inner: Linear,
    /// Linear layer with `d_ff` input features and `d_model` output features.
    pub linear_outer: Linear,
    /// Dropout layer.
    pub dropout: Dropout,
    /// Activation function (not recorded, as in Burn).
    #[module(skip)]
    pub activation: Activation,
}

impl ModuleDisplay for PositionWiseFeedForward {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new().with_new_line_after_attribute(false).optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_model", &self.linear_inner.d_input())
            .add("d_ff", &self.linear_inner.d_output())
            .add("prob", &self.dropout.prob)
            .optional()
    }
}

impl PositionWiseFeedForward {
    /// Applies the block.
    ///
    /// # Shapes
    /// - input: `[..., d_model]`
    /// - output: `[..., d_model]`
    ///
    /// # Panics
    /// If the last axis of `input` is not `d_model`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        // The layer's own dims: an emulator layer's dense weight is empty.
        let d_model = self.linear_inner.d_input();
        assert_shape!(input, [.., d_model]);

        let x = self.linear_inner.forward(input);
        let x = self.activation.forward(x);
        let x = self.dropout.forward(x);
        self.linear_outer.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn config_defaults_are_burns() {
        let ours = PositionWiseFeedForwardConfig::new(4, 8);
        let burn = burn::nn::transformer::PositionWiseFeedForwardConfig::new(4, 8);
        assert_eq!(ours.dropout, burn.dropout);
        assert_eq!(ours.initializer, burn.initializer);
        assert_eq!(format!("{:?}", ours.activation), format!("{:?}", burn.activation));
    }

    #[test]
    fn display_matches_burn() {
        let device = Device::flex();
        let ours = PositionWiseFeedForwardConfig::new(2, 4).init(&device);
        let burn = burn::nn::transformer::PositionWiseFeedForwardConfig::new(2, 4).init(&device);
        assert_eq!(format!("{ours}"), format!("{burn}"));
    }

    #[test]
    fn forward_is_the_composition_of_its_parts() {
        // Oracle: the formula written out with plain tensor ops on the layers' weights.
        let device = Device::flex();
        let ffn = PositionWiseFeedForwardConfig::new(6, 10)
            .with_activation(ActivationConfig::Relu)
            .init(&device);
        let x = Tensor::<3>::random([2, 3, 6], Distribution::Default, &device);
        let bias = |l: &Linear| l.bias.as_ref().unwrap().val().unsqueeze::<3>();
        let h = (x.clone().matmul(ffn.linear_inner.weight.val().unsqueeze())
            + bias(&ffn.linear_inner))
        .clamp_min(0.0);
        let expected =
            h.matmul(ffn.linear_outer.weight.val().unsqueeze()) + bias(&ffn.linear_outer);
        let diff = (ffn.forward(x) - expected).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn invalid_dropout_is_a_typed_error() {
        let err =
            PositionWiseFeedForwardConfig::new(4, 8).with_dropout(-0.5).try_init(&Device::flex());
        assert!(matches!(err, Err(EmlocError::InvalidConfig(_))));
    }
}
