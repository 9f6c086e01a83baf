//! Interoperability with the real Hugging Face PEFT library, both ways.
//!
//! Fixtures in `tests/fixtures/peft/`, made by `make_peft_fixtures.py` with torch, transformers
//! and PEFT (see the fixtures README; not run by CI):
//! - adapters PEFT made and saved (mixed `rank_pattern` / `alpha_pattern` with a key that is a
//!   tail of paths another key matches and regex keys, rsLoRA with a regex `target_modules`,
//!   a Llama adapter over every projection and `lm_head`, and one with `modules_to_save`);
//! - `emloc_bert/`, an adapter emloc wrote (by the ignored test
//!   [`write_emloc_adapter_fixture`]), which PEFT loaded;
//! - `expected.json`: the inputs, PEFT's per-layer rank and scale, and PEFT's float64 outputs
//!   with each adapter active and after `merge_and_unload()`.
//!
//! emloc computes in f32; every output is compared with a maximum absolute difference of
//! [`TOL`].

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use emloc::nn::LoraAdapter;
use emloc::peft::{CONFIG_FILE, PeftAdapter, WEIGHTS_FILE};
use emloc::{
    EmlocError, attach_adapter, export_adapter, merge_adapter, merge_adapter_into_safetensors,
};
use emloc_models::bert::{BertInput, BertModel};
use emloc_models::llama::LlamaForCausalLM;
use serde_json::Value;

/// Maximum absolute difference to PEFT's float64 outputs. Measured (CPU): BERT hidden states
/// (O(1)) ≤ 1.7e-6, Llama logits (O(10)) ≤ 4.8e-6, attached, merged and merged into the files
/// alike (each test prints its own).
const TOL: f32 = 1e-5;

/// The base-model path written into `emloc_bert/adapter_config.json`, relative to the
/// repository root (where `make_peft_fixtures.py` runs).
const EMLOC_BASE_MODEL: &str = "models/tests/fixtures/tiny_bert";

fn peft_dir(name: &str) -> PathBuf {
    fixtures().join("peft").join(name)
}

fn expected() -> Value {
    read_expected("peft/expected.json")
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

/// The model family of an adapter, with its fixture and forward pass.
enum Family {
    Bert,
    Llama,
}

impl Family {
    fn of(adapter: &Value) -> Self {
        match adapter["family"].as_str().unwrap() {
            "bert" => Self::Bert,
            "llama" => Self::Llama,
            other => panic!("unknown family {other}"),
        }
    }

    fn model_dir(&self) -> PathBuf {
        fixtures().join(match self {
            Self::Bert => "tiny_bert",
            Self::Llama => "tiny_llama",
        })
    }

    /// BERT's `last_hidden_state` or Llama's logits on the fixed inputs, row-major.
    fn outputs(&self, dir: &Path, adapter: Option<&PeftAdapter>, merge: bool) -> Vec<f32> {
        let (device, inputs) = (device(), &expected()["inputs"]);
        match self {
            Self::Bert => {
                let (model, _) = BertModel::load(dir, &device).unwrap();
                let model = with_adapter(model, adapter, merge);
                let x = &inputs["bert"];
                let input = BertInput::new(int_tensor(&x["input_ids"], &device))
                    .with_token_type_ids(int_tensor(&x["token_type_ids"], &device))
                    .with_attention_mask(int_tensor(&x["attention_mask"], &device));
                values(model.forward(input).last_hidden_state)
            }
            Self::Llama => {
                let (model, _) = LlamaForCausalLM::load(dir, &device).unwrap();
                let model = with_adapter(model, adapter, merge);
                values(model.forward(int_tensor(&inputs["llama"]["input_ids"], &device), None))
            }
        }
    }
}

fn with_adapter<M: burn::module::Module>(
    model: M,
    adapter: Option<&PeftAdapter>,
    merge: bool,
) -> M {
    match (adapter, merge) {
        (None, _) => model,
        (Some(a), false) => attach_adapter(model, a).unwrap(),
        (Some(a), true) => merge_adapter(model, a).unwrap(),
    }
}

/// Loads adapter `name` and checks emloc against everything PEFT recorded for it: each layer's
/// rank and scale, the outputs with the adapter attached, merged into the model, and merged into
/// the checkpoint files by [`merge_adapter_into_safetensors`].
fn check_against_peft(name: &str) {
    let e = expected();
    let want = &e["adapters"][name];
    let family = Family::of(want);
    let adapter = PeftAdapter::load(&peft_dir(name)).unwrap();

    let layers = want["layers"].as_object().unwrap();
    assert_eq!(
        adapter.layers.keys().collect::<Vec<_>>(),
        layers.keys().collect::<Vec<_>>(),
        "{name}: layers"
    );
    let patterns = adapter.config.patterns().unwrap();
    for (path, peft) in layers {
        let (r, scale) = (peft["r"].as_u64().unwrap() as usize, peft["scale"].as_f64().unwrap());
        assert_eq!(patterns.rank_for(path), r, "{name}: rank of {path}");
        assert!(
            (patterns.scale_for(path) - scale).abs() <= 1e-12 * scale,
            "{name}: scale of {path}"
        );
    }

    let dir = family.model_dir();
    let (lora, merged) = (floats(&want["lora"]), floats(&want["merged"]));
    assert_within(
        &format!("{name}: attached vs PEFT"),
        &family.outputs(&dir, Some(&adapter), false),
        &lora,
        TOL,
    );
    assert_within(
        &format!("{name}: merge_adapter vs PEFT merged"),
        &family.outputs(&dir, Some(&adapter), true),
        &merged,
        TOL,
    );
    // The adapter matters at this tolerance.
    assert!(
        max_abs_diff(&family.outputs(&dir, None, false), &lora) > 100.0 * TOL,
        "{name}: adapter changes nothing"
    );

    let out = tempfile::tempdir().unwrap();
    merge_adapter_into_safetensors(&adapter, &[dir.join("model.safetensors")], out.path()).unwrap();
    std::fs::copy(dir.join("config.json"), out.path().join("config.json")).unwrap();
    assert_within(
        &format!("{name}: merge_adapter_into_safetensors vs PEFT merged"),
        &family.outputs(out.path(), None, false),
        &merged,
        TOL,
    );
}

#[test]
fn peft_bert_adapter_with_suffix_and_regex_patterns() {
    check_against_peft("bert_patterns");
}

#[test]
fn peft_bert_rslora_adapter_with_regex_targets() {
    check_against_peft("bert_rslora");
}

#[test]
fn peft_llama_adapter_with_patterns_and_lm_head() {
    check_against_peft("llama_patterns");
}

#[test]
fn peft_adapter_with_modules_to_save_is_refused_by_name() {
    let dir = peft_dir("bert_modules_to_save");
    let err = PeftAdapter::load(&dir).unwrap_err();
    let message = err.to_string();
    match err {
        EmlocError::UnsupportedPeftFeature { path, feature, value } => {
            assert_eq!(
                (path, feature.as_str(), value.as_str()),
                (dir.join(CONFIG_FILE), "modules_to_save", r#"["pooler.dense"]"#)
            );
        }
        other => panic!("expected UnsupportedPeftFeature, got {other:?}"),
    }
    assert!(message.contains("modules_to_save") && message.contains("pooler.dense"), "{message}");
}

/// emloc's side of `emloc_bert/` (checked against PEFT's outputs by
/// [`emloc_written_adapter_gives_peft_outputs`]): adapters with mixed ranks and alphas on tiny
/// BERT, deterministic factors, exported as emloc exports any trained adapter, with the metadata
/// the CLI writes for encoders.
fn emloc_adapter() -> PeftAdapter {
    let device = device();
    let (mut model, _) = BertModel::load(fixtures().join("tiny_bert"), &device).unwrap();
    let mut seed = 0;
    let mut lora = |d_in: usize, d_out: usize, r: usize, alpha: f64| {
        seed += 2;
        let a = Tensor::from_data(TensorData::new(noise(seed, d_in * r, 0.5), [d_in, r]), &device);
        let b = Tensor::from_data(
            TensorData::new(noise(seed + 1, r * d_out, 0.5), [r, d_out]),
            &device,
        );
        Some(LoraAdapter::new(a, b, alpha, false, 0.0))
    };
    let [l0, l1] = &mut model.encoder.layer[..] else { panic!("tiny BERT has 2 layers") };
    l0.attention.self_attn.query.lora = lora(16, 16, 2, 4.0);
    l1.attention.self_attn.query.lora = lora(16, 16, 2, 4.0);
    l0.attention.self_attn.value.lora = lora(16, 16, 3, 4.0);
    l1.attention.self_attn.value.lora = lora(16, 16, 2, 8.0);
    l0.intermediate.dense.lora = lora(16, 32, 2, 4.0);
    l1.output.dense.lora = lora(32, 16, 1, 4.0);
    let mut adapter = export_adapter(&model).unwrap();
    adapter.config.task_type = Some("FEATURE_EXTRACTION".into());
    adapter.config.base_model_name_or_path = Some(EMLOC_BASE_MODEL.into());
    adapter
}

/// Deterministic values in [-scale, scale) (xorshift), independent of any backend RNG.
fn noise(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale as f32
        })
        .collect()
}

/// Regenerates `emloc_bert/`; then rerun `make_peft_fixtures.py` for PEFT's outputs on it.
#[test]
#[ignore = "writes the emloc_bert fixture"]
fn write_emloc_adapter_fixture() {
    emloc_adapter().save(&peft_dir("emloc_bert")).unwrap();
}

#[test]
fn emloc_still_writes_the_emloc_bert_fixture_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    emloc_adapter().save(tmp.path()).unwrap();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let committed = std::fs::read(peft_dir("emloc_bert").join(file)).unwrap();
        assert!(
            std::fs::read(tmp.path().join(file)).unwrap() == committed,
            "{file} differs: rerun the ignored test and the script"
        );
    }
}

#[test]
fn emloc_written_adapter_gives_peft_outputs() {
    let written = emloc_adapter();
    // `^`-anchored keys, so PEFT cannot resolve them to another layer's tail.
    assert_eq!(
        written.config.rank_pattern.keys().collect::<Vec<_>>(),
        [r"^encoder\.layer\.0\.attention\.self\.value", r"^encoder\.layer\.1\.output\.dense"]
    );
    check_against_peft("emloc_bert");
}
