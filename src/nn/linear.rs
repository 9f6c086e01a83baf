use crate::ops::linear;
use burn::config::Config;
use burn::module::{
    Content, DisplaySettings, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor, Param,
};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use super::hooks;
use super::{LoraAdapter, LowRankFactors, QuantizedWeight};
use crate::calibration;

/// Configuration of a [`Linear`] layer; the same fields and defaults as `burn::nn::LinearConfig`
/// (row layout only).
#[derive(Config, Debug)]
pub struct LinearConfig {
    /// Input features `d_in`.
    pub d_input: usize,
    /// Output features `d_out`.
    pub d_output: usize,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Weight (and bias) initializer; Burn's default.
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
}

impl LinearConfig {
    /// Builds a dense layer on `device`.
    pub fn init(&self, device: &Device) -> Linear {
        let weight = self.initializer.init_with(
            [self.d_input, self.d_output],
            Some(self.d_input),
            Some(self.d_output),
            device,
        );
        let bias = self.bias.then(|| {
            self.initializer.init_with(
                [self.d_output],
                Some(self.d_input),
                Some(self.d_output),
                device,
            )
        });
        Linear { weight, bias, factors: None, lora: None, quantized: None }
    }
}

/// A drop-in replacement for `burn::nn::Linear` that EMLoC can calibrate, emulate and adapt.
///
/// It has the same `weight` (`[d_in, d_out]`) and `bias` (`[d_out]`) fields and the same module
/// name, so records and HF checkpoints (through burn-store's PyTorch adapter) load unchanged.
/// It runs in one of these forms:
///
/// - **dense**: `y = x W + b`, exactly like Burn's layer;
/// - **emulator**: [`factors`](Self::factors) is set and `y = (x W_v) W_u + b`; the dense weight is
///   dropped (stored as an empty `[0, 0]` tensor) so the emulator costs `k (d_in + d_out)`;
/// - **quantized** (QLoRA-style): [`quantized`](Self::quantized) is set and the dense weight is
///   kept only in a compact form, decoded for each forward pass (the dense `weight` is `[0, 0]`);
/// - any form plus a **LoRA adapter** ([`lora`](Self::lora)): `y += s · (dropout(x) A) B`,
///   computed through the rank-`r` bottleneck, never as a dense `B A`.
///
/// While [`emulate`](crate::emulate) or [`calibrate`](crate::calibrate) runs calibration on
/// this thread, the forward pass also adds the layer's input Gram matrix `XᵀX` to that
/// session's statistics.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Dense weight `Wᵀ`, shape `[d_in, d_out]`; `[0, 0]` in emulator form.
    pub weight: Param<Tensor<2>>,
    /// Optional bias, shape `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Frozen emulator factors; when set they replace the dense weight.
    pub factors: Option<LowRankFactors>,
    /// Trainable LoRA adapter.
    pub lora: Option<LoraAdapter>,
    /// The frozen dense weight in a compact form (see [`Linear::quantize`]); not a parameter:
    /// module visitors and mappers do not see it, and records do not hold it.
    pub quantized: Option<QuantizedWeight>,
}

impl Linear {
    /// Applies the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_in]`
    /// - output: `[..., d_out]`
    ///
    /// # Panics
    /// If the last input dimension is not `d_in`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let d_input = self.d_input();
        let got = input.dims()[D - 1];
        assert_eq!(
            got, d_input,
            "Linear::forward: input has {got} features, layer expects {d_input}"
        );
        calibration::record(&self.weight.id, &input);

        let bias = self.bias.as_ref().map(|b| b.val());
        let dtype = input.dtype();
        // An f32 adapter on frozen weights of another dtype (`cast_frozen`) runs unfused, in
        // its own dtype.
        let adapter_dtype = self.lora.as_ref().map(|lora| lora.a.val().dtype());
        if let (Some(factors), Some(lora), true) =
            (&self.factors, &self.lora, adapter_dtype == Some(dtype))
        {
            // Emulator + adapter: one fused op on every backend (emloc::ops); the LoRA branch
            // gets its own input only when dropout actually changes it.
            let dropped = (lora.dropout.prob > 0.0).then(|| lora.dropout.forward(input.clone()));
            let (w_v, w_u) = (factors.w_v.val(), factors.w_u.val());
            let (a, b) = (lora.a.val(), lora.b.val());
            return crate::ops::lowrank_lora(input, dropped, w_v, w_u, a, b, bias, lora.scale());
        }
        let base = match &self.factors {
            Some(factors) => {
                let h = linear(input.clone(), factors.w_v.val(), None);
                linear(h, factors.w_u.val(), bias)
            }
            None => match &self.quantized {
                Some(q) => linear(input.clone(), q.dense(&input.device(), dtype.into()), bias),
                None => linear(input.clone(), self.weight.val(), bias),
            },
        };
        match (&self.lora, adapter_dtype) {
            (Some(lora), Some(own)) if own != dtype => {
                base + lora.forward(input.cast(own)).cast(dtype)
            }
            (Some(lora), _) => base + lora.forward(input),
            (None, _) => base,
        }
    }

    /// Input features `d_in`. Never initialises a lazily initialised weight.
    pub fn d_input(&self) -> usize {
        match (&self.factors, &self.quantized) {
            (Some(f), _) => f.d_input(),
            (None, Some(q)) => q.d_input(),
            (None, None) => self.weight.lazy_shape().dims::<2>()[0],
        }
    }

    /// Output features `d_out`. Never initialises a lazily initialised weight.
    pub fn d_output(&self) -> usize {
        match (&self.factors, &self.quantized) {
            (Some(f), _) => f.d_output(),
            (None, Some(q)) => q.d_output(),
            (None, None) => self.weight.lazy_shape().dims::<2>()[1],
        }
    }

    /// Whether the layer runs as an emulator layer.
    pub fn is_emulated(&self) -> bool {
        self.factors.is_some()
    }

    /// The dense layer with only the output features `kept` (weight columns and bias entries,
    /// in the order given): structured pruning of the neurons it produces.
    ///
    /// # Errors
    /// As [`keep_inputs`](Self::keep_inputs).
    pub fn keep_outputs(self, kept: &[usize]) -> crate::Result<Self> {
        let width = self.d_output();
        self.check_prunable(kept, width, "output")?;
        let index = feature_index(kept, &self.weight.val().device());
        let weight = self.weight.map(|w| w.select(1, index.clone()));
        let bias = self.bias.map(|b| b.map(|b| b.select(0, index)));
        Ok(Self { weight, bias, ..self })
    }

    /// The dense layer with only the input features `kept` (weight rows, in the order given):
    /// what reads a pruned layer's output.
    ///
    /// # Errors
    /// [`EmlocError::InvalidConfig`](crate::EmlocError::InvalidConfig) if the layer is emulated
    /// or carries an adapter (prune first), or `kept` is empty, not strictly increasing, or
    /// names a feature the layer does not have.
    pub fn keep_inputs(self, kept: &[usize]) -> crate::Result<Self> {
        let width = self.d_input();
        self.check_prunable(kept, width, "input")?;
        let index = feature_index(kept, &self.weight.val().device());
        Ok(Self { weight: self.weight.map(|w| w.select(0, index)), ..self })
    }

    fn check_prunable(&self, kept: &[usize], width: usize, side: &str) -> crate::Result<()> {
        let problem = if self.is_emulated() || self.lora.is_some() || self.quantized.is_some() {
            Some(
                "an emulator layer, a quantized one or one with an adapter cannot be pruned".into(),
            )
        } else if kept.is_empty()
            || kept.windows(2).any(|w| w[0] >= w[1])
            || kept.last().is_some_and(|&k| k >= width)
        {
            Some(format!(
                "kept {side} features must be non-empty, strictly increasing and below {width}"
            ))
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(crate::EmlocError::InvalidConfig(p)))
    }

    /// The effective frozen weight `Wᵀ` (dense or decoded from its quantized form) or `W^Eᵀ`
    /// (emulator), shape `[d_in, d_out]`, in the dtype of `weight`. Builds a dense matrix: for
    /// merging, correction and tests, not for the forward pass.
    pub fn base_weight(&self) -> Tensor<2> {
        match (&self.factors, &self.quantized) {
            (Some(f), _) => f.dense(),
            (None, Some(q)) => {
                let weight = self.weight.val();
                q.dense(&weight.device(), weight.dtype().into())
            }
            (None, None) => self.weight.val(),
        }
    }

    /// The dense layer with its weight kept only as `quantized` (QLoRA-style: decoded for each
    /// forward pass, so the layer holds the compact bytes instead of `d_in · d_out` floats).
    /// The dense weight is dropped (kept as a `[0, 0]` tensor under its id); the bias stays.
    ///
    /// # Errors
    /// [`EmlocError::InvalidConfig`](crate::EmlocError::InvalidConfig) if the layer is emulated
    /// or carries an adapter; [`EmlocError::ShapeMismatch`](crate::EmlocError::ShapeMismatch)
    /// if `quantized` is not `[d_out, d_in]` of this layer.
    pub fn quantize(self, quantized: QuantizedWeight) -> crate::Result<Self> {
        if self.is_emulated() || self.lora.is_some() {
            return Err(crate::EmlocError::InvalidConfig(
                "an emulator layer or one with an adapter cannot be quantized".into(),
            ));
        }
        let expected = vec![self.d_input(), self.d_output()];
        let found = vec![quantized.d_input(), quantized.d_output()];
        if found != expected {
            return Err(crate::EmlocError::ShapeMismatch {
                name: "quantized weight [d_in, d_out]".into(),
                expected,
                found,
            });
        }
        let mut layer = self;
        layer.drop_dense_weight();
        layer.quantized = Some(quantized);
        Ok(layer)
    }

    /// Drops the dense weight and any quantized form, keeping the weight's id so that the layer
    /// stays addressable: an empty `[0, 0]` tensor on the weight's device that requires no
    /// gradient (what emulator and quantized layers hold).
    pub(crate) fn drop_dense_weight(&mut self) {
        let device = self.weight.lazy_device();
        self.weight = Param::initialized(self.weight.id, Tensor::zeros([0, 0], &device))
            .set_require_grad(false);
        self.quantized = None;
    }
}

/// `kept` as an index tensor on `device`.
fn feature_index(kept: &[usize], device: &Device) -> Tensor<1, burn::tensor::Int> {
    let ids: Vec<i64> = kept.iter().map(|&k| k as i64).collect();
    Tensor::from_data(burn::tensor::TensorData::new(ids, [kept.len()]), device)
}

const CONTAINER: &str = "Struct:Linear";

// Hand-written rather than derived so that `visit` and `map` can hand the whole layer to emloc's
// transforms (see `hooks`); otherwise identical to what `#[derive(Module)]` generates.
impl Module for Linear {
    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        hooks::on_visit(self);
        hooks::visit_fields!(self, visitor, CONTAINER);
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let this = hooks::on_map(self);
        let (weight, bias, factors, lora) = hooks::map_fields!(this, mapper, CONTAINER);
        Self { weight, bias, factors, lora, quantized: this.quantized }
    }

    hooks::delegate_fields!();
}

impl ModuleDisplayDefault for Linear {
    fn content(&self, content: Content) -> Option<Content> {
        content.set_top_level_type("Linear").optional()
    }

    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

impl ModuleDisplay for Linear {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new().with_new_line_after_attribute(false).optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let content = content
            .add("d_input", &self.d_input())
            .add("d_output", &self.d_output())
            .add("bias", &self.bias.is_some());
        let content = match &self.factors {
            Some(f) => content.add("emulator_rank", &f.rank()),
            None => content,
        };
        match &self.lora {
            Some(l) => content.add("lora_rank", &l.rank()).optional(),
            None => content.optional(),
        }
    }
}

impl core::fmt::Display for Linear {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", ModuleDisplay::format(self, Default::default()))
    }
}
