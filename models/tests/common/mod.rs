//! Helpers shared by the model tests that compare against the transformers fixtures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use emloc_models::ModelError;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Maximum absolute difference to the float64 reference (LayerNorm outputs are O(1)).
pub const TOL: f32 = 1e-4;

/// `models/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture's expected-outputs JSON.
pub fn read_expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of numbers as `f32`.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// The `pixel_values` `[batch, channels, height, width]` of an expected-outputs JSON.
pub fn pixels(expected: &Value, device: &Device) -> Tensor<4> {
    let shape: Vec<usize> = expected["pixel_values"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    Tensor::from_data(
        TensorData::new(
            floats(&expected["pixel_values"]["values"]),
            [shape[0], shape[1], shape[2], shape[3]],
        ),
        device,
    )
}

/// A tensor's values, row-major.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// max |a − b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Asserts max |got − want| ≤ [`TOL`] and prints it.
pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_within(what, got, want, TOL);
}

/// Asserts max |got − want| ≤ `tol` and prints it.
pub fn assert_within(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let diff = max_abs_diff(got, want);
    println!("{what}: max |diff| = {diff:.2e}");
    assert!(diff <= tol, "{what}: max |diff| {diff} > {tol}");
}

/// A checkpoint's tensors as `(key, dtype, shape, bytes)`, sorted by key.
pub type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes `tensors` as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A model directory with `files` copied from `from` and `tensors` as `model.safetensors`.
pub fn model_dir_from(
    from: &Path,
    files: &[&str],
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(from.join(f), dir.path().join(f)).unwrap();
    }
    write_safetensors(&dir.path().join("model.safetensors"), tensors);
    dir
}

/// The lists and message of a [`ModelError::KeyMismatch`] from a load.
///
/// # Panics
/// If the load succeeded or failed otherwise.
pub fn key_mismatch_of<T>(
    result: Result<T, ModelError>,
) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    match result {
        Err(err @ ModelError::KeyMismatch { .. }) => {
            let message = err.to_string();
            let ModelError::KeyMismatch { missing, unexpected, invalid, .. } = err else {
                unreachable!()
            };
            (missing, unexpected, invalid, message)
        }
        Err(other) => panic!("expected KeyMismatch, got {other}"),
        Ok(_) => panic!("expected KeyMismatch, loading succeeded"),
    }
}
