//! Stage 1 through the public API: calibration statistics and the emulator they build.

use burn::tensor::Device;
use emloc::emulator::{Keep, LayerRule};
use emloc::{EmulatorConfig, WhiteningMethod, calibrate, emulate};

use crate::common::*;

#[test]
fn calibration_gram_is_x_transpose_x_in_f64() {
    let device = Device::flex();
    let model = Mlp::new(6, 5, 3, &device);
    let batches: Vec<_> = (0..3).map(|i| tensor(10 + i, [7, 6], &device)).collect();
    let stats = calibrate(
        &model,
        batches.clone(),
        |m: &Mlp, x| {
            m.forward(x);
        },
        |p| p == "l1",
    )
    .unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].tokens, 21);
    // Oracle: Σ_batches XᵀX in f64 on the host.
    let mut expected = [[0f64; 6]; 6];
    for i in 0..3 {
        let x = noise(10 + i, 42);
        for t in 0..7 {
            for a in 0..6 {
                for b in 0..6 {
                    expected[a][b] += x[t * 6 + a] as f64 * x[t * 6 + b] as f64;
                }
            }
        }
    }
    for (a, row) in expected.iter().enumerate() {
        for (b, value) in row.iter().enumerate() {
            assert!((stats[0].gram.get(a, b) as f64 - value).abs() < 1e-5);
        }
    }
}

#[test]
fn concurrent_calibrations_of_one_model_stay_apart() {
    // Two threads calibrate clones of one model (the same parameter ids) on different data, their
    // sessions overlapping: each must see only its own inputs.
    let device = Device::flex();
    let model = Mlp::new(6, 5, 3, &device);
    let data =
        |seed: u64| -> Vec<_> { (0..2).map(|i| tensor(seed + i, [4, 6], &device)).collect() };
    let barrier = std::sync::Barrier::new(2);
    let run = |batches: Vec<_>, model: Mlp, meet: bool| {
        let mut seen = 0;
        calibrate(
            &model,
            batches,
            |m: &Mlp, x| {
                m.forward(x);
                seen += 1;
                if meet && seen == 1 {
                    // Both sessions are open and have recorded one batch here.
                    barrier.wait();
                }
            },
            |_| true,
        )
        .unwrap()
    };
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| run(data(100), model.clone(), true));
        let b = scope.spawn(|| run(data(200), model.clone(), true));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (got, seed) in [(a, 100), (b, 200)] {
        let alone = run(data(seed), model.clone(), false);
        assert_eq!(got.len(), alone.len());
        for (g, w) in got.iter().zip(&alone) {
            assert_eq!((&g.path, g.tokens), (&w.path, 8), "layer {} saw other inputs", g.path);
            assert_eq!(g.gram, w.gram, "layer {}: Gram differs from its own data's", g.path);
        }
    }
}

#[test]
fn emulator_is_exact_on_the_calibration_subspace() {
    // Inputs of l1 span 3 dimensions of R^12: a rank-3 emulator of l1 reproduces l1 on that
    // subspace although W^E differs from W (the whitened SVD only has to be right on the data).
    let device = Device::flex();
    device.seed(1);
    let model = Mlp::new(12, 10, 4, &device);
    let calibration = subspace_batches(12, 3, 16, 2, &device);
    let config = EmulatorConfig {
        rules: vec![LayerRule { pattern: "l1".into(), keep: Keep::Rank(3) }],
        ..Default::default()
    };
    let (emulator, report) = emulate(
        model.clone(),
        calibration,
        |m: &Mlp, x| {
            m.forward(x);
        },
        &config,
    )
    .unwrap();
    assert_eq!(report.layers.len(), 1);
    let layer = &report.layers[0];
    assert_eq!((layer.path.as_str(), layer.rank, layer.tokens), ("l1", 3, 32));
    assert!(layer.relative_damping > 0.0, "rank-3 Gram of size 12 needs damping");
    assert!(layer.relative_whitened_error < 1e-3, "{layer:?}");
    assert_eq!(report.dense_layers, vec!["l2".to_string(), "stock".to_string()]);
    assert_eq!(
        report.stock_layers,
        vec!["stock".to_string()],
        "the burn::nn::Linear is named as such"
    );
    assert!(emulator.l1.is_emulated() && emulator.l1.weight.val().dims() == [0, 0]);

    let x = subspace_batches(12, 3, 9, 1, &device).remove(0);
    assert!(rel_diff(emulator.l1.forward(x.clone()), model.l1.forward(x.clone())) < 1e-3);
    // Off the subspace the emulator is a rank-3 map, not the original.
    let off = tensor(5, [9, 12], &device);
    assert!(rel_diff(emulator.l1.forward(off.clone()), model.l1.forward(off)) > 1e-2);
    // W^E really has rank 3 and is not W.
    assert_eq!(emulator.l1.factors.as_ref().unwrap().rank(), 3);
}

#[test]
fn whitened_emulator_beats_plain_svd_on_calibration_outputs() {
    let device = Device::flex();
    device.seed(2);
    let model = Mlp::new(16, 16, 4, &device);
    // Anisotropic inputs: a few directions dominate, like real activations.
    let basis = tensor(3, [16, 16], &device);
    let scales = burn::tensor::Tensor::<1>::from_floats(
        [8.0, 6.0, 4.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.02, 0.02, 0.01, 0.01],
        &device,
    );
    let batches: Vec<_> = (0..4)
        .map(|i| {
            (tensor(40 + i, [32, 16], &device) * scales.clone().unsqueeze()).matmul(basis.clone())
        })
        .collect();
    let out_err = |method| {
        let config =
            EmulatorConfig { rules: vec![LayerRule::ratio("l1", 0.25)], ..Default::default() }
                .with_whitening(method);
        let (emu, _) = emulate(
            model.clone(),
            batches.clone(),
            |m: &Mlp, x| {
                m.forward(x);
            },
            &config,
        )
        .unwrap();
        batches
            .iter()
            .map(|x| rel_diff(emu.l1.forward(x.clone()), model.l1.forward(x.clone())))
            .sum::<f32>()
    };
    let (whitened, plain) = (out_err(WhiteningMethod::Cholesky), out_err(WhiteningMethod::None));
    assert!(whitened < plain, "whitened {whitened} !< plain {plain}");
}

#[test]
fn same_inputs_give_bit_identical_emulators() {
    // Weights from the test's own generator, not the device RNG: tests run in parallel and
    // share Flex's global RNG, so seeding it would not make a model reproducible here.
    let build = || {
        let device = Device::flex();
        let mut model = Mlp::new(8, 8, 2, &device);
        model.l1.weight = burn::module::Param::from_tensor(tensor(30, [8, 8], &device));
        let batches: Vec<_> = (0..2).map(|i| tensor(i, [10, 8], &device)).collect();
        let config =
            EmulatorConfig { rules: vec![LayerRule::ratio("l1", 0.5)], ..Default::default() };
        let (emu, _) = emulate(
            model,
            batches,
            |m: &Mlp, x| {
                m.forward(x);
            },
            &config,
        )
        .unwrap();
        let f = emu.l1.factors.unwrap();
        (f.w_u.val().into_data(), f.w_v.val().into_data())
    };
    assert_eq!(build(), build());
}

#[test]
fn factorisation_progress_reports_each_layer_once_in_order() {
    let device = Device::flex();
    let model = Mlp::new(10, 8, 6, &device);
    let batches: Vec<_> = (0..2).map(|i| tensor(30 + i, [12, 10], &device)).collect();
    let mut seen = Vec::new();
    let (_, report) = emloc::emulate_with_progress(
        model,
        batches,
        |m: &Mlp, x| {
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
        |p| seen.push((p.done, p.total, p.path.to_string())),
    )
    .unwrap();
    let want: Vec<_> = report
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (i + 1, report.layers.len(), l.path.clone()))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(seen, want);
}

#[test]
fn layers_calibrated_on_fewer_tokens_than_features_are_named() {
    let device = Device::flex();
    device.seed(2);
    let model = Mlp::new(12, 10, 4, &device);
    let config = EmulatorConfig {
        rules: vec![LayerRule { pattern: "l1".into(), keep: Keep::Rank(3) }],
        ..Default::default()
    };
    let build = |batches: Vec<_>| {
        emulate(
            model.clone(),
            batches,
            |m: &Mlp, x| {
                m.forward(x);
            },
            &config,
        )
        .unwrap()
        .1
    };
    // 2 batches of 4 tokens: 8 < d_in = 12.
    let few = build((0..2).map(|i| tensor(30 + i, [4, 12], &device)).collect());
    let deficient: Vec<_> = few.rank_deficient_layers().map(|l| l.path.as_str()).collect();
    assert_eq!(deficient, ["l1"]);
    let warning = few.calibration_warning().unwrap();
    assert!(warning.contains("`l1`: 8 tokens, d_in 12"), "{warning}");
    // 2 batches of 6 tokens: exactly d_in, a Gram that can be full rank.
    let enough = build((0..2).map(|i| tensor(40 + i, [6, 12], &device)).collect());
    assert_eq!(enough.rank_deficient_layers().count(), 0);
    assert_eq!(enough.calibration_warning(), None);
}
