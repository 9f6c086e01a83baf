//! `adapter_model.safetensors`: decoding the LoRA factors (f32, f16, bf16) into layers and
//! checking them against the configuration's ranks.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::*;
use crate::error::Result;
use crate::matrix::Matrix;

/// Decodes the weights file into layers, checking them against `config`'s ranks.
pub(super) fn parse_weights(
    bytes: &[u8],
    weights_path: &Path,
    config: &PeftConfig,
) -> Result<BTreeMap<String, PeftLayer>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| safetensors_error(weights_path, e.to_string()))?;
    let mut tensors = st.tensors();
    if tensors.is_empty() {
        return Err(safetensors_error(weights_path, "contains no tensors"));
    }
    // Sorted so that the first error reported is the same on every run.
    tensors.sort_by(|x, y| x.0.cmp(&y.0));

    let patterns = config.patterns()?;
    // Each factor with its kernel: `Some([kh, kw])` for a 4-D `lora_A`, `Some([1, 1])` for a
    // 4-D `lora_B`.
    type Half = Option<(Matrix, Option<[usize; 2]>)>;
    let mut halves: BTreeMap<&str, (Half, Half)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    // PEFT saves modules_to_save copies as `<path>.modules_to_save.<name>` tensors.
    if let Some((key, _)) = tensors.iter().find(|(key, _)| key.contains("modules_to_save")) {
        return Err(EmlocError::UnsupportedPeftFeature {
            path: weights_path.to_owned(),
            feature: "modules_to_save".to_owned(),
            value: key.clone(),
        });
    }
    for (key, view) in &tensors {
        let Some((path, factor)) = parse_key(key) else {
            unexpected.push(key.clone());
            continue;
        };
        let matrix = decode_factor(key, view, weights_path, patterns.rank_for(path), factor)?;
        let slot = halves.entry(path).or_default();
        match factor {
            Factor::A => slot.0 = Some(matrix),
            Factor::B => slot.1 = Some(matrix),
        }
    }

    let (mut missing, mut wrong) = (Vec::new(), Vec::new());
    let mut layers = BTreeMap::new();
    for (path, (a, b)) in halves {
        let rank = patterns.rank_for(path);
        if let Some((a, kernel)) = &a
            && a.rows != rank
        {
            let found = factor_shape(Factor::A, a.rows, a.cols, *kernel);
            let mut expected = found.clone();
            expected[0] = rank;
            wrong.push(misshaped(&lora_a_key(path), expected, found));
        }
        if let Some((b, kernel)) = &b
            && b.cols != rank
        {
            let found = factor_shape(Factor::B, b.rows, b.cols, *kernel);
            let mut expected = found.clone();
            expected[1] = rank;
            wrong.push(misshaped(&lora_b_key(path), expected, found));
        }
        match (a, b) {
            // A convolution's factors are both 4-D, a linear layer's both 2-D.
            (Some((lora_a, a_kernel)), Some((lora_b, b_kernel)))
                if a_kernel.is_some() != b_kernel.is_some() =>
            {
                let b_found = factor_shape(Factor::B, lora_b.rows, lora_b.cols, b_kernel);
                let b_expected = factor_shape(Factor::B, lora_b.rows, lora_b.cols, a_kernel);
                wrong.push(format!(
                    "{}: expected {b_expected:?} for the {}-D lora_A {:?}, found {b_found:?}",
                    lora_b_key(path),
                    if a_kernel.is_some() { 4 } else { 2 },
                    factor_shape(Factor::A, lora_a.rows, lora_a.cols, a_kernel),
                ));
            }
            (Some((lora_a, kernel_size)), Some((lora_b, _))) => {
                layers.insert(path.to_owned(), PeftLayer { lora_a, lora_b, kernel_size });
            }
            (Some(_), None) => missing.push(lora_b_key(path)),
            (None, Some(_)) => missing.push(lora_a_key(path)),
            (None, None) => {}
        }
    }
    key_problems(missing, unexpected, wrong)?;

    for (path, layer) in &layers {
        for (m, factor) in [(&layer.lora_a, Factor::A), (&layer.lora_b, Factor::B)] {
            if !m.is_finite() {
                return Err(EmlocError::NonFinite {
                    layer: path.clone(),
                    what: factor.name().to_owned(),
                });
            }
        }
    }
    Ok(layers)
}

/// Converts one factor, a 2-D tensor or a convolution's 4-D kernel (`lora_A`
/// `[r, C_in, kh, kw]`, `lora_B` `[C_out, r, 1, 1]`), to an `f32` matrix (`[r, C_in·kh·kw]`,
/// `[C_out, r]`) and the kernel size it had (`[1, 1]` for a 4-D `lora_B`).
pub(super) fn decode_factor(
    key: &str,
    view: &TensorView<'_>,
    weights_path: &Path,
    rank: usize,
    factor: Factor,
) -> Result<(Matrix, Option<[usize; 2]>)> {
    let shape = view.shape();
    let (rows, cols, kernel) = match (factor, shape) {
        (_, &[rows, cols]) => (rows, cols, None),
        (Factor::A, &[rows, channels, kh, kw]) => {
            (rows, channels.saturating_mul(kh).saturating_mul(kw), Some([kh, kw]))
        }
        (Factor::B, &[rows, cols, 1, 1]) => (rows, cols, Some([1, 1])),
        (Factor::B, &[rows, cols, _, _]) => {
            return Err(EmlocError::ShapeMismatch {
                name: key.to_owned(),
                expected: vec![rows, cols, 1, 1],
                found: shape.to_vec(),
            });
        }
        _ => {
            // Best guess at the intended 2-D shape, so the message shows what was expected.
            let other = match factor {
                Factor::A => shape.last(),
                Factor::B => shape.first(),
            }
            .copied()
            .unwrap_or(0);
            let expected = match factor {
                Factor::A => vec![rank, other],
                Factor::B => vec![other, rank],
            };
            return Err(EmlocError::ShapeMismatch {
                name: key.to_owned(),
                expected,
                found: shape.to_vec(),
            });
        }
    };
    let data = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => {
            data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Dtype::F16 => {
            data.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        Dtype::BF16 => {
            data.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        other => {
            return Err(safetensors_error(
                weights_path,
                format!("{key}: dtype {other} is not supported (expected F32, F16 or BF16)"),
            ));
        }
    };
    // safetensors validates offsets against shape and dtype; re-check so Matrix::new cannot panic.
    if Some(data.len()) != rows.checked_mul(cols) {
        return Err(safetensors_error(
            weights_path,
            format!("{key}: {} values for shape {shape:?}", data.len()),
        ));
    }
    Ok((Matrix::new(rows, cols, data), kernel))
}

/// IEEE binary16 to binary32; exact for every input, NaN payloads kept.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x03ff);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: mantissa * 2^-24, exact in f32.
            let magnitude = mantissa as f32 / 16_777_216.0;
            return if sign == 0 { magnitude } else { -magnitude };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mantissa << 13),
        _ => sign | ((exponent + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 is the upper half of an f32.
pub(super) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}
