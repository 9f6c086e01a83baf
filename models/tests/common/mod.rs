//! Helpers shared by the model tests that compare against the numpy fixtures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
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
    let diff = max_abs_diff(got, want);
    println!("{what}: max |diff| = {diff:.2e}");
    assert!(diff <= TOL, "{what}: max |diff| {diff} > {TOL}");
}
