//! Emulator directories (save → load onto the original) and merging adapters straight into
//! safetensors files.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use emloc::Matrix;
use emloc::emulator::{DESCRIPTION_FILE, FACTORS_FILE};
use emloc::peft::{PeftAdapter, PeftConfig, PeftLayer};
use emloc::{
    EmlocError, EmulatorConfig, EmulatorDescription, emulate, load_emulator,
    merge_adapter_into_safetensors, save_emulator,
};
use safetensors::tensor::{Dtype, TensorView};

use crate::common::*;

fn built(device: &Device) -> (Mlp, Mlp, EmulatorDescription) {
    let model = Mlp::new(12, 9, 5, device);
    let config = EmulatorConfig::all_layers(0.5);
    let calibration = vec![tensor(1, [30, 12], device), tensor(2, [30, 12], device)];
    let (emulator, report) = emulate(
        model.clone(),
        calibration,
        |m: &Mlp, x| {
            m.forward(x);
        },
        &config,
    )
    .unwrap();
    (model, emulator, EmulatorDescription::new(config, report))
}

fn emulator_file_error(result: emloc::Result<(Mlp, EmulatorDescription)>, needle: &str) {
    match result {
        Err(EmlocError::EmulatorFile { message, .. }) => {
            assert!(message.contains(needle), "{message}")
        }
        Err(other) => panic!("expected an emulator file error about {needle}, got {other}"),
        Ok(_) => panic!("expected an emulator file error about {needle}"),
    }
}

#[test]
fn saved_emulator_loads_onto_the_original_bit_identically() {
    let device = Device::flex();
    let (original, emulator, description) = built(&device);
    let dir = tempfile::tempdir().unwrap();
    save_emulator(&emulator, &description, dir.path()).unwrap();
    let (loaded, read) = load_emulator(original.clone(), dir.path()).unwrap();
    // Compared through the same JSON parse: serde_json's default float parser may read a
    // 17-digit report value (e.g. `whitened_error`) back one ulp off.
    let reparsed: EmulatorDescription =
        serde_json::from_str(&serde_json::to_string(&description).unwrap()).unwrap();
    assert_eq!(read, reparsed);
    assert!(loaded.l1.is_emulated() && loaded.l2.is_emulated());
    let x = tensor(3, [7, 12], &device);
    let (a, b) = (loaded.forward(x.clone()), emulator.forward(x));
    assert_eq!(
        a.into_data(),
        b.into_data(),
        "a saved and reloaded emulator must compute the same outputs"
    );

    // Loading checks the model before changing it.
    emulator_file_error(load_emulator(emulator.clone(), dir.path()), "already an emulator layer");
    emulator_file_error(
        load_emulator(Mlp::new(12, 10, 5, &device), dir.path()),
        "`l1` is [12, 10] in the model",
    );
}

#[test]
fn tampered_emulator_directories_are_rejected_by_name() {
    let device = Device::flex();
    let (original, emulator, description) = built(&device);
    let dir = tempfile::tempdir().unwrap();
    save_emulator(&emulator, &description, dir.path()).unwrap();
    let json_path = dir.path().join(DESCRIPTION_FILE);
    let json = std::fs::read_to_string(&json_path).unwrap();

    // A rank in the description that the factors file does not have.
    let rank = description.report.layers[0].rank;
    let mut wrong = description.clone();
    wrong.report.layers[0].rank = rank - 1;
    std::fs::write(&json_path, serde_json::to_string(&wrong).unwrap()).unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "mis-shaped [\"l1.w_u");

    // Invalid JSON and an unknown version.
    std::fs::write(&json_path, "{ not json").unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "key must be a string");
    let mut future = description.clone();
    future.format_version = 99;
    std::fs::write(&json_path, serde_json::to_string(&future).unwrap()).unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "format_version 99");

    // A truncated factors file.
    std::fs::write(&json_path, &json).unwrap();
    let factors = dir.path().join(FACTORS_FILE);
    let bytes = std::fs::read(&factors).unwrap();
    std::fs::write(&factors, &bytes[..bytes.len() - 4]).unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "the header describes");
    std::fs::write(&factors, &bytes[..bytes.len() / 2]).unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "does not fit");
    // A header length past the end of the file, and a file too short for one.
    let mut long = bytes.clone();
    long[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    std::fs::write(&factors, &long).unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "does not fit");
    std::fs::write(&factors, &bytes[..5]).unwrap();
    emulator_file_error(load_emulator(original.clone(), dir.path()), "too short");

    // A missing file is an I/O error naming it.
    std::fs::remove_file(&factors).unwrap();
    match load_emulator(original, dir.path()) {
        Err(EmlocError::Io { path, .. }) => assert_eq!(path, factors),
        other => panic!("expected an I/O error, got {:?}", other.err()),
    }
}

fn write_checkpoint(path: &Path, tensors: &[(&str, [usize; 2], &[f32])]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| (*k, TensorView::new(Dtype::F32, s.to_vec(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn merging_into_safetensors_matches_a_float64_reference_and_copies_the_rest() {
    let (d_in, d_out, r) = (6usize, 4usize, 2usize);
    let w = noise(1, d_out * d_in);
    let other = noise(2, 10);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.safetensors");
    write_checkpoint(
        &input,
        &[
            ("bert.encoder.dense.weight", [d_out, d_in], &w),
            ("bert.embeddings.weight", [2, 5], &other),
        ],
    );
    let lora_a = Matrix::new(r, d_in, noise(3, r * d_in));
    let lora_b = Matrix::new(d_out, r, noise(4, d_out * r));
    let adapter = PeftAdapter {
        config: PeftConfig::new(r, 6.0, vec!["dense".into()]),
        layers: BTreeMap::from([(
            "encoder.dense".to_string(),
            PeftLayer::new(lora_a.clone(), lora_b.clone()),
        )]),
    };
    let out = dir.path().join("merged");
    let merged =
        merge_adapter_into_safetensors(&adapter, std::slice::from_ref(&input), &out).unwrap();
    assert_eq!(
        merged.merged,
        vec![("encoder.dense".to_string(), "bert.encoder.dense.weight".to_string())]
    );

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |k: &str| -> Vec<f32> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    assert_eq!(read("bert.embeddings.weight"), other, "untouched tensors are copied bit for bit");
    let got = read("bert.encoder.dense.weight");
    let scale = 6.0 / r as f64;
    for o in 0..d_out {
        for i in 0..d_in {
            let delta: f64 =
                (0..r).map(|k| f64::from(lora_b.get(o, k)) * f64::from(lora_a.get(k, i))).sum();
            let expected = f64::from(w[o * d_in + i]) + scale * delta;
            assert!(
                (f64::from(got[o * d_in + i]) - expected).abs() <= 1e-6 * expected.abs().max(1.0)
            );
        }
    }

    // An adapter layer the checkpoint lacks: nothing is written.
    let mut stray = adapter.clone();
    stray.config = PeftConfig::new(r, 6.0, vec!["dense".into(), "gate".into()]);
    stray.layers.insert("encoder.gate".into(), PeftLayer::new(lora_a, lora_b));
    let out2 = dir.path().join("merged2");
    match merge_adapter_into_safetensors(&stray, std::slice::from_ref(&input), &out2) {
        Err(EmlocError::AdapterKeys { missing, .. }) => {
            assert_eq!(missing, vec!["encoder.gate.weight".to_string()])
        }
        other => panic!("expected missing keys, got {other:?}"),
    }
    assert!(!out2.exists(), "a failed merge must not create its output");
    // Writing over the input is refused.
    assert!(
        merge_adapter_into_safetensors(&adapter, std::slice::from_ref(&input), dir.path()).is_err()
    );

    // A NaN in the checkpoint's weight is named, not merged into a NaN model.
    let mut poisoned = w.clone();
    poisoned[3] = f32::NAN;
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    write_checkpoint(
        &bad.join("model.safetensors"),
        &[("bert.encoder.dense.weight", [d_out, d_in], &poisoned)],
    );
    match merge_adapter_into_safetensors(
        &adapter,
        &[bad.join("model.safetensors")],
        &dir.path().join("merged3"),
    ) {
        Err(EmlocError::NonFinite { layer, .. }) => assert_eq!(layer, "bert.encoder.dense.weight"),
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    assert!(!dir.path().join("merged3/model.safetensors").exists());
}
