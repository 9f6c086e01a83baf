//! The drop-ins for Burn's composite modules (`emloc::nn::{MultiHeadAttention,
//! PositionWiseFeedForward, SwiGlu}`): Burn's records load into them unchanged and they compute
//! Burn's outputs; a model written with them goes through the whole EMLoC pipeline.

use burn::module::Module;
use burn::nn::activation::ActivationConfig;
use burn::nn::{LayerNorm, LayerNormConfig, LinearLayout};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::{ApplyResult, ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use emloc::nn::attention::generate_autoregressive_mask;
use emloc::nn::{
    Linear, LinearConfig, MhaCache, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig,
    PositionWiseFeedForward, PositionWiseFeedForwardConfig, SwiGlu, SwiGluConfig,
};
use emloc::{
    CorrectionConfig, EmulatorConfig, LoraConfig, attach_adapter, attach_new_adapter, correct,
    emulate, linear_layers, merge_adapter,
};

use crate::common::*;

fn tensor3(seed: u64, shape: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::from_data(TensorData::new(noise(seed, shape.iter().product()), shape), device)
}

/// Saves `from` to safetensors bytes and loads them into `into`, the way a user moves a
/// checkpoint; returns the loaded module and what the store reports.
fn copy_record<A: Module, B: Module>(from: &A, mut into: B) -> (B, ApplyResult) {
    let mut store = SafetensorsStore::from_bytes(None);
    from.save_into(&mut store).expect("save");
    let bytes = store.get_bytes().expect("bytes");
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    let result = into.load_from(&mut store).expect("load");
    (into, result)
}

/// The store found a place for every tensor, in both directions, and nothing else.
fn assert_clean(result: &ApplyResult, tensors: usize) {
    assert!(result.missing.is_empty(), "missing: {:?}", result.missing);
    assert!(result.unused.is_empty(), "unused: {:?}", result.unused);
    assert!(result.errors.is_empty(), "errors: {:?}", result.errors);
    assert_eq!(result.applied.len(), tensors, "applied: {:?}", result.applied);
}

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn dropins_mha_loads_burns_record_and_matches_its_outputs() {
    let device = Device::flex();
    for config in [
        MultiHeadAttentionConfig::new(8, 2),
        MultiHeadAttentionConfig::new(8, 4)
            .with_quiet_softmax(true)
            .with_key_bias(false)
            .with_min_float(-1e9),
    ] {
        let burn =
            burn::nn::attention::MultiHeadAttentionConfig::new(config.d_model, config.n_heads)
                .with_quiet_softmax(config.quiet_softmax)
                .with_key_bias(config.key_bias)
                .with_min_float(config.min_float)
                .init(&device);
        let fresh = config.init(&device);
        let biases = 3 + usize::from(config.key_bias);
        let (ours, result) = copy_record(&burn, fresh.clone());
        assert_clean(&result, 4 + biases);
        // And back: emloc's record loads into Burn's module.
        let (_, back) = copy_record(&ours, config_burn_twin(&config, &device));
        assert_clean(&back, 4 + biases);

        // Cross-attention shapes, a padding mask and a causal-style attention mask.
        let (q, kv) = (tensor3(1, [2, 4, 8], &device), tensor3(2, [2, 6, 8], &device));
        let pad = Tensor::<2, Bool>::from_data(
            TensorData::new(
                vec![
                    false, false, false, false, true, true, false, false, false, false, false, true,
                ],
                [2, 6],
            ),
            &device,
        );
        let attn = Tensor::<3, Bool>::from_data(
            TensorData::new(
                (0..48).map(|i| (i % 6) > (i / 6 % 4) + 2).collect::<Vec<_>>(),
                [2, 4, 6],
            ),
            &device,
        );
        let input = || {
            MhaInput::new(q.clone(), kv.clone(), kv.clone())
                .mask_pad(pad.clone())
                .mask_attn(attn.clone())
        };
        let burn_input = burn::nn::attention::MhaInput::new(q.clone(), kv.clone(), kv.clone())
            .mask_pad(pad.clone())
            .mask_attn(attn.clone());
        let (got, want) = (ours.forward(input()), burn.forward(burn_input));
        assert!(max_abs_diff(got.context.clone(), want.context.clone()) <= 1e-6);
        assert!(max_abs_diff(got.weights.clone(), want.weights.clone()) <= 1e-6);
        // The masks did something, and the copy did: the freshly initialised twin differs.
        assert!(
            got.weights.slice([0..1, 0..1, 0..4, 4..6]).abs().max().into_scalar::<f32>() < 1e-6
        );
        assert!(max_abs_diff(fresh.forward(input()).context, want.context) > 1e-3);
    }
}

/// Burn's MHA with the same config as `config`, freshly initialised.
fn config_burn_twin(
    config: &MultiHeadAttentionConfig,
    device: &Device,
) -> burn::nn::attention::MultiHeadAttention {
    burn::nn::attention::MultiHeadAttentionConfig::new(config.d_model, config.n_heads)
        .with_quiet_softmax(config.quiet_softmax)
        .with_key_bias(config.key_bias)
        .with_min_float(config.min_float)
        .init(device)
}

#[test]
fn dropins_mha_cache_matches_burns_cache_and_the_masked_full_pass() {
    let device = Device::flex();
    let burn = burn::nn::attention::MultiHeadAttentionConfig::new(12, 3).init(&device);
    let (ours, result) = copy_record(&burn, MultiHeadAttentionConfig::new(12, 3).init(&device));
    assert_clean(&result, 8);
    let [batch, seq, d] = [2, 5, 12];
    let x = tensor3(7, [batch, seq, d], &device);
    let memory = tensor3(8, [batch, 3, d], &device);

    // Self-attention: step by step against Burn's cache, then against the causal full pass.
    let (mut ours_cache, mut burn_cache) =
        (MhaCache::autoregressive(), burn::nn::attention::MhaCache::autoregressive());
    // Cross-attention: fixed memory for keys and values.
    let (mut ours_cross, mut burn_cross) = (
        MhaCache::autoregressive_cross_attention(),
        burn::nn::attention::MhaCache::autoregressive_cross_attention(),
    );
    let mut steps = Vec::new();
    for i in 1..=seq {
        let prefix = x.clone().slice([0..batch, 0..i, 0..d]);
        let got = ours.forward_cache(MhaInput::self_attn(prefix.clone()), &mut ours_cache).context;
        let want = burn
            .forward_cache(
                burn::nn::attention::MhaInput::self_attn(prefix.clone()),
                &mut burn_cache,
            )
            .context;
        assert_eq!(got.dims(), [batch, i, d]);
        assert!(max_abs_diff(got.clone(), want) <= 1e-6, "self-attention step {i}");
        steps.push(got.slice([0..batch, i - 1..i, 0..d]));

        let got = ours.forward_cache(
            MhaInput::new(prefix.clone(), memory.clone(), memory.clone()),
            &mut ours_cross,
        );
        let want = burn.forward_cache(
            burn::nn::attention::MhaInput::new(prefix, memory.clone(), memory.clone()),
            &mut burn_cross,
        );
        assert!(max_abs_diff(got.context, want.context) <= 1e-6, "cross-attention step {i}");
    }
    let mask = generate_autoregressive_mask(batch, seq, &device);
    let full = ours.forward(MhaInput::self_attn(x).mask_attn(mask)).context;
    assert!(max_abs_diff(Tensor::cat(steps, 1), full) < 1e-5);
}

#[test]
fn dropins_feed_forward_loads_burns_record_and_matches_its_outputs() {
    let device = Device::flex();
    for activation in [ActivationConfig::Gelu, ActivationConfig::Relu] {
        let burn = burn::nn::transformer::PositionWiseFeedForwardConfig::new(6, 10)
            .with_activation(activation.clone())
            .init(&device);
        let fresh =
            PositionWiseFeedForwardConfig::new(6, 10).with_activation(activation).init(&device);
        let (ours, result) = copy_record(&burn, fresh.clone());
        assert_clean(&result, 4);
        let (_, back) = copy_record(
            &ours,
            burn::nn::transformer::PositionWiseFeedForwardConfig::new(6, 10).init(&device),
        );
        assert_clean(&back, 4);
        let x = tensor3(3, [2, 5, 6], &device);
        let want = burn.forward(x.clone());
        assert!(max_abs_diff(ours.forward(x.clone()), want.clone()) <= 1e-6);
        assert!(max_abs_diff(fresh.forward(x), want) > 1e-3);
    }
}

#[test]
fn dropins_swiglu_loads_burns_record_in_both_layouts_and_matches_its_outputs() {
    let device = Device::flex();
    for layout in [LinearLayout::Row, LinearLayout::Col] {
        for bias in [false, true] {
            let burn =
                burn::nn::SwiGluConfig::new(5, 7).with_bias(bias).with_layout(layout).init(&device);
            let fresh = SwiGluConfig::new(5, 7).with_bias(bias).with_layout(layout).init(&device);
            let (ours, result) = copy_record(&burn, fresh.clone());
            assert_clean(&result, if bias { 4 } else { 2 });
            // Loaded weights are initialised, `[d_in, d_out]` in memory whatever the layout.
            assert_eq!(
                [ours.linear_inner.d_input(), ours.linear_outer.d_output()],
                [5, 7],
                "{layout:?}"
            );
            let (_, back) = copy_record(
                &ours,
                burn::nn::SwiGluConfig::new(5, 7).with_bias(bias).with_layout(layout).init(&device),
            );
            assert_clean(&back, if bias { 4 } else { 2 });
            let x = tensor(4, [3, 5], &device);
            let want = burn.forward(x.clone());
            assert!(
                max_abs_diff(ours.forward(x.clone()), want.clone()) <= 1e-6,
                "{layout:?} bias {bias}"
            );
            assert!(max_abs_diff(fresh.forward(x), want) > 1e-3);
        }
    }
    // A column-layout record really is stored transposed: it does not fit a row-layout layer.
    let col = burn::nn::SwiGluConfig::new(5, 7).with_layout(LinearLayout::Col).init(&device);
    let mut store = SafetensorsStore::from_bytes(None);
    col.save_into(&mut store).unwrap();
    let mut store = SafetensorsStore::from_bytes(Some(store.get_bytes().unwrap()));
    let err = SwiGluConfig::new(5, 7).init(&device).load_from(&mut store).unwrap_err();
    assert!(format!("{err:?}").contains("ShapeMismatch"), "{err:?}");
}

/// A small transformer block written as with `burn::nn`, with only the imports swapped to
/// `emloc::nn` (LayerNorm stays Burn's: it has no linear layer).
#[derive(Module, Debug)]
struct Block {
    attn: MultiHeadAttention,
    norm1: LayerNorm,
    ffn: PositionWiseFeedForward,
    norm2: LayerNorm,
    glu: SwiGlu,
    head: Linear,
}

impl Block {
    fn new(d: usize, device: &Device) -> Self {
        Self {
            attn: MultiHeadAttentionConfig::new(d, 2).with_dropout(0.0).init(device),
            norm1: LayerNormConfig::new(d).init(device),
            ffn: PositionWiseFeedForwardConfig::new(d, 2 * d).with_dropout(0.0).init(device),
            norm2: LayerNormConfig::new(d).init(device),
            glu: SwiGluConfig::new(d, d).init(device),
            head: LinearConfig::new(d, 3).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let mask = generate_autoregressive_mask(batch, seq, &x.device());
        let h = self
            .norm1
            .forward(x.clone() + self.attn.forward(MhaInput::self_attn(x).mask_attn(mask)).context);
        let h = self.norm2.forward(h.clone() + self.ffn.forward(h));
        self.head.forward(self.glu.forward(h))
    }
}

#[test]
fn dropins_model_goes_through_emulate_lora_correct_and_merge() {
    let device = Device::flex();
    let d = 8;
    let original = Block::new(d, &device);
    let calibration: Vec<_> = (0..4).map(|i| tensor3(20 + i, [2, 6, d], &device)).collect();
    let (emulator, report) = emulate(
        original.clone(),
        calibration,
        |m: &Block, x| {
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
    )
    .unwrap();

    // Every projection inside the drop-ins is found and emulated.
    let layers: Vec<String> = linear_layers(&original).into_iter().map(|l| l.path).collect();
    let expected = [
        "attn.query",
        "attn.key",
        "attn.value",
        "attn.output",
        "ffn.linear_inner",
        "ffn.linear_outer",
        "glu.linear_inner",
        "glu.linear_outer",
        "head",
    ];
    assert_eq!(layers, expected);
    let emulated: Vec<&str> = report.layers.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(emulated, expected);
    assert!(report.dense_layers.is_empty(), "{:?}", report.dense_layers);
    assert!(report.layers.iter().all(|l| l.tokens == 48), "{:?}", report.layers);
    assert!(report.params_kept() < report.params_original());
    for linear in [
        &emulator.attn.query,
        &emulator.attn.output,
        &emulator.ffn.linear_outer,
        &emulator.glu.linear_inner,
        &emulator.head,
    ] {
        assert!(linear.is_emulated() && linear.weight.val().dims() == [0, 0]);
    }

    // LoRA on every emulator layer, a few AdamW steps on a toy regression.
    let (adapted, targets) =
        attach_new_adapter(emulator, &LoraConfig::new(2).with_alpha(4.0)).unwrap();
    assert_eq!(targets, expected);
    let train_device = device.clone().autodiff();
    let x = tensor3(40, [2, 6, d], &train_device);
    let y = tensor3(41, [2, 6, 3], &train_device);
    let mut model = adapted.train();
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let loss = (model.forward(x.clone()) - y.clone()).powf_scalar(2.0).mean();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    assert!(losses[4] < losses[0], "loss did not fall: {losses:?}");
    let trained = model.valid();
    for linear in [&trained.attn.value, &trained.ffn.linear_inner, &trained.glu.linear_outer] {
        let b = linear.lora.as_ref().unwrap().b.val();
        assert!(b.abs().max().into_scalar::<f32>() > 0.0, "adapter B is still zero");
    }

    // Correct against the original, then merge vs serve unmerged.
    let (adapter, correction) = correct(&original, &trained, &CorrectionConfig::default()).unwrap();
    assert_eq!(correction.layers.len(), expected.len());
    let merged = merge_adapter(original.clone(), &adapter).unwrap();
    let served = attach_adapter(original.clone(), &adapter).unwrap();
    assert!(merged.attn.query.lora.is_none() && served.attn.query.lora.is_some());
    let x = tensor3(42, [3, 5, d], &device);
    let (m, s) = (merged.forward(x.clone()), served.forward(x.clone()));
    let rel = max_abs_diff(m.clone(), s.clone()) / s.clone().abs().max().into_scalar::<f32>();
    assert!(rel < 1e-4, "merged vs served: {rel}");
    // The adapter changed the model.
    assert!(max_abs_diff(m, original.forward(x)) > 1e-4);
}
