//! `emloc::nn::Conv2d`: Burn equivalence, the factored and LoRA convolutions against float64
//! host references, calibration on unfolded patches, and the whole pipeline (emulate → LoRA →
//! train → correct → merge) on a small CNN, PEFT's Conv2d adapter files included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use emloc::nn::{LoraAdapter, LowRankFactors};
use emloc::peft::PeftAdapter;
use emloc::{
    Conv2d, Conv2dConfig, CorrectionConfig, EmlocError, EmulatorConfig, Linear, LinearConfig,
    LoraConfig, attach_adapter, attach_new_adapter, calibrate, correct, emulate, export_adapter,
    merge_adapter, merge_adapter_into_safetensors,
};
use faer::Mat;

use crate::common::{noise, tensor};

/// One convolution geometry; `pads` is `((top, bottom), (left, right))` worked out by hand from
/// `padding` (the oracle's own, not emloc's computation).
#[derive(Clone)]
struct Case {
    name: &'static str,
    channels: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    padding: PaddingConfig2d,
    pads: ((usize, usize), (usize, usize)),
    input: [usize; 4],
}

fn cases() -> Vec<Case> {
    let case = |name, channels, kernel, stride, dilation, padding, pads, input| Case {
        name,
        channels,
        kernel,
        stride,
        dilation,
        groups: 1,
        padding,
        pads,
        input,
    };
    vec![
        case(
            "stride 2, padding 1",
            [3, 5],
            [3, 3],
            [2, 2],
            [1, 1],
            PaddingConfig2d::Explicit(1, 1, 1, 1),
            ((1, 1), (1, 1)),
            [2, 3, 9, 8],
        ),
        // Explicit(top, left, bottom, right).
        case(
            "asymmetric explicit padding, dilation",
            [4, 3],
            [2, 3],
            [1, 2],
            [2, 1],
            PaddingConfig2d::Explicit(2, 0, 1, 1),
            ((2, 1), (0, 1)),
            [2, 4, 7, 9],
        ),
        // Same, kernel 4, stride 1: 3 rows/cols of padding in total, (1, 2).
        case(
            "same padding, even kernel",
            [3, 4],
            [4, 4],
            [1, 1],
            [1, 1],
            PaddingConfig2d::Same,
            ((1, 2), (1, 2)),
            [1, 3, 7, 6],
        ),
        case(
            "padding 2 rows, 1 column",
            [2, 3],
            [5, 3],
            [1, 1],
            [1, 1],
            PaddingConfig2d::Explicit(2, 1, 2, 1),
            ((2, 2), (1, 1)),
            [1, 2, 6, 5],
        ),
        case(
            "valid, stride 2, dilation 2",
            [2, 6],
            [3, 3],
            [2, 2],
            [2, 2],
            PaddingConfig2d::Valid,
            ((0, 0), (0, 0)),
            [2, 2, 11, 10],
        ),
    ]
}

impl Case {
    fn emloc_config(&self) -> Conv2dConfig {
        Conv2dConfig::new(self.channels, self.kernel)
            .with_stride(self.stride)
            .with_dilation(self.dilation)
            .with_groups(self.groups)
            .with_padding(self.padding.clone())
    }

    fn burn_config(&self) -> burn::nn::conv::Conv2dConfig {
        burn::nn::conv::Conv2dConfig::new(self.channels, self.kernel)
            .with_stride(self.stride)
            .with_dilation(self.dilation)
            .with_groups(self.groups)
            .with_padding(self.padding.clone())
    }

    fn emloc(&self, device: &Device) -> Conv2d {
        self.emloc_config().init(device)
    }

    fn d_in(&self) -> usize {
        self.channels[0] * self.kernel[0] * self.kernel[1]
    }

    fn x(&self, seed: u64, device: &Device) -> Tensor<4> {
        Tensor::from_data(
            TensorData::new(noise(seed, self.input.iter().product()), self.input),
            device,
        )
    }

    fn out_size(&self) -> [usize; 2] {
        let [_, _, h, w] = self.input;
        let ((top, bottom), (left, right)) = self.pads;
        let size =
            |n: usize, p: usize, k: usize, s: usize, d: usize| (n + p - d * (k - 1) - 1) / s + 1;
        [
            size(h, top + bottom, self.kernel[0], self.stride[0], self.dilation[0]),
            size(w, left + right, self.kernel[1], self.stride[1], self.dilation[1]),
        ]
    }

    /// Host patches in f64: one row per (n, oy, ox), columns in (c, i, j) order, zero padding.
    fn patches(&self, x: &[f32]) -> Vec<Vec<f64>> {
        let [n, c, h, w] = self.input;
        let [ho, wo] = self.out_size();
        let ((top, _), (left, _)) = self.pads;
        let mut rows = Vec::with_capacity(n * ho * wo);
        for b in 0..n {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut row = Vec::with_capacity(self.d_in());
                    for ch in 0..c {
                        for i in 0..self.kernel[0] {
                            for j in 0..self.kernel[1] {
                                let y = (oy * self.stride[0] + i * self.dilation[0]) as isize
                                    - top as isize;
                                let xx = (ox * self.stride[1] + j * self.dilation[1]) as isize
                                    - left as isize;
                                let inside =
                                    y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w;
                                row.push(if inside {
                                    x[((b * c + ch) * h + y as usize) * w + xx as usize] as f64
                                } else {
                                    0.0
                                });
                            }
                        }
                    }
                    rows.push(row);
                }
            }
        }
        rows
    }

    /// `y[n, o, oy, ox] = f(patch)[o]` laid out NCHW.
    fn apply(&self, x: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
        let [n, _, _, _] = self.input;
        let [ho, wo] = self.out_size();
        let c_out = self.channels[1];
        let mut out = vec![0.0; n * c_out * ho * wo];
        for (row, patch) in self.patches(x).iter().enumerate() {
            let (b, pixel) = (row / (ho * wo), row % (ho * wo));
            for (o, v) in f(patch).into_iter().enumerate() {
                out[(b * c_out + o) * ho * wo + pixel] = v;
            }
        }
        out
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// max |got − want| / max |want|.
fn rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / scale
}

/// A row-major `[rows, cols]` matrix of `t` (2-D) in f64.
fn host(t: Tensor<2>) -> (Vec<f64>, [usize; 2]) {
    let dims = t.dims();
    (f64s(&values(t)), dims)
}

#[test]
fn config_defaults_are_burns() {
    let ours = Conv2dConfig::new([3, 4], [3, 3]);
    let burns = burn::nn::conv::Conv2dConfig::new([3, 4], [3, 3]);
    assert_eq!(
        (ours.stride, ours.dilation, ours.groups, &ours.padding, ours.bias, &ours.initializer),
        (
            burns.stride,
            burns.dilation,
            burns.groups,
            &burns.padding,
            burns.bias,
            &burns.initializer
        )
    );
}

#[derive(Module, Debug)]
struct BurnNet {
    conv: burn::nn::conv::Conv2d,
}

#[derive(Module, Debug)]
struct EmlocNet {
    conv: Conv2d,
}

/// Burn's record loads into emloc's layer with every tensor applied, and the outputs agree.
#[test]
fn burn_records_load_and_outputs_match_burn() {
    let device = Device::flex();
    device.seed(3);
    let mut all = cases();
    let mut grouped = all[0].clone();
    (grouped.name, grouped.channels, grouped.groups) = ("groups 2", [4, 6], 2);
    grouped.input[1] = 4;
    all.push(grouped);
    for case in all {
        for bias in [true, false] {
            let burn = BurnNet { conv: case.burn_config().with_bias(bias).init(&device) };
            let mut store = SafetensorsStore::from_bytes(None);
            burn.save_into(&mut store).unwrap();
            let bytes = store.get_bytes().unwrap();
            let mut ours = EmlocNet { conv: case.emloc_config().with_bias(bias).init(&device) };
            let result = ours.load_from(&mut SafetensorsStore::from_bytes(Some(bytes))).unwrap();
            let want = if bias { vec!["conv.bias", "conv.weight"] } else { vec!["conv.weight"] };
            let mut applied = result.applied.clone();
            applied.sort();
            assert_eq!(applied, want, "{}", case.name);
            assert!(
                result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty(),
                "{}: {result:?}",
                case.name
            );

            let x = case.x(5, &device);
            let (got, expected) = (ours.conv.forward(x.clone()), burn.conv.forward(x));
            assert_eq!(got.dims(), expected.dims(), "{}", case.name);
            assert_eq!(values(got), values(expected), "{} (bias {bias})", case.name);
        }
    }
    // The emloc config builds the same layer as Burn's from the same seed (parameters are lazy:
    // they draw from the device RNG when first read).
    let case = &cases()[1];
    device.seed(9);
    let ours = case.emloc(&device);
    let (ours_weight, ours_bias) =
        (values(ours.weight.val()), values(ours.bias.as_ref().unwrap().val()));
    device.seed(9);
    let burns = case.burn_config().init(&device);
    let (burn_weight, burn_bias) =
        (values(burns.weight.val()), values(burns.bias.as_ref().unwrap().val()));
    assert_eq!((ours_weight, ours_bias), (burn_weight, burn_bias));
    let x = case.x(6, &device);
    assert_eq!(values(ours.forward(x.clone())), values(burns.forward(x)));
}

/// The emulator form (a kh×kw convolution into k channels, then a 1×1 convolution) against
/// explicit f64 loops over the output pixels with the factors. Tolerance: 1e-5 of the largest
/// output (f32 arithmetic over at most C_in·kh·kw·k ≈ 300 products).
#[test]
fn factored_convolution_matches_f64_reference() {
    let device = Device::flex();
    device.seed(7);
    for case in cases() {
        let (d_in, c_out, k) = (case.d_in(), case.channels[1], 2);
        let mut conv = case.emloc(&device);
        conv.factors = Some(LowRankFactors::new(
            tensor(11, [d_in, k], &device),
            tensor(12, [k, c_out], &device),
        ));
        conv.weight = Param::from_tensor(Tensor::zeros([0, 0, 0, 0], &device));
        assert_eq!(
            (conv.channels_in(), conv.channels_out(), conv.d_input()),
            (case.channels[0], c_out, d_in)
        );
        let (w_v, _) = host(conv.factors.as_ref().unwrap().w_v.val());
        let (w_u, _) = host(conv.factors.as_ref().unwrap().w_u.val());
        let bias = f64s(&values(conv.bias.as_ref().unwrap().val()));
        let x = case.x(13, &device);
        let xs = values(x.clone());
        let want = case.apply(&xs, |patch| {
            let h: Vec<f64> =
                (0..k).map(|t| (0..d_in).map(|q| w_v[q * k + t] * patch[q]).sum()).collect();
            (0..c_out)
                .map(|o| bias[o] + (0..k).map(|t| w_u[t * c_out + o] * h[t]).sum::<f64>())
                .collect()
        });
        let got = conv.forward(x);
        let [n, _, _, _] = case.input;
        let [ho, wo] = case.out_size();
        assert_eq!(got.dims(), [n, c_out, ho, wo], "{}", case.name);
        let err = rel(&values(got), &want);
        assert!(err < 1e-5, "{}: relative error {err}", case.name);
    }
}

/// LoRA on a dense and on an emulated convolution (fused and unfused paths) equals the dense
/// convolution with the kernel `W + s·(B A)` (or `W^E + s·(B A)`) reshaped, in f64 on the host.
#[test]
fn lora_convolution_equals_dense_convolution_with_merged_kernel() {
    let device = Device::flex();
    device.seed(8);
    for case in cases() {
        let (d_in, c_out, r) = (case.d_in(), case.channels[1], 3);
        for (form, emulated, dropout) in
            [("dense", false, 0.0), ("emulator fused", true, 0.0), ("emulator unfused", true, 0.1)]
        {
            let mut conv = case.emloc(&device);
            if emulated {
                conv.factors = Some(LowRankFactors::new(
                    tensor(21, [d_in, 2], &device),
                    tensor(22, [2, c_out], &device),
                ));
                conv.weight = Param::from_tensor(Tensor::zeros([0, 0, 0, 0], &device));
            }
            // W^T as [d_in, c_out] in f64, from the 4-D kernel or the factors.
            let base: Vec<f64> = match &conv.factors {
                Some(f) => host(f.dense()).0,
                None => {
                    let w = f64s(&values(conv.weight.val())); // [c_out, d_in] row-major
                    (0..d_in * c_out).map(|x| w[(x % c_out) * d_in + x / c_out]).collect()
                }
            };
            conv.lora = Some(LoraAdapter::new(
                tensor(23, [d_in, r], &device),
                tensor(24, [r, c_out], &device),
                4.5,
                false,
                dropout,
            ));
            let lora = conv.lora.as_ref().unwrap();
            let s = lora.scale();
            assert!((s - 1.5).abs() < 1e-12);
            let (a, _) = host(lora.a.val());
            let (b, _) = host(lora.b.val());
            // The merged kernel, built independently of emloc: K[o][q] = W[o][q] + s Σ_t A[t][q] B[o][t].
            let kernel: Vec<Vec<f64>> = (0..c_out)
                .map(|o| {
                    (0..d_in)
                        .map(|q| {
                            base[q * c_out + o]
                                + s * (0..r).map(|t| a[q * r + t] * b[t * c_out + o]).sum::<f64>()
                        })
                        .collect()
                })
                .collect();
            let bias = f64s(&values(conv.bias.as_ref().unwrap().val()));
            let x = case.x(25, &device);
            let xs = values(x.clone());
            let want = case.apply(&xs, |p| {
                (0..c_out)
                    .map(|o| bias[o] + kernel[o].iter().zip(p).map(|(k, v)| k * v).sum::<f64>())
                    .collect()
            });
            let err = rel(&values(conv.forward(x)), &want);
            assert!(err < 1e-5, "{} ({form}): relative error {err}", case.name);
        }
    }
}

/// Calibration accumulates the Gram of the unfolded patches; compared with an f64 Gram of
/// patches unfolded on the host (relative 1e-5 of the largest entry).
#[test]
fn calibration_gram_is_the_gram_of_unfolded_patches() {
    let device = Device::flex();
    for case in cases() {
        let model = EmlocNet { conv: case.emloc(&device) };
        let batches: Vec<Tensor<4>> = (0..2).map(|i| case.x(40 + i, &device)).collect();
        let host_batches: Vec<Vec<f32>> = batches.iter().map(|b| values(b.clone())).collect();
        let stats = calibrate(
            &model,
            batches,
            |m: &EmlocNet, x| {
                m.conv.forward(x);
            },
            |_| true,
        )
        .unwrap();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].path, "conv");
        let d = case.d_in();
        let mut gram = vec![0.0f64; d * d];
        let mut tokens = 0;
        for x in &host_batches {
            for p in case.patches(x) {
                tokens += 1;
                for i in 0..d {
                    for j in 0..d {
                        gram[i * d + j] += p[i] * p[j];
                    }
                }
            }
        }
        assert_eq!(stats[0].tokens, tokens as u64, "{}", case.name);
        assert_eq!(stats[0].gram.shape(), [d, d]);
        let err = rel(&stats[0].gram.data, &gram);
        assert!(err < 1e-5, "{}: relative error {err}", case.name);
    }
}

/// Two convolutions, a dilated one and a linear head on the spatial mean.
#[derive(Module, Debug)]
struct Cnn {
    c1: Conv2d,
    c2: Conv2d,
    c3: Conv2d,
    head: Linear,
}

impl Cnn {
    fn new(device: &Device) -> Self {
        Self {
            c1: Conv2dConfig::new([3, 8], [3, 3]).with_padding(PaddingConfig2d::Same).init(device),
            c2: Conv2dConfig::new([8, 12], [3, 2])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 0, 1, 1))
                .init(device),
            c3: Conv2dConfig::new([12, 10], [2, 2]).with_dilation([2, 2]).init(device),
            head: LinearConfig::new(10, 4).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let h = relu(self.c1.forward(x));
        let h = relu(self.c2.forward(h));
        let h = self.c3.forward(h);
        let [n, c, _, _] = h.dims();
        self.head.forward(h.mean_dim(3).mean_dim(2).reshape([n, c]))
    }
}

fn images(seed: u64, n: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(noise(seed, n * 3 * 10 * 9), [n, 3, 10, 9]), device)
}

fn max_rel(a: Tensor<2>, b: Tensor<2>) -> f64 {
    rel(&values(a), &f64s(&values(b)))
}

/// W as `[d_out, d_in]` in f64 from a conv's kernel `[C_out, C_in, kh, kw]`.
fn faer_kernel(t: Tensor<4>) -> Mat<f64> {
    let [o, c, kh, kw] = t.dims();
    let v = values(t);
    Mat::from_fn(o, c * kh * kw, |i, j| v[i * c * kh * kw + j] as f64)
}

fn faer_of(m: &emloc::Matrix) -> Mat<f64> {
    Mat::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64)
}

#[test]
fn small_cnn_emulate_train_correct_merge() {
    let device = Device::flex();
    device.seed(31);
    let original = Cnn::new(&device);
    let calibration: Vec<Tensor<4>> = (0..3).map(|i| images(100 + i, 4, &device)).collect();
    let (emulator, report) = emulate(
        original.clone(),
        calibration,
        |m: &Cnn, x| {
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
    )
    .unwrap();
    let paths: Vec<&str> = report.layers.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(paths, ["c1", "c2", "c3", "head"]);
    let c2 = &report.layers[1];
    assert_eq!((c2.d_in, c2.d_out), (8 * 3 * 2, 12));
    // k = ⌊0.5 · 48 · 12 / 60⌋ = 4; the dense kernel is dropped.
    assert_eq!(c2.rank, 4);
    assert!(emulator.c2.is_emulated());
    assert_eq!(emulator.c2.weight.val().dims(), [0, 0, 0, 0]);
    assert_eq!(emulator.c2.factors.as_ref().unwrap().w_v.val().dims(), [48, 4]);
    let probe = images(7, 3, &device);
    let drift = max_rel(emulator.forward(probe.clone()), original.forward(probe.clone()));
    assert!(drift > 0.0 && drift < 0.5, "emulator drift {drift}");

    let config = LoraConfig::new(2).with_alpha(4.0).with_target_modules(vec![
        "c1".into(),
        "c2".into(),
        "c3".into(),
        "head".into(),
    ]);
    let (adapted, targets) = attach_new_adapter(emulator.clone(), &config).unwrap();
    assert_eq!(targets.len(), 4);
    assert_eq!(adapted.c2.lora.as_ref().unwrap().a.val().dims(), [48, 2]);
    // B = 0 at attachment: the emulator's outputs, through the fused emulator + LoRA path.
    let err = max_rel(adapted.forward(probe.clone()), emulator.forward(probe.clone()));
    assert!(err < 1e-6, "attaching changed the outputs by {err}");

    let train_device = device.clone().autodiff();
    let x = images(200, 6, &device).to_device(&train_device);
    let target = tensor(201, [6, 4], &device).to_device(&train_device);
    let mut model = adapted.train();
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..6 {
        let loss = (model.forward(x.clone()) - target.clone()).powi_scalar(2).mean();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // Only the adapters train: the conv kernels and emulator factors get no gradient.
        assert!(grads.get::<4>(model.c1.weight.id).is_none());
        assert!(grads.get::<2>(model.c2.factors.as_ref().unwrap().w_v.id).is_none());
        assert!(grads.get::<2>(model.c2.lora.as_ref().unwrap().a.id).is_some());
        model = optim.step(1e-2, model, grads);
    }
    assert!(losses.last() < losses.first(), "training did not lower the loss: {losses:?}");
    let tuned = model.valid();

    // Correction's exactness identity (clamp off), per layer on the flattened kernels:
    // W + s B_c A_c = W + (W^E + s B A − W) P Pᵀ, with P spanning the rows of A.
    let (exact, _) =
        correct(&original, &tuned, &CorrectionConfig { clamp: f64::INFINITY }).unwrap();
    for (path, conv, trained) in [
        ("c1", &original.c1, &tuned.c1),
        ("c2", &original.c2, &tuned.c2),
        ("c3", &original.c3, &tuned.c3),
    ] {
        let layer = &exact.layers[path];
        assert_eq!(layer.kernel_size, Some(conv.kernel_size), "{path}");
        let w = faer_kernel(conv.weight.val());
        let lora = trained.lora.as_ref().unwrap();
        let s = lora.scale();
        let (a, b) = (
            faer_of(&emloc::Matrix::from_tensor(lora.a.val())).transpose().to_owned(),
            faer_of(&emloc::Matrix::from_tensor(lora.b.val())).transpose().to_owned(),
        );
        let w_e = faer_kernel(trained.base_weight());
        let trained_map = &w_e + (&b * &a) * s;
        let p = a.transpose().thin_svd().unwrap().U().to_owned();
        let want = &w + (&trained_map - &w) * &p * p.transpose();
        let got = &w + (faer_of(&layer.lora_b) * faer_of(&layer.lora_a)) * s;
        let err = (&got - &want).norm_l2() / want.norm_l2();
        assert!(err < 1e-5, "{path}: identity off by {err}");
    }

    // Default correction, merged vs served unmerged: the same model up to f32 rounding.
    let (corrected, correction) = correct(&original, &tuned, &CorrectionConfig::default()).unwrap();
    assert_eq!(correction.layers.len(), 4);
    let merged = merge_adapter(original.clone(), &corrected).unwrap();
    assert!(merged.c2.lora.is_none() && !merged.c2.is_emulated());
    assert_eq!(merged.c2.weight.val().dims(), [12, 8, 3, 2]);
    assert_eq!(merged.c2.weight.id, original.c2.weight.id);
    let served = attach_adapter(original.clone(), &corrected).unwrap();
    let (m, u) = (merged.forward(probe.clone()), served.forward(probe.clone()));
    let err = max_rel(m.clone(), u);
    assert!(err < 1e-5, "merged vs unmerged: {err}");
    assert!(max_rel(m, original.forward(probe)) > 1e-4, "the merged adapter changed nothing");

    // The original was never touched.
    assert!(original.c2.lora.is_none() && !original.c2.is_emulated());
}

/// An adapter on a CNN goes to PEFT's files with 4-D conv factors and comes back; merging it into
/// the checkpoint file equals merging it into the model.
#[test]
fn peft_conv_adapter_round_trip_and_file_merge() {
    let device = Device::flex();
    device.seed(41);
    let original = Cnn::new(&device);
    let config = LoraConfig::new(2).with_alpha(6.0).with_target_modules(vec![
        "c2".into(),
        "c3".into(),
        "head".into(),
    ]);
    let (mut adapted, _) = attach_new_adapter(original.clone(), &config).unwrap();
    for (i, conv) in [&mut adapted.c2, &mut adapted.c3].into_iter().enumerate() {
        let lora = conv.lora.as_mut().unwrap();
        lora.b = Param::from_tensor(tensor(50 + i as u64, lora.b.val().dims(), &device));
    }
    let dir = tempfile::tempdir().unwrap();
    let adapter = export_adapter(&adapted).unwrap();
    assert_eq!(adapter.layers["c2"].kernel_size, Some([3, 2]));
    assert_eq!(adapter.layers["head"].kernel_size, None);
    adapter.save(dir.path()).unwrap();

    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |key: &str| st.tensor(key).unwrap().shape().to_vec();
    assert_eq!(shape("base_model.model.c2.lora_A.weight"), [2, 8, 3, 2]);
    assert_eq!(shape("base_model.model.c2.lora_B.weight"), [12, 2, 1, 1]);
    assert_eq!(shape("base_model.model.c3.lora_A.weight"), [2, 12, 2, 2]);
    assert_eq!(shape("base_model.model.head.lora_A.weight"), [2, 10]);
    // The 4-D kernel is the flattened A in (c, i, j) order.
    let a_file: Vec<f32> = st
        .tensor("base_model.model.c2.lora_A.weight")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(a_file, values(adapted.c2.lora.as_ref().unwrap().a.val().transpose()));

    let loaded = PeftAdapter::load(dir.path()).unwrap();
    assert_eq!(loaded, adapter);
    let restored = attach_adapter(original.clone(), &loaded).unwrap();
    let probe = images(8, 2, &device);
    assert_eq!(values(restored.forward(probe.clone())), values(adapted.forward(probe.clone())));

    // A linear-shaped adapter does not fit a convolution, even with the same flattened size.
    let mut flat = loaded.clone();
    flat.layers.get_mut("c2").unwrap().kernel_size = None;
    match attach_adapter(original.clone(), &flat).unwrap_err() {
        EmlocError::AdapterKeys { misshaped, .. } => {
            assert!(
                misshaped.iter().any(|m| m.contains("c2.lora_A") && m.contains("[2, 8, 3, 2]")),
                "{misshaped:?}"
            )
        }
        other => panic!("{other}"),
    }

    // The original model saved as a PyTorch checkpoint; merged on file, loaded back.
    let checkpoint = dir.path().join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&checkpoint).with_to_adapter(BurnToPyTorchAdapter);
    original.save_into(&mut store).unwrap();
    let out = dir.path().join("merged");
    let files = merge_adapter_into_safetensors(&loaded, &[checkpoint], &out).unwrap();
    let keys: BTreeMap<String, String> = files.merged.into_iter().collect();
    assert_eq!(keys["c2"], "c2.weight");
    let merged_file = load_cnn(&out.join("model.safetensors"), &device);
    let merged = merge_adapter(original.clone(), &loaded).unwrap();
    let err = max_rel(merged_file.forward(probe.clone()), merged.forward(probe));
    assert!(err < 1e-6, "file merge vs model merge: {err}");
}

fn load_cnn(file: &Path, device: &Device) -> Cnn {
    let mut model = Cnn::new(device);
    let mut store = SafetensorsStore::from_file(file).with_from_adapter(PyTorchToBurnAdapter);
    let result = model.load_from(&mut store).unwrap();
    assert!(
        result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty(),
        "{result:?}"
    );
    model
}

#[test]
fn grouped_convolution_stays_dense_and_refuses_a_targeted_adapter() {
    #[derive(Module, Debug)]
    struct Grouped {
        dense: Conv2d,
        depthwise: Conv2d,
    }
    let device = Device::flex();
    let model = Grouped {
        dense: Conv2dConfig::new([4, 4], [3, 3]).with_padding(PaddingConfig2d::Same).init(&device),
        depthwise: Conv2dConfig::new([4, 4], [3, 3]).with_groups(4).init(&device),
    };
    let forward = |m: &Grouped, x: Tensor<4>| {
        m.depthwise.forward(m.dense.forward(x));
    };
    let batches: Vec<Tensor<4>> = (0..2)
        .map(|i| {
            Tensor::from_data(TensorData::new(noise(60 + i, 2 * 4 * 8 * 8), [2, 4, 8, 8]), &device)
        })
        .collect();
    let (emulator, report) =
        emulate(model.clone(), batches, forward, &EmulatorConfig::all_layers(0.5)).unwrap();
    assert_eq!(report.layers.iter().map(|l| l.path.as_str()).collect::<Vec<_>>(), ["dense"]);
    assert_eq!(report.dense_layers, ["depthwise"]);
    assert!(!emulator.depthwise.is_emulated());

    let err = attach_new_adapter(
        model.clone(),
        &LoraConfig::new(2).with_target_modules(vec!["depthwise".into()]),
    )
    .unwrap_err();
    assert!(
        matches!(&err, EmlocError::InvalidConfig(m) if m.contains("`depthwise`") && m.contains("groups = 4")),
        "{err}"
    );
    // Every layer (no targets): the grouped one is passed over.
    let (_, targets) = attach_new_adapter(model, &LoraConfig::new(2)).unwrap();
    assert_eq!(targets, ["dense"]);
}

#[test]
fn invalid_configs_are_typed_errors() {
    let device = Device::flex();
    for (config, needle) in [
        (Conv2dConfig::new([4, 6], [3, 3]).with_groups(4), "divisible by groups"),
        (Conv2dConfig::new([4, 6], [3, 0]), "kernel_size"),
        (Conv2dConfig::new([4, 6], [3, 3]).with_stride([0, 1]), "stride"),
        (Conv2dConfig::new([4, 6], [3, 3]).with_dilation([1, 0]), "dilation"),
        (Conv2dConfig::new([4, 6], [3, 3]).with_groups(0), "groups"),
    ] {
        match config.try_init(&device) {
            Err(EmlocError::InvalidConfig(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{needle}: {other:?}"),
        }
    }
}

/// Fixture directory of the PEFT-made Conv2d adapter (`make_conv_fixture.py`).
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/peft/conv")
}

/// The CNN of `make_conv_fixture.py`.
#[derive(Module, Debug)]
struct TorchNet {
    c1: Conv2d,
    c2: Conv2d,
    head: Linear,
}

impl TorchNet {
    fn load(device: &Device) -> Self {
        let mut model = Self {
            c1: Conv2dConfig::new([3, 6], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
            c2: Conv2dConfig::new([6, 8], [3, 2])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 0, 1, 0))
                .init(device),
            head: LinearConfig::new(8, 4).init(device),
        };
        let mut store = SafetensorsStore::from_file(fixture().join("base.safetensors"))
            .with_from_adapter(PyTorchToBurnAdapter);
        let result = model.load_from(&mut store).unwrap();
        assert_eq!(result.applied.len(), 6, "{result:?}");
        assert!(
            result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty(),
            "{result:?}"
        );
        model
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let h = relu(self.c2.forward(relu(self.c1.forward(x))));
        let [n, c, _, _] = h.dims();
        self.head.forward(h.mean_dim(3).mean_dim(2).reshape([n, c]))
    }
}

/// A Conv2d LoRA adapter written by PEFT 0.21.2 loads, and serves and merges to PEFT's own
/// float64 outputs (within 1e-5 of the largest output: the model runs in f32).
#[test]
fn peft_made_conv_adapter_matches_peft() {
    let device = Device::flex();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let floats = |v: &serde_json::Value| {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>()
    };
    let shape: Vec<usize> = expected["x"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let x_values: Vec<f32> = floats(&expected["x"]["values"]).iter().map(|&v| v as f32).collect();
    let x = Tensor::<4>::from_data(
        TensorData::new(x_values, [shape[0], shape[1], shape[2], shape[3]]),
        &device,
    );

    let base = TorchNet::load(&device);
    let err = rel(&values(base.forward(x.clone())), &floats(&expected["base"]));
    assert!(err < 1e-5, "base model: {err}");

    let adapter = PeftAdapter::load(&fixture().join("adapter")).unwrap();
    for (path, layer) in expected["layers"].as_object().unwrap() {
        let ours = &adapter.layers[path.as_str()];
        assert_eq!(
            ours.lora_a_shape(),
            layer["lora_A"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect::<Vec<_>>(),
            "{path}"
        );
        assert_eq!(
            ours.lora_b_shape(),
            layer["lora_B"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect::<Vec<_>>(),
            "{path}"
        );
        assert_eq!(adapter.config.rank_for(path), layer["r"].as_u64().unwrap() as usize, "{path}");
        assert_eq!(adapter.config.scale_for(path), layer["scale"].as_f64().unwrap(), "{path}");
    }
    let served = attach_adapter(TorchNet::load(&device), &adapter).unwrap();
    let err = rel(&values(served.forward(x.clone())), &floats(&expected["lora"]));
    assert!(err < 1e-5, "unmerged vs PEFT: {err}");
    let merged = merge_adapter(TorchNet::load(&device), &adapter).unwrap();
    let err = rel(&values(merged.forward(x.clone())), &floats(&expected["merged"]));
    assert!(err < 1e-5, "merged vs PEFT: {err}");

    let out = tempfile::tempdir().unwrap();
    merge_adapter_into_safetensors(&adapter, &[fixture().join("base.safetensors")], out.path())
        .unwrap();
    let mut from_file = TorchNet::load(&device);
    let mut store = SafetensorsStore::from_file(out.path().join("base.safetensors"))
        .with_from_adapter(PyTorchToBurnAdapter);
    from_file.load_from(&mut store).unwrap();
    let err = rel(&values(from_file.forward(x)), &floats(&expected["merged"]));
    assert!(err < 1e-5, "file merge vs PEFT: {err}");
}

/// A CNN's emulator saves and loads back onto the original; onto a freshly built (lazy) model the
/// emulated convolutions' dense kernels are never materialised.
#[test]
fn cnn_emulator_saves_and_loads_onto_the_original() {
    let device = Device::flex();
    device.seed(51);
    let original = Cnn::new(&device);
    let calibration: Vec<Tensor<4>> = (0..2).map(|i| images(300 + i, 4, &device)).collect();
    let config = EmulatorConfig::all_layers(0.4);
    let (emulator, report) = emulate(
        original.clone(),
        calibration,
        |m: &Cnn, x| {
            m.forward(x);
        },
        &config,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    emloc::save_emulator(&emulator, &emloc::EmulatorDescription::new(config, report), dir.path())
        .unwrap();
    let (loaded, _) = emloc::load_emulator(original.clone(), dir.path()).unwrap();
    assert_eq!(loaded.c1.weight.val().dims(), [0, 0, 0, 0]);
    let probe = images(9, 2, &device);
    assert_eq!(values(loaded.forward(probe.clone())), values(emulator.forward(probe.clone())));

    device.seed(51);
    let skeleton = Cnn::new(&device);
    let dense_c1 = skeleton.c1.weight.clone();
    let (loaded, _) = emloc::load_emulator(skeleton, dir.path()).unwrap();
    assert!(!dense_c1.is_initialized(), "loading the emulator materialised a dense kernel");
    assert!(loaded.c1.is_emulated());
}
