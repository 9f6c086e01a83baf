//! ggml storage types and their dequantization to `f32`.
//!
//! Supported: `F32`, `F16`, `BF16`, `Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q4_K`, `Q5_K`,
//! `Q6_K` ([`SUPPORTED_TYPES`]). The results equal
//! the `gguf` Python package's `gguf.quants.dequantize` bit for bit: every block's scales are
//! converted from f16 to f32 exactly, and the f32 products and sums are formed in the same order
//! as its numpy code (no fused multiply-add):
//!
//! | type | block | bytes | value |
//! |---|---|---|---|
//! | `Q8_0` | 32 | 34 | `f32(d) · q`, `q: i8` |
//! | `Q4_0` | 32 | 18 | `f32(d) · (q − 8)`, nibbles low halves first |
//! | `Q4_1` | 32 | 20 | `f32(d) · q + f32(m)` |
//! | `Q5_0` | 32 | 22 | `f32(d) · (q − 16)`, `q` = nibble `\| (bit e of u32 qh) << 4` |
//! | `Q5_1` | 32 | 24 | `f32(d) · q + f32(m)`, 5-bit `q` as `Q5_0` |
//! | `Q4_K` | 256 | 144 | `(f32(d)·sc) · q − (f32(dmin)·m)`, 8 sub-blocks with 6-bit `sc`, `m` |
//! | `Q5_K` | 256 | 176 | as `Q4_K`, `q` = nibble `\| (bit j of qh[l]) << 4` in sub-block `j` |
//! | `Q6_K` | 256 | 210 | `(f32(d)·scale) · (q − 32)`, 16 sub-blocks with `i8` scales |

use std::fmt;

use half::f16;

/// A ggml tensor storage type (`GGMLQuantizationType`), by its id in the file.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half (id 1).
    F16,
    /// 4-bit, one f16 scale per 32 (id 2).
    Q4_0,
    /// 4-bit, f16 scale and minimum per 32 (id 3).
    Q4_1,
    /// 5-bit, one f16 scale per 32 (id 6).
    Q5_0,
    /// 5-bit, f16 scale and minimum per 32 (id 7).
    Q5_1,
    /// 8-bit, one f16 scale per 32 (id 8).
    Q8_0,
    /// 8-bit with sums (id 9; not dequantized).
    Q8_1,
    /// 2-bit k-quant (id 10; not dequantized).
    Q2_K,
    /// 3-bit k-quant (id 11; not dequantized).
    Q3_K,
    /// 4-bit k-quant, 256-value super-blocks (id 12).
    Q4_K,
    /// 5-bit k-quant, 256-value super-blocks (id 13).
    Q5_K,
    /// 6-bit k-quant, 256-value super-blocks (id 14).
    Q6_K,
    /// 8-bit k-quant (id 15; not dequantized).
    Q8_K,
    /// 8-bit integer (id 24; not dequantized).
    I8,
    /// 16-bit integer (id 25; not dequantized).
    I16,
    /// 32-bit integer (id 26; not dequantized).
    I32,
    /// 64-bit integer (id 27; not dequantized).
    I64,
    /// 64-bit float (id 28; not dequantized).
    F64,
    /// bfloat16 (id 30).
    BF16,
    /// Any other id (IQ*, TQ*, MXFP4, ... or not a ggml type at all).
    Other(u32),
}

impl GgmlType {
    /// The type with id `id`.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// The type's id in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::BF16 => 30,
            Self::Other(id) => id,
        }
    }

    /// `(elements per block, bytes per block)` (ggml's `GGML_QUANT_SIZES`), `None` for
    /// [`Other`](Self::Other).
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 | Self::I32 => (1, 4),
            Self::F16 | Self::BF16 | Self::I16 => (1, 2),
            Self::I8 => (1, 1),
            Self::I64 | Self::F64 => (1, 8),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::Q8_K => (256, 292),
            Self::Other(_) => return None,
        })
    }

    /// Elements per block, `None` for [`Other`](Self::Other).
    pub fn block_size(self) -> Option<usize> {
        self.block_layout().map(|(b, _)| b)
    }

    /// Bytes taken by `n_elements` values (`None` for an unknown layout, for a count that is
    /// not a whole number of blocks, or on overflow).
    pub fn byte_len(self, n_elements: u64) -> Option<u64> {
        let (block, bytes) = self.block_layout()?;
        let (block, bytes) = (block as u64, bytes as u64);
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(bytes)
    }

    /// Whether [`dequantize`] handles the type (one of [`SUPPORTED_TYPES`]).
    pub fn is_supported(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }
}

/// The types [`dequantize`] handles, in id order (error messages list them).
pub const SUPPORTED_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::BF16,
];

/// [`SUPPORTED_TYPES`] as a comma-separated list of names, for messages.
pub(crate) fn supported_type_names() -> String {
    SUPPORTED_TYPES.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(id) => write!(f, "{id} (unknown)"),
            known => write!(f, "{known:?} ({})", known.id()),
        }
    }
}

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[i], bytes[i + 1]]).to_f32()
}

/// Dequantizes `bytes` of type `ty` to `f32` values (as many as the blocks hold), bit for bit
/// as `gguf.quants.dequantize`.
///
/// # Errors
/// A message if the type is not supported ([`GgmlType::is_supported`]) or `bytes` is not a
/// whole number of blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !ty.is_supported() {
        return Err(format!(
            "ggml type {ty} cannot be dequantized (supported: {})",
            supported_type_names()
        ));
    }
    let (block, size) = ty.block_layout().expect("supported types have a layout");
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes are not a whole number of {ty:?} blocks of {size} bytes",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / size * block);
    let blocks = bytes.chunks_exact(size);
    match ty {
        GgmlType::F32 => {
            out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        GgmlType::F16 => out.extend(blocks.map(|b| f16_at(b, 0))),
        // numpy's `(int16 << 16).view(float32)`: the bits as they are (half's `to_f32` would
        // quiet a signalling NaN).
        GgmlType::BF16 => {
            out.extend(
                blocks.map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
            );
        }
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 0x0F) as i8 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i8 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * (q & 0x0F) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        // Element e of a block: low 4 bits from qs[e % 16] (low nibbles first), bit 4 from bit e
        // of the little-endian u32 qh.
        GgmlType::Q5_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                out.extend((0..32).map(|e| d * (q5(qs, qh, e) as i8 - 16) as f32));
            }
        }
        GgmlType::Q5_1 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..24];
                out.extend((0..32).map(|e| d * q5(qs, qh, e) as f32 + m));
            }
        }
        GgmlType::Q4_K => {
            for b in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let (sc, m) = q4_k_scale_min(&b[4..16]);
                let qs = &b[16..144];
                // Sub-block j = 2c + s takes nibble s (low, then high) of qs[32c .. 32c + 32].
                for j in 0..8 {
                    let (c, shift) = (j / 2, 4 * (j % 2));
                    let scale = d * sc[j] as f32;
                    let offset = dmin * m[j] as f32;
                    out.extend(
                        qs[32 * c..32 * c + 32]
                            .iter()
                            .map(|&q| scale * ((q >> shift) & 0x0F) as f32 - offset),
                    );
                }
            }
        }
        GgmlType::Q5_K => {
            for b in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let (sc, m) = q4_k_scale_min(&b[4..16]);
                let (qh, qs) = (&b[16..48], &b[48..176]);
                // As Q4_K; element l of sub-block j takes bit j of qh[l] as its fifth bit.
                for j in 0..8 {
                    let (c, shift) = (j / 2, 4 * (j % 2));
                    let scale = d * sc[j] as f32;
                    let offset = dmin * m[j] as f32;
                    out.extend(qs[32 * c..32 * c + 32].iter().zip(qh).map(|(&q, &h)| {
                        let q = ((q >> shift) & 0x0F) | (((h >> j) & 1) << 4);
                        scale * q as f32 - offset
                    }));
                }
            }
        }
        GgmlType::Q6_K => {
            for b in blocks {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                let start = out.len();
                // Element e = 128c + r (c = half, r in 0..128): low 4 bits from
                // ql[64c + r % 64] >> 4·(r / 64), high 2 bits from qh[32c + r % 32] >> 2·(r / 32).
                for e in 0..256 {
                    let (c, r) = (e / 128, e % 128);
                    let lo = (ql[64 * c + r % 64] >> (4 * (r / 64))) & 0x0F;
                    let hi = (qh[32 * c + r % 32] >> (2 * (r / 32))) & 0x03;
                    let q = (lo | (hi << 4)) as i8 - 32;
                    let scale = d * (scales[e / 16] as i8) as f32;
                    out.push(scale * q as f32);
                }
                debug_assert_eq!(out.len() - start, 256);
            }
        }
        _ => unreachable!("checked by is_supported"),
    }
    Ok(out)
}

/// The 5-bit quant of element `e` (0..32) of a Q5_0 / Q5_1 block.
fn q5(qs: &[u8], qh: u32, e: usize) -> u8 {
    let low = (qs[e % 16] >> (4 * (e / 16))) & 0x0F;
    low | ((((qh >> e) & 1) as u8) << 4)
}

/// Unpacks Q4_K's (and Q5_K's) 12 bytes of 6-bit scales and mins (ggml's `get_scale_min_k4`).
fn q4_k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (d, m, md) = (&s[0..4], &s[4..8], &s[8..12]);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for i in 0..4 {
        sc[i] = d[i] & 0x3F;
        sc[i + 4] = (md[i] & 0x0F) | ((d[i] >> 2) & 0x30);
        mn[i] = m[i] & 0x3F;
        mn[i + 4] = (md[i] >> 4) | ((m[i] >> 2) & 0x30);
    }
    (sc, mn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for i in 0..32 {
            b[2 + i] = (i as i8 - 16) as u8;
        }
        let v = dequantize(GgmlType::Q8_0, &b).unwrap();
        assert_eq!(v.len(), 32);
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
    }

    #[test]
    fn partial_block_and_unsupported_are_errors() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33]).is_err());
        let err = dequantize(GgmlType::Q2_K, &[0u8; 84]).unwrap_err();
        assert!(err.contains("Q2_K (10)") && err.contains("Q5_0, Q5_1"), "{err}");
        assert!(dequantize(GgmlType::Other(99), &[]).is_err());
    }

    #[test]
    fn q5_0_and_q5_1_blocks() {
        // d = 0.5 (m = -1 for Q5_1); qs nibbles 0..15 twice, qh sets the fifth bit of the odd
        // elements: q_e = e for e < 16 with odd ones + 16, likewise for 16..32.
        let mut qs = [0u8; 16];
        for (i, q) in qs.iter_mut().enumerate() {
            *q = (i as u8) | ((15 - i as u8) << 4);
        }
        let qh = 0xAAAA_AAAAu32.to_le_bytes();
        let q = |e: usize| {
            let low = if e < 16 { e } else { 15 - (e - 16) };
            (low + 16 * (e % 2)) as f32
        };
        let half = f16::from_f32(0.5).to_le_bytes();
        let b0 = [&half[..], &qh, &qs].concat();
        let v = dequantize(GgmlType::Q5_0, &b0).unwrap();
        assert_eq!(v, (0..32).map(|e| 0.5 * (q(e) - 16.0)).collect::<Vec<_>>());
        let b1 = [&half[..], &f16::from_f32(-1.0).to_le_bytes(), &qh, &qs].concat();
        let v = dequantize(GgmlType::Q5_1, &b1).unwrap();
        assert_eq!(v, (0..32).map(|e| 0.5 * q(e) - 1.0).collect::<Vec<_>>());
    }

    #[test]
    fn byte_len_overflow_is_none() {
        assert_eq!(GgmlType::Q8_0.byte_len(u64::MAX / 32 * 32), None);
        assert_eq!(GgmlType::Q4_K.byte_len(100), None);
        assert_eq!(GgmlType::Q4_K.byte_len(512), Some(288));
    }
}
