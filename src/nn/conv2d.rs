use burn::config::Config;
use burn::module::{
    Content, DisplaySettings, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor, Param,
};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::module::{conv2d, unfold4d};
use burn::tensor::ops::{ConvOptions, PadMode, UnfoldOptions};
use burn::tensor::{Device, Shape, Tensor};

use super::hooks;
use super::{Linear, LoraAdapter, LowRankFactors};
use crate::calibration;
use crate::error::{EmlocError, Result};

/// Configuration of a [`Conv2d`] layer; the same fields and defaults as
/// `burn::nn::conv::Conv2dConfig`.
#[derive(Config, Debug)]
pub struct Conv2dConfig {
    /// Input and output channels `[C_in, C_out]`.
    pub channels: [usize; 2],
    /// Kernel size `[kh, kw]`.
    pub kernel_size: [usize; 2],
    /// Stride of the convolution.
    #[config(default = "[1, 1]")]
    pub stride: [usize; 2],
    /// Spacing between kernel elements.
    #[config(default = "[1, 1]")]
    pub dilation: [usize; 2],
    /// Channel groups. emloc emulates and adapts only `groups = 1`; a grouped convolution runs
    /// as Burn's and stays dense.
    #[config(default = "1")]
    pub groups: usize,
    /// Padding, as Burn's (`Same` with an even kernel pads asymmetrically, like Burn).
    #[config(default = "PaddingConfig2d::Valid")]
    pub padding: PaddingConfig2d,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Weight (and bias) initializer; Burn's default.
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
}

impl Conv2dConfig {
    /// Checks what Burn would panic on: zero channels, kernel, stride, dilation or groups, and
    /// channel counts that `groups` does not divide.
    ///
    /// # Errors
    /// [`EmlocError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(EmlocError::InvalidConfig(format!("Conv2d: {msg}")));
        for (name, value) in [
            ("channels", self.channels),
            ("kernel_size", self.kernel_size),
            ("stride", self.stride),
            ("dilation", self.dilation),
        ] {
            if value.contains(&0) {
                return invalid(format!("{name} {value:?} must be non-zero"));
            }
        }
        if self.groups == 0 {
            return invalid("groups must be at least 1".into());
        }
        if self.channels.iter().any(|c| c % self.groups != 0) {
            return invalid(format!(
                "channels {:?} must both be divisible by groups = {}",
                self.channels, self.groups
            ));
        }
        Ok(())
    }

    /// Builds a dense layer on `device`, as Burn does, after [`validate`](Self::validate).
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn try_init(&self, device: &Device) -> Result<Conv2d> {
        self.validate()?;
        let [c_in, c_out] = self.channels;
        let [kh, kw] = self.kernel_size;
        let fan_in = c_in / self.groups * kh * kw;
        let fan_out = c_out / self.groups * kh * kw;
        let weight = self.initializer.init_with(
            [c_out, c_in / self.groups, kh, kw],
            Some(fan_in),
            Some(fan_out),
            device,
        );
        let bias = self
            .bias
            .then(|| self.initializer.init_with([c_out], Some(fan_in), Some(fan_out), device));
        Ok(Conv2d {
            weight,
            bias,
            stride: self.stride,
            kernel_size: self.kernel_size,
            dilation: self.dilation,
            groups: self.groups,
            padding: self.padding.clone(),
            factors: None,
            lora: None,
        })
    }

    /// Builds a dense layer on `device` (Burn's signature).
    ///
    /// # Panics
    /// If the config is invalid (see [`validate`](Self::validate); use
    /// [`try_init`](Self::try_init) for an error instead), as Burn's `init` panics.
    pub fn init(&self, device: &Device) -> Conv2d {
        self.try_init(device).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A drop-in replacement for `burn::nn::conv::Conv2d` that EMLoC can calibrate, emulate and
/// adapt.
///
/// Same fields (`weight` `[C_out, C_in / groups, kh, kw]`, `bias` `[C_out]`, `stride`,
/// `kernel_size`, `dilation`, `groups`, `padding`), module name and record paths as Burn's, so
/// records and HF checkpoints load unchanged. With `groups = 1` a convolution is the linear map
/// `W [C_out, C_in·kh·kw]` applied to every unfolded input patch (channel-major `(c, i, j)`
/// order, that of `weight.reshape([C_out, C_in·kh·kw])`), and it runs in one of these forms:
///
/// - **dense**: exactly Burn's convolution;
/// - **emulator**: [`factors`](Self::factors) is set (`w_v` `[C_in·kh·kw, k]`, `w_u`
///   `[k, C_out]`) and the layer is a factored convolution: a `kh×kw` convolution into `k`
///   channels (kernel `W_v` reshaped `[k, C_in, kh, kw]`, the layer's stride, padding and
///   dilation), then a `1×1` convolution with kernel `W_u` (`[C_out, k, 1, 1]`) plus the bias;
///   the dense weight is dropped (an empty `[0, 0, 0, 0]` tensor);
/// - either form plus a **LoRA adapter** ([`lora`](Self::lora), PEFT's Conv2d LoRA):
///   `y += s · B(A(dropout(x)))` where `A` is a convolution with kernel `[r, C_in, kh, kw]` and
///   the layer's stride, padding and dilation, and `B` a `1×1` convolution `[C_out, r, 1, 1]`.
///
/// While [`emulate`](crate::emulate) calibrates, the forward pass also accumulates the Gram
/// matrix of the unfolded patches (`[N·L, C_in·kh·kw]`). Every model-wide transform of emloc
/// (emulate, attach/export/merge adapters, correct, save/load emulators) sees the layer as an
/// [`emloc::nn::Linear`](Linear) with `d_in = C_in·kh·kw`, `d_out = C_out`.
///
/// A grouped convolution (`groups > 1`) is not a dense map on patches: emloc leaves it dense
/// (listed in [`EmulatorReport::dense_layers`](crate::EmulatorReport)) and refuses to put a
/// LoRA adapter on it when a target names it.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// Dense weight `[C_out, C_in / groups, kh, kw]`; `[0, 0, 0, 0]` in emulator form.
    pub weight: Param<Tensor<4>>,
    /// Optional bias `[C_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Stride of the convolution.
    pub stride: [usize; 2],
    /// Kernel size `[kh, kw]`.
    pub kernel_size: [usize; 2],
    /// Spacing between kernel elements.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
    /// Padding configuration.
    pub padding: PaddingConfig2d,
    /// Frozen emulator factors on unfolded patches; when set they replace the dense weight.
    pub factors: Option<LowRankFactors>,
    /// Trainable LoRA adapter on unfolded patches (`a` `[C_in·kh·kw, r]`, `b` `[r, C_out]`).
    pub lora: Option<LoraAdapter>,
}

impl Conv2d {
    /// Applies the layer.
    ///
    /// # Shapes
    /// - input: `[batch, C_in, height, width]`
    /// - output: `[batch, C_out, height_out, width_out]`, as Burn's `Conv2d`
    ///
    /// # Panics
    /// If the input does not have `C_in` channels, or is smaller than the dilated kernel.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let [_, channels, height, width] = input.dims();
        let c_in = self.channels_in();
        assert_eq!(
            channels, c_in,
            "Conv2d::forward: input has {channels} channels, layer expects {c_in}"
        );
        if calibration::is_recording(&self.weight.id) {
            calibration::record(&self.weight.id, &self.patches(input.clone()));
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        // The factored and LoRA convolutions are dense (groups = 1) on the full patch.
        let spatial = self.conv_options(height, width, 1);
        let pointwise = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        if let (Some(factors), Some(lora)) = (&self.factors, &self.lora)
            && lora.dropout.prob == 0.0
        {
            // Emulator + adapter: one kh×kw convolution into k + r channels, one 1×1 out.
            let down = Tensor::cat(
                vec![self.patch_kernel(factors.w_v.val()), self.patch_kernel(lora.a.val())],
                0,
            );
            let up = Tensor::cat(
                vec![
                    pointwise_kernel(factors.w_u.val()),
                    pointwise_kernel(lora.b.val()).mul_scalar(lora.scale()),
                ],
                1,
            );
            return conv2d(conv2d(input, down, None, spatial), up, bias, pointwise);
        }
        let base = match &self.factors {
            Some(factors) => {
                let h = conv2d(
                    input.clone(),
                    self.patch_kernel(factors.w_v.val()),
                    None,
                    spatial.clone(),
                );
                conv2d(h, pointwise_kernel(factors.w_u.val()), bias, pointwise.clone())
            }
            None => conv2d(
                input.clone(),
                self.weight.val(),
                bias,
                self.conv_options(height, width, self.groups),
            ),
        };
        match &self.lora {
            Some(lora) => {
                let h = conv2d(
                    lora.dropout.forward(input),
                    self.patch_kernel(lora.a.val()),
                    None,
                    spatial,
                );
                base + conv2d(h, pointwise_kernel(lora.b.val()), None, pointwise)
                    .mul_scalar(lora.scale())
            }
            None => base,
        }
    }

    /// The unfolded input patches, `[batch, L, C_in·kh·kw]` with `L` output pixels, in the
    /// channel-major `(c, i, j)` order of `weight.reshape([C_out, C_in·kh·kw])` (for groups = 1):
    /// what calibration accumulates the Gram of. Detached from autodiff.
    ///
    /// # Shapes
    /// - input: `[batch, C_in, height, width]`
    /// - output: `[batch, height_out · width_out, C_in·kh·kw]`
    pub fn patches(&self, input: Tensor<4>) -> Tensor<3> {
        let [_, _, height, width] = input.dims();
        let ((top, bottom), (left, right)) = self.padding_pairs(height, width);
        let input = input.without_autodiff();
        let (input, padding) = if top == bottom && left == right {
            (input, [top, left])
        } else {
            (input.pad([(top, bottom), (left, right)], PadMode::Constant(0.0)), [0, 0])
        };
        let options = UnfoldOptions::new(self.stride, padding, self.dilation);
        unfold4d(input, self.kernel_size, options).swap_dims(1, 2)
    }

    /// Input channels `C_in`. Never initialises a lazily initialised weight.
    pub fn channels_in(&self) -> usize {
        match &self.factors {
            Some(f) => f.d_input() / self.kernel_size.iter().product::<usize>().max(1),
            None => self.weight.lazy_shape().dims::<4>()[1] * self.groups,
        }
    }

    /// Output channels `C_out`. Never initialises a lazily initialised weight.
    pub fn channels_out(&self) -> usize {
        match &self.factors {
            Some(f) => f.d_output(),
            None => self.weight.lazy_shape().dims::<4>()[0],
        }
    }

    /// Features of one unfolded patch, `C_in·kh·kw`: the `d_in` of the layer's linear view.
    pub fn d_input(&self) -> usize {
        self.channels_in() * self.kernel_size.iter().product::<usize>()
    }

    /// `C_out`: the `d_out` of the layer's linear view.
    pub fn d_output(&self) -> usize {
        self.channels_out()
    }

    /// Whether the layer runs as an emulator layer.
    pub fn is_emulated(&self) -> bool {
        self.factors.is_some()
    }

    /// The effective frozen kernel, `W` (dense) or `W^E` (emulator) reshaped
    /// `[C_out, C_in, kh, kw]`. Builds a dense tensor: for merging and tests, not the forward.
    pub fn base_weight(&self) -> Tensor<4> {
        match &self.factors {
            Some(f) => self.patch_kernel(f.dense()),
            None => self.weight.val(),
        }
    }

    /// Padding as `((top, bottom), (left, right))` for an input of `height × width`, as Burn
    /// computes it (`Same` pads `(total / 2, total − total / 2)`).
    pub fn padding_pairs(&self, height: usize, width: usize) -> ((usize, usize), (usize, usize)) {
        match &self.padding {
            PaddingConfig2d::Valid => ((0, 0), (0, 0)),
            PaddingConfig2d::Same => (
                same_padding(self.kernel_size[0], self.stride[0], height),
                same_padding(self.kernel_size[1], self.stride[1], width),
            ),
            PaddingConfig2d::Explicit(top, left, bottom, right) => {
                ((*top, *bottom), (*left, *right))
            }
        }
    }

    fn conv_options(&self, height: usize, width: usize, groups: usize) -> ConvOptions<2> {
        let (rows, cols) = self.padding_pairs(height, width);
        ConvOptions::new_with_padding(self.stride, [rows, cols], self.dilation, groups)
    }

    /// A patch-space matrix `[C_in·kh·kw, n]` as the kernel `[n, C_in, kh, kw]` of a convolution.
    fn patch_kernel(&self, matrix: Tensor<2>) -> Tensor<4> {
        let [d_in, n] = matrix.dims();
        let [kh, kw] = self.kernel_size;
        matrix.transpose().reshape([n, d_in / (kh * kw), kh, kw])
    }

    /// The `Linear` view of a groups = 1 layer that emloc's transforms see: its weight `Param`
    /// has the conv weight's id and the lazily computed value `weight.reshape([C_out, d_in])ᵀ`
    /// (never computed unless a transform reads it), the bias, factors and adapter are shared.
    fn linear_view(&self) -> Linear {
        let dims = self.weight.lazy_shape().dims::<4>();
        let (d_in, d_out) = (dims[1] * dims[2] * dims[3], dims[0]);
        let conv = self.weight.clone();
        let weight = Param::uninitialized(
            self.weight.id,
            move |device, _| conv.val().reshape([d_out, d_in]).transpose().to_device(device),
            self.weight.lazy_device(),
            false,
            Shape::new([d_in, d_out]),
        );
        Linear {
            weight,
            bias: self.bias.clone(),
            factors: self.factors.clone(),
            lora: self.lora.clone(),
            quantized: None,
        }
    }

    /// Takes the bias, factors and adapter of a transformed [`linear_view`](Self::linear_view),
    /// and its weight if the transform replaced it: an empty weight becomes the emulator form's
    /// `[0, 0, 0, 0]`, a dense `[d_in, d_out]` one is reshaped back to the 4-D kernel.
    fn with_linear_view(self, view: Linear) -> Self {
        // A convolution has no quantized form: `quantize` is for `Linear` layers only.
        let Linear { weight, bias, factors, lora, .. } = view;
        let weight = if weight.id == self.weight.id && !weight.is_initialized() {
            self.weight
        } else if weight.lazy_shape().num_elements() == 0 {
            let device = weight.lazy_device();
            Param::initialized(weight.id, Tensor::zeros([0, 0, 0, 0], &device))
                .set_require_grad(false)
        } else {
            // `patch_kernel` of the `[d_in, d_out]` weight is the `[d_out, C_in, kh, kw]` kernel.
            let value = self.patch_kernel(weight.val());
            if weight.id == self.weight.id {
                self.weight.map(|_| value)
            } else {
                Param::initialized(weight.id, value)
            }
        };
        Self { weight, bias, factors, lora, ..self }
    }
}

/// Burn's `Same` padding for one dimension: `(total / 2, total − total / 2)`.
fn same_padding(kernel: usize, stride: usize, size: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = if out > 0 { ((out - 1) * stride + kernel).saturating_sub(size) } else { 0 };
    (total / 2, total - total / 2)
}

/// A matrix `[n, C_out]` as the kernel `[C_out, n, 1, 1]` of a 1×1 convolution.
fn pointwise_kernel(matrix: Tensor<2>) -> Tensor<4> {
    let [n, c_out] = matrix.dims();
    matrix.transpose().reshape([c_out, n, 1, 1])
}

const CONTAINER: &str = "Struct:Conv2d";

// Hand-written rather than derived so that `visit` and `map` can hand emloc's transforms the
// layer's linear view (see `hooks`); the fields are visited exactly as `#[derive(Module)]` on
// Burn's `Conv2d` visits them (`weight`, `bias`; the others are constants), plus `factors` and
// `lora`.
impl Module for Conv2d {
    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        if self.groups != 1 {
            hooks::on_unsupported(|| {
                format!(
                    "it is a Conv2d with groups = {}, which emloc cannot emulate or adapt",
                    self.groups
                )
            });
        } else if hooks::is_visiting() {
            hooks::on_visit_layer(&self.linear_view(), Some(self.kernel_size));
        }
        hooks::visit_fields!(self, visitor, CONTAINER);
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let this = if self.groups == 1 && hooks::is_mapping() {
            let view = hooks::on_map(self.linear_view());
            self.with_linear_view(view)
        } else {
            self
        };
        let (weight, bias, factors, lora) = hooks::map_fields!(this, mapper, CONTAINER);
        Self { weight, bias, factors, lora, ..this }
    }

    hooks::delegate_fields!();
}

impl ModuleDisplayDefault for Conv2d {
    fn content(&self, content: Content) -> Option<Content> {
        content.set_top_level_type("Conv2d").optional()
    }

    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

impl ModuleDisplay for Conv2d {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new().with_new_line_after_attribute(false).optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let content = content
            .add("ch_in", &self.channels_in())
            .add("ch_out", &self.channels_out())
            .add("stride", &format!("{:?}", self.stride))
            .add("kernel_size", &format!("{:?}", self.kernel_size))
            .add("dilation", &format!("{:?}", self.dilation))
            .add("groups", &self.groups)
            .add_debug_attribute("padding", &self.padding);
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

impl core::fmt::Display for Conv2d {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", ModuleDisplay::format(self, Default::default()))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::tensor::{Distribution, Tolerance};

    use super::*;
    use crate::nn::hooks::{for_each_layer, map_linears, unsupported_layers};

    #[derive(Module, Debug)]
    struct Net {
        conv: Conv2d,
        depthwise: Conv2d,
    }

    fn net(device: &Device) -> Net {
        Net {
            conv: Conv2dConfig::new([3, 4], [3, 2]).with_stride([2, 1]).init(device),
            depthwise: Conv2dConfig::new([4, 4], [3, 3]).with_groups(4).init(device),
        }
    }

    #[test]
    fn same_padding_is_burns() {
        let device = Device::flex();
        // Burn's own layer pads so that the output is ceil(size / stride).
        for (kernel, stride, size) in [(4, 1, 7), (3, 2, 9), (2, 3, 10), (5, 1, 3)] {
            let conv = Conv2dConfig::new([1, 1], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Same)
                .init(&device);
            let ((top, bottom), (left, right)) = conv.padding_pairs(size, size);
            assert_eq!((top, bottom), (left, right));
            assert!(bottom == top || bottom == top + 1, "{top} {bottom}");
            let out = (size + top + bottom - kernel) / stride + 1;
            assert_eq!(out, size.div_ceil(stride), "kernel {kernel} stride {stride} size {size}");
            let x = Tensor::<4>::ones([1, 1, size, size], &device);
            assert_eq!(conv.forward(x).dims()[2], out);
        }
    }

    /// The unfolded patches, multiplied by the flattened kernel, give Burn's convolution: the
    /// patch order is the `(c, i, j)` order of `weight.reshape([C_out, C_in·kh·kw])`.
    #[test]
    fn patches_times_flattened_kernel_is_the_convolution() {
        let device = Device::flex();
        device.seed(1);
        let conv = Conv2dConfig::new([3, 5], [3, 2])
            .with_stride([2, 1])
            .with_dilation([1, 2])
            .with_padding(PaddingConfig2d::Explicit(2, 0, 1, 1))
            .with_bias(false)
            .init(&device);
        let x = Tensor::<4>::random([2, 3, 8, 9], Distribution::Default, &device);
        let y = conv.forward(x.clone()); // [2, 5, ho, wo]
        let [n, c_out, ho, wo] = y.dims();
        let patches = conv.patches(x); // [2, ho·wo, 18]
        assert_eq!(patches.dims(), [n, ho * wo, 18]);
        let w = conv.weight.val().reshape([c_out, 18]).transpose().unsqueeze::<3>();
        let via_patches = patches.matmul(w).swap_dims(1, 2).reshape([n, c_out, ho, wo]);
        via_patches.into_data().assert_approx_eq::<f32>(&y.into_data(), Tolerance::default());
    }

    #[test]
    fn transforms_see_a_lazy_linear_view_with_the_weight_id() {
        let device = Device::flex();
        let model = net(&device);
        let mut seen = Vec::new();
        for_each_layer(&model, |path, linear, kernel| {
            seen.push((
                path.to_string(),
                linear.weight.id,
                linear.d_input(),
                linear.d_output(),
                kernel,
            ));
        });
        assert_eq!(seen, [("conv".to_string(), model.conv.weight.id, 18, 4, Some([3, 2]))]);
        assert!(!model.conv.weight.is_initialized(), "visiting materialised the weight");
        let unsupported = unsupported_layers(&model);
        assert_eq!(unsupported.len(), 1);
        assert_eq!(unsupported[0].0, "depthwise");
        assert!(unsupported[0].1.contains("groups = 4"), "{}", unsupported[0].1);

        // The view's value is the flattened kernel, transposed.
        let mut value = None;
        for_each_layer(&model, |_, linear, _| value = Some(linear.weight.val()));
        let want = model.conv.weight.val().reshape([4, 18]).transpose();
        value.unwrap().into_data().assert_eq(&want.into_data(), true);
    }

    #[test]
    fn mapping_keeps_an_untouched_weight_and_reshapes_a_replaced_one() {
        let device = Device::flex();
        let model = net(&device);
        let id = model.conv.weight.id;
        let same = map_linears(model.clone(), |_, linear| linear);
        assert_eq!(same.conv.weight.id, id);
        assert!(!same.conv.weight.is_initialized(), "an untouched weight was rebuilt");

        let shifted = map_linears(model.clone(), |_, mut linear| {
            linear.weight = linear.weight.map(|w| w.add_scalar(1.0));
            linear
        });
        assert_eq!(shifted.conv.weight.id, id);
        let want = model.conv.weight.val().add_scalar(1.0);
        shifted.conv.weight.val().into_data().assert_eq(&want.into_data(), true);
        // The grouped layer is not handed to transforms at all.
        assert_eq!(shifted.depthwise.weight.id, model.depthwise.weight.id);

        let emulated = map_linears(model, |_, mut linear| {
            let d = linear.weight.lazy_device();
            linear.factors =
                Some(LowRankFactors::new(Tensor::ones([18, 2], &d), Tensor::ones([2, 4], &d)));
            linear.weight = Param::initialized(linear.weight.id, Tensor::zeros([0, 0], &d));
            linear
        });
        assert_eq!(emulated.conv.weight.val().dims(), [0, 0, 0, 0]);
        assert_eq!(emulated.conv.weight.id, id);
        assert_eq!((emulated.conv.channels_in(), emulated.conv.channels_out()), (3, 4));
        assert!(emulated.conv.to_string().contains("emulator_rank: 2"), "{}", emulated.conv);
        // W^E = w_v w_u = 2 everywhere, as a 4-D kernel.
        let base = emulated.conv.base_weight();
        assert_eq!(base.dims(), [4, 3, 3, 2]);
        base.into_data()
            .assert_eq(&Tensor::<4>::full([4, 3, 3, 2], 2.0, &device).into_data(), true);
    }

    #[test]
    fn init_refuses_what_burn_panics_on() {
        let device = Device::flex();
        assert!(matches!(
            Conv2dConfig::new([3, 4], [3, 3]).with_groups(2).try_init(&device),
            Err(EmlocError::InvalidConfig(m)) if m.contains("divisible by groups")
        ));
        let conv = Conv2dConfig::new([4, 6], [1, 1]).with_groups(2).try_init(&device).unwrap();
        assert_eq!(conv.weight.lazy_shape().dims::<4>(), [6, 2, 1, 1]);
        assert_eq!((conv.channels_in(), conv.channels_out()), (4, 6));
    }
}
