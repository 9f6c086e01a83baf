//! Merging a PEFT adapter straight into HF safetensors files, without building the model.
//!
//! For each adapted layer `path`, the checkpoint tensor `path.weight` (or `PREFIX.path.weight`,
//! e.g. `bert.` or `model.`) in PyTorch layout `[d_out, d_in]` becomes `W + s · B A` (PEFT's
//! `lora_B` `[d_out, r]`, `lora_A` `[r, d_in]`), computed in f64 and rounded to nearest in the
//! tensor's own dtype (F32, F16 or BF16), so every tensor keeps its dtype, shape and byte range:
//! the header, the metadata and every other tensor are copied byte for byte, and a
//! `model.safetensors.index.json` beside the shards stays true. A convolution's weight
//! `[C_out, C_in, kh, kw]` takes its adapter (`lora_A` `[r, C_in, kh, kw]`, `lora_B`
//! `[C_out, r, 1, 1]`) the same way, flattened to `d_in = C_in·kh·kw`.
//!
//! The files are streamed one at a time from read-only memory maps and written one row of a
//! merged weight at a time, so the merge holds at most one input shard's pages and one row.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::atomic::write_atomic_with;
use crate::error::{EmlocError, Result};
use crate::peft::PeftAdapter;

/// What [`merge_adapter_into_safetensors`] changed.
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
/// or its shards) to `output_dir` with `adapter` merged into them.
///
/// For each adapted layer `path`, the checkpoint tensor `path.weight` (or `PREFIX.path.weight`,
/// e.g. `bert.` or `model.`) in PyTorch layout `[d_out, d_in]` becomes `W + s · B A` (PEFT's
/// `lora_B` `[d_out, r]`, `lora_A` `[r, d_in]`), computed in f64 and rounded to nearest in the
/// tensor's own dtype (F32, F16 or BF16), so every tensor keeps its dtype, shape and byte range:
/// the header, the metadata and every other tensor are copied byte for byte, and a
/// `model.safetensors.index.json` beside the shards stays true. A convolution's weight
/// `[C_out, C_in, kh, kw]` takes its adapter (`lora_A` `[r, C_in, kh, kw]`, `lora_B`
/// `[C_out, r, 1, 1]`) the same way, flattened to `d_in = C_in·kh·kw`.
///
/// The files are streamed one at a time from read-only memory maps and written one row of a
/// merged weight at a time, so the merge holds at most one input shard's pages and one row.
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
pub fn merge_adapter_into_safetensors(
    adapter: &PeftAdapter,
    input_files: &[PathBuf],
    output_dir: &Path,
) -> Result<MergedFiles> {
    adapter.validate()?;
    let patterns = adapter.config.patterns()?;
    let mut targets = Vec::new();
    for file in input_files {
        let target =
            output_dir.join(file.file_name().ok_or_else(|| st_error(file, "not a file name"))?);
        if fs::canonicalize(file).ok().is_some_and(|f| fs::canonicalize(&target).ok() == Some(f)) {
            return Err(st_error(file, "output would overwrite the input; choose another --out"));
        }
        targets.push(target);
    }

    // Locate every adapter layer's weight (file index, key) and check its shape and dtype; only
    // the headers are read.
    let (mut missing, mut misshaped) = (Vec::new(), Vec::new());
    let mut plan: HashMap<usize, Vec<(String, &str)>> = HashMap::new();
    let mut merged = Vec::new();
    {
        let maps = input_files.iter().map(|f| map(f)).collect::<Result<Vec<_>>>()?;
        let parsed = maps
            .iter()
            .zip(input_files)
            .map(|(m, file)| SafeTensors::deserialize(m).map_err(|e| st_error(file, e.to_string())))
            .collect::<Result<Vec<_>>>()?;
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
            let view = parsed[*file]
                .tensor(key)
                .map_err(|e| st_error(&input_files[*file], e.to_string()))?;
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
                    &input_files[*file],
                    format!("{key}: dtype {} cannot be merged", view.dtype()),
                ));
            }
            plan.entry(*file).or_default().push((key.to_string(), path.as_str()));
            merged.push((path.clone(), key.to_string()));
        }
    }
    if !missing.is_empty() || !misshaped.is_empty() {
        return Err(EmlocError::AdapterKeys { missing, unexpected: Vec::new(), misshaped });
    }

    fs::create_dir_all(output_dir).map_err(|e| EmlocError::io(output_dir, e))?;
    let mut files = Vec::new();
    for (index, (file, target)) in input_files.iter().zip(&targets).enumerate() {
        let bytes = map(file)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| st_error(file, e.to_string()))?;
        // The merged tensors of this file, in file order, with their byte ranges.
        let mut spans = Vec::new();
        for (key, path) in plan.get(&index).map(Vec::as_slice).unwrap_or_default() {
            let view = st.tensor(key).map_err(|e| st_error(file, e.to_string()))?;
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            spans.push((start, start + view.data().len(), key.as_str(), *path, view));
        }
        spans.sort_by_key(|s| s.0);
        // The key of a weight whose merge is not finite; the write stops there.
        let mut non_finite = None;
        write_atomic_with(target, |out| {
            let mut cursor = 0;
            for (start, end, key, path, view) in &spans {
                out.write_all(&bytes[cursor..*start])?;
                let layer = &adapter.layers[*path];
                if !write_merged(out, view, layer, patterns.scale_for(path))? {
                    non_finite = Some(key.to_string());
                    return Err(std::io::Error::other("a merged weight is not finite"));
                }
                cursor = *end;
            }
            out.write_all(&bytes[cursor..])
        })
        .map_err(|e| match non_finite.take() {
            Some(layer) => {
                EmlocError::NonFinite { layer, what: "merged weight W + s·B·A".into() }
            }
            None => e,
        })?;
        files.push(target.clone());
    }
    Ok(MergedFiles { files, merged })
}

/// A read-only memory map of `file`.
fn map(file: &Path) -> Result<memmap2::Mmap> {
    let handle = fs::File::open(file).map_err(|e| EmlocError::io(file, e))?;
    // SAFETY: the map is only read, while the merge runs; a checkpoint rewritten underneath a
    // running merge is outside what this function promises (as for every reader of mapped
    // safetensors).
    unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| EmlocError::io(file, e))
}

/// Writes `W + scale · B A` for the checkpoint weight `view` (`[d_out, d_in]`, or a
/// convolution's `[C_out, C_in, kh, kw]`) row by row, computed in f64 and rounded to the
/// weight's own dtype. `Ok(false)`, with the rows so far written, when a merged value is not
/// finite in that dtype.
fn write_merged(
    out: &mut impl Write,
    view: &TensorView<'_>,
    layer: &crate::peft::PeftLayer,
    scale: f64,
) -> std::io::Result<bool> {
    let (d_out, d_in, r) = (layer.lora_b.rows, layer.lora_a.cols, layer.lora_a.rows);
    let dtype = view.dtype();
    let width = dtype.bitsize() / 8;
    let mut row = Vec::with_capacity(d_in * width);
    for o in 0..d_out {
        row.clear();
        let weights = decode(dtype, &view.data()[o * d_in * width..(o + 1) * d_in * width]);
        for (i, w) in weights.into_iter().enumerate() {
            let delta: f64 = (0..r)
                .map(|k| f64::from(layer.lora_b.get(o, k)) * f64::from(layer.lora_a.get(k, i)))
                .sum();
            if !encode(dtype, w + scale * delta, &mut row) {
                return Ok(false);
            }
        }
        out.write_all(&row)?;
    }
    Ok(true)
}

/// Appends `value` rounded to nearest in `dtype` (F32, F16 or BF16, little-endian); false if
/// the rounded value is not finite.
fn encode(dtype: Dtype, value: f64, out: &mut Vec<u8>) -> bool {
    match dtype {
        Dtype::F32 => {
            let v = value as f32;
            out.extend_from_slice(&v.to_le_bytes());
            v.is_finite()
        }
        Dtype::BF16 => {
            let v = half::bf16::from_f64(value);
            out.extend_from_slice(&v.to_le_bytes());
            v.is_finite()
        }
        Dtype::F16 => {
            let v = half::f16::from_f64(value);
            out.extend_from_slice(&v.to_le_bytes());
            v.is_finite()
        }
        other => unreachable!("dtype {other} is rejected before merging"),
    }
}

/// The values of little-endian F32/F16/BF16 bytes as f64.
fn decode(dtype: Dtype, data: &[u8]) -> Vec<f64> {
    match dtype {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::matrix::Matrix;
    use crate::peft::{PeftConfig, PeftLayer};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + seed * 13) as f32 * 0.37).sin()).collect()
    }

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()
    }

    /// A two-shard checkpoint: a bf16 weight and embedding in the first shard, an f16 weight
    /// and an f32 norm in the second, with its index; merging keeps every dtype, the headers
    /// and the untouched tensors byte for byte, rounds each merged value to within half a unit
    /// in the last place of the f64 result, and keeps the index true.
    #[test]
    fn sharded_bf16_checkpoint_merges_shard_by_shard_in_its_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let (d_out, d_in, r) = (8, 6, 2);
        let w0 = values(d_out * d_in, 1);
        let w1 = values(d_out * d_in, 2);
        let f16_bytes: Vec<u8> =
            w1.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let norm: Vec<u8> = values(d_in, 3).iter().flat_map(|x| x.to_le_bytes()).collect();
        let embed = bf16_bytes(&values(10 * d_in, 4));
        let shards = [
            vec![
                ("model.layers.0.q_proj.weight", Dtype::BF16, vec![d_out, d_in], bf16_bytes(&w0)),
                ("model.embed_tokens.weight", Dtype::BF16, vec![10, d_in], embed),
            ],
            vec![
                ("model.layers.1.q_proj.weight", Dtype::F16, vec![d_out, d_in], f16_bytes),
                ("model.norm.weight", Dtype::F32, vec![d_in], norm),
            ],
        ];
        let mut files = Vec::new();
        let mut index = serde_json::Map::new();
        for (i, tensors) in shards.iter().enumerate() {
            let name = format!("model-0000{}-of-00002.safetensors", i + 1);
            let views = tensors.iter().map(|(k, dt, shape, bytes)| {
                (*k, TensorView::new(*dt, shape.clone(), bytes).unwrap())
            });
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            let bytes = safetensors::serialize(views, Some(meta)).unwrap();
            fs::write(dir.path().join(&name), bytes).unwrap();
            for (k, ..) in tensors {
                index.insert(k.to_string(), name.clone().into());
            }
            files.push(dir.path().join(name));
        }

        let matrix = |rows, cols, seed| Matrix::new(rows, cols, values(rows * cols, seed));
        let mut layers = BTreeMap::new();
        layers.insert(
            "layers.0.q_proj".to_string(),
            PeftLayer::new(matrix(r, d_in, 5), matrix(d_out, r, 6)),
        );
        layers.insert(
            "layers.1.q_proj".to_string(),
            PeftLayer::new(matrix(r, d_in, 7), matrix(d_out, r, 8)),
        );
        let adapter =
            PeftAdapter { config: PeftConfig::new(r, 4.0, vec!["q_proj".into()]), layers };
        let out = dir.path().join("merged");
        let merged = merge_adapter_into_safetensors(&adapter, &files, &out).unwrap();
        assert_eq!(merged.merged.len(), 2);

        for (file, tensors) in files.iter().zip(&shards) {
            let before = fs::read(file).unwrap();
            let after = fs::read(out.join(file.file_name().unwrap())).unwrap();
            assert_eq!(before.len(), after.len(), "same dtypes, same sizes");
            let header = 8 + u64::from_le_bytes(before[..8].try_into().unwrap()) as usize;
            assert_eq!(before[..header], after[..header], "header and metadata kept");
            let st = SafeTensors::deserialize(&after).unwrap();
            for (key, dtype, shape, bytes) in tensors {
                let view = st.tensor(key).unwrap();
                assert_eq!((view.dtype(), view.shape()), (*dtype, shape.as_slice()), "{key}");
                let Some(layer) = key
                    .strip_prefix("model.")
                    .and_then(|k| k.strip_suffix(".weight"))
                    .and_then(|p| adapter.layers.get(p))
                else {
                    assert_eq!(view.data(), bytes.as_slice(), "{key} copied byte for byte");
                    continue;
                };
                let (w, got) = (decode(*dtype, bytes), decode(*dtype, view.data()));
                let mantissa = if *dtype == Dtype::BF16 { 8 } else { 11 };
                let scale = 4.0 / r as f64;
                for (i, (w, got)) in w.iter().zip(&got).enumerate() {
                    let (o, j) = (i / d_in, i % d_in);
                    let delta: f64 = (0..r)
                        .map(|k| {
                            f64::from(layer.lora_b.get(o, k)) * f64::from(layer.lora_a.get(k, j))
                        })
                        .sum();
                    let exact = w + scale * delta;
                    let half_ulp = exact.abs() * 2f64.powi(-mantissa) + 1e-30;
                    assert!((got - exact).abs() <= half_ulp, "{key}[{i}]: {got} vs {exact}");
                }
            }
        }
        // The index (copied by `emloc merge`) still names the right shard for every key.
        for (key, shard) in &index {
            let bytes = fs::read(out.join(shard.as_str().unwrap())).unwrap();
            assert!(SafeTensors::deserialize(&bytes).unwrap().tensor(key).is_ok(), "{key}");
        }
    }
}
