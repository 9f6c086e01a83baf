//! BERT: loading HF checkpoints, forward pass against HF transformers (float64), sentence
//! embeddings, loading errors, EMLoC on BERT, and (when present) the real all-MiniLM-L6-v2.
//!
//! Fixtures: `tests/fixtures/tiny_bert/` (written by `make_tiny_bert.py`) and
//! `tiny_bert_transformers.json` (`BertModel` in float64, by `make_transformers_refs.py`). Outputs
//! are compared with a maximum absolute difference of [`TOL`] (the Rust side computes in f32).

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData, bf16, f16};
use emloc_models::ModelError;
use emloc_models::bert::{
    BertConfig, BertInput, BertModel, SentenceEncoder, l2_normalize, linear_paths, mean_pooling,
};
use safetensors::Dtype;
use serde_json::Value;

/// Maximum absolute difference to the float64 reference (outputs are O(1) LayerNorm states;
/// the f32 forward pass on the CPU is within 1e-6).
const TOL: f32 = 1e-5;

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny_bert")
}

fn expected() -> Value {
    read_expected("tiny_bert_transformers.json")
}

fn device() -> Device {
    Device::default()
}

fn int_tensor(v: &Value, device: &Device) -> Tensor<2, Int> {
    let rows = v.as_array().unwrap();
    let cols = rows[0].as_array().unwrap().len();
    let data: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), cols]), device)
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_within(what, got, want, TOL);
}

fn tiny_input(device: &Device) -> BertInput {
    let e = expected();
    BertInput::new(int_tensor(&e["input_ids"], device))
        .with_token_type_ids(int_tensor(&e["token_type_ids"], device))
        .with_attention_mask(int_tensor(&e["attention_mask"], device))
}

/// Checks a model against the fixture's hidden states, pooler output and pooled embeddings.
fn check_against_reference(model: &BertModel) {
    let device = device();
    let e = expected();
    let input = tiny_input(&device);
    let mask = input.attention_mask.clone().unwrap();
    let out = model.forward(input);
    assert_eq!(out.last_hidden_state.dims(), [2, 7, 16]);
    assert_close(
        "last_hidden_state",
        &values(out.last_hidden_state.clone()),
        &floats(&e["last_hidden_state"]["values"]),
    );
    assert_close(
        "pooler_output",
        &values(out.pooler_output.expect("tiny BERT has a pooler")),
        &floats(&e["pooler_output"]["values"]),
    );
    let pooled = l2_normalize(mean_pooling(out.last_hidden_state, mask));
    assert_close(
        "mean-pooled embedding",
        &values(pooled),
        &floats(&e["sentence_embedding"]["values"]),
    );
}

#[test]
fn tiny_bert_matches_transformers() {
    let (model, report) = {
        let (model, config, report) = BertModel::load_with_report(tiny_dir(), &device()).unwrap();
        assert_eq!(config.hidden_size, 16);
        assert_eq!(config.num_hidden_layers, 2);
        (model, report)
    };
    // 5 embedding tensors + 16 per layer + 2 pooler; the position_ids buffer is skipped.
    assert_eq!(report.applied, 5 + 2 * 16 + 2);
    assert_eq!(report.ignored, vec!["embeddings.position_ids".to_string()]);
    check_against_reference(&model);
}

#[test]
fn fresh_model_holds_no_weights_until_loaded() {
    // Parameters are lazily initialised: building the model before loading a checkpoint into
    // it allocates nothing, so loading never holds random and loaded weights at once.
    let config = BertConfig::from_file(tiny_dir().join("config.json")).unwrap();
    let model = config.init(true, &device());
    assert!(!model.embeddings.word_embeddings.weight.is_initialized());
    assert!(!model.encoder.layer[0].attention.self_attn.query.weight.is_initialized());
    assert!(!model.encoder.layer[1].output.layer_norm.gamma.is_initialized());
}

#[test]
fn tiny_sentence_encoder_matches_reference() {
    let e = expected();
    let sentences = e["sentences"].as_array().unwrap();
    let texts: Vec<&str> = sentences.iter().map(|s| s["text"].as_str().unwrap()).collect();
    // Batches of 3 over 4 texts: sorting, padding and two forward passes.
    let encoder = SentenceEncoder::load(tiny_dir(), &device()).unwrap().with_batch_size(3);
    assert_eq!(encoder.max_seq_length(), 16);

    let encoded = encoder.tokenize(&texts).unwrap();
    for (enc, s) in encoded.iter().zip(sentences) {
        let want: Vec<u32> =
            s["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(enc.ids, want, "token ids of {:?}", s["text"]);
    }

    let embeddings = encoder.embed(&texts).unwrap();
    assert_eq!(embeddings.len(), texts.len());
    for (got, s) in embeddings.iter().zip(sentences) {
        assert_close(&format!("embedding of {:?}", s["text"]), got, &floats(&s["embedding"]));
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }

    // Taking the model out leaves an unmaterialised skeleton; putting it back changes nothing.
    let mut encoder = encoder;
    let model = encoder.take_model();
    let skeleton = &encoder.model.encoder.layer[0].attention.self_attn.query;
    assert!(!skeleton.weight.is_initialized(), "the placeholder must not be materialised");
    let encoder = encoder.with_model(model);
    assert_eq!(encoder.embed(&texts).unwrap(), embeddings);
    assert!(encoder.embed(&[]).unwrap().is_empty());
}

// ------------------------------------------------------------------------ checkpoint variants

/// The fixture checkpoint as `(key, dtype, shape, bytes)`.
fn fixture_tensors() -> Tensors {
    read_tensors(&tiny_dir().join("model.safetensors"))
}

/// A model directory with the fixture's config and tokenizer and the given tensors.
fn model_dir(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::TempDir {
    model_dir_from(&tiny_dir(), &["config.json", "tokenizer.json"], tensors)
}

fn key_mismatch(dir: &Path) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    key_mismatch_of(BertModel::load(dir, &device()))
}

fn to_half(dtype: Dtype, bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|c| {
            let x = f32::from_le_bytes(c.try_into().unwrap());
            let bits = match dtype {
                Dtype::BF16 => bf16::from_f32(x).to_bits(),
                Dtype::F16 => f16::from_f32(x).to_bits(),
                _ => unreachable!(),
            };
            // The fixture's weights are exactly representable in both half types.
            let back = match dtype {
                Dtype::BF16 => bf16::from_bits(bits).to_f32(),
                _ => f16::from_bits(bits).to_f32(),
            };
            assert_eq!(back, x, "fixture weight not exactly representable in {dtype:?}");
            bits.to_le_bytes()
        })
        .collect()
}

#[test]
fn tiny_bert_loads_sharded_half_precision_with_bert_prefix() {
    // Two shards, `bert.` prefix (as `BertFor*` checkpoints), bf16 in one shard and f16 in the
    // other, listed by model.safetensors.index.json: same outputs as the f32 file.
    let tensors: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            let key = format!("bert.{k}");
            if d != Dtype::F32 {
                return (key, d, s, b);
            }
            let half = if k.starts_with("encoder.layer.1") || k.starts_with("pooler") {
                Dtype::F16
            } else {
                Dtype::BF16
            };
            (key, half, s, to_half(half, &b))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(tiny_dir().join(f), dir.path().join(f)).unwrap();
    }
    let (first, second): (Vec<_>, Vec<_>) =
        tensors.into_iter().partition(|t| t.0.contains("encoder.layer.0"));
    let shards =
        [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)];
    let mut weight_map = serde_json::Map::new();
    for (name, shard) in &shards {
        write_safetensors(&dir.path().join(name), shard);
        for t in shard {
            weight_map.insert(t.0.clone(), Value::String(name.to_string()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let (model, _, report) = BertModel::load_with_report(dir.path(), &device()).unwrap();
    assert_eq!(report.files.len(), 2);
    assert_eq!(report.ignored, vec!["bert.embeddings.position_ids".to_string()]);
    let weight = model.encoder.layer[1].attention.self_attn.query.weight.val();
    assert_eq!(weight.dtype(), burn::tensor::DType::F32);
    check_against_reference(&model);
}

#[test]
fn missing_keys_are_listed() {
    let drop = ["encoder.layer.1.attention.self.key.bias", "embeddings.LayerNorm.weight"];
    let tensors: Vec<_> =
        fixture_tensors().into_iter().filter(|t| !drop.contains(&t.0.as_str())).collect();
    let dir = model_dir(&tensors);
    let (missing, unexpected, invalid, message) = key_mismatch(dir.path());
    println!("{message}");
    let mut want: Vec<String> = drop.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut missing = missing;
    missing.sort();
    assert_eq!(missing, want);
    assert!(unexpected.is_empty() && invalid.is_empty(), "{message}");
    assert!(message.contains("encoder.layer.1.attention.self.key.bias"), "{message}");
}

#[test]
fn unexpected_keys_are_listed() {
    let mut tensors = fixture_tensors();
    let extra = |k: &str, n: usize| (k.to_string(), Dtype::F32, vec![n], vec![0u8; 4 * n]);
    tensors.push(extra("cls.predictions.bias", 40));
    tensors.push(extra("encoder.layer.0.attention.self.rotary.inv_freq", 2));
    let dir = model_dir(&tensors);
    let (missing, unexpected, invalid, message) = key_mismatch(dir.path());
    println!("{message}");
    assert!(missing.is_empty() && invalid.is_empty(), "{message}");
    assert_eq!(
        unexpected,
        vec!["cls.predictions.bias", "encoder.layer.0.attention.self.rotary.inv_freq"]
    );
}

#[test]
fn misshaped_keys_are_listed() {
    let tensors: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            if k == "encoder.layer.0.intermediate.dense.weight" {
                (k, d, vec![16, 16], b[..16 * 16 * 4].to_vec())
            } else {
                (k, d, s, b)
            }
        })
        .collect();
    let dir = model_dir(&tensors);
    let (missing, unexpected, invalid, message) = key_mismatch(dir.path());
    println!("{message}");
    assert!(missing.is_empty() && unexpected.is_empty(), "{message}");
    assert_eq!(invalid.len(), 1, "{message}");
    assert!(invalid[0].starts_with("encoder.layer.0.intermediate.dense.weight"), "{message}");
}

#[test]
fn config_without_hidden_size_names_the_field() {
    let dir = model_dir(&fixture_tensors());
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, config.to_string()).unwrap();
    match BertConfig::from_file(&path) {
        Err(err @ ModelError::MissingConfigField { .. }) => {
            let message = err.to_string();
            let ModelError::MissingConfigField { path: p, field } = err else { unreachable!() };
            assert_eq!(field, "hidden_size");
            assert_eq!(p, path);
            assert!(
                message.contains("hidden_size") && message.contains("config.json"),
                "{message}"
            );
        }
        other => panic!("expected MissingConfigField, got {other:?}"),
    }
    // Loading the whole directory fails the same way.
    assert!(matches!(
        BertModel::load(dir.path(), &device()),
        Err(ModelError::MissingConfigField { field, .. }) if field == "hidden_size"
    ));
}

#[test]
fn missing_checkpoint_and_tokenizer_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_dir().join("config.json"), dir.path().join("config.json")).unwrap();
    assert!(matches!(BertModel::load(dir.path(), &device()), Err(ModelError::MissingFile { .. })));
    assert!(matches!(
        SentenceEncoder::load(dir.path(), &device()),
        Err(ModelError::MissingFile { .. })
    ));
}

// ------------------------------------------------------------------------------------ EMLoC

#[test]
fn emulate_and_lora_run_on_tiny_bert() {
    let device = device();
    let (model, config) = BertModel::load(tiny_dir(), &device).unwrap();

    // Module paths are HF's names.
    let mut paths: Vec<String> = emloc::linear_layers(&model).into_iter().map(|l| l.path).collect();
    let mut want = linear_paths(&config, true);
    paths.sort();
    want.sort();
    assert_eq!(paths, want);
    assert!(paths.contains(&"encoder.layer.0.attention.self.query".to_string()));

    let batches = vec![tiny_input(&device), tiny_input(&device)];
    let (emulator, report) = emloc::emulate(
        model.clone(),
        batches,
        |m: &BertModel, batch: BertInput| {
            m.forward(batch);
        },
        &emloc::EmulatorConfig::uniform(0.4),
    )
    .unwrap();
    // Every encoder linear is emulated; the pooler stays dense under the default rules.
    assert_eq!(report.layers.len(), 2 * 6);
    assert_eq!(report.dense_layers, vec!["pooler.dense".to_string()]);
    assert!(report.params_kept() < report.params_original());

    let out = emulator.forward(tiny_input(&device)).last_hidden_state;
    let v = values(out);
    assert!(v.iter().all(|x| x.is_finite()), "emulator output not finite");

    let (adapted, targets) = emloc::attach_new_adapter(
        emulator,
        &emloc::LoraConfig::new(2).with_target_modules(vec!["query".into(), "value".into()]),
    )
    .unwrap();
    assert_eq!(targets.len(), 4);
    assert!(targets.contains(&"encoder.layer.1.attention.self.value".to_string()));
    let out = adapted.forward(tiny_input(&device));
    assert!(values(out.last_hidden_state).iter().all(|x| x.is_finite()));

    // Correction and merge back into the original model run as well.
    let (adapter, _) =
        emloc::correct(&model, &adapted, &emloc::CorrectionConfig::default()).unwrap();
    let merged = emloc::merge_adapter(model, &adapter).unwrap();
    assert!(
        values(merged.forward(tiny_input(&device)).last_hidden_state).iter().all(|x| x.is_finite())
    );
}

#[test]
fn emulator_loads_without_reading_the_weights_it_replaces() {
    let device = device();
    let (model, _) = BertModel::load(tiny_dir(), &device).unwrap();
    let batches = vec![tiny_input(&device)];
    let config = emloc::EmulatorConfig::uniform(0.4);
    let (emulator, report) = emloc::emulate(
        model,
        batches,
        |m: &BertModel, b: BertInput| {
            m.forward(b);
        },
        &config,
    )
    .unwrap();
    let saved = tempfile::tempdir().unwrap();
    emloc::save_emulator(&emulator, &emloc::EmulatorDescription::new(config, report), saved.path())
        .unwrap();

    let description = emloc::read_emulator_description(saved.path()).unwrap();
    let skip: std::collections::BTreeSet<String> =
        description.report.layers.iter().map(|l| format!("{}.weight", l.path)).collect();
    let (skeleton, _, load) = BertModel::load_skipping(tiny_dir(), &device, &skip).unwrap();
    // The skipped weights were neither read nor materialised; everything else was loaded.
    assert_eq!(load.skipped.len(), skip.len());
    let query = &skeleton.encoder.layer[0].attention.self_attn.query;
    assert!(!query.weight.is_initialized(), "a skipped weight was materialised");
    assert!(query.bias.as_ref().unwrap().is_initialized(), "the bias must still be loaded");
    assert_eq!(query.d_input(), 16, "reading the shape must not materialise the weight");
    assert!(!query.weight.is_initialized());
    let (lean, _) = emloc::load_emulator(skeleton, saved.path()).unwrap();

    // The same emulator as loading the whole original first (the old path) and as built.
    let (full, _) = BertModel::load(tiny_dir(), &device).unwrap();
    let (reference, _) = emloc::load_emulator(full, saved.path()).unwrap();
    let (a, b, c) = (
        values(lean.forward(tiny_input(&device)).last_hidden_state),
        values(reference.forward(tiny_input(&device)).last_hidden_state),
        values(emulator.forward(tiny_input(&device)).last_hidden_state),
    );
    assert_eq!(a, b, "lean and full loading must give identical emulators");
    assert_eq!(a, c, "a reloaded emulator must compute what the built one did");
}

// ------------------------------------------------------------------------- real checkpoint

fn minilm_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("EMLOC_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/emloc/all-MiniLM-L6-v2"),
    };
    dir.join("model.safetensors").is_file().then_some(dir)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn minilm_embeddings_are_unit_norm_and_rank_paraphrases() {
    let Some(dir) = minilm_dir() else {
        println!(
            "SKIPPED minilm_embeddings_are_unit_norm_and_rank_paraphrases: all-MiniLM-L6-v2 \
             not found (set EMLOC_MINILM_DIR or run scripts/fetch_minilm.sh)"
        );
        return;
    };
    let encoder = SentenceEncoder::load(&dir, &device()).unwrap();
    assert_eq!(encoder.dim(), 384);
    assert_eq!(encoder.max_seq_length(), 256);

    let pairs = [
        ("A man is eating food.", "A man is eating a piece of bread."),
        ("The cat sits on the mat.", "A cat is sitting on a rug."),
        ("How do I reset my password?", "I forgot my password, how can I change it?"),
        ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ];
    let texts: Vec<&str> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let emb = encoder.embed(&texts).unwrap();
    for (text, e) in texts.iter().zip(&emb) {
        let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm of {text:?} is {norm}");
    }
    let mut min_paraphrase = f32::INFINITY;
    for i in 0..pairs.len() {
        let c = cosine(&emb[2 * i], &emb[2 * i + 1]);
        println!("paraphrase cos = {c:.4}: {:?} / {:?}", pairs[i].0, pairs[i].1);
        min_paraphrase = min_paraphrase.min(c);
    }
    let mut max_unrelated = f32::NEG_INFINITY;
    for i in 0..pairs.len() {
        for j in 0..pairs.len() {
            if i != j {
                let c = cosine(&emb[2 * i], &emb[2 * j + 1]);
                println!("unrelated  cos = {c:.4}: {:?} / {:?}", pairs[i].0, pairs[j].1);
                max_unrelated = max_unrelated.max(c);
            }
        }
    }
    println!("min paraphrase cos {min_paraphrase:.4} > max unrelated cos {max_unrelated:.4}");
    assert!(min_paraphrase > max_unrelated + 0.1);

    // Batching and padding do not change the embeddings.
    let single: Vec<Vec<f32>> =
        texts.iter().map(|t| encoder.embed(&[t]).unwrap().remove(0)).collect();
    let diff = emb.iter().zip(&single).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
    println!("batched vs one-by-one: max |diff| = {diff:.2e}");
    assert!(diff < 1e-5);
}

#[test]
fn a_layer_dropped_model_trains_an_adapter_that_moves_onto_the_kept_layers() {
    let device = device();
    let (model, _) = BertModel::load(tiny_dir(), &device).unwrap();
    let output = |m: &BertModel| values(m.forward(tiny_input(&device)).last_hidden_state);
    // Keeping every layer is the model itself; bad selections are refused.
    assert_eq!(output(&model.clone().keep_layers(&[0, 1]).unwrap()), output(&model));
    for bad in [&[][..], &[1, 0], &[0, 2], &[1, 1]] {
        assert!(model.clone().keep_layers(bad).is_err(), "{bad:?}");
    }

    // An adapter on the model that keeps layer 1 only (its `encoder.layer.0`)...
    let dropped = model.clone().keep_layers(&[1]).unwrap();
    let seeded = |seed: u64, n: usize| -> Vec<f32> {
        let unit = |i| (emloc::nn::splitmix64(seed, i) >> 40) as f32 / (1u64 << 24) as f32;
        (0..n as u64).map(|i| unit(i) - 0.5).collect()
    };
    let config =
        emloc::peft::PeftConfig::new(2, 4.0, vec!["query".into(), "intermediate.dense".into()]);
    let layers = ["attention.self.query", "intermediate.dense"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (d_in, d_out) = if i == 0 { (16, 16) } else { (16, 32) };
            let layer = emloc::peft::PeftLayer::new(
                emloc::Matrix::new(2, d_in, seeded(2 * i as u64 + 1, 2 * d_in)),
                emloc::Matrix::new(d_out, 2, seeded(2 * i as u64 + 2, 2 * d_out)),
            );
            (format!("encoder.layer.0.{name}"), layer)
        })
        .collect();
    let adapter = emloc::peft::PeftAdapter { config, layers };
    let tuned_dropped = emloc::merge_adapter(dropped, &adapter).unwrap();
    // ...renumbered onto the original's layer 1: the merged original, with layer 0 dropped
    // again, is the tuned layer-dropped model; its layer 0 is untouched.
    let moved = adapter.renumber_blocks("encoder.layer.", &[1]).unwrap();
    let tuned = emloc::merge_adapter(model.clone(), &moved).unwrap();
    assert_within(
        "tuned original without layer 0",
        &output(&tuned.clone().keep_layers(&[1]).unwrap()),
        &output(&tuned_dropped),
        1e-6,
    );
    let query = |m: &BertModel, i: usize| {
        values(m.encoder.layer[i].attention.self_attn.query.weight.val().unsqueeze::<3>())
    };
    assert_eq!(query(&tuned, 0), query(&model, 0));
    assert_ne!(query(&tuned, 1), query(&model, 1));
    // An adapter naming a block the dropped model did not have is refused.
    assert!(adapter.renumber_blocks("encoder.layer.", &[]).is_err());
}

#[test]
fn an_ffn_pruned_model_trains_an_adapter_that_moves_onto_the_unpruned_model() {
    let device = device();
    let (model, _) = BertModel::load(tiny_dir(), &device).unwrap();
    let output = |m: &BertModel| values(m.forward(tiny_input(&device)).last_hidden_state);
    let kept: Vec<Vec<usize>> = vec![vec![1, 5, 9, 30], (0..32).step_by(3).collect()];
    for bad in
        [vec![vec![1]], vec![vec![], vec![1]], vec![vec![2, 1], vec![1]], vec![vec![32], vec![1]]]
    {
        assert!(model.clone().prune_ffn(&bad).is_err(), "{bad:?}");
    }
    let pruned = model.clone().prune_ffn(&kept).unwrap();
    assert_eq!(pruned.encoder.layer[0].intermediate.dense.d_output(), 4);
    assert_eq!(pruned.encoder.layer[1].output.dense.d_input(), 11);
    // Oracle: the unpruned model whose pruned neurons are silenced (their `output.dense`
    // input rows zeroed) computes the same function.
    let silence = |m: BertModel| {
        let mut m = m;
        for (layer, neurons) in m.encoder.layer.iter_mut().zip(&kept) {
            let mask: Vec<f32> =
                (0..32).map(|n| f32::from(u8::from(neurons.contains(&n)))).collect();
            let mask = Tensor::<1>::from_floats(mask.as_slice(), &device).reshape([32, 1]);
            layer.output.dense.weight = layer.output.dense.weight.clone().map(|w| w * mask);
        }
        m
    };
    let silenced = silence(model.clone());
    assert_within("pruned vs silenced", &output(&pruned), &output(&silenced), 1e-5);

    // LoRA on both FFN layers of the pruned model, moved back onto the unpruned one.
    let seeded = |seed: u64, n: usize| -> Vec<f32> {
        let unit = |i| (emloc::nn::splitmix64(seed, i) >> 40) as f32 / (1u64 << 24) as f32;
        (0..n as u64).map(|i| unit(i) - 0.5).collect()
    };
    let mut layers = std::collections::BTreeMap::new();
    for (l, neurons) in kept.iter().enumerate() {
        let m = neurons.len();
        let seed = 10 * l as u64;
        let up = emloc::peft::PeftLayer::new(
            emloc::Matrix::new(2, 16, seeded(seed, 32)),
            emloc::Matrix::new(m, 2, seeded(seed + 1, 2 * m)),
        );
        let down = emloc::peft::PeftLayer::new(
            emloc::Matrix::new(2, m, seeded(seed + 2, 2 * m)),
            emloc::Matrix::new(16, 2, seeded(seed + 3, 32)),
        );
        layers.insert(format!("encoder.layer.{l}.intermediate.dense"), up);
        layers.insert(format!("encoder.layer.{l}.output.dense"), down);
    }
    let config = emloc::peft::PeftConfig::new(
        2,
        4.0,
        vec!["intermediate.dense".into(), "output.dense".into()],
    );
    let mut adapter = emloc::peft::PeftAdapter { config, layers };
    // `output.dense` also names each attention's output projection: target only the FFN's.
    adapter.config.target_modules =
        emloc::peft::TargetModules::List(adapter.layers.keys().cloned().collect());
    let tuned_pruned = emloc::merge_adapter(pruned, &adapter).unwrap();
    let adapter = emloc_models::pruning::unprune_adapter(
        adapter,
        &kept,
        32,
        |l| vec![format!("encoder.layer.{l}.intermediate.dense")],
        |l| format!("encoder.layer.{l}.output.dense"),
    )
    .unwrap();
    let tuned = emloc::merge_adapter(model.clone(), &adapter).unwrap();
    assert_within(
        "tuned pruned vs tuned unpruned, silenced",
        &output(&tuned_pruned),
        &output(&silence(tuned)),
        1e-5,
    );
}
