//! Streaming construction (`causal_lm::emulate_streaming`) against the in-memory emulator
//! (`emloc::emulate` on the loaded original, one forward pass per sequence): the same emulator,
//! bit for bit, from HF safetensors directories and from GGUF.
//!
//! Fixtures: `tests/fixtures/tiny_{llama,qwen2}/` (untied head; biases) and
//! `tests/fixtures/gguf/tiny_llama.gguf`.

mod common;

use std::path::Path;

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use common::*;
use emloc::{EmulatorConfig, EmulatorReport, emulate, linear_layers};
use emloc_models::causal_lm::{StreamingProgress, emulate_streaming, is_gguf};
use emloc_models::llama::LlamaForCausalLM;

fn ids(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let data = TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]);
    Tensor::from_data(data, device)
}

/// Calibration sequences of different lengths, inside every fixture's vocabulary.
fn sequences() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 13, 2, 7], vec![3, 3, 8], vec![11, 4, 6, 10, 12, 14, 15, 0, 2]]
}

fn in_memory(path: &Path, config: &EmulatorConfig) -> (LlamaForCausalLM, EmulatorReport) {
    let device = Device::flex();
    let original = if is_gguf(path) {
        LlamaForCausalLM::load_gguf(path, &device).unwrap().0
    } else {
        LlamaForCausalLM::load(path, &device).unwrap().0
    };
    let sequences = sequences();
    emulate(
        original,
        sequences.iter(),
        |m: &LlamaForCausalLM, s: &Vec<u32>| {
            m.forward(ids(s, &device), None);
        },
        config,
    )
    .unwrap()
}

fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
    t.into_data().try_to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// Builds both emulators and checks that they are the same: reports (ranks, whitened errors,
/// damping, dense layers), every layer's factors and dense weights, and the logits (which also
/// cover the embeddings and norms).
fn check_streaming_equals_in_memory(path: &Path, config: &EmulatorConfig) -> EmulatorReport {
    let device = Device::flex();
    let (want, want_report) = in_memory(path, config);
    let mut parts = Vec::new();
    let mut layers = Vec::new();
    let (got, got_report) =
        emulate_streaming(path, &device, &sequences(), config, FloatDType::F32, |p| match p {
            StreamingProgress::Part { done, total } => parts.push((done, total)),
            StreamingProgress::Layer(l) => layers.push((l.done, l.total, l.path.to_string())),
        })
        .unwrap();

    assert_eq!(got_report.layers, want_report.layers, "per-layer reports");
    assert_eq!(got_report.dense_layers, want_report.dense_layers);
    assert_eq!(got_report.stock_layers, want_report.stock_layers);
    assert_eq!(got_report.calibration_batches, want_report.calibration_batches);

    let (mut got_layers, mut want_layers) = (Vec::new(), Vec::new());
    emloc_layers(&got, &mut got_layers);
    emloc_layers(&want, &mut want_layers);
    assert_eq!(got_layers.len(), want_layers.len());
    for ((path, got), (_, want)) in got_layers.into_iter().zip(want_layers) {
        assert!(got == want, "{path}: factors or weights differ");
    }
    let probe = [2, 9, 4, 4, 1];
    assert_eq!(
        bits(got.forward(ids(&probe, &device), None)),
        bits(want.forward(ids(&probe, &device), None)),
        "logits"
    );

    // Progress: each part once in order; each factored layer once, numbered over the model.
    let total = parts.last().map(|&(_, t)| t).unwrap();
    assert_eq!(parts, (1..=total).map(|d| (d, total)).collect::<Vec<_>>());
    let n = want_report.layers.len();
    let expected: Vec<_> =
        want_report.layers.iter().enumerate().map(|(i, l)| (i + 1, n, l.path.clone())).collect();
    assert_eq!(layers, expected);
    got_report
}

/// Every emloc layer's path with the bits of its weight, bias and factors.
fn emloc_layers(model: &LlamaForCausalLM, out: &mut Vec<(String, Vec<Vec<u32>>)>) {
    let paths: Vec<String> = linear_layers(model).into_iter().map(|l| l.path).collect();
    let mut all = Vec::new();
    for layer in &model.model.layers {
        for linear in [
            &layer.self_attn.q_proj,
            &layer.self_attn.k_proj,
            &layer.self_attn.v_proj,
            &layer.self_attn.o_proj,
            &layer.mlp.gate_proj,
            &layer.mlp.up_proj,
            &layer.mlp.down_proj,
        ] {
            all.push(linear);
        }
    }
    all.extend(model.lm_head.as_ref());
    assert_eq!(all.len(), paths.len());
    for (path, linear) in paths.into_iter().zip(all) {
        let mut tensors = vec![bits(linear.weight.val())];
        tensors.extend(linear.bias.as_ref().map(|b| bits(b.val())));
        if let Some(f) = &linear.factors {
            tensors.push(bits(f.w_v.val()));
            tensors.push(bits(f.w_u.val()));
        }
        out.push((path, tensors));
    }
}

#[test]
fn streaming_equals_in_memory_from_safetensors_with_an_untied_head() {
    // Every layer, the head included.
    let report = check_streaming_equals_in_memory(
        &fixtures().join("tiny_llama"),
        &EmulatorConfig::all_layers(0.5),
    );
    assert!(report.layers.iter().any(|l| l.path == "lm_head"), "{:?}", report.layers);
    // The paper's rules: the head stays dense.
    let report = check_streaming_equals_in_memory(
        &fixtures().join("tiny_llama"),
        &EmulatorConfig::uniform(0.4),
    );
    assert_eq!(report.dense_layers, ["lm_head"]);
}

#[test]
fn streaming_equals_in_memory_with_biases_and_from_gguf() {
    check_streaming_equals_in_memory(&fixtures().join("tiny_qwen2"), &EmulatorConfig::uniform(0.5));
    check_streaming_equals_in_memory(
        &fixtures().join("gguf/tiny_llama.gguf"),
        &EmulatorConfig::uniform(0.5),
    );
}

#[test]
fn streaming_keeps_unselected_blocks_dense_and_checks_before_work() {
    // Only the second block is selected: the first is run (its outputs feed the second) but
    // stays dense.
    let mut config = EmulatorConfig::uniform(0.5);
    config.rules = vec![emloc::LayerRule::ratio(r"model\.layers\.1\..*", 0.5)];
    let report = check_streaming_equals_in_memory(&fixtures().join("tiny_llama"), &config);
    assert!(report.layers.iter().all(|l| l.path.starts_with("model.layers.1.")));

    let device = Device::flex();
    let dir = fixtures().join("tiny_llama");
    let err = emulate_streaming(&dir, &device, &[], &config, FloatDType::F32, |_| {}).unwrap_err();
    assert!(err.to_string().contains("calibration sequence"), "{err}");
    config.rules = vec![emloc::LayerRule::ratio("nothing", 0.5)];
    let err = emulate_streaming(&dir, &device, &sequences(), &config, FloatDType::F32, |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("nothing"), "{err}");
    config.rules = vec![emloc::LayerRule::ratio(".*", 1.5)];
    assert!(
        emulate_streaming(&dir, &device, &sequences(), &config, FloatDType::F32, |_| {}).is_err()
    );
}
