//! Sequential calibration and dense ends through the public API, against float64 references
//! computed from the raw activations (QR least squares, not the Gram formulas the library uses).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use emloc::emulator::{
    Keep, LayerRule, Refit, emulated_params, factorize_layer, largest_ratio, with_dense_layers,
};
use emloc::{EmlocError, EmulatorConfig, Matrix, emulate, emulate_part};
use faer::Mat;
use faer::linalg::solvers::SolveLstsq;

use crate::common::*;

fn to_f64(t: Tensor<2>) -> Mat<f64> {
    let m = Matrix::from_tensor(t);
    Mat::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64)
}

fn gelu(x: Tensor<2>) -> Tensor<2> {
    burn::tensor::activation::gelu(x)
}

/// `l1` at rank 3 and `l2` at rank 4 of an MLP `8 → 12 → 6`, and 60 calibration tokens.
fn setup(device: &Device) -> (Mlp, Vec<Tensor<2>>, EmulatorConfig) {
    device.seed(5);
    let model = Mlp::new(8, 12, 6, device);
    let batches = (0..3).map(|i| tensor(70 + i, [20, 8], device)).collect();
    let config = EmulatorConfig {
        rules: vec![
            LayerRule { pattern: "l1".into(), keep: Keep::Rank(3) },
            LayerRule { pattern: "l2".into(), keep: Keep::Rank(4) },
        ],
        ..Default::default()
    };
    (model, batches, config)
}

fn build(
    model: &Mlp,
    batches: &[Tensor<2>],
    config: &EmulatorConfig,
) -> (Mlp, emloc::EmulatorReport) {
    let forward = |m: &Mlp, x: Tensor<2>| drop(m.forward(x));
    emulate(model.clone(), batches.to_vec(), forward, config).unwrap()
}

fn factors(layer: &emloc::Linear) -> (Mat<f64>, Mat<f64>) {
    let f = layer.factors.as_ref().expect("an emulated layer");
    (to_f64(f.w_v.val()), to_f64(f.w_u.val()))
}

fn max_rel(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let scale = (0..b.nrows())
        .flat_map(|i| (0..b.ncols()).map(move |j| (i, j)))
        .map(|(i, j)| b[(i, j)].abs())
        .fold(0.0, f64::max);
    (a - b).norm_max() / scale
}

#[test]
fn sequential_refit_is_the_float64_least_squares_fit_of_the_original_outputs() {
    let device = Device::flex();
    let (model, batches, config) = setup(&device);
    let (emulator, report) =
        build(&model, &batches, &config.clone().with_sequential(Refit::Output));
    let x = Tensor::cat(batches.clone(), 0);
    // l2's inputs in the original and in the emulator whose l1 is already factored.
    let h = to_f64(gelu(model.l1.forward(x.clone())));
    let h_emulated = to_f64(gelu(emulator.l1.forward(x)));
    let target = &h * to_f64(model.l2.weight.val());
    let (v, u) = factors(&emulator.l2);
    // Oracle: min_U ‖H' V U − H W‖_F by Householder QR of H' V in f64.
    let expected = (&h_emulated * &v).qr().solve_lstsq(&target);
    assert!(
        max_rel(&u, &expected) < 1e-3,
        "refit W_u differs from least squares: {}",
        max_rel(&u, &expected)
    );

    // The first block sees the original's inputs, so its SVD factor is already the best fit.
    let l1 = &report.layers[0].refit.unwrap();
    assert!((l1.relative_output_error - l1.relative_output_error_before).abs() < 1e-6, "{l1:?}");
    // l2's reported error is the error of its outputs, measured here from the activations.
    let l2 = report.layers[1].refit.unwrap();
    let measured = (&h_emulated * &v * &u - &target).norm_l2() / target.norm_l2();
    assert!((l2.relative_output_error - measured).abs() < 1e-4, "{l2:?} vs {measured}");
    assert!(l2.relative_output_error < l2.relative_output_error_before, "{l2:?}");
}

#[test]
fn refitting_both_factors_gives_the_best_rank_k_fit_of_the_original_outputs() {
    let device = Device::flex();
    let (model, batches, config) = setup(&device);
    let (emulator, report) = build(&model, &batches, &config.clone().with_sequential(Refit::Both));
    let x = Tensor::cat(batches.clone(), 0);
    let h = to_f64(gelu(model.l1.forward(x.clone())));
    let h_emulated = to_f64(gelu(emulator.l1.forward(x)));
    let target = &h * to_f64(model.l2.weight.val());
    // Oracle: the unconstrained least-squares map by QR, then the rank-4 truncation of its
    // outputs H' M̂ by an SVD in data space (Eckart–Young): the best rank-4 fit H' M.
    let fitted = &h_emulated * h_emulated.qr().solve_lstsq(&target);
    let svd = fitted.thin_svd().unwrap();
    let u4 = svd.U().subcols(0, 4);
    let best = u4 * (u4.transpose() * &fitted);
    let (v, u) = factors(&emulator.l2);
    let got = &h_emulated * &v * &u;
    // The 10⁻⁶ relative ridge on X'ᵀX' (and f32 Grams) move the fit slightly off the optimum;
    // its error may exceed the optimum's by a hair only.
    let (error, optimum) = ((&got - &target).norm_l2(), (&best - &target).norm_l2());
    assert!(error <= optimum * (1.0 + 1e-4), "error {error} vs the optimum {optimum}");
    assert!(max_rel(&got, &best) < 1e-2, "not the best rank-4 fit: {}", max_rel(&got, &best));
    // Better than refitting the output factor alone, which is better than no refit.
    let (_, output_only) = build(&model, &batches, &config.with_sequential(Refit::Output));
    let (both, output) = (report.layers[1].refit.unwrap(), output_only.layers[1].refit.unwrap());
    // (l2's inputs differ by a hair: on block 1, X' = X and M̂ = W up to the ridge.)
    let befores = (both.relative_output_error_before, output.relative_output_error_before);
    assert!((befores.0 - befores.1).abs() < 1e-5, "{befores:?}");
    assert!(both.relative_output_error < output.relative_output_error, "{both:?} vs {output:?}");
}

#[test]
fn sequential_calibration_fits_each_block_to_the_emulated_prefix() {
    let device = Device::flex();
    let (model, batches, config) = setup(&device);
    let (one_shot, _) = build(&model, &batches, &config);
    let (sequential, report) =
        build(&model, &batches, &config.clone().with_sequential(Refit::None));
    assert!(report.layers.iter().all(|l| l.refit.is_none()));
    // Block 1 (l1) sees the original's inputs either way.
    let (v1, u1) = factors(&sequential.l1);
    let (v1_once, u1_once) = factors(&one_shot.l1);
    assert!(max_rel(&v1, &v1_once) < 1e-6 && max_rel(&u1, &u1_once) < 1e-6);
    // Block 2 (l2): the whitened SVD on the Gram of what the emulated l1 feeds it.
    let x = Tensor::cat(batches, 0);
    let h_emulated = gelu(sequential.l1.forward(x));
    let gram = Matrix::from_tensor(h_emulated.clone().transpose().matmul(h_emulated));
    let weight = Matrix::from_tensor(model.l2.weight.val());
    let expected = factorize_layer("l2", &weight, &gram, 4, &config.whitening).unwrap();
    let (v2, u2) = factors(&sequential.l2);
    let (v2_once, _) = factors(&one_shot.l2);
    let to_mat = |m: &Matrix| Mat::from_fn(m.rows, m.cols, |i, j| m.get(i, j) as f64);
    let (ev, eu) = (to_mat(&expected.w_v), to_mat(&expected.w_u));
    // Compare the products (the factors' split is only unique up to signs).
    assert!(max_rel(&(&v2 * &u2), &(&ev * &eu)) < 1e-4, "{}", max_rel(&(&v2 * &u2), &(&ev * &eu)));
    assert!(max_rel(&v2, &v2_once) > 1e-3, "l2 was fitted to the original's inputs");
}

#[test]
fn sequential_calibration_is_refused_for_a_part() {
    let device = Device::flex();
    let (model, batches, config) = setup(&device);
    let forward = |m: &Mlp, x: Tensor<2>| drop(m.forward(x));
    let err =
        emulate_part(model, "", batches, forward, &config.with_sequential(Refit::Output), |_| {})
            .unwrap_err();
    assert!(matches!(err, EmlocError::InvalidConfig(ref m) if m.contains("emulate")), "{err}");
}

#[test]
fn dense_layers_keep_the_emulator_size_with_lower_ranks_elsewhere() {
    let device = Device::flex();
    // l1: 32 → 48 (rank ⌊0.5·1536/80⌋ = 9, 720 params); l2: 48 → 8 (rank 3, 168): 888 in all.
    let model = Mlp::new(32, 48, 8, &device);
    let base = EmulatorConfig::all_layers(0.5);
    let (config, factor) = with_dense_layers(&model, &base, &["l2"]).unwrap();
    // l2 dense (384) leaves 504 for l1: rank 6 (480) fits, rank 7 (560) does not.
    assert_eq!(config.rank_of("l2", 48, 8).unwrap(), None);
    assert_eq!(config.rank_of("l1", 32, 48).unwrap(), Some(6));
    assert!(factor > 0.0 && factor < 1.0);
    assert!(matches!(
        with_dense_layers(&model, &base, &["nothing"]).unwrap_err(),
        EmlocError::InvalidConfig(_)
    ));
    // l1 dense (1536) alone is above 888: no ratio fits.
    assert!(matches!(
        with_dense_layers(&model, &base, &["l1"]).unwrap_err(),
        EmlocError::InvalidConfig(ref m) if m.contains("no rank")
    ));
}

#[test]
fn sizing_by_parameters_matches_the_built_emulator_and_finds_the_largest_fitting_ratio() {
    let device = Device::flex();
    let (model, batches, _) = setup(&device);
    let at = |ratio: f64| EmulatorConfig::all_layers(ratio);
    // The count from shapes alone equals the emulator actually built.
    for ratio in [0.3, 0.5, 0.9] {
        let (emulator, _) = build(&model, &batches, &at(ratio));
        assert_eq!(emulated_params(&model, &at(ratio)).unwrap(), emulator.num_params());
    }
    // 240 parameters; at ρ, l1 (8 → 12) keeps rank ⌊4.8ρ⌋ (20 per rank instead of 96), l2
    // (12 → 6) ⌊4ρ⌋ (18 instead of 72); the stock layer stays dense. Ranks (4, 3) cost 206 and
    // hold up to ρ → 1; (3, 3) cost 186 on [0.75, 5/6); (3, 2) 168 on [5/8, 0.75); (1, 1) 110.
    let within = |max: usize| largest_ratio(&model, at, max).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 2e-6;
    assert!(close(within(206).unwrap(), 1.0), "{:?}", within(206));
    assert!(close(within(205).unwrap(), 5.0 / 6.0), "{:?}", within(205));
    assert!(close(within(186).unwrap(), 5.0 / 6.0), "{:?}", within(186));
    assert!(close(within(185).unwrap(), 0.75), "{:?}", within(185));
    for max in [206, 186, 185, 110] {
        assert!(emulated_params(&model, &at(within(max).unwrap())).unwrap() <= max);
    }
    // Below rank 1 everywhere nothing fits; a layer kept dense counts whole.
    assert_eq!(within(109), None);
    let l1_dense = |ratio: f64| EmulatorConfig {
        rules: vec![LayerRule::full("l1"), LayerRule::ratio("l2", ratio)],
        ..Default::default()
    };
    assert_eq!(largest_ratio(&model, l1_dense, 185).unwrap(), None);
    assert!(largest_ratio(&model, l1_dense, 186).unwrap().is_some());
}
