//! Llama family: loading HF checkpoints (Llama, Llama 3 `rope_scaling`, Qwen2 with biases;
//! tied and untied heads), logits against HF transformers (float64), KV-cache decoding,
//! greedy and nucleus generation, padded batches (left and right padding, padded KV-cache
//! decoding, batched generation), the tokenizer, loading errors, and EMLoC end to end.
//!
//! Fixtures: `tests/fixtures/tiny_{llama,llama3,qwen2}/` (written by `make_tiny_llama.py`) and
//! `tiny_*_transformers.json` (`LlamaForCausalLM` / `Qwen2ForCausalLM` in float64, greedy ids from
//! `generate`, by `make_transformers_refs.py`). Logits are compared with a maximum absolute
//! difference of [`TOL`] (the Rust side computes in f32).

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use emloc_models::ModelError;
use emloc_models::llama::{
    GenerationConfig, LlamaConfig, LlamaFamily, LlamaForCausalLM, LlamaTokenizer, PaddingMask,
    linear_paths,
};
use safetensors::Dtype;
use serde_json::Value;

/// Maximum absolute difference to the float64 reference. Logits are O(5); the f32 forward pass
/// is within ~1e-5 of float64 here.
const TOL: f32 = 1e-4;

const VARIANTS: [&str; 3] = ["tiny_llama", "tiny_llama3", "tiny_qwen2"];

fn dir(variant: &str) -> PathBuf {
    fixtures().join(variant)
}

fn expected(variant: &str) -> Value {
    read_expected(&format!("{variant}_transformers.json"))
}

fn device() -> Device {
    Device::default()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn int_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), rows[0].len()]), device)
}

fn input_ids(e: &Value, device: &Device) -> Tensor<2, Int> {
    let rows: Vec<Vec<u32>> = e["input_ids"].as_array().unwrap().iter().map(ids).collect();
    int_tensor(&rows, device)
}

// ----------------------------------------------------------------------- reference outputs

#[test]
fn tiny_variants_match_transformers_logits() {
    let device = device();
    for variant in VARIANTS {
        let e = expected(variant);
        let (model, config, report) =
            LlamaForCausalLM::load_with_report(dir(variant), &device).unwrap();
        let tied = config.tie_word_embeddings;
        assert_eq!(model.lm_head.is_none(), tied, "{variant}: head tying");
        // embed + 9 per layer (+3 q/k/v biases for Qwen2) + norm (+ lm_head).
        let per_layer = if config.model_type == LlamaFamily::Qwen2 { 12 } else { 9 };
        assert_eq!(report.applied, 1 + 2 * per_layer + 1 + usize::from(!tied), "{variant}");
        let logits = model.forward(input_ids(&e, &device), None);
        assert_eq!(logits.dims(), [2, 8, 50]);
        assert_within(
            &format!("{variant} logits"),
            &values(logits),
            &floats(&e["logits"]["values"]),
            TOL,
        );
    }
}

#[test]
fn configs_are_read_as_expected() {
    let llama = LlamaConfig::from_file(dir("tiny_llama").join("config.json")).unwrap();
    assert_eq!((llama.num_key_value_heads(), llama.head_dim()), (2, 8));
    assert!(!llama.qkv_bias() && !llama.tie_word_embeddings && llama.rope_scaling.is_none());
    assert_eq!(llama.eos_token_ids(), vec![2]);
    let llama3 = LlamaConfig::from_file(dir("tiny_llama3").join("config.json")).unwrap();
    assert!(matches!(
        llama3.rope_scaling,
        Some(emloc_models::llama::RopeScaling::Llama3 { factor: 8.0, .. })
    ));
    let qwen = LlamaConfig::from_file(dir("tiny_qwen2").join("config.json")).unwrap();
    assert_eq!(qwen.model_type, LlamaFamily::Qwen2);
    assert!(qwen.qkv_bias() && !qwen.o_bias() && !qwen.mlp_bias());
}

#[test]
fn rope_scaling_changes_the_logits() {
    // The llama3 fixture without its scaling must no longer match: the test can fail.
    let device = device();
    let e = expected("tiny_llama3");
    let mut config = LlamaConfig::from_file(dir("tiny_llama3").join("config.json")).unwrap();
    config.rope_scaling = None;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&config).unwrap())
        .unwrap();
    std::fs::copy(
        dir("tiny_llama3").join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let (model, _) = LlamaForCausalLM::load(tmp.path(), &device).unwrap();
    let diff = max_abs_diff(
        &values(model.forward(input_ids(&e, &device), None)),
        &floats(&e["logits"]["values"]),
    );
    println!("llama3 logits without rope_scaling: max |diff| = {diff:.3}");
    assert!(diff > 100.0 * TOL, "rope_scaling had no effect ({diff})");
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let device = device();
    for variant in VARIANTS {
        let e = expected(variant);
        let (model, _) = LlamaForCausalLM::load(dir(variant), &device).unwrap();
        let input = input_ids(&e, &device);
        let full = values(model.forward(input.clone(), None));
        // Prefill 3 positions, then 2, then one at a time.
        let mut cache = model.new_cache();
        let mut pieces = Vec::new();
        let mut start = 0;
        for len in [3, 2, 1, 1, 1] {
            let chunk = input.clone().slice([0..2, start..start + len]);
            pieces.push(model.forward(chunk, Some(&mut cache)));
            start += len;
            assert_eq!(cache.len(), start);
        }
        let incremental = values(Tensor::cat(pieces, 1));
        assert_within(&format!("{variant} cached vs full"), &incremental, &full, 1e-4);
    }
}

#[test]
fn greedy_generation_matches_transformers_ids() {
    let device = device();
    for variant in VARIANTS {
        let e = expected(variant);
        let (model, config) = LlamaForCausalLM::load(dir(variant), &device).unwrap();
        let settings = GenerationConfig::greedy(e["max_new_tokens"].as_u64().unwrap() as usize)
            .with_eos_token_ids(config.eos_token_ids());
        let got = model.generate(&ids(&e["prompt"]), &settings).unwrap();
        println!("{variant}: {got:?}");
        assert_eq!(got, ids(&e["greedy"]), "{variant}");
    }
}

#[test]
fn sampling_is_reproducible_and_top_p_zero_is_greedy() {
    let device = device();
    let e = expected("tiny_llama");
    let (model, _) = LlamaForCausalLM::load(dir("tiny_llama"), &device).unwrap();
    let prompt = ids(&e["prompt"]);
    let sample =
        |seed| model.generate(&prompt, &GenerationConfig::sampling(12, 1.5, 0.95, seed)).unwrap();
    let a = sample(7);
    assert_eq!(a, sample(7), "same seed, same tokens");
    assert_eq!(a.len(), 12);
    // A hot temperature over 12 steps: different seeds give different continuations.
    let others: Vec<Vec<u32>> = (8..12).map(sample).collect();
    assert!(others.iter().any(|o| *o != a), "sampling ignores the seed: {a:?} {others:?}");
    let greedy = model.generate(&prompt, &GenerationConfig::greedy(12)).unwrap();
    assert_ne!(a, greedy, "sampling at temperature 1.5 reproduced greedy decoding");
    let nucleus0 = model.generate(&prompt, &GenerationConfig::sampling(12, 1.5, 0.0, 3)).unwrap();
    assert_eq!(nucleus0, greedy);
    assert_eq!(greedy, ids(&e["greedy"]));
}

#[test]
fn generation_rejects_bad_inputs() {
    let (model, _) = LlamaForCausalLM::load(dir("tiny_llama"), &device()).unwrap();
    let bad = |r: emloc_models::Result<Vec<u32>>, needle: &str| match r {
        Err(ModelError::InvalidInput(m)) => assert!(m.contains(needle), "{m}"),
        other => panic!("expected InvalidInput({needle}), got {other:?}"),
    };
    bad(model.generate(&[], &GenerationConfig::greedy(3)), "empty prompt");
    bad(model.generate(&[1, 50], &GenerationConfig::greedy(3)), "50");
    bad(model.generate(&[1], &GenerationConfig::sampling(3, 1.0, 1.5, 0)), "top_p");
    bad(model.generate(&[1], &GenerationConfig::sampling(3, -1.0, 0.5, 0)), "temperature");
    // A broken (NaN) model gives an error, not a silent token.
    let broken = model.map(&mut Poison);
    bad(broken.generate(&[1, 5], &GenerationConfig::greedy(3)), "not finite");
    bad(broken.generate(&[1, 5], &GenerationConfig::sampling(3, 1.0, 0.9, 0)), "row 0, step 0");
}

/// Turns every float parameter into NaN.
struct Poison;

impl ModuleMapper for Poison {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.add_scalar(f32::NAN))
    }
}

// ------------------------------------------------------------------------- padded batches

/// The pad id of the padded tests: a real word ("<unk>"), so a mask that let pads through
/// would change the logits.
const PAD: u32 = 0;

/// Real positions of a padded batch must equal the unpadded sequences this closely: the same
/// f32 computations, only summed over extra (exactly zero) masked terms.
const PAD_TOL: f32 = 1e-5;

/// Three sequences of different lengths (5, 8, 2), each a prefix of a fixture row, with the
/// transformers float64 logits of its positions (causal, so a prefix's logits are the row's first ones).
fn ragged(e: &Value) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let rows: Vec<Vec<u32>> = e["input_ids"].as_array().unwrap().iter().map(ids).collect();
    let logits = floats(&e["logits"]["values"]);
    let (seq, vocab) = (8, 50);
    let mut seqs = Vec::new();
    let mut refs = Vec::new();
    for (row, len) in [(1, 5), (0, 8), (1, 2)] {
        seqs.push(rows[row][..len].to_vec());
        refs.push(logits[row * seq * vocab..(row * seq + len) * vocab].to_vec());
    }
    (seqs, refs)
}

/// `seqs` padded with [`PAD`] to `width` on the left or the right, and the padding mask.
fn pad(seqs: &[Vec<u32>], width: usize, left: bool) -> (Vec<Vec<u32>>, PaddingMask) {
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let rows = seqs
        .iter()
        .map(|s| {
            let pads = vec![PAD; width - s.len()];
            if left { [pads, s.clone()].concat() } else { [s.clone(), pads].concat() }
        })
        .collect();
    let mask = if left {
        PaddingMask::left_padded(&lengths, width)
    } else {
        PaddingMask::right_padded(&lengths, width)
    };
    (rows, mask)
}

fn argmaxes(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits.chunks(vocab).map(emloc_models::llama::argmax).collect()
}

#[test]
fn padded_batches_equal_unpadded_sequences() {
    let device = device();
    for variant in VARIANTS {
        let e = expected(variant);
        let (model, _) = LlamaForCausalLM::load(dir(variant), &device).unwrap();
        let (seqs, refs) = ragged(&e);
        let single: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| values(model.forward(int_tensor(std::slice::from_ref(s), &device), None)))
            .collect();
        for (i, (one, want)) in single.iter().zip(&refs).enumerate() {
            assert_within(&format!("{variant} sequence {i} vs transformers"), one, want, TOL);
        }
        let width = 9; // one more than the longest: every row has a pad
        for left in [true, false] {
            let side = if left { "left" } else { "right" };
            let (rows, mask) = pad(&seqs, width, left);
            // HF's Int mask for left padding, a Bool mask for right padding.
            let logits = if left {
                model.forward_padded(int_tensor(&rows, &device), mask.to_tensor(&device), None)
            } else {
                let flags: Vec<bool> = (0..3).flat_map(|r| mask.row(r).to_vec()).collect();
                let mask =
                    Tensor::<2, Bool>::from_data(TensorData::new(flags, [3, width]), &device);
                model.forward_padded(int_tensor(&rows, &device), mask, None)
            };
            assert_eq!(logits.dims(), [3, width, 50]);
            let logits = values(logits);
            assert!(logits.iter().all(|x| x.is_finite()), "{variant} {side}: non-finite logits");
            let (mut worst, mut worst_ref) = (0.0f32, 0.0f32);
            for (r, s) in seqs.iter().enumerate() {
                let start = if left { width - s.len() } else { 0 };
                let row = &logits[(r * width + start) * 50..(r * width + start + s.len()) * 50];
                worst = worst.max(max_abs_diff(row, &single[r]));
                worst_ref = worst_ref.max(max_abs_diff(row, &refs[r]));
                assert_eq!(argmaxes(row, 50), argmaxes(&single[r], 50), "{variant} {side} row {r}");
            }
            println!(
                "{variant} {side}-padded: max |diff| vs unpadded {worst:.2e}, vs transformers {worst_ref:.2e}"
            );
            assert!(worst <= PAD_TOL, "{variant} {side}: {worst} > {PAD_TOL}");
            assert!(worst_ref <= TOL, "{variant} {side}: {worst_ref} vs transformers");
        }
        // The pad id does not matter: another pad token gives the same real logits.
        let (rows, mask) = pad(&seqs, width, true);
        let other: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.iter().map(|&t| if t == PAD { 7 } else { t }).collect())
            .collect();
        let a = values(model.forward_padded(int_tensor(&rows, &device), mask.clone(), None));
        let b = values(model.forward_padded(int_tensor(&other, &device), mask, None));
        for (r, s) in seqs.iter().enumerate() {
            let span = (r * width + width - s.len()) * 50..(r + 1) * width * 50;
            assert_eq!(a[span.clone()], b[span], "{variant}: the pad id changed row {r}");
        }
    }
}

#[test]
fn padded_kv_cache_decoding_equals_full_forward() {
    let device = device();
    for variant in VARIANTS {
        let e = expected(variant);
        let (model, _) = LlamaForCausalLM::load(dir(variant), &device).unwrap();
        let (seqs, _) = ragged(&e);
        let width = 8;

        // Left padding: the whole batch at once vs prefill + chunks, pads included.
        let (rows, mask) = pad(&seqs, width, true);
        let input = int_tensor(&rows, &device);
        let full = values(model.forward_padded(input.clone(), mask.clone(), None));
        let mut cache = model.new_cache();
        let mut pieces = Vec::new();
        let mut start = 0;
        for len in [3, 2, 1, 1, 1] {
            let flags: Vec<bool> =
                (0..3).flat_map(|r| mask.row(r)[start..start + len].to_vec()).collect();
            let chunk = input.clone().slice([0..3, start..start + len]);
            pieces.push(model.forward_padded(
                chunk,
                PaddingMask::new(3, len, flags),
                Some(&mut cache),
            ));
            start += len;
            assert_eq!(cache.len(), start);
        }
        assert_eq!(cache.next_positions(), &[5, 8, 2]);
        assert_eq!(cache.key_mask()[2], mask.row(2));
        let incremental = values(Tensor::cat(pieces, 1));
        assert!(full.iter().all(|x| x.is_finite()));
        assert_within(&format!("{variant} padded cached vs full"), &incremental, &full, PAD_TOL);

        // Right padding, then one more token per row: positions continue after the real
        // tokens and the cached pads stay masked, as for the unpadded sequence + token.
        let (rows, mask) = pad(&seqs, width, false);
        let mut cache = model.new_cache();
        model.forward_padded(int_tensor(&rows, &device), mask, Some(&mut cache));
        let next = [9u32, 30, 16];
        let step = values(model.forward_padded(
            int_tensor(&next.iter().map(|&t| vec![t]).collect::<Vec<_>>(), &device),
            PaddingMask::all_real(3, 1),
            Some(&mut cache),
        ));
        for (r, s) in seqs.iter().enumerate() {
            let longer = [s.clone(), vec![next[r]]].concat();
            let n = longer.len();
            let alone = values(model.forward(int_tensor(&[longer], &device), None));
            assert_within(
                &format!("{variant} right-padded + 1 token, row {r}"),
                &step[r * 50..(r + 1) * 50],
                &alone[(n - 1) * 50..],
                PAD_TOL,
            );
        }
    }
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let device = device();
    for variant in VARIANTS {
        let e = expected(variant);
        let (model, config) = LlamaForCausalLM::load(dir(variant), &device).unwrap();
        let rows: Vec<Vec<u32>> = e["input_ids"].as_array().unwrap().iter().map(ids).collect();
        let prompts = vec![ids(&e["prompt"]), rows[0][..3].to_vec(), rows[1][..7].to_vec()];
        let max_new = 10;
        let alone = |settings: &GenerationConfig| -> Vec<Vec<u32>> {
            prompts.iter().map(|p| model.generate(p, settings).unwrap()).collect()
        };

        // Without stop ids every row runs max_new steps.
        let free = GenerationConfig::greedy(max_new);
        let free_ids = alone(&free);
        assert_eq!(model.generate_batch(&prompts, &free, PAD).unwrap(), free_ids, "{variant}");

        // Stop ids: the model's eos and a token row 1 emits at step k >= 1 (its first
        // occurrence), so that row stops early.
        let k = (1..max_new).find(|&k| !free_ids[1][..k].contains(&free_ids[1][k])).unwrap();
        let mut eos = config.eos_token_ids();
        eos.push(free_ids[1][k]);
        let settings = GenerationConfig::greedy(max_new).with_eos_token_ids(eos.clone());
        let want = alone(&settings);
        assert_eq!(want[1].len(), k + 1, "{variant}: row 1 stops at its stop id");
        let got = model.generate_batch(&prompts, &settings, PAD).unwrap();
        println!("{variant}: stop ids {eos:?}; batched {got:?}");
        assert_eq!(got, want, "{variant}");
        assert!(got.iter().any(|g| g.len() == max_new) || got.iter().all(|g| g.len() < max_new));
        for g in &got {
            // Nothing after a stop id.
            if let Some(i) = g.iter().position(|t| eos.contains(t)) {
                assert_eq!(i, g.len() - 1, "{variant}: tokens after a stop id: {g:?}");
            }
        }
        // Another pad id, and the prompts in another order, change nothing.
        assert_eq!(model.generate_batch(&prompts, &settings, 7).unwrap(), want, "{variant}");
        let reversed: Vec<Vec<u32>> = prompts.iter().rev().cloned().collect();
        let mut back = model.generate_batch(&reversed, &settings, PAD).unwrap();
        back.reverse();
        assert_eq!(back, want, "{variant}");
    }

    // Sampling: row r samples what `generate` samples with seed `row_seed(r)`.
    let e = expected("tiny_llama");
    let (model, _) = LlamaForCausalLM::load(dir("tiny_llama"), &device).unwrap();
    let prompts = vec![ids(&e["prompt"]), vec![1, 5, 7], vec![1, 41, 42, 6, 43]];
    let settings = GenerationConfig::sampling(10, 1.5, 0.95, 11).with_eos_token_ids(vec![2]);
    let got = model.generate_batch(&prompts, &settings, PAD).unwrap();
    assert_eq!(got, model.generate_batch(&prompts, &settings, PAD).unwrap(), "reproducible");
    for (r, p) in prompts.iter().enumerate() {
        let seeded = GenerationConfig { seed: settings.row_seed(r), ..settings.clone() };
        assert_eq!(got[r], model.generate(p, &seeded).unwrap(), "sampled row {r}");
    }
    assert_ne!(got[0], got[1], "rows sample independently");

    // Errors name the row; no prompts give no outputs.
    let err = model.generate_batch(&[vec![1], vec![]], &settings, PAD).unwrap_err();
    assert!(err.to_string().contains("empty prompt (row 1)"), "{err}");
    let err = model.generate_batch(&[vec![1]], &settings, 50).unwrap_err();
    assert!(err.to_string().contains("pad id"), "{err}");
    assert!(model.generate_batch(&[], &settings, PAD).unwrap().is_empty());
}

/// Casts every float parameter to f16.
struct ToF16;

impl ModuleMapper for ToF16 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.cast(DType::F16))
    }
}

#[test]
fn f16_padded_batches_have_no_nan() {
    // The masks in f16: blocked scores are filled with f16's finite minimum and a left pad
    // attends itself, so no softmax row is all -inf and no 0 · inf product appears. On Flex
    // (the pure-Rust CPU backend), which runs f16 matmuls; wgpu adapters may lack f16.
    let device = Device::flex();
    let e = expected("tiny_llama");
    let (model, _) = LlamaForCausalLM::load(dir("tiny_llama"), &device).unwrap();
    let (seqs, _) = ragged(&e);
    let (rows, mask) = pad(&seqs, 8, true);
    let f32_logits = values(model.forward_padded(int_tensor(&rows, &device), mask.clone(), None));
    let half = model.map(&mut ToF16);
    assert_eq!(half.model.embed_tokens.weight.val().dtype(), DType::F16);
    let logits = half.forward_padded(int_tensor(&rows, &device), mask, None);
    assert_eq!(logits.dtype(), DType::F16);
    let logits: Vec<f32> = logits.into_data().iter::<f32>().collect();
    assert!(logits.iter().all(|x| x.is_finite()), "f16 logits with NaN/Inf");
    let diff = max_abs_diff(&logits, &f32_logits);
    println!("f16 vs f32 padded logits: max |diff| = {diff:.2e}");
    assert!(diff < 0.1, "f16 logits too far from f32: {diff}");
}

#[test]
fn tokenizer_round_trips() {
    let e = expected("tiny_llama");
    let tokenizer = LlamaTokenizer::from_dir(dir("tiny_llama")).unwrap();
    let text = e["tokenizer_text"].as_str().unwrap();
    let encoded = tokenizer.encode(text, true).unwrap();
    assert_eq!(encoded, ids(&e["tokenizer_ids"]));
    assert_eq!(encoded[0], 1, "<s> first");
    let decoded = tokenizer.decode(&encoded, true).unwrap();
    assert_eq!(decoded, text.to_lowercase());
    assert!(matches!(
        LlamaTokenizer::from_dir(dir("tiny_qwen2")),
        Err(ModelError::MissingFile { .. })
    ));
}

// ------------------------------------------------------------------------- loading errors

fn fixture_tensors(variant: &str) -> Tensors {
    read_tensors(&dir(variant).join("model.safetensors"))
}

fn model_dir(variant: &str, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::TempDir {
    model_dir_from(&dir(variant), &["config.json"], tensors)
}

fn key_mismatch(path: &Path) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    key_mismatch_of(LlamaForCausalLM::load(path, &device()))
}

#[test]
fn missing_unexpected_and_misshaped_keys_are_listed() {
    // Missing: an untied head and a Qwen2 bias.
    let tensors: Vec<_> =
        fixture_tensors("tiny_llama").into_iter().filter(|t| t.0 != "lm_head.weight").collect();
    let (missing, unexpected, invalid, message) =
        key_mismatch(model_dir("tiny_llama", &tensors).path());
    println!("{message}");
    assert_eq!(missing, vec!["lm_head.weight"]);
    assert!(unexpected.is_empty() && invalid.is_empty());

    let drop = "model.layers.1.self_attn.k_proj.bias";
    let tensors: Vec<_> =
        fixture_tensors("tiny_qwen2").into_iter().filter(|t| t.0 != drop).collect();
    let (missing, _, _, message) = key_mismatch(model_dir("tiny_qwen2", &tensors).path());
    assert_eq!(missing, vec![drop], "{message}");

    // Unexpected: a bias a Llama config does not have; the inv_freq buffer is not reported.
    let mut tensors = fixture_tensors("tiny_llama");
    tensors.push((
        "model.layers.0.self_attn.o_proj.bias".into(),
        Dtype::F32,
        vec![32],
        vec![0; 128],
    ));
    let (missing, unexpected, invalid, message) =
        key_mismatch(model_dir("tiny_llama", &tensors).path());
    println!("{message}");
    assert!(missing.is_empty() && invalid.is_empty(), "{message}");
    assert_eq!(unexpected, vec!["model.layers.0.self_attn.o_proj.bias"]);

    // Mis-shaped: k_proj with as many heads as q_proj (no GQA).
    let tensors: Vec<_> = fixture_tensors("tiny_llama")
        .into_iter()
        .map(|(k, d, s, b)| {
            if k == "model.layers.0.self_attn.k_proj.weight" {
                (k, d, vec![32, 32], vec![0; 32 * 32 * 4])
            } else {
                (k, d, s, b)
            }
        })
        .collect();
    let (_, _, invalid, message) = key_mismatch(model_dir("tiny_llama", &tensors).path());
    println!("{message}");
    assert_eq!(invalid.len(), 1, "{message}");
    assert!(invalid[0].starts_with("model.layers.0.self_attn.k_proj.weight"), "{message}");
}

fn config_error(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> ModelError {
    let tmp = model_dir("tiny_llama", &fixture_tensors("tiny_llama"));
    let path = tmp.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
    match LlamaForCausalLM::load(tmp.path(), &device()) {
        Err(e) => e,
        Ok(_) => panic!("expected a config error"),
    }
}

#[test]
fn bad_configs_name_the_field() {
    match config_error(|c| {
        c.remove("num_attention_heads");
    }) {
        ModelError::MissingConfigField { field, .. } => assert_eq!(field, "num_attention_heads"),
        other => panic!("expected MissingConfigField, got {other}"),
    }
    type Tamper = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(Tamper, &str)> = vec![
        (
            Box::new(|c| {
                c.insert("num_key_value_heads".into(), 3.into());
            }),
            "num_key_value_heads",
        ),
        (
            Box::new(|c| {
                c.insert("hidden_act".into(), "gelu".into());
            }),
            "hidden_act",
        ),
        (
            Box::new(|c| {
                c.insert("model_type".into(), "mistral".into());
            }),
            "model_type",
        ),
        (
            Box::new(|c| {
                c.insert("rms_norm_eps".into(), 0.0.into());
            }),
            "rms_norm_eps",
        ),
        (
            Box::new(|c| {
                c.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                );
            }),
            "rope_scaling.low_freq_factor",
        ),
        (
            Box::new(|c| {
                c.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
                );
            }),
            "rope_scaling.rope_type",
        ),
        (
            Box::new(|c| {
                c.insert("vocab_size".into(), "fifty".into());
            }),
            "vocab_size",
        ),
    ];
    for (edit, field) in cases {
        // Unparsable forms are `InvalidConfig`; values `validate` rejects are `ConfigValue`
        // (a typed `ConfigProblem`, displayed the same way).
        let (message, path) = match config_error(edit) {
            ModelError::InvalidConfig { message, path } => (message, path),
            ModelError::ConfigValue { problem, path } => (problem.to_string(), path),
            other => panic!("{field}: expected InvalidConfig or ConfigValue, got {other}"),
        };
        assert!(message.contains(field), "{field}: {message}");
        assert!(path.ends_with("config.json"));
    }
}

// ----------------------------------------------------------------------------------- EMLoC

/// Mean next-token cross-entropy of `logits` `[b, s, v]` against `ids` `[b, s]` (shifted).
fn lm_loss(logits: Tensor<3>, ids: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
    let targets = ids.slice([0..b, 1..s]).unsqueeze_dim::<3>(2);
    logp.gather(2, targets).mean().neg()
}

#[test]
fn emloc_pipeline_runs_on_tiny_llama() {
    let device = device();
    let (original, config) = LlamaForCausalLM::load(dir("tiny_llama"), &device).unwrap();

    let mut paths: Vec<String> =
        emloc::linear_layers(&original).into_iter().map(|l| l.path).collect();
    let mut want = linear_paths(&config, false);
    paths.sort();
    want.sort();
    assert_eq!(paths, want);

    // Calibration: a few random sequences of the vocabulary.
    let mut rng = emloc_models::llama::XorShiftRng::new(5);
    let batch = |rng: &mut emloc_models::llama::XorShiftRng| {
        let rows: Vec<Vec<u32>> =
            (0..4).map(|_| (0..10).map(|_| (rng.next_u64() % 50) as u32).collect()).collect();
        int_tensor(&rows, &device)
    };
    let calibration: Vec<_> = (0..3).map(|_| batch(&mut rng)).collect();
    let (emulator, report) = emloc::emulate(
        original.clone(),
        calibration,
        |m: &LlamaForCausalLM, ids: Tensor<2, Int>| {
            m.forward(ids, None);
        },
        &emloc::EmulatorConfig::uniform(0.5),
    )
    .unwrap();
    assert_eq!(report.layers.len(), 2 * 7);
    assert_eq!(report.dense_layers, vec!["lm_head".to_string()]);
    assert!(report.params_kept() < report.params_original());

    let lora = emloc::LoraConfig::new(4).with_alpha(8.0).with_target_modules(vec![
        "q_proj".into(),
        "v_proj".into(),
        "down_proj".into(),
    ]);
    let (adapted, targets) = emloc::attach_new_adapter(emulator, &lora).unwrap();
    assert_eq!(targets.len(), 6);

    // A few AdamW steps on next-token prediction of one fixed batch.
    let train_device = device.clone().autodiff();
    let data = batch(&mut rng);
    let mut model = adapted.train();
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let ids = data.clone().to_device(&train_device);
        let loss = lm_loss(model.forward(ids.clone(), None), ids);
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    println!("emulator LM loss: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses.last() < losses.first(), "training did not lower the loss: {losses:?}");
    let tuned = model.valid();

    let (adapter, correction) =
        emloc::correct(&original, &tuned, &emloc::CorrectionConfig::default()).unwrap();
    assert_eq!(correction.layers.len(), 6);
    let merged = emloc::merge_adapter(original.clone(), &adapter).unwrap();
    let unmerged = emloc::attach_adapter(original.clone(), &adapter).unwrap().valid();
    let probe = batch(&mut rng);
    let a = merged.forward(probe.clone(), None);
    let b = unmerged.forward(probe.clone(), None);
    assert_eq!(a.dims(), [4, 10, 50]);
    let (a, b) = (values(a), values(b));
    assert!(a.iter().all(|x| x.is_finite()));
    assert_within("merged vs unmerged logits", &a, &b, 1e-4);
    // The adapter changed the model.
    let base = values(original.forward(probe, None));
    assert!(max_abs_diff(&a, &base) > 1e-4, "the merged adapter changed nothing");
    // Generation still runs on the merged model.
    assert_eq!(merged.generate(&[1, 5, 7], &GenerationConfig::greedy(4)).unwrap().len(), 4);
}

// ------------------------------------------------------------------------- real checkpoint

#[test]
fn real_checkpoint_generates_when_present() {
    // Any HF Llama/Qwen2 directory with tokenizer.json (e.g. SmolLM-135M, TinyLlama).
    let Some(dir) = std::env::var_os("EMLOC_LLAMA_DIR").map(PathBuf::from) else {
        println!("SKIPPED real_checkpoint_generates_when_present: set EMLOC_LLAMA_DIR");
        return;
    };
    let device = device();
    let (model, config) = LlamaForCausalLM::load(&dir, &device).unwrap();
    let tokenizer = LlamaTokenizer::from_dir(&dir).unwrap();
    let prompt = tokenizer.encode("The capital of France is", true).unwrap();
    let full = model.forward(int_tensor(std::slice::from_ref(&prompt), &device), None);
    assert!(values(full.clone()).iter().all(|x| x.is_finite()));
    let mut cache = model.new_cache();
    let n = prompt.len();
    let head = model.forward(int_tensor(&[prompt[..n - 1].to_vec()], &device), Some(&mut cache));
    let tail = model.forward(int_tensor(&[prompt[n - 1..].to_vec()], &device), Some(&mut cache));
    let cached = values(Tensor::cat(vec![head, tail], 1));
    let diff = max_abs_diff(&cached, &values(full));
    println!("cached vs full: {diff:.2e}");
    assert!(diff < 1e-2);
    let settings = GenerationConfig::greedy(8).with_eos_token_ids(config.eos_token_ids());
    let ids = model.generate(&prompt, &settings).unwrap();
    println!(
        "{:?} -> {:?}",
        tokenizer.decode(&prompt, true).unwrap(),
        tokenizer.decode(&ids, true).unwrap()
    );
    assert!(!ids.is_empty());
}

#[test]
fn explicit_head_dim_and_biases_build_and_decode_consistently() {
    // head_dim 16 with hidden 32 and 4 heads (q_proj is 32 -> 64), GQA 4/1, all Llama biases,
    // linear RoPE scaling: random weights, so only shapes and cache consistency are checked.
    let device = device();
    let mut config = LlamaConfig::new(50, 32, 48, 2, 4);
    config.head_dim = Some(16);
    config.num_key_value_heads = Some(1);
    config.attention_bias = true;
    config.mlp_bias = true;
    config.rope_scaling = Some(emloc_models::llama::RopeScaling::Linear { factor: 2.0 });
    config.validate().unwrap();
    let model = config.init(false, &device);
    assert_eq!(model.model.layers[0].self_attn.q_proj.weight.shape().dims::<2>(), [32, 64]);
    assert_eq!(model.model.layers[0].self_attn.k_proj.weight.shape().dims::<2>(), [32, 16]);
    assert!(model.model.layers[0].self_attn.o_proj.bias.is_some());
    let input = int_tensor(&[vec![1, 2, 3, 4, 5, 6]], &device);
    let full = values(model.forward(input.clone(), None));
    let mut cache = model.new_cache();
    let a = model.forward(input.clone().slice([0..1, 0..4]), Some(&mut cache));
    let b = model.forward(input.slice([0..1, 4..6]), Some(&mut cache));
    assert_within("head_dim 16 cached vs full", &values(Tensor::cat(vec![a, b], 1)), &full, 1e-4);
    assert_eq!(full.len(), 6 * 50);
}

#[test]
fn layer_drop_and_mlp_pruning_keep_the_selected_parts_of_the_model() {
    let device = device();
    let (model, _) = LlamaForCausalLM::load(dir("tiny_qwen2"), &device).unwrap();
    let e = expected("tiny_qwen2");
    let logits = |m: &LlamaForCausalLM| values(m.forward(input_ids(&e, &device), None));
    // Keeping every layer is the model; a bad selection is refused.
    assert_eq!(logits(&model.clone().keep_layers(&[0, 1]).unwrap()), logits(&model));
    assert!(model.clone().keep_layers(&[1, 0]).is_err());
    let dropped = model.clone().keep_layers(&[1]).unwrap();
    assert_eq!(dropped.model.layers.len(), 1);
    assert_ne!(logits(&dropped), logits(&model));

    // Pruned MLP neurons against the oracle of silenced ones: `down_proj` rows zeroed.
    let width = model.model.layers[0].mlp.gate_proj.d_output();
    let kept: Vec<Vec<usize>> = vec![(0..width).step_by(5).collect(), vec![0, 7, width - 1]];
    let pruned = model.clone().prune_mlp(&kept).unwrap();
    assert_eq!(pruned.model.layers[1].mlp.down_proj.d_input(), 3);
    let mut silenced = model.clone();
    for (layer, neurons) in silenced.model.layers.iter_mut().zip(&kept) {
        let mask: Vec<f32> =
            (0..width).map(|n| f32::from(u8::from(neurons.contains(&n)))).collect();
        let mask = Tensor::<1>::from_floats(mask.as_slice(), &device).reshape([width, 1]);
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight.clone().map(|w| w * mask);
    }
    assert_within("pruned vs silenced", &logits(&pruned), &logits(&silenced), TOL);
    assert!(model.clone().prune_mlp(&kept[..1]).is_err());
    assert!(model.prune_mlp(&[vec![width], vec![0]]).is_err());
}
