//! Bad input gets a typed error naming what to fix, before any work starts.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use emloc::emulator::{Keep, LayerRule};
use emloc::{EmlocError, EmulatorConfig, LoraConfig, attach_new_adapter, emulate};

use crate::common::*;

fn run(
    model: Mlp,
    batches: Vec<Tensor<2>>,
    config: &EmulatorConfig,
) -> Result<(Mlp, emloc::EmulatorReport), EmlocError> {
    emulate(
        model,
        batches,
        |m: &Mlp, x| {
            m.forward(x);
        },
        config,
    )
}

fn setup() -> (Mlp, Vec<Tensor<2>>) {
    let device = Device::flex();
    (Mlp::new(8, 6, 4, &device), vec![tensor(1, [5, 8], &device)])
}

#[test]
fn ratio_outside_open_unit_interval_is_rejected() {
    for ratio in [0.0, 1.0, -0.2, 1.5, f64::NAN] {
        let (model, batches) = setup();
        let err = run(model, batches, &EmulatorConfig::all_layers(ratio)).unwrap_err();
        assert!(matches!(err, EmlocError::InvalidRatio { .. }), "{ratio}: {err}");
    }
}

#[test]
fn rank_zero_or_too_large_is_rejected_with_the_layer() {
    let (model, batches) = setup();
    let rule = |k| EmulatorConfig {
        rules: vec![LayerRule { pattern: "l.".into(), keep: Keep::Rank(k) }],
        ..Default::default()
    };
    assert!(matches!(
        run(model, batches, &rule(0)).unwrap_err(),
        EmlocError::InvalidRank { rank: 0, .. }
    ));
    let (model, batches) = setup();
    match run(model, batches, &rule(7)).unwrap_err() {
        EmlocError::InvalidRank { layer, rank: 7, max: 6 } => assert_eq!(layer, "l1"),
        other => panic!("{other}"),
    }
    // A ratio so small that a layer would keep rank 0.
    let (model, batches) = setup();
    assert!(matches!(
        run(model, batches, &EmulatorConfig::all_layers(0.05)).unwrap_err(),
        EmlocError::InvalidRank { rank: 0, .. }
    ));
}

#[test]
fn empty_calibration_is_rejected() {
    let (model, _) = setup();
    let err = run(model, vec![], &EmulatorConfig::all_layers(0.5)).unwrap_err();
    assert!(matches!(err, EmlocError::EmptyCalibration(_)), "{err}");
}

#[test]
fn a_layer_the_forward_never_reaches_is_named() {
    let (model, batches) = setup();
    let err = emulate(
        model,
        batches,
        |m: &Mlp, x| {
            m.l1.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
    )
    .unwrap_err();
    match err {
        EmlocError::NoCalibrationTokens { layer } => assert_eq!(layer, "l2"),
        other => panic!("{other}"),
    }
}

#[test]
fn non_finite_weight_is_named_before_calibration() {
    let (mut model, batches) = setup();
    model.l2.weight = Param::from_tensor(model.l2.weight.val().mul_scalar(f32::NAN));
    let mut forwards = 0;
    let err = emulate(
        model,
        batches,
        |m: &Mlp, x| {
            forwards += 1;
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
    )
    .unwrap_err();
    assert_eq!(forwards, 0, "validation must happen before calibration");
    match err {
        EmlocError::NonFinite { layer, what } => {
            assert_eq!((layer.as_str(), what.as_str()), ("l2", "weight"))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn non_finite_activations_are_named() {
    let (model, mut batches) = setup();
    batches.push(batches[0].clone().mul_scalar(f32::INFINITY));
    match run(model, batches, &EmulatorConfig::all_layers(0.5)).unwrap_err() {
        EmlocError::NonFinite { layer, what } => {
            assert_eq!(layer, "l1");
            assert!(what.contains("Gram"), "{what}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn stock_burn_linear_is_reported_not_silently_skipped() {
    let (model, batches) = setup();
    let only_stock =
        EmulatorConfig { rules: vec![LayerRule::ratio("stock", 0.5)], ..Default::default() };
    match run(model.clone(), batches, &only_stock).unwrap_err() {
        EmlocError::NoMatchingLayers(msg) => {
            assert!(msg.contains("stock") && msg.contains("burn::nn::Linear"), "{msg}")
        }
        other => panic!("{other}"),
    }
    let lora = LoraConfig::new(2).with_target_modules(vec!["stock".into()]);
    assert!(matches!(
        attach_new_adapter(model, &lora).unwrap_err(),
        EmlocError::NoMatchingLayers(_)
    ));
}

#[test]
fn bad_lora_config_and_regex_are_rejected() {
    let (model, _) = setup();
    for config in [
        LoraConfig::new(0),
        LoraConfig::new(2).with_alpha(-1.0),
        LoraConfig::new(2).with_dropout(1.0),
        LoraConfig::new(2).with_target_regex(Some("l(".into())),
    ] {
        assert!(matches!(
            attach_new_adapter(model.clone(), &config).unwrap_err(),
            EmlocError::InvalidConfig(_)
        ));
    }
    let bad_rule = EmulatorConfig { rules: vec![LayerRule::ratio("(", 0.5)], ..Default::default() };
    let (model, batches) = setup();
    assert!(matches!(run(model, batches, &bad_rule).unwrap_err(), EmlocError::InvalidConfig(_)));
}

#[test]
fn valid_model_is_untouched_by_a_failed_lora_attach() {
    let (model, _) = setup();
    let (model, _) =
        attach_new_adapter(model, &LoraConfig::new(2).with_target_modules(vec!["l1".into()]))
            .unwrap();
    // A second attach on the same layer fails and says why.
    let err = attach_new_adapter(model.clone(), &LoraConfig::new(2)).unwrap_err();
    assert!(err.to_string().contains("already carries"), "{err}");
    assert!(model.l1.lora.is_some() && model.l2.lora.is_none());
    let _ = model.num_params();
}
