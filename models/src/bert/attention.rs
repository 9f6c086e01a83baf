//! [`BertAttention`]: multi-head self-attention ([`BertSelfAttention`], HF `attention.self`)
//! followed by [`BertSelfOutput`] (HF `attention.output`: dense, dropout, residual, LayerNorm).

use burn::config::Config;
use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use emloc::nn::{Dropout, DropoutConfig};
use emloc::nn::{Linear, LinearConfig};

/// Configuration of [`BertAttention`].
#[derive(Config, Debug)]
pub struct BertAttentionConfig {
    /// Hidden width `d`.
    pub hidden_size: usize,
    /// Number of heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// LayerNorm epsilon.
    #[config(default = 1e-12)]
    pub layer_norm_eps: f64,
    /// Dropout on the attention probabilities (training only).
    #[config(default = 0.1)]
    pub attention_dropout: f64,
    /// Dropout on the output projection (training only).
    #[config(default = 0.1)]
    pub hidden_dropout: f64,
}

impl BertAttentionConfig {
    /// Builds the module on `device` (weights lazily initialised).
    ///
    /// # Panics
    /// If `num_attention_heads` is zero or does not divide `hidden_size`.
    pub fn init(&self, device: &Device) -> BertAttention {
        let d = self.hidden_size;
        assert!(
            self.num_attention_heads > 0 && d.is_multiple_of(self.num_attention_heads),
            "BertAttentionConfig: hidden_size {d} is not a multiple of num_attention_heads {}",
            self.num_attention_heads
        );
        BertAttention {
            self_attn: BertSelfAttention {
                query: LinearConfig::new(d, d).init(device),
                key: LinearConfig::new(d, d).init(device),
                value: LinearConfig::new(d, d).init(device),
                dropout: DropoutConfig::new(self.attention_dropout).init(),
                num_heads: self.num_attention_heads,
            },
            output: BertSelfOutput {
                dense: LinearConfig::new(d, d).init(device),
                layer_norm: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
                dropout: DropoutConfig::new(self.hidden_dropout).init(),
            },
        }
    }
}

/// HF `BertSelfAttention` (absolute positions): scaled dot-product attention over
/// `num_heads` heads, with an additive mask bias for padding.
#[derive(Module, Debug)]
pub struct BertSelfAttention {
    /// Query projection `[d, d]`.
    pub query: Linear,
    /// Key projection `[d, d]`.
    pub key: Linear,
    /// Value projection `[d, d]`.
    pub value: Linear,
    /// Dropout on the attention probabilities (training only).
    pub dropout: Dropout,
    /// Number of heads.
    pub num_heads: usize,
}

impl BertSelfAttention {
    /// Attends every position to every unmasked position.
    ///
    /// `mask_bias` is added to the attention scores: 0 where a key may be attended and a large
    /// negative number where it is padding (see [`super::attention_mask_bias`]).
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, d]`
    /// - `mask_bias`: `[batch, 1, 1, seq]` (broadcast over heads and queries)
    /// - output (context, before the output projection): `[batch, seq, d]`
    ///
    /// # Panics
    /// If `d` is not the layer's width.
    pub fn forward(&self, hidden: Tensor<3>, mask_bias: Option<Tensor<4>>) -> Tensor<3> {
        let [batch, seq, d] = hidden.dims();
        let heads = self.num_heads;
        let head_dim = d / heads;
        let split = |x: Tensor<3>| x.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2);
        let q = split(self.query.forward(hidden.clone()));
        let k = split(self.key.forward(hidden.clone()));
        let v = split(self.value.forward(hidden));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((head_dim as f64).sqrt());
        let scores = match mask_bias {
            // A bias of another dtype (f32 beside f16 weights) is clamped to the scores' finite
            // minimum before the cast, so padding stays finite, as in HF.
            Some(bias) if bias.dtype() != scores.dtype() => {
                let dtype = scores.dtype();
                scores + bias.clamp_min(crate::llama::mask_value(dtype)).cast(dtype)
            }
            Some(bias) => scores + bias,
            None => scores,
        };
        let probs = self.dropout.forward(softmax(scores, 3));
        probs.matmul(v).swap_dims(1, 2).reshape([batch, seq, d])
    }
}

/// HF `BertSelfOutput`: `LayerNorm(dropout(dense(context)) + input)`.
#[derive(Module, Debug)]
pub struct BertSelfOutput {
    /// Output projection `[d, d]`.
    pub dense: Linear,
    /// HF `LayerNorm`.
    pub layer_norm: LayerNorm,
    /// Dropout (training only).
    pub dropout: Dropout,
}

impl BertSelfOutput {
    /// # Shapes
    /// - `context`, `input`, output: `[batch, seq, d]`
    pub fn forward(&self, context: Tensor<3>, input: Tensor<3>) -> Tensor<3> {
        let x = self.dropout.forward(self.dense.forward(context));
        self.layer_norm.forward(x + input)
    }
}

/// HF `BertAttention`: self-attention, then output projection with residual and LayerNorm.
///
/// Its `Module` implementation is written by hand so that the self-attention sub-module is
/// visited under HF's name **`self`** (a Rust keyword, so the field is `self_attn`): module
/// paths, and hence LoRA adapter keys, read `encoder.layer.N.attention.self.query` exactly as in
/// HF and PEFT. Otherwise it is what `#[derive(Module)]` would generate.
#[derive(Clone, Debug)]
pub struct BertAttention {
    /// HF `attention.self` (module path segment `self`).
    pub self_attn: BertSelfAttention,
    /// HF `attention.output`.
    pub output: BertSelfOutput,
}

impl BertAttention {
    /// # Shapes
    /// - `hidden`, output: `[batch, seq, d]`
    /// - `mask_bias`: `[batch, 1, 1, seq]`
    pub fn forward(&self, hidden: Tensor<3>, mask_bias: Option<Tensor<4>>) -> Tensor<3> {
        let context = self.self_attn.forward(hidden.clone(), mask_bias);
        self.output.forward(context, hidden)
    }
}

const CONTAINER: &str = "Struct:BertAttention";
/// The module path segment of [`BertAttention::self_attn`].
pub const SELF_ATTENTION_PATH: &str = "self";

impl Module for BertAttention {
    fn collect_devices(&self, devices: Devices) -> Devices {
        let devices = self.self_attn.collect_devices(devices);
        self.output.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        Self { self_attn: self.self_attn.fork(device), output: self.output.fork(device) }
    }

    fn to_device(self, device: &Device) -> Self {
        Self { self_attn: self.self_attn.to_device(device), output: self.output.to_device(device) }
    }

    fn train(self) -> Self {
        Self { self_attn: self.self_attn.train(), output: self.output.train() }
    }

    fn valid(&self) -> Self {
        Self { self_attn: self.self_attn.valid(), output: self.output.valid() }
    }

    fn materialize(self) -> Self {
        Self { self_attn: self.self_attn.materialize(), output: self.output.materialize() }
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module(SELF_ATTENTION_PATH, CONTAINER);
        Module::visit(&self.self_attn, visitor);
        visitor.exit_module(SELF_ATTENTION_PATH, CONTAINER);
        visitor.enter_module("output", CONTAINER);
        Module::visit(&self.output, visitor);
        visitor.exit_module("output", CONTAINER);
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        mapper.enter_module(SELF_ATTENTION_PATH, CONTAINER);
        let self_attn = Module::map(self.self_attn, mapper);
        mapper.exit_module(SELF_ATTENTION_PATH, CONTAINER);
        mapper.enter_module("output", CONTAINER);
        let output = Module::map(self.output, mapper);
        mapper.exit_module("output", CONTAINER);
        Self { self_attn, output }
    }
}

impl ModuleDisplayDefault for BertAttention {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .set_top_level_type("BertAttention")
            .add(SELF_ATTENTION_PATH, &self.self_attn)
            .add("output", &self.output)
            .optional()
    }

    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

impl ModuleDisplay for BertAttention {}

impl core::fmt::Display for BertAttention {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", ModuleDisplay::format(self, Default::default()))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{ModuleMapper, Param};
    use burn::tensor::{DType, Int, TensorData};

    use super::*;
    use crate::bert::attention_mask_bias;

    struct ToHalf(DType);

    impl ModuleMapper for ToHalf {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|t| t.cast(dtype))
        }
    }

    #[test]
    fn half_precision_attention_with_padding_has_no_nan() {
        let device = Device::flex();
        device.seed(7);
        let attention = BertAttentionConfig::new(8, 2).init(&device);
        let hidden =
            Tensor::<3>::random([2, 4, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 0, 0], [2, 4]),
            &device,
        );
        let bias = attention_mask_bias(mask);
        let values: Vec<f32> = bias.clone().into_data().iter::<f32>().collect();
        assert_eq!(values, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, f32::MIN, f32::MIN]);
        let reference: Vec<f32> = attention
            .self_attn
            .forward(hidden.clone(), Some(bias.clone()))
            .into_data()
            .iter::<f32>()
            .collect();
        for dtype in [DType::F16, DType::BF16] {
            let half = attention.clone().map(&mut ToHalf(dtype));
            let out = half.self_attn.forward(hidden.clone().cast(dtype), Some(bias.clone()));
            assert_eq!(out.dtype(), dtype);
            let out: Vec<f32> = out.into_data().iter::<f32>().collect();
            assert!(out.iter().all(|v| v.is_finite()), "{dtype:?}: {out:?}");
            let diff =
                out.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff < 0.05, "{dtype:?} differs from f32 by {diff}");
        }
    }
}
