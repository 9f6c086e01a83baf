//! The SwiGLU gated unit built on [`emloc::nn::Linear`](crate::nn::Linear): a drop-in for
//! `burn::nn::SwiGlu`.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay};
use burn::nn::{Initializer, LinearLayout};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use super::Linear;

/// Configuration of a [`SwiGlu`] layer; the same fields and defaults as `burn::nn::SwiGluConfig`.
#[derive(Config, Debug)]
pub struct SwiGluConfig {
    /// The size of the input features.
    pub d_input: usize,
    /// The size of the output features.
    pub d_output: usize,
    /// Whether both linear layers have a bias. Default: false
    #[config(default = false)]
    pub bias: bool,
    /// Initializer of the linear layers' parameters; Burn's default.
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
    /// The layout in which the weights are stored in records (Burn's type). Default: row.
    ///
    /// With [`LinearLayout::Col`] the weights are still `[d_in, d_out]` in memory (as in Burn)
    /// and saved/loaded as `[d_out, d_in]` by the parameter's mappers. Burn 0.22 behaviour that
    /// comes with it, kept as is:
    /// - a column-layout record loads only into a layer whose weight is still lazy (not yet
    ///   initialised by a forward pass or `val()`): the store checks the record's shape against
    ///   the parameter's pre-transpose lazy shape `[d_out, d_in]`;
    /// - for the same reason, until the weight is initialised (by [`SwiGlu::forward`] or a
    ///   load), [`Linear::d_input`] and [`Linear::d_output`] read that lazy shape, i.e.
    ///   swapped. Run a forward pass or load a record before
    ///   [`attach_new_adapter`](crate::attach_new_adapter) on a fresh column-layout layer (an
    ///   [`emulate`](crate::emulate)d layer reads its dims from its factors and is not affected).
    ///
    /// emloc's transforms that replace a weight ([`emulate`](crate::emulate), loading an
    /// emulator) build a fresh parameter without these mappers; merging keeps them.
    #[config(default = "LinearLayout::Row")]
    pub layout: LinearLayout,
}

impl SwiGluConfig {
    /// Builds the layer on `device`. Both linear layers are initialised by Burn's own
    /// `LinearConfig` (same shapes, initializer calls and layout mappers) and wrapped as
    /// [`emloc::nn::Linear`](crate::nn::Linear); see [`layout`](SwiGluConfig::layout) for the
    /// column layout's caveats.
    pub fn init(&self, device: &Device) -> SwiGlu {
        let linear = || {
            let burn = burn::nn::LinearConfig::new(self.d_input, self.d_output)
                .with_bias(self.bias)
                .with_initializer(self.initializer.clone())
                .with_layout(self.layout)
                .init(device);
            Linear {
                weight: burn.weight,
                bias: burn.bias,
                factors: None,
                lora: None,
                quantized: None,
            }
        };
        SwiGlu { linear_inner: linear(), linear_outer: linear() }
    }
}

/// `SwiGLU(x) = silu(linear_inner(x)) ⊙ linear_outer(x)`, with the same fields, forward and
/// record as `burn::nn::SwiGlu` but built on [`emloc::nn::Linear`](crate::nn::Linear).
///
/// Should be created with [`SwiGluConfig`].
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct SwiGlu {
    /// The gate layer (through `silu`), `d_input` → `d_output`.
    pub linear_inner: Linear,
    /// The value layer (multiplied element-wise), `d_input` → `d_output`.
    pub linear_outer: Linear,
}

impl ModuleDisplay for SwiGlu {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new().with_new_line_after_attribute(false).optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("d_input", &self.linear_inner.d_input())
            .add("d_output", &self.linear_inner.d_output())
            .add("bias", &self.linear_inner.bias.is_some())
            .optional()
    }
}

impl SwiGlu {
    /// Applies the gated unit.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    ///
    /// # Panics
    /// If the last axis of `input` is not `d_input`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        // A lazy column-layout weight reports its pre-transpose shape until initialised, and
        // `Linear::forward` checks the input against the layer's dims before it reads the
        // weight: initialise first (what the forward pass would do anyway).
        for linear in [&self.linear_inner, &self.linear_outer] {
            if linear.factors.is_none() && !linear.weight.is_initialized() {
                let _ = linear.weight.val();
            }
        }
        let x = self.linear_inner.forward(input.clone());
        let x = silu(x);
        x.mul(self.linear_outer.forward(input))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn config_defaults_are_burns() {
        let ours = SwiGluConfig::new(3, 5);
        let burn = burn::nn::SwiGluConfig::new(3, 5);
        assert_eq!(ours.bias, burn.bias);
        assert_eq!(ours.initializer, burn.initializer);
        assert_eq!(format!("{:?}", ours.layout), format!("{:?}", burn.layout));
    }

    #[test]
    fn display_matches_burn() {
        let device = Device::flex();
        let ours = SwiGluConfig::new(3, 5).init(&device);
        let burn = burn::nn::SwiGluConfig::new(3, 5).init(&device);
        assert_eq!(format!("{ours}"), format!("{burn}"));
    }

    #[test]
    fn forward_is_silu_gate_times_value() {
        // Oracle: silu(a) = a / (1 + exp(-a)) written out, on the layers' weights.
        let device = Device::flex();
        let swiglu = SwiGluConfig::new(4, 6).with_bias(true).init(&device);
        let x = Tensor::<2>::random([5, 4], Distribution::Default, &device);
        let lin = |l: &Linear| {
            x.clone().matmul(l.weight.val()) + l.bias.as_ref().unwrap().val().unsqueeze()
        };
        let gate = lin(&swiglu.linear_inner);
        let expected = gate.clone() / (gate.neg().exp() + 1.0) * lin(&swiglu.linear_outer);
        let diff = (swiglu.forward(x) - expected).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn col_layout_keeps_d_in_d_out_in_memory() {
        let device = Device::flex();
        // A fresh (lazy) column-layout layer runs.
        let swiglu = SwiGluConfig::new(3, 5).with_layout(LinearLayout::Col).init(&device);
        assert_eq!(swiglu.forward(Tensor::<2>::zeros([2, 3], &device)).dims(), [2, 5]);
        let swiglu = SwiGluConfig::new(3, 5).with_layout(LinearLayout::Col).init(&device);
        // Burn's lazy column-layout weight has the pre-transpose lazy shape until initialised.
        assert_eq!(swiglu.linear_inner.weight.lazy_shape().dims::<2>(), [5, 3]);
        assert_eq!(swiglu.linear_inner.weight.val().dims(), [3, 5]);
        assert_eq!((swiglu.linear_inner.d_input(), swiglu.linear_inner.d_output()), (3, 5));
        assert_eq!(swiglu.forward(Tensor::<2>::zeros([2, 3], &device)).dims(), [2, 5]);
    }
}
