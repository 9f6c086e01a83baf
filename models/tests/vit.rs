//! ViT: loading HF `ViTModel` checkpoints, the forward pass against HF transformers (float64),
//! loading errors, and EMLoC end to end.
//!
//! Fixtures: `tests/fixtures/tiny_vit/` (written by `make_tiny_vit.py`) and
//! `tiny_vit_transformers.json` (`ViTModel` in float64, by `make_transformers_refs.py`). Outputs
//! are compared with a maximum absolute difference of [`TOL`].

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use emloc_models::ModelError;
use emloc_models::vit::{ViTConfig, ViTModel, linear_paths};
use safetensors::Dtype;
use serde_json::Value;

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny_vit")
}

fn expected() -> Value {
    read_expected("tiny_vit_transformers.json")
}

fn device() -> Device {
    Device::default()
}

fn check_against_reference(model: &ViTModel) {
    let e = expected();
    let out = model.forward(pixels(&e, &device()));
    assert_eq!(out.last_hidden_state.dims(), [2, 5, 32]);
    let hidden = floats(&e["last_hidden_state"]["values"]);
    assert_close("last_hidden_state", &values(out.last_hidden_state.clone()), &hidden);
    // The CLS output is the first token of each image.
    let cls: Vec<f32> = (0..2).flat_map(|b| hidden[b * 5 * 32..b * 5 * 32 + 32].to_vec()).collect();
    assert_close("cls", &values(out.cls()), &cls);
    assert_close(
        "pooler_output",
        &values(out.pooler_output.expect("tiny ViT has a pooler")),
        &floats(&e["pooler_output"]["values"]),
    );
}

#[test]
fn tiny_vit_matches_transformers() {
    let (model, config, report) = ViTModel::load_with_report(tiny_dir(), &device()).unwrap();
    assert_eq!((config.hidden_size, config.num_patches()), (32, 4));
    // cls, positions, conv weight + bias; 16 per layer; final norm 2; pooler 2.
    assert_eq!(report.applied, 4 + 2 * 16 + 2 + 2);
    check_against_reference(&model);
}

// ------------------------------------------------------------------------ checkpoint variants

fn fixture_tensors() -> Tensors {
    read_tensors(&tiny_dir().join("model.safetensors"))
}

fn model_dir(tensors: &Tensors) -> tempfile::TempDir {
    model_dir_from(&tiny_dir(), &["config.json"], tensors)
}

fn key_mismatch(dir: &Path) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    key_mismatch_of(ViTModel::load(dir, &device()))
}

#[test]
fn prefixed_checkpoint_loads_and_extra_keys_are_reported() {
    // `vit.` prefix (as ViTForImageClassification saves): same outputs.
    let prefixed: Tensors =
        fixture_tensors().into_iter().map(|(k, d, s, b)| (format!("vit.{k}"), d, s, b)).collect();
    let dir = model_dir(&prefixed);
    let (model, _) = ViTModel::load(dir.path(), &device()).unwrap();
    check_against_reference(&model);

    // ... and its classifier head is reported as unexpected.
    let mut with_head = prefixed;
    with_head.push(("classifier.bias".into(), Dtype::F32, vec![3], vec![0; 12]));
    let (missing, unexpected, invalid, message) = key_mismatch(model_dir(&with_head).path());
    println!("{message}");
    assert!(missing.is_empty() && invalid.is_empty(), "{message}");
    assert_eq!(unexpected, vec!["classifier.bias"]);
}

#[test]
fn missing_and_misshaped_keys_are_listed_under_hf_names() {
    let drop = ["encoder.layer.1.layernorm_before.weight", "embeddings.cls_token"];
    let tensors: Tensors =
        fixture_tensors().into_iter().filter(|t| !drop.contains(&t.0.as_str())).collect();
    let (mut missing, unexpected, invalid, message) = key_mismatch(model_dir(&tensors).path());
    println!("{message}");
    missing.sort();
    let mut want: Vec<String> = drop.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(missing, want);
    assert!(unexpected.is_empty() && invalid.is_empty(), "{message}");

    // A patch projection with 8x8 kernels instead of 4x4.
    let tensors: Tensors = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            if k == "embeddings.patch_embeddings.projection.weight" {
                (k, d, vec![8, 3, 8, 8], b[..8 * 3 * 64 * 4].to_vec())
            } else {
                (k, d, s, b)
            }
        })
        .collect();
    let (_, _, invalid, message) = key_mismatch(model_dir(&tensors).path());
    println!("{message}");
    assert_eq!(invalid.len(), 1, "{message}");
    assert!(invalid[0].starts_with("embeddings.patch_embeddings.projection.weight"), "{message}");
}

#[test]
fn bad_configs_name_the_field() {
    let edit = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let dir = model_dir(&fixture_tensors());
        let path = dir.path().join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(config.as_object_mut().unwrap());
        std::fs::write(&path, config.to_string()).unwrap();
        (ViTConfig::from_file(&path), ViTModel::load(dir.path(), &device()).map(|_| ()))
    };
    let (config, load) = edit(&|c| {
        c.remove("patch_size");
    });
    assert!(
        matches!(config, Err(ModelError::MissingConfigField { field, .. }) if field == "patch_size")
    );
    assert!(
        matches!(load, Err(ModelError::MissingConfigField { field, .. }) if field == "patch_size")
    );
    let (config, _) = edit(&|c| {
        c.insert("patch_size".into(), 3.into());
    });
    match config {
        Err(ModelError::ConfigValue { problem, .. }) => {
            let message = problem.to_string();
            assert!(message.contains("image_size") && message.contains("patch_size"), "{message}");
            assert_eq!(problem.field, "image_size");
        }
        other => panic!("expected ConfigValue, got {other:?}"),
    }
}

#[test]
#[should_panic(expected = "image is 16x16")]
fn wrong_image_size_panics_with_a_message() {
    let (model, _) = ViTModel::load(tiny_dir(), &device()).unwrap();
    model.forward(Tensor::zeros([1, 3, 16, 16], &device()));
}

// ----------------------------------------------------------------------------------- EMLoC

#[test]
fn emloc_pipeline_runs_on_tiny_vit() {
    let device = device();
    let (original, config) = ViTModel::load(tiny_dir(), &device).unwrap();
    let mut paths: Vec<String> =
        emloc::linear_layers(&original).into_iter().map(|l| l.path).collect();
    let mut want = linear_paths(&config, true);
    paths.sort();
    want.sort();
    assert_eq!(paths, want);

    device.seed(11);
    let images = |n| Tensor::<4>::random([n, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let calibration: Vec<_> = (0..4).map(|_| images(8)).collect();
    let (emulator, report) = emloc::emulate(
        original.clone(),
        calibration,
        |m: &ViTModel, x: Tensor<4>| {
            m.forward(x);
        },
        &emloc::EmulatorConfig::uniform(0.5),
    )
    .unwrap();
    assert_eq!(report.layers.len(), 2 * 6);
    assert_eq!(report.dense_layers, vec!["pooler.dense".to_string()]);

    let lora = emloc::LoraConfig::new(4).with_target_modules(vec![
        "query".into(),
        "value".into(),
        "intermediate.dense".into(),
    ]);
    let (adapted, targets) = emloc::attach_new_adapter(emulator, &lora).unwrap();
    assert_eq!(targets.len(), 6);

    // Regress the pooled output onto a fixed random target for a few AdamW steps.
    let train_device = device.clone().autodiff();
    let x = images(8);
    let target = Tensor::<2>::random([8, 32], Distribution::Uniform(-0.5, 0.5), &device);
    let mut model = adapted.train();
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let pooled = model.forward(x.clone().to_device(&train_device)).pooler_output.unwrap();
        let loss = (pooled - target.clone().to_device(&train_device)).powi_scalar(2).mean();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    println!("emulator MSE: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses.last() < losses.first(), "training did not lower the loss: {losses:?}");
    let tuned = model.valid();

    let (adapter, correction) =
        emloc::correct(&original, &tuned, &emloc::CorrectionConfig::default()).unwrap();
    assert_eq!(correction.layers.len(), 6);
    let merged = emloc::merge_adapter(original.clone(), &adapter).unwrap();
    let unmerged = emloc::attach_adapter(original.clone(), &adapter).unwrap().valid();
    let probe = images(3);
    let a = merged.forward(probe.clone());
    let b = unmerged.forward(probe.clone());
    assert_eq!(a.last_hidden_state.dims(), [3, 5, 32]);
    assert_eq!(a.pooler_output.as_ref().unwrap().dims(), [3, 32]);
    let (a, b) = (values(a.last_hidden_state), values(b.last_hidden_state));
    assert!(a.iter().all(|x| x.is_finite()));
    assert_close("merged vs unmerged", &a, &b);
    let base = values(original.forward(probe).last_hidden_state);
    assert!(max_abs_diff(&a, &base) > 1e-4, "the merged adapter changed nothing");
}
