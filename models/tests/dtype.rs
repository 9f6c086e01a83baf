//! Frozen weights in bf16 / f16 (`emloc::cast_frozen`, the CLI's `--dtype`) with f32 adapters,
//! against the f32 path on the tiny Llama fixture, stage by stage: logits, streaming emulator
//! construction (per-layer whitened errors), LoRA fine-tuning (the adapter stays f32 and
//! learns), correction and merge; on Flex and, for f16, on wgpu (Mesa lavapipe in CI).
//! Tolerances are those of the dtypes' 8 (bf16) and 11 (f16) mantissa bits on values of order 1
//! to 10 through two blocks.

mod common;

use std::collections::BTreeSet;

use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use common::*;
use emloc::{
    CorrectionConfig, EmulatorConfig, EmulatorReport, LoraConfig, attach_new_adapter, cast_frozen,
};
use emloc_models::causal_lm::{
    EvalConfig, Example, Prompt, emulate_streaming, evaluate, finetune, load_causal_lm,
};
use emloc_models::llama::LlamaForCausalLM;
use emloc_models::training::TrainConfig;

fn logits(model: &LlamaForCausalLM, ids: &[u32]) -> Vec<f32> {
    let data = TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]);
    let device = model.device();
    let out = model.forward(Tensor::<2, Int>::from_data(data, &device), None);
    out.into_data().iter::<f32>().collect()
}

/// `(max |got − want|, max |want|)`.
fn deviation(got: &[f32], want: &[f32]) -> (f32, f32) {
    (max_abs_diff(got, want), want.iter().fold(0.0f32, |m, v| m.max(v.abs())))
}

fn data() -> Vec<Example> {
    let animals = ["cat", "dog", "bird", "fish"];
    (0..12)
        .map(|i| Example {
            prompt: Prompt::Text(format!("the {} in the park", animals[i % 4])),
            targets: vec![format!("{} runs fast", animals[i % 4])],
            choices: None,
        })
        .collect()
}

/// The same layers at the same ranks, with relative whitened errors within `tolerance`. (The
/// emulators' outputs off the calibration data are no test: with fewer calibration tokens than
/// features, the factors' directions outside the data's span are set by damping and vary with
/// rounding.)
fn same_whitened_errors(got: &EmulatorReport, want: &EmulatorReport, tolerance: f64) {
    assert_eq!(got.layers.len(), want.layers.len());
    for (got, want) in got.layers.iter().zip(&want.layers) {
        assert_eq!((&got.path, got.rank), (&want.path, want.rank));
        let (g, w) = (got.relative_whitened_error, want.relative_whitened_error);
        println!("{}: relative whitened error {g:.6} vs f32 {w:.6}", got.path);
        assert!((g - w).abs() <= tolerance, "{}: whitened error {g} vs {w}", got.path);
    }
}

/// Per dtype: the tolerance on logits, relative to their largest magnitude.
const DTYPES: [(FloatDType, DType, f32); 2] =
    [(FloatDType::BF16, DType::BF16, 0.02), (FloatDType::F16, DType::F16, 0.004)];

#[test]
fn half_precision_weights_run_every_stage_close_to_f32() {
    let device = Device::flex();
    let dir = fixtures().join("tiny_llama");
    let lm = load_causal_lm(&dir, &device, &BTreeSet::new()).unwrap();
    let probe = [1, 9, 4, 17, 3, 8, 2];
    let want = logits(&lm.model, &probe);
    let sequences = vec![vec![1, 5, 9, 13, 2, 7], vec![3, 3, 8], vec![11, 4, 6, 10, 12, 14, 15]];
    let config = EmulatorConfig::uniform(0.5);
    let (_, report_f32) =
        emulate_streaming(&dir, &device, &sequences, &config, FloatDType::F32, |_| {}).unwrap();

    for (dtype, burn_dtype, tolerance) in DTYPES {
        // Inference: every float parameter cast, the logits close to f32's.
        let half = cast_frozen(lm.model.clone(), dtype);
        assert_eq!(half.model.layers[0].self_attn.q_proj.weight.val().dtype(), burn_dtype);
        assert_eq!(half.model.norm.weight.val().dtype(), burn_dtype);
        let (diff, scale) = deviation(&logits(&half, &probe), &want);
        println!("{dtype:?} logits: max |diff| {diff:.3e} of max |logit| {scale:.2}");
        assert!(diff <= tolerance * scale, "{dtype:?} logits off by {diff} (scale {scale})");

        // Streaming construction in the dtype: factors in the dtype, Grams and factorisation in
        // f32/f64, so the per-layer whitened errors and the emulator's logits stay close.
        let (emulator, report) =
            emulate_streaming(&dir, &device, &sequences, &config, dtype, |_| {}).unwrap();
        let layer = &emulator.model.layers[1].mlp.down_proj;
        assert_eq!(layer.factors.as_ref().unwrap().w_v.val().dtype(), burn_dtype);
        same_whitened_errors(&report, &report_f32, f64::from(tolerance) / 4.0);
        assert!(logits(&emulator, &probe).iter().all(|v| v.is_finite()));

        // Fine-tuning on the half-precision emulator: the adapter and its optimizer stay f32,
        // the loss falls, and the trained adapter corrects and merges into the f32 original.
        let lora = LoraConfig::new(4).with_alpha(8.0).with_target_modules(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]);
        let (adapted, _) = attach_new_adapter(emulator, &lora).unwrap();
        let lora_a = adapted.model.layers[0].self_attn.q_proj.lora.as_ref().unwrap().a.val();
        assert_eq!(lora_a.dtype(), DType::F32);
        let train = TrainConfig {
            steps: 12,
            batch_size: 4,
            lr: 1e-2,
            warmup_steps: 2,
            ..Default::default()
        };
        let (tuned, report) =
            finetune(&lm.task, adapted, &data(), &train, None, |_, _, _| {}).unwrap();
        assert!(report.last_loss < report.first_loss, "{dtype:?}: {report:?}");
        let trained = tuned.model.layers[0].self_attn.q_proj.lora.as_ref().unwrap();
        assert_eq!(trained.b.val().dtype(), DType::F32);
        let (corrected, _) =
            emloc::correct(&lm.model, &tuned, &CorrectionConfig::default()).unwrap();
        let merged = emloc::merge_adapter(lm.model.clone(), &corrected).unwrap();
        let eval = EvalConfig { batch_size: 4, max_new_tokens: 0 };
        let scores = evaluate(&lm.task, &merged, &data(), &eval, |_, _| {}).unwrap();
        assert!(scores.loss.is_finite(), "{dtype:?}: {scores:?}");
    }
}

#[test]
fn f16_weights_on_wgpu_match_f32_on_the_cpu() {
    // wgpu (Mesa lavapipe in CI) with f16 frozen weights: the inference and the streaming
    // emulator's logits against Flex's f32. Skipped where the adapter has no f16.
    let Ok(wgpu) = emloc::DeviceChoice::Wgpu.device() else {
        println!("skipped: this build has no wgpu backend");
        return;
    };
    let dir = fixtures().join("tiny_llama");
    let probe = [1, 9, 4, 17, 3, 8, 2];
    let cpu = load_causal_lm(&dir, &Device::flex(), &BTreeSet::new()).unwrap().model;
    let want = logits(&cpu, &probe);
    let gpu = load_causal_lm(&dir, &wgpu, &BTreeSet::new()).unwrap().model;
    let half = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let half = cast_frozen(gpu.clone(), FloatDType::F16);
        logits(&half, &probe);
        half
    })) {
        Ok(half) => half,
        Err(_) => {
            println!("skipped: this wgpu adapter runs no f16");
            return;
        }
    };
    let (diff, scale) = deviation(&logits(&half, &probe), &want);
    println!("wgpu f16 logits: max |diff| {diff:.3e} of {scale:.2}");
    assert!(diff <= 0.004 * scale, "wgpu f16 logits off by {diff}");

    let sequences = vec![vec![1, 5, 9, 13, 2, 7], vec![3, 3, 8]];
    let config = EmulatorConfig::uniform(0.5);
    let (_, cpu_report) =
        emulate_streaming(&dir, &Device::flex(), &sequences, &config, FloatDType::F32, |_| {})
            .unwrap();
    let (gpu_emulator, gpu_report) =
        emulate_streaming(&dir, &wgpu, &sequences, &config, FloatDType::F16, |_| {}).unwrap();
    assert_eq!(logits(&gpu_emulator, &probe).len(), want.len());
    same_whitened_errors(&gpu_report, &cpu_report, 1e-3);
}

#[test]
fn half_precision_sentence_encoder_embeds_like_f32() {
    // The encoder path (BERT: LayerNorm, exact GELU, padding mask bias) with bf16 / f16 weights:
    // each sentence's embedding keeps its direction.
    use emloc_models::bert::SentenceEncoder;
    let texts = ["a cat sat on the mat", "dogs run", "the weather is fine today"];
    let encoder = SentenceEncoder::load(fixtures().join("tiny_bert"), &Device::flex()).unwrap();
    let embed = |encoder: &SentenceEncoder| -> Vec<f32> {
        let out = encoder.forward(encoder.inputs(&texts).unwrap());
        out.into_data().iter::<f32>().collect()
    };
    let want = embed(&encoder);
    let dim = want.len() / texts.len();
    for (dtype, _, tolerance) in DTYPES {
        let half = SentenceEncoder::load(fixtures().join("tiny_bert"), &Device::flex()).unwrap();
        let model = cast_frozen(half.model.clone(), dtype);
        let got = embed(&half.with_model(model));
        for (g, w) in got.chunks(dim).zip(want.chunks(dim)) {
            let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            let cosine = dot / (norm(g) * norm(w));
            println!("{dtype:?} sentence embedding cosine to f32: {cosine:.6}");
            assert!(cosine > 1.0 - tolerance / 10.0, "{dtype:?}: cosine {cosine}");
        }
    }
}
