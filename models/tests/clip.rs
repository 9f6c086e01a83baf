//! CLIP vision tower: loading HF `CLIPVisionModel` / `CLIPModel` checkpoints, the forward pass
//! against HF transformers (float64), loading errors, and EMLoC end to end.
//!
//! Fixtures: `tests/fixtures/tiny_clip/` and `tiny_clip_full/` (written by `make_tiny_clip.py`),
//! `tiny_clip_transformers.json` (`CLIPVisionModel`) and `tiny_clip_full_transformers.json`
//! (`CLIPModel`, with `image_embeds`), both float64, by `make_transformers_refs.py`. Outputs are
//! compared with a maximum absolute difference of [`TOL`].

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use emloc_models::ModelError;
use emloc_models::clip::{ClipActivation, ClipVisionConfig, ClipVisionModel, linear_paths};
use safetensors::Dtype;
use serde_json::Value;

/// Tokens per image (4 patches + class) and width of the tiny model.
const SEQ: usize = 5;
const D: usize = 16;

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny_clip")
}

fn full_dir() -> PathBuf {
    fixtures().join("tiny_clip_full")
}

fn expected() -> Value {
    read_expected("tiny_clip_transformers.json")
}

fn full_expected() -> Value {
    read_expected("tiny_clip_full_transformers.json")
}

fn device() -> Device {
    Device::default()
}

/// Against `CLIPModel` when the model has a projection, else against `CLIPVisionModel`.
fn check_against_reference(model: &ClipVisionModel) {
    let e = if model.visual_projection.is_some() { full_expected() } else { expected() };
    let out = model.forward(pixels(&e, &device()));
    assert_eq!(out.last_hidden_state.dims(), [2, SEQ, D]);
    assert_eq!(out.pooler_output.dims(), [2, D]);
    assert_close(
        "last_hidden_state",
        &values(out.last_hidden_state),
        &floats(&e["last_hidden_state"]["values"]),
    );
    assert_close(
        "pooler_output",
        &values(out.pooler_output),
        &floats(&e["pooler_output"]["values"]),
    );
    match (&model.visual_projection, out.image_embeds) {
        (Some(_), Some(embeds)) => {
            assert_eq!(embeds.dims(), [2, 8]);
            assert_close("image_embeds", &values(embeds), &floats(&e["image_embeds"]["values"]));
        }
        (None, None) => {}
        _ => panic!("image_embeds present iff the model has visual_projection"),
    }
}

#[test]
fn tiny_clip_vision_matches_transformers() {
    let (model, config, report) = ClipVisionModel::load_with_report(tiny_dir(), &device()).unwrap();
    assert_eq!((config.hidden_size, config.num_patches()), (D, SEQ - 1));
    assert_eq!(config.hidden_act, ClipActivation::QuickGelu);
    // class, patch conv (no bias), positions; pre_layrnorm 2; 16 per layer; post_layernorm 2.
    assert_eq!(report.applied, 3 + 2 + 2 * 16 + 2);
    assert!(report.ignored.is_empty(), "{:?}", report.ignored);
    assert!(model.visual_projection.is_none());
    check_against_reference(&model);
}

#[test]
fn full_clip_model_checkpoint_loads_the_vision_tower_and_projection() {
    let (model, config, report) = ClipVisionModel::load_with_report(full_dir(), &device()).unwrap();
    // From CLIPConfig.vision_config; absent fields take HF's defaults, projection_dim the
    // top-level value.
    assert_eq!(config.hidden_act, ClipActivation::QuickGelu);
    assert_eq!(config.layer_norm_eps, 1e-5);
    assert_eq!((config.num_channels, config.projection_dim), (3, 8));
    assert_eq!(report.applied, 3 + 2 + 2 * 16 + 2 + 1);
    let ignored = &report.ignored;
    println!("ignored: {ignored:?}");
    for key in [
        "logit_scale",
        "text_projection.weight",
        "text_model.final_layer_norm.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_model.embeddings.position_ids",
    ] {
        assert!(ignored.iter().any(|k| k == key), "{key} not ignored: {ignored:?}");
    }
    assert!(ignored.iter().all(|k| !k.starts_with("vision_model.") || k.ends_with("position_ids")));
    assert!(model.visual_projection.is_some());
    check_against_reference(&model);
}

#[test]
fn wrong_activation_does_not_match_the_reference() {
    // The fixture uses quick_gelu; with exact GELU the outputs must move past the tolerance
    // (guards against the activation being ignored).
    let dir = model_dir(&fixture_tensors(), &tiny_dir());
    edit_config(dir.path(), &|c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    let (model, config) = ClipVisionModel::load(dir.path(), &device()).unwrap();
    assert_eq!(config.hidden_act, ClipActivation::Gelu);
    let out = model.forward(pixels(&expected(), &device()));
    let diff = max_abs_diff(
        &values(out.last_hidden_state),
        &floats(&expected()["last_hidden_state"]["values"]),
    );
    assert!(diff > 1e-3, "gelu vs quick_gelu differ by only {diff}");
}

// ------------------------------------------------------------------------ checkpoint variants

fn fixture_tensors() -> Tensors {
    read_tensors(&tiny_dir().join("model.safetensors"))
}

fn model_dir(tensors: &Tensors, config_from: &Path) -> tempfile::TempDir {
    model_dir_from(config_from, &["config.json"], tensors)
}

fn key_mismatch(dir: &Path) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    key_mismatch_of(ClipVisionModel::load(dir, &device()))
}

fn edit_config(dir: &Path, f: &dyn Fn(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn unprefixed_checkpoint_loads() {
    let bare: Tensors = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| (k.strip_prefix("vision_model.").unwrap().to_string(), d, s, b))
        .collect();
    let dir = model_dir(&bare, &tiny_dir());
    let (model, _) = ClipVisionModel::load(dir.path(), &device()).unwrap();
    check_against_reference(&model);
}

#[test]
fn missing_keys_are_listed_under_hf_names() {
    let drop = [
        "vision_model.encoder.layers.1.layer_norm1.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.pre_layrnorm.bias",
        "vision_model.encoder.layers.0.self_attn.out_proj.weight",
    ];
    let tensors: Tensors =
        fixture_tensors().into_iter().filter(|t| !drop.contains(&t.0.as_str())).collect();
    let (mut missing, unexpected, invalid, message) =
        key_mismatch(model_dir(&tensors, &tiny_dir()).path());
    println!("{message}");
    missing.sort();
    let mut want: Vec<String> = drop.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(missing, want);
    assert!(unexpected.is_empty() && invalid.is_empty(), "{message}");
    assert!(message.contains("vision_model.pre_layrnorm.bias"), "{message}");
}

#[test]
fn unexpected_and_misshaped_keys_are_reported() {
    // A classifier head and a third layer the config does not have.
    let mut tensors = fixture_tensors();
    tensors.push(("classifier.bias".into(), Dtype::F32, vec![3], vec![0; 12]));
    tensors.push((
        "vision_model.encoder.layers.2.mlp.fc1.bias".into(),
        Dtype::F32,
        vec![32],
        vec![0; 128],
    ));
    let (missing, mut unexpected, invalid, message) =
        key_mismatch(model_dir(&tensors, &tiny_dir()).path());
    println!("{message}");
    assert!(missing.is_empty() && invalid.is_empty(), "{message}");
    unexpected.sort();
    assert_eq!(unexpected, vec!["classifier.bias", "vision_model.encoder.layers.2.mlp.fc1.bias"]);

    // Positions for 9 tokens (a 12x12 image) instead of 5.
    let tensors: Tensors = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            if k == "vision_model.embeddings.position_embedding.weight" {
                (k, d, vec![9, D], [b.clone(), b[..4 * D * 4].to_vec()].concat())
            } else {
                (k, d, s, b)
            }
        })
        .collect();
    let (_, _, invalid, message) = key_mismatch(model_dir(&tensors, &tiny_dir()).path());
    println!("{message}");
    assert_eq!(invalid.len(), 1, "{message}");
    assert!(
        invalid[0].starts_with("vision_model.embeddings.position_embedding.weight"),
        "{message}"
    );

    // A text-tower key under the vision prefix is not silently ignored.
    let mut tensors = fixture_tensors();
    tensors.push(("vision_model.final_layer_norm.weight".into(), Dtype::F32, vec![D], vec![0; 64]));
    let (_, unexpected, _, message) = key_mismatch(model_dir(&tensors, &tiny_dir()).path());
    assert_eq!(unexpected, vec!["vision_model.final_layer_norm.weight"], "{message}");
}

#[test]
fn bad_configs_name_the_field() {
    let load = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let dir = model_dir(&fixture_tensors(), &tiny_dir());
        edit_config(dir.path(), f);
        let config = ClipVisionConfig::from_file(dir.path().join("config.json"));
        let model = ClipVisionModel::load(dir.path(), &device()).map(|_| ());
        (config, model)
    };
    let invalid = |r: Result<ClipVisionConfig, ModelError>| match r {
        Err(ModelError::InvalidConfig { message, .. }) => message,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let (config, model) = load(&|c| {
        c.insert("patch_size".into(), 3.into());
    });
    let problem = match config {
        Err(ModelError::ConfigValue { problem, .. }) => problem,
        other => panic!("expected ConfigValue, got {other:?}"),
    };
    let message = problem.to_string();
    assert!(message.contains("image_size") && message.contains("patch_size"), "{message}");
    assert_eq!(problem.field, "image_size");
    assert!(matches!(model, Err(ModelError::ConfigValue { .. })));

    let (config, _) = load(&|c| {
        c.insert("hidden_act".into(), "tanh".into());
    });
    let message = invalid(config);
    assert!(message.contains("tanh"), "{message}");

    let (config, _) = load(&|c| {
        c.insert("vision_config".into(), 3.into());
    });
    assert!(invalid(config).contains("vision_config"));

    // A CLIPConfig whose vision_config disagrees with the weights: the mismatch is reported.
    let dir = model_dir(&fixture_tensors(), &full_dir());
    edit_config(dir.path(), &|c| {
        c["vision_config"].as_object_mut().unwrap().insert("num_hidden_layers".into(), 3.into());
    });
    let (missing, _, _, message) = key_mismatch(dir.path());
    assert!(
        missing.contains(&"vision_model.encoder.layers.2.mlp.fc2.weight".to_string()),
        "{message}"
    );
}

#[test]
#[should_panic(expected = "image is 16x16")]
fn wrong_image_size_panics_with_a_message() {
    let (model, _) = ClipVisionModel::load(tiny_dir(), &device()).unwrap();
    model.forward(Tensor::zeros([1, 3, 16, 16], &device()));
}

// ----------------------------------------------------------------------------------- EMLoC

#[test]
fn emloc_pipeline_runs_on_tiny_clip() {
    let device = device();
    let (original, config) = ClipVisionModel::load(tiny_dir(), &device).unwrap();
    let mut paths: Vec<String> =
        emloc::linear_layers(&original).into_iter().map(|l| l.path).collect();
    let mut want = linear_paths(&config, false);
    paths.sort();
    want.sort();
    assert_eq!(paths, want);

    device.seed(11);
    let images = |n| Tensor::<4>::random([n, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let calibration: Vec<_> = (0..4).map(|_| images(8)).collect();
    let (emulator, report) = emloc::emulate(
        original.clone(),
        calibration,
        |m: &ClipVisionModel, x: Tensor<4>| {
            m.forward(x);
        },
        &emloc::EmulatorConfig::uniform(0.5),
    )
    .unwrap();
    assert_eq!(report.layers.len(), 2 * 6);
    assert!(report.dense_layers.is_empty(), "{:?}", report.dense_layers);

    let lora = emloc::LoraConfig::new(4).with_target_modules(vec![
        "q_proj".into(),
        "v_proj".into(),
        "fc1".into(),
    ]);
    let (adapted, targets) = emloc::attach_new_adapter(emulator, &lora).unwrap();
    assert_eq!(targets.len(), 6);

    // Regress the pooled output onto a fixed random target for a few AdamW steps.
    let train_device = device.clone().autodiff();
    let x = images(8);
    let target = Tensor::<2>::random([8, D], Distribution::Uniform(-0.5, 0.5), &device);
    let mut model = adapted.train();
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let pooled = model.forward(x.clone().to_device(&train_device)).pooler_output;
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
    assert_eq!(a.last_hidden_state.dims(), [3, SEQ, D]);
    assert_eq!(a.pooler_output.dims(), [3, D]);
    let (a, b) = (values(a.last_hidden_state), values(b.last_hidden_state));
    assert!(a.iter().all(|x| x.is_finite()));
    assert_close("merged vs unmerged", &a, &b);
    let base = values(original.forward(probe).last_hidden_state);
    assert!(max_abs_diff(&a, &base) > 1e-4, "the merged adapter changed nothing");
}
