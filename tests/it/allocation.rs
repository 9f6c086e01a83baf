//! Rank allocation from whitened spectra, checked against what `emulate` reports.

use burn::tensor::Device;
use emloc::emulator::{
    Objective, allocation_cost, config_for_ranks, global_ranks, uniform_ranks, whitened_spectra,
};
use emloc::{EmulatorConfig, emulate};

use crate::common::*;

#[test]
fn spectra_agree_with_emulate_and_global_plans_build() {
    let device = Device::flex();
    let model = Mlp::new(12, 9, 5, &device);
    let config = EmulatorConfig::all_layers(0.5);
    let calibration = || vec![tensor(1, [30, 12], &device), tensor(2, [30, 12], &device)];
    let forward = |m: &Mlp, x| {
        m.forward(x);
    };
    let spectra = whitened_spectra(&model, calibration(), forward, &config).unwrap();
    assert_eq!(spectra.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["l1", "l2"]);

    // The uniform plan is what `emulate` does at the same ratio: same ranks, same errors.
    let uniform = uniform_ranks(&spectra, 0.5).unwrap();
    let (_, report) = emulate(model.clone(), calibration(), forward, &config).unwrap();
    for layer in &report.layers {
        let spectrum = spectra.iter().find(|s| s.path == layer.path).unwrap();
        assert_eq!(uniform[&layer.path], layer.rank);
        let error = spectrum.whitened_error(layer.rank);
        assert!(
            (error - layer.whitened_error).abs() <= 1e-9 * error.max(1.0),
            "{error} vs {}",
            layer.whitened_error
        );
    }

    // A global plan of the same size is a valid emulator config, and what it reports matches.
    let (_, params) = allocation_cost(&spectra, &uniform);
    let global = global_ranks(&spectra, params, Objective::Absolute).unwrap();
    let (global_error, global_params) = allocation_cost(&spectra, &global);
    assert!(global_params <= params);
    let (_, report) =
        emulate(model, calibration(), forward, &config_for_ranks(&global, &config)).unwrap();
    let reported: f64 = report.layers.iter().map(|l| l.whitened_error.powi(2)).sum();
    assert!(
        (reported - global_error).abs() <= 1e-9 * global_error.max(1.0),
        "{reported} vs {global_error}"
    );
}
