//! LoRA on dense and emulator layers: the factored forward, what trains, PEFT round trips, merge.

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use emloc::Matrix;
use emloc::peft::{PeftAdapter, PeftConfig, PeftLayer};
use emloc::{
    EmlocError, EmulatorConfig, LoraConfig, attach_adapter, attach_new_adapter, emulate,
    export_adapter, merge_adapter, merge_attached_adapter,
};

use crate::common::*;

fn targets(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Replaces every adapter's B by deterministic noise (a fresh adapter has B = 0).
fn randomize_b(model: Mlp, device: &Device) -> Mlp {
    let mut model = model;
    for (i, layer) in [&mut model.l1, &mut model.l2].into_iter().enumerate() {
        if let Some(lora) = layer.lora.as_mut() {
            let dims = lora.b.val().dims();
            lora.b = Param::from_tensor(tensor(70 + i as u64, dims, device));
        }
    }
    model
}

#[test]
fn adapter_forward_matches_dense_oracle_on_dense_and_emulator_layers() {
    let device = Device::flex();
    device.seed(4);
    let model = Mlp::new(10, 8, 6, &device);
    let calibration = vec![tensor(1, [20, 10], &device)];
    let (emulator, _) = emulate(
        model.clone(),
        calibration,
        |m: &Mlp, x| {
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
    )
    .unwrap();
    for (name, base, rslora) in [("dense", model, false), ("emulator", emulator, true)] {
        let config = LoraConfig::new(3)
            .with_alpha(6.0)
            .with_use_rslora(rslora)
            .with_target_modules(targets(&["l1"]));
        let (adapted, paths) = attach_new_adapter(base.clone(), &config).unwrap();
        assert_eq!(paths, targets(&["l1"]));
        let x = tensor(2, [5, 10], &device);
        // B = 0 at attachment: outputs unchanged.
        assert_eq!(
            adapted.l1.forward(x.clone()).into_data(),
            base.l1.forward(x.clone()).into_data()
        );

        let adapted = randomize_b(adapted, &device);
        let lora = adapted.l1.lora.as_ref().unwrap();
        let s = if rslora { 6.0 / 3f64.sqrt() } else { 2.0 };
        assert!((lora.scale() - s).abs() < 1e-12);
        // Oracle: x (W + s a b) + bias with everything dense.
        let dense = base.l1.base_weight() + lora.a.val().matmul(lora.b.val()).mul_scalar(s);
        let expected = x.clone().matmul(dense) + base.l1.bias.as_ref().unwrap().val().unsqueeze();
        assert!(rel_diff(adapted.l1.forward(x), expected) < 1e-5, "{name}");
    }
}

#[test]
fn only_adapter_factors_receive_gradients() {
    let device = Device::flex();
    let model = Mlp::new(6, 5, 4, &device);
    let (model, _) =
        attach_new_adapter(model, &LoraConfig::new(2).with_target_modules(targets(&["l1", "l2"])))
            .unwrap();
    let model = randomize_b(model, &device).train();
    let model = {
        // randomize_b made fresh params; re-freeze everything but the adapters the public way.
        let adapter = export_adapter(&model.valid()).unwrap();
        let base = Mlp {
            l1: strip(model.l1.clone()),
            l2: strip(model.l2.clone()),
            stock: model.stock.clone(),
        };
        attach_adapter(base.valid(), &adapter).unwrap().train()
    };
    let x = tensor(3, [4, 6], &device.clone().autodiff());
    let loss = model.forward(x).powf_scalar(2.0).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let l1 = model.l1.lora.as_ref().unwrap();
    let l2 = model.l2.lora.as_ref().unwrap();
    for id in [l1.a.id, l1.b.id, l2.a.id, l2.b.id] {
        assert!(grads.get::<2>(id).is_some(), "adapter factor without gradient");
    }
    for id in [model.l1.weight.id, model.l2.weight.id, model.stock.weight.id] {
        assert!(grads.get::<2>(id).is_none(), "frozen weight got a gradient");
    }
    assert!(grads.get::<1>(model.l1.bias.as_ref().unwrap().id).is_none());
}

fn strip(mut l: emloc::Linear) -> emloc::Linear {
    l.lora = None;
    l
}

#[test]
fn peft_round_trip_gives_identical_outputs() {
    let device = Device::flex();
    device.seed(5);
    let model = Mlp::new(7, 9, 5, &device);
    let (adapted, _) = attach_new_adapter(
        model.clone(),
        &LoraConfig::new(4).with_alpha(16.0).with_target_modules(targets(&["l1", "l2"])),
    )
    .unwrap();
    let adapted = randomize_b(adapted, &device);
    let dir = tempfile::tempdir().unwrap();
    export_adapter(&adapted).unwrap().save(dir.path()).unwrap();
    let loaded = PeftAdapter::load(dir.path()).unwrap();
    assert_eq!(loaded.config.r, 4);
    assert_eq!(loaded.layers["l1"].lora_a.shape(), [4, 7]);
    assert_eq!(loaded.layers["l2"].lora_b.shape(), [5, 4]);
    let restored = attach_adapter(model.clone(), &loaded).unwrap();
    let x = tensor(6, [5, 7], &device);
    assert_eq!(restored.forward(x.clone()).into_data(), adapted.forward(x.clone()).into_data());

    // Merged into the weights: the same function up to f32 rounding.
    let merged = merge_adapter(model.clone(), &loaded).unwrap();
    assert!(merged.l1.lora.is_none());
    assert!(rel_diff(merged.forward(x.clone()), adapted.forward(x.clone())) < 1e-5);
    let folded = merge_attached_adapter(adapted.clone());
    assert!(rel_diff(folded.forward(x.clone()), adapted.forward(x)) < 1e-5);
}

#[test]
fn adapter_for_another_model_is_rejected_with_every_key() {
    let device = Device::flex();
    let small = Mlp::new(7, 9, 3, &device);
    let (adapted, _) =
        attach_new_adapter(small, &LoraConfig::new(2).with_target_modules(targets(&["l1", "l2"])))
            .unwrap();
    let mut adapter = export_adapter(&adapted).unwrap();
    // Make l2's adapter belong to a layer the model does not have.
    let l2 = adapter.layers.remove("l2").unwrap();
    adapter.layers.insert("decoder.l2".into(), l2);
    adapter.config.target_modules = emloc::peft::TargetModules::List(targets(&["l1", "l2"]));
    let other = Mlp::new(7, 11, 3, &device); // l1 is [7 → 11]: A fits, B does not.
    match attach_adapter(other, &adapter).unwrap_err() {
        EmlocError::AdapterKeys { missing, unexpected, misshaped } => {
            assert_eq!(
                missing,
                vec![
                    "base_model.model.l2.lora_A.weight".to_string(),
                    "base_model.model.l2.lora_B.weight".to_string()
                ]
            );
            assert_eq!(
                unexpected,
                vec![
                    "base_model.model.decoder.l2.lora_A.weight".to_string(),
                    "base_model.model.decoder.l2.lora_B.weight".to_string()
                ]
            );
            assert_eq!(misshaped.len(), 1, "{misshaped:?}");
            assert!(misshaped[0].starts_with("base_model.model.l1.lora_B.weight"), "{misshaped:?}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn merging_into_an_emulator_is_refused() {
    let device = Device::flex();
    let model = Mlp::new(6, 6, 6, &device);
    let (adapted, _) = attach_new_adapter(
        model.clone(),
        &LoraConfig::new(2).with_target_modules(targets(&["l1"])),
    )
    .unwrap();
    let adapter = export_adapter(&adapted).unwrap();
    let (emulator, _) = emulate(
        model,
        vec![tensor(1, [12, 6], &device)],
        |m: &Mlp, x| {
            m.forward(x);
        },
        &EmulatorConfig::all_layers(0.5),
    )
    .unwrap();
    let err = merge_adapter(emulator, &adapter).unwrap_err();
    assert!(err.to_string().contains("emulator layer"), "{err}");
    let _: Tensor<2> = tensor(0, [1, 1], &device);
}

/// A rank above `min(d_in, d_out)` is refused wherever an adapter meets a layer, as a typed error:
/// the correction used to panic indexing the `min(d_in, r)` singular values of `Aᵀ` up to `r`.
#[test]
fn rank_above_the_layer_dims_is_refused_on_attach_load_and_correct() {
    let device = Device::flex();
    let model = Mlp::new(3, 9, 5, &device); // l1: 3 → 9, l2: 9 → 5
    let too_big = LoraConfig::new(4).with_target_modules(targets(&["l1"]));
    let err = attach_new_adapter(model.clone(), &too_big).unwrap_err().to_string();
    assert!(
        err.contains("LoRA rank 4 at layer `l1` exceeds min(d_in = 3, d_out = 9) = 3"),
        "{err}"
    );
    // Rank 5 ≤ 5 on l2 is fine.
    attach_new_adapter(model.clone(), &LoraConfig::new(5).with_target_modules(targets(&["l2"])))
        .unwrap();

    // An adapter file with r = 4 on the 3-input l1 (built by hand, as another tool might write it).
    let mut adapter = export_adapter(
        &attach_new_adapter(
            model.clone(),
            &LoraConfig::new(3).with_target_modules(targets(&["l1"])),
        )
        .unwrap()
        .0,
    )
    .unwrap();
    adapter.config.r = 4;
    let layer = adapter.layers.get_mut("l1").unwrap();
    layer.lora_a = emloc::Matrix::new(4, 3, noise(1, 12));
    layer.lora_b = emloc::Matrix::new(9, 4, noise(2, 36));
    assert!(adapter.validate().unwrap_err().to_string().contains("exceeds min(d_in = 3"));
    assert!(attach_adapter(model.clone(), &adapter).is_err());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        serde_json::to_string(&adapter.config).unwrap(),
    )
    .unwrap();
    let a = emloc::peft::lora_a_key("l1");
    let b = emloc::peft::lora_b_key("l1");
    let bytes =
        |m: &emloc::Matrix| m.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let (ab, bb) = (bytes(&adapter.layers["l1"].lora_a), bytes(&adapter.layers["l1"].lora_b));
    let views = vec![
        (
            a.as_str(),
            safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![4, 3], &ab)
                .unwrap(),
        ),
        (
            b.as_str(),
            safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![9, 4], &bb)
                .unwrap(),
        ),
    ];
    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let err = PeftAdapter::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("exceeds min(d_in = 3, d_out = 9)"),
        "{err}"
    );

    // A LoraAdapter built by hand (its fields are public) reaches the correction: an error, no panic.
    let mut tuned = model.clone();
    tuned.l1.lora = Some(emloc::nn::LoraAdapter::new(
        tensor(3, [3, 4], &device),
        tensor(4, [4, 9], &device),
        8.0,
        false,
        0.0,
    ));
    let err = emloc::correct(&model, &tuned, &emloc::CorrectionConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("LoRA rank 4 at layer `l1`"), "{err}");
}

#[derive(Module, Debug)]
struct Attn {
    q: emloc::Linear,
}

#[derive(Module, Debug)]
struct Cross {
    attn: Attn,
}

/// Layers `attn.q`, `cross.attn.q` and `mlp`: `attn.q` is a tail of `cross.attn.q`, so a plain
/// `attn.q` pattern key (or target) also matches `cross.attn.q` in PEFT.
#[derive(Module, Debug)]
struct Nested {
    attn: Attn,
    cross: Cross,
    mlp: emloc::Linear,
}

impl Nested {
    /// Bias-free dense layers with deterministic weights from `seed`.
    fn new(seed: u64, device: &Device) -> Self {
        let dense = |s: u64, d_in: usize, d_out: usize| {
            let mut l = emloc::LinearConfig::new(d_in, d_out).with_bias(false).init(device);
            l.weight = Param::from_tensor(tensor(s, [d_in, d_out], device));
            l
        };
        Self {
            attn: Attn { q: dense(seed, 6, 5) },
            cross: Cross { attn: Attn { q: dense(seed + 1, 6, 5) } },
            mlp: dense(seed + 2, 5, 6),
        }
    }

    /// Attaches adapters with mixed ranks and alphas: `attn.q` (r 2, α 2), `cross.attn.q` and
    /// `mlp` (r 3, α 12), so only `attn.q` goes to the patterns.
    fn adapted(mut self, only_attn_q: bool, device: &Device) -> Self {
        let lora = |s: u64, d_in: usize, d_out: usize, r: usize, alpha: f64| {
            Some(emloc::nn::LoraAdapter::new(
                tensor(s, [d_in, r], device),
                tensor(s + 1, [r, d_out], device),
                alpha,
                false,
                0.0,
            ))
        };
        self.attn.q.lora = lora(80, 6, 5, 2, 2.0);
        if !only_attn_q {
            self.cross.attn.q.lora = lora(82, 6, 5, 3, 12.0);
            self.mlp.lora = lora(84, 5, 6, 3, 12.0);
        }
        self
    }

    fn layers(&self) -> [(&'static str, &emloc::Linear); 3] {
        [("attn.q", &self.attn.q), ("cross.attn.q", &self.cross.attn.q), ("mlp", &self.mlp)]
    }
}

#[test]
fn exported_patterns_resolve_each_layer_to_its_own_rank_and_alpha() {
    let device = Device::flex();
    let adapted = Nested::new(1, &device).adapted(false, &device);
    let adapter = export_adapter(&adapted).unwrap();
    // A plain `attn.q` key would give `cross.attn.q` rank 2 and alpha 2 in PEFT.
    assert_eq!(adapter.config.rank_pattern.keys().collect::<Vec<_>>(), ["^attn\\.q"]);
    for (path, linear) in adapted.layers() {
        let lora = linear.lora.as_ref().unwrap();
        assert_eq!(adapter.config.rank_for(path), lora.rank(), "{path}");
        assert_eq!(adapter.config.alpha_for(path), lora.alpha, "{path}");
    }
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let restored =
        attach_adapter(Nested::new(1, &device), &PeftAdapter::load(dir.path()).unwrap()).unwrap();
    let x = tensor(6, [4, 6], &device);
    for ((path, got), (_, want)) in restored.layers().into_iter().zip(adapted.layers()) {
        let x = if path == "mlp" { tensor(7, [4, 5], &device) } else { x.clone() };
        assert_eq!(got.forward(x.clone()).into_data(), want.forward(x).into_data(), "{path}");
    }

    // Only `attn.q` adapted: the plain target list `["attn.q"]` would also target
    // `cross.attn.q`, so the targets are written as a regex of the adapted paths.
    let only = export_adapter(&Nested::new(1, &device).adapted(true, &device)).unwrap();
    assert!(only.config.target_modules.matches("attn.q").unwrap());
    assert!(!only.config.target_modules.matches("cross.attn.q").unwrap());
    only.save(dir.path()).unwrap();
    attach_adapter(Nested::new(1, &device), &PeftAdapter::load(dir.path()).unwrap()).unwrap();
}

#[test]
fn correction_uses_each_attached_adapters_own_scale() {
    let device = Device::flex();
    let original = Nested::new(1, &device);
    // Trained on other dense weights (the "emulator"); the correction must make the original
    // plus the corrected adapter equal the emulator plus the trained adapter on span(A).
    let trained = Nested::new(11, &device).adapted(false, &device);
    let config = emloc::CorrectionConfig { clamp: f64::INFINITY };
    let (corrected, _) = emloc::correct(&original, &trained, &config).unwrap();
    let served = attach_adapter(original, &corrected).unwrap();
    for ((path, got), (_, want)) in served.layers().into_iter().zip(trained.layers()) {
        let a = want.lora.as_ref().unwrap().a.val(); // [d_in, r]
        let r = a.dims()[1];
        let x = tensor(9, [4, r], &device).matmul(a.transpose());
        let diff = rel_diff(got.forward(x.clone()), want.forward(x));
        assert!(diff < 1e-4, "{path}: relative difference {diff}");
    }
}

/// `x (W + s Aᵀ Bᵀ) + bias` in f64 on the host (PEFT layout: `A` `[r, d_in]`, `B` `[d_out, r]`).
fn dense_lora_oracle(
    x: &Tensor<2>,
    w: &Tensor<2>,
    bias: &Tensor<1>,
    a: &Matrix,
    b: &Matrix,
    s: f64,
) -> Tensor<2> {
    let [n, d_in] = x.dims();
    let d_out = w.dims()[1];
    let r = a.shape()[0];
    let xs: Vec<f32> = x.to_data().try_to_vec().unwrap();
    let ws: Vec<f32> = w.to_data().try_to_vec().unwrap();
    let bs: Vec<f32> = bias.to_data().try_to_vec().unwrap();
    let mut out = vec![0f32; n * d_out];
    for i in 0..n {
        for o in 0..d_out {
            let mut sum = bs[o] as f64;
            for k in 0..d_in {
                let delta: f64 = (0..r).map(|j| a.get(j, k) as f64 * b.get(o, j) as f64).sum();
                sum += xs[i * d_in + k] as f64 * (ws[k * d_out + o] as f64 + s * delta);
            }
            out[i * d_out + o] = sum as f32;
        }
    }
    Tensor::from_data(burn::tensor::TensorData::new(out, [n, d_out]), &x.device())
}

#[test]
fn adapters_are_served_and_merged_on_stock_burn_linear_layers() {
    let device = Device::flex();
    let model = Mlp::new(6, 5, 4, &device);
    let (r, alpha) = (2, 6.0);
    let layer = |seed: u64, d_in: usize, d_out: usize| {
        PeftLayer::new(
            Matrix::new(r, d_in, noise(seed, r * d_in)),
            Matrix::new(d_out, r, noise(seed + 1, d_out * r)),
        )
    };
    let adapter = PeftAdapter {
        config: PeftConfig::new(r, alpha, targets(&["l1", "stock"])),
        layers: [("l1".to_string(), layer(1, 6, 5)), ("stock".to_string(), layer(3, 6, 4))].into(),
    };
    let x = tensor(5, [7, 6], &device);
    let s = alpha / r as f64;
    let expected = |name: &str, w: &Tensor<2>, bias: &Tensor<1>| {
        let l = &adapter.layers[name];
        dense_lora_oracle(&x, w, bias, &l.lora_a, &l.lora_b, s)
    };
    let stock_expected =
        expected("stock", &model.stock.weight.val(), &model.stock.bias.as_ref().unwrap().val());
    let l1_expected =
        expected("l1", &model.l1.weight.val(), &model.l1.bias.as_ref().unwrap().val());

    // Served: Burn's LoRA reparameterization on the stock layer, emloc's adapter on l1.
    let served = attach_adapter(model.clone(), &adapter).unwrap();
    assert!(served.stock.weight.adapter().is_some(), "stock layer must carry Burn's LoraAdapter");
    assert!(rel_diff(served.stock.forward(x.clone()), stock_expected.clone()) < 1e-5);
    assert!(rel_diff(served.l1.forward(x.clone()), l1_expected.clone()) < 1e-5);
    // Only the adapters train, the stock layer's included.
    let train = served.clone().to_device(&device.clone().autodiff()).train();
    let grads = train.forward(x.clone().to_device(&device.clone().autodiff())).sum().backward();
    let stock_adapter = train.stock.weight.adapter().unwrap();
    assert!(stock_adapter.a.grad(&grads).is_some() && stock_adapter.b.grad(&grads).is_some());
    assert!(train.stock.weight.grad(&grads).is_none() && train.l2.weight.grad(&grads).is_none());

    // Merged: the stock weight itself changes; outputs equal the served model's.
    let merged = merge_adapter(model.clone(), &adapter).unwrap();
    assert!(merged.stock.weight.adapter().is_none());
    assert!(rel_diff(merged.stock.forward(x.clone()), stock_expected) < 1e-5);
    assert!(rel_diff(merged.l1.forward(x.clone()), l1_expected) < 1e-5);
    assert!(rel_diff(merged.forward(x.clone()), served.forward(x.clone())) < 1e-5);

    // Attaching twice is refused, as on emloc layers.
    let stock_only = PeftAdapter {
        config: PeftConfig::new(r, alpha, targets(&["stock"])),
        layers: [("stock".to_string(), layer(3, 6, 4))].into(),
    };
    let err = attach_adapter(served, &stock_only).unwrap_err();
    assert!(err.to_string().contains("already carries"), "{err}");
    // A stock layer with the wrong shape is a key/shape error naming it.
    let wrong = PeftAdapter {
        config: PeftConfig::new(r, alpha, targets(&["stock"])),
        layers: [("stock".to_string(), layer(3, 6, 9))].into(),
    };
    let err = merge_adapter(model, &wrong).unwrap_err();
    assert!(err.to_string().contains("stock"), "{err}");
}

#[test]
fn pruned_features_leave_the_kept_ones_exact_and_adapted_or_emulated_layers_refuse() {
    let device = Device::flex();
    device.seed(3);
    let model = Mlp::new(6, 8, 4, &device);
    let x = tensor(50, [5, 6], &device);
    // l1 keeps hidden features 1, 4, 7; l2 keeps the matching inputs. Oracle: the dense product
    // through the kept columns of l1 and rows of l2 (l1 has no activation before l2 here).
    let kept = [1, 4, 7];
    let l1 = model.l1.clone().keep_outputs(&kept).unwrap();
    let l2 = model.l2.clone().keep_inputs(&kept).unwrap();
    assert_eq!((l1.d_output(), l2.d_input()), (3, 3));
    let hidden = model.l1.forward(x.clone());
    let index = Tensor::<1, burn::tensor::Int>::from_ints([1, 4, 7], &device);
    assert!(rel_diff(l1.forward(x.clone()), hidden.clone().select(1, index.clone())) < 1e-6);
    let w2 = model.l2.weight.val().select(0, index.clone());
    let expected = hidden.select(1, index).matmul(w2.unsqueeze::<2>())
        + model.l2.bias.as_ref().unwrap().val().unsqueeze::<2>();
    assert!(rel_diff(l2.forward(l1.forward(x)), expected) < 1e-5);
    for bad in [&[][..], &[4, 1], &[1, 8]] {
        assert!(model.l1.clone().keep_outputs(bad).is_err(), "{bad:?}");
    }
    let (adapted, _) =
        emloc::attach_new_adapter(model, &LoraConfig::new(2).with_target_modules(targets(&["l1"])))
            .unwrap();
    let err = adapted.l1.keep_outputs(&kept).unwrap_err().to_string();
    assert!(err.contains("cannot be pruned"), "{err}");
}
