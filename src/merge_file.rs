//! Merging a PEFT adapter straight into HF safetensors files, without building the model.
//!
//! For each adapted layer `path`, the checkpoint tensor `path.weight` (or `PREFIX.path.weight`,
//! e.g. `bert.` or `model.`) in PyTorch layout `[d_out, d_in]` becomes `W + s · B A` (PEFT's
//! `lora_B` `[d_out, r]`, `lora_A` `[r, d_in]`), computed in f64 and written as F32. A
//! convolution's weight `[C_out, C_in, kh, kw]` takes its adapter (`lora_A` `[r, C_in, kh, kw]`,
//! `lora_B` `[C_out, r, 1, 1]`) the same way, flattened to `d_in = C_in·kh·kw`. Every other
//! tensor is copied byte for byte, with its dtype, and the file metadata is kept.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::atomic::write_atomic;
use crate::error::{EmlocError, Result};
use crate::peft::PeftAdapter;

/// What [`merge_into_safetensors`] changed.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedFiles {
    /// The files written, one per input file, same names, in `output_dir`.
    pub files: Vec<PathBuf>,
    /// Checkpoint key of every merged weight, per adapter layer path.
    pub merged: Vec<(String, String)>,
}

fn st_error(path: &Path, message: impl Into<String>) -> EmlocError {
    EmlocError::Safetensors { path: path.to_path_buf(), message: message.into() }
}

/// Finds the checkpoint key of layer `path`'s weight: `path.weight` or `*.path.weight`.
fn weight_key<'a>(keys: impl Iterator<Item = &'a str>, path: &str) -> Vec<&'a str> {
    let exact = format!("{path}.weight");
    let suffix = format!(".{exact}");
    keys.filter(|k| *k == exact || k.ends_with(&suffix)).collect()
}

/// Writes `input_files` (the safetensors files of one HF checkpoint, e.g. `model.safetensors`
/// or its shards) to `output_dir` with `adapter` merged into them; see the [module docs](self).
///
/// Everything is checked before anything is written: the headers, that each adapter layer's
/// weight is exactly one F32/F16/BF16 `[d_out, d_in]` (convolution: `[C_out, C_in, kh, kw]`)
/// tensor across the files, and that the
/// adapter's shapes fit. Each output file is written atomically; an output path equal to its
/// input is refused.
///
/// # Errors
/// [`EmlocError::Io`], [`EmlocError::Safetensors`] for unparsable files or unsupported dtypes,
/// [`EmlocError::AdapterKeys`] listing every adapter layer with no (or an ambiguous) weight
/// and every mis-shaped one; [`EmlocError::NonFinite`] naming the checkpoint key of a merged
/// weight that holds NaN or infinity (files written before it stay; write into a fresh
/// directory and discard it on error, as `emloc merge` does).
pub fn merge_into_safetensors(
    adapter: &PeftAdapter,
    input_files: &[PathBuf],
    output_dir: &Path,
) -> Result<MergedFiles> {
    adapter.validate()?;
    let patterns = adapter.config.patterns()?;
    let mut contents = Vec::new();
    for file in input_files {
        let target =
            output_dir.join(file.file_name().ok_or_else(|| st_error(file, "not a file name"))?);
        if fs::canonicalize(file).ok().is_some_and(|f| fs::canonicalize(&target).ok() == Some(f)) {
            return Err(st_error(file, "output would overwrite the input; choose another --out"));
        }
        contents.push((file.clone(), target, fs::read(file).map_err(|e| EmlocError::io(file, e))?));
    }
    let parsed = contents
        .iter()
        .map(|(file, _, bytes)| {
            SafeTensors::deserialize(bytes).map_err(|e| st_error(file, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;

    // Locate every adapter layer's weight (file index, key) and check its shape.
    let (mut missing, mut misshaped) = (Vec::new(), Vec::new());
    let mut plan: HashMap<(usize, String), &str> = HashMap::new();
    let mut merged = Vec::new();
    for (path, layer) in &adapter.layers {
        let hits: Vec<(usize, &str)> = parsed
            .iter()
            .enumerate()
            .flat_map(|(i, st)| {
                weight_key(st.names().into_iter(), path).into_iter().map(move |k| (i, k))
            })
            .collect();
        let [(file, key)] = hits.as_slice() else {
            missing.push(if hits.is_empty() {
                format!("{path}.weight")
            } else {
                format!(
                    "{path}.weight (ambiguous: {:?})",
                    hits.iter().map(|h| h.1).collect::<Vec<_>>()
                )
            });
            continue;
        };
        let view =
            parsed[*file].tensor(key).map_err(|e| st_error(&contents[*file].0, e.to_string()))?;
        let (d_out, d_in) = (layer.lora_b.rows, layer.lora_a.cols);
        let expected = match layer.kernel_size {
            Some([kh, kw]) => vec![d_out, d_in / (kh * kw).max(1), kh, kw],
            None => vec![d_out, d_in],
        };
        if view.shape() != expected {
            misshaped.push(format!(
                "{key}: adapter needs {expected:?}, checkpoint has {:?}",
                view.shape()
            ));
            continue;
        }
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(st_error(
                &contents[*file].0,
                format!("{key}: dtype {} cannot be merged", view.dtype()),
            ));
        }
        plan.insert((*file, key.to_string()), path.as_str());
        merged.push((path.clone(), key.to_string()));
    }
    if !missing.is_empty() || !misshaped.is_empty() {
        return Err(EmlocError::AdapterKeys { missing, unexpected: Vec::new(), misshaped });
    }

    fs::create_dir_all(output_dir).map_err(|e| EmlocError::io(output_dir, e))?;
    let mut files = Vec::new();
    for (index, ((file, target, bytes), st)) in contents.iter().zip(&parsed).enumerate() {
        let mut merged_bytes: HashMap<String, Vec<u8>> = HashMap::new();
        for name in st.names() {
            let Some(path) = plan.get(&(index, name.to_string())) else { continue };
            let view = st.tensor(name).map_err(|e| st_error(file, e.to_string()))?;
            let layer = &adapter.layers[*path];
            let scale = patterns.scale_for(path);
            let (d_out, d_in, r) = (layer.lora_b.rows, layer.lora_a.cols, layer.lora_a.rows);
            let weights = decode(&view);
            let mut out = Vec::with_capacity(d_out * d_in * 4);
            for o in 0..d_out {
                for i in 0..d_in {
                    let delta: f64 = (0..r)
                        .map(|k| {
                            f64::from(layer.lora_b.get(o, k)) * f64::from(layer.lora_a.get(k, i))
                        })
                        .sum();
                    let value = (weights[o * d_in + i] + scale * delta) as f32;
                    if !value.is_finite() {
                        return Err(EmlocError::NonFinite {
                            layer: name.to_string(),
                            what: "merged weight W + s·B·A".into(),
                        });
                    }
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            merged_bytes.insert(name.to_string(), out);
        }
        let (_, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| st_error(file, e.to_string()))?;
        let mut names = st.names();
        names.sort();
        let views = names
            .iter()
            .map(|name| {
                let view = st.tensor(name).map_err(|e| st_error(file, e.to_string()))?;
                let out = match merged_bytes.get(*name) {
                    Some(m) => TensorView::new(Dtype::F32, view.shape().to_vec(), m),
                    None => TensorView::new(view.dtype(), view.shape().to_vec(), view.data()),
                };
                out.map(|v| (*name, v)).map_err(|e| st_error(file, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let serialized = safetensors::serialize(views, metadata.metadata().clone())
            .map_err(|e| st_error(target, e.to_string()))?;
        write_atomic(target, &serialized)?;
        files.push(target.clone());
    }
    Ok(MergedFiles { files, merged })
}

/// The values of an F32/F16/BF16 tensor as f64.
fn decode(view: &TensorView<'_>) -> Vec<f64> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f64::from(f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f64::from(crate::peft::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        other => unreachable!("dtype {other} is rejected before decoding"),
    }
}
