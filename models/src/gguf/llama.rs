//! Llama-family decoders from GGUF: the [`LlamaConfig`] from the `{arch}.*` metadata, the
//! GGUF → HF tensor names, undoing llama.cpp's Q/K row permutation, and
//! [`LlamaForCausalLM::load_gguf`].
//!
//! # Tensor names
//!
//! | GGUF | HF / module path |
//! |---|---|
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `blk.N.attn_{q,k,v}.{weight,bias}` | `model.layers.N.self_attn.{q,k,v}_proj.*` |
//! | `blk.N.attn_output.{weight,bias}` | `model.layers.N.self_attn.o_proj.*` |
//! | `blk.N.ffn_{gate,up,down}.{weight,bias}` | `model.layers.N.mlp.{gate,up,down}_proj.*` |
//! | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
//! | `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` (absent: tied head) | `lm_head.weight` |
//!
//! # The Q/K permutation
//!
//! llama.cpp applies RoPE to interleaved pairs `(x₀, x₁), (x₂, x₃), ...` of each head, HF
//! Llama to the two halves `(xᵢ, xᵢ₊d/2)`. `convert_hf_to_gguf.py` therefore reorders the
//! rows of `q_proj` (with `num_attention_heads` heads) and `k_proj` (with
//! `num_key_value_heads` heads), weights and biases: within each head of width `d`, HF row
//! `j·d/2 + i` (half `j ∈ {0, 1}`, `i < d/2`) becomes GGUF row `2i + j`
//! (`w.reshape(heads, 2, d/2, cols).swapaxes(1, 2)`). Loading inverts it. Qwen2 GGUFs use
//! llama.cpp's NeoX RoPE (halves, like HF) and are not permuted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use burn::store::burn_pack::Error as PackError;
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, bridge};
use burn::tensor::{DType, Device, Shape, TensorData};

use super::GgufFile;
use super::dequant::{GgmlType, supported_type_names};
use crate::error::{ModelError, Result};
use crate::llama::{LlamaConfig, LlamaFamily, LlamaForCausalLM, RopeScaling, TokenIds};

/// Architectures (`general.architecture`) that load as a [`LlamaForCausalLM`].
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

fn invalid(file: &GgufFile, message: String) -> ModelError {
    ModelError::InvalidConfig { path: file.path().to_path_buf(), message }
}

fn positive(file: &GgufFile, key: &str) -> Result<usize> {
    let value = file.get_u64(key)?;
    match usize::try_from(value) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(invalid(file, format!("metadata `{key}` must be a positive size, got {value}"))),
    }
}

fn token_id(file: &GgufFile, key: &str) -> Result<Option<u32>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().and_then(|id| u32::try_from(id).ok()).map(Some).ok_or_else(|| {
            invalid(file, format!("metadata `{key}` must be a token id, got {v:?}"))
        }),
    }
}

/// The model's [`LlamaConfig`] from a GGUF file's metadata, as HF transformers derives it:
/// `{arch}.embedding_length` → `hidden_size`, `block_count` → `num_hidden_layers`,
/// `feed_forward_length` → `intermediate_size`, `attention.head_count(_kv)` →
/// `num_attention_heads` / `num_key_value_heads`, `rope.freq_base` → `rope_theta`,
/// `attention.layer_norm_rms_epsilon` → `rms_norm_eps` (the stored f32, widened),
/// `context_length` → `max_position_embeddings`; the vocabulary size is the row count of
/// `token_embd.weight`; the head is tied when there is no `output.weight`; Llama biases are
/// on when `blk.0.attn_q.bias` / `blk.0.ffn_up.bias` exist; `tokenizer.ggml.bos_token_id` /
/// `eos_token_id` give the BOS / EOS ids; `rope.scaling.type` `linear` with
/// `rope.scaling.factor` gives linear RoPE scaling.
///
/// # Errors
/// [`ModelError::Checkpoint`] for an absent or mistyped required key;
/// [`ModelError::InvalidConfig`] for an architecture other than [`SUPPORTED_ARCHITECTURES`],
/// a head width other than `rope.dimension_count` (partial RoPE), or an unsupported RoPE scaling
/// (including Llama 3's `rope_freqs.weight`); [`ModelError::ConfigValue`] for a config
/// [`LlamaConfig::validate`] rejects (its field named as in `config.json`).
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let arch = file.get_str("general.architecture")?;
    let family = match arch {
        "llama" => LlamaFamily::Llama,
        "qwen2" => LlamaFamily::Qwen2,
        other => {
            return Err(invalid(
                file,
                format!("architecture `{other}` is not supported (only llama and qwen2)"),
            ));
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = positive(file, &key("embedding_length"))?;
    let heads = positive(file, &key("attention.head_count"))?;
    let kv_heads = match file.get(&key("attention.head_count_kv")) {
        Some(_) => positive(file, &key("attention.head_count_kv"))?,
        None => heads,
    };
    let vocab = match file.tensor("token_embd.weight") {
        Some(t) if t.ne.len() == 2 => t.shape()[0],
        Some(t) => {
            return Err(invalid(file, format!("`token_embd.weight` has ne {:?}, not 2-D", t.ne)));
        }
        None => positive(file, &key("vocab_size"))?,
    };
    let mut config = LlamaConfig::new(
        vocab,
        hidden,
        positive(file, &key("feed_forward_length"))?,
        positive(file, &key("block_count"))?,
        heads,
    );
    config.model_type = family;
    config.num_key_value_heads = Some(kv_heads);
    let head_dim = match file.get(&key("attention.key_length")) {
        Some(_) => positive(file, &key("attention.key_length"))?,
        None => hidden / heads,
    };
    if let Some(v) = file.get(&key("attention.value_length"))
        && v.as_u64() != Some(head_dim as u64)
    {
        return Err(invalid(
            file,
            format!(
                "`{}` {v:?} differs from the key width {head_dim}",
                key("attention.value_length")
            ),
        ));
    }
    if head_dim * heads != hidden || file.get(&key("attention.key_length")).is_some() {
        config.head_dim = Some(head_dim);
    }
    if let Some(v) = file.get(&key("rope.dimension_count"))
        && v.as_u64() != Some(head_dim as u64)
    {
        return Err(invalid(
            file,
            format!(
                "`{}` {v:?} differs from the head width {head_dim} (partial RoPE is not supported)",
                key("rope.dimension_count")
            ),
        ));
    }
    if file.get(&key("rope.freq_base")).is_some() {
        config.rope_theta = file.get_f64(&key("rope.freq_base"))?;
    }
    if file.get(&key("attention.layer_norm_rms_epsilon")).is_some() {
        config.rms_norm_eps = file.get_f64(&key("attention.layer_norm_rms_epsilon"))?;
    }
    if file.get(&key("context_length")).is_some() {
        config.max_position_embeddings = positive(file, &key("context_length"))?;
    }
    match file.get(&key("rope.scaling.type")).map(|v| v.as_str()) {
        None | Some(Some("none")) => {}
        Some(Some("linear")) => {
            let factor = file.get_f64(&key("rope.scaling.factor"))?;
            config.rope_scaling = Some(RopeScaling::Linear { factor });
        }
        Some(other) => {
            return Err(invalid(
                file,
                format!("RoPE scaling {other:?} is not supported (only linear)"),
            ));
        }
    }
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(invalid(
            file,
            "`rope_freqs.weight` (Llama 3.1 RoPE frequency factors) is not supported".into(),
        ));
    }
    config.tie_word_embeddings = file.tensor("output.weight").is_none();
    if family == LlamaFamily::Llama {
        config.attention_bias = file.tensor("blk.0.attn_q.bias").is_some();
        config.mlp_bias = file.tensor("blk.0.ffn_up.bias").is_some();
    }
    config.bos_token_id = token_id(file, "tokenizer.ggml.bos_token_id")?.map(TokenIds::One);
    config.eos_token_id = token_id(file, "tokenizer.ggml.eos_token_id")?.map(TokenIds::One);
    config.validate().map_err(|problem| ModelError::config_value(file.path(), problem))?;
    Ok(config)
}

/// The HF name of a GGUF tensor of a Llama-family model (see the module docs), `None` for a
/// name with no HF counterpart.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (module, param) = rest.split_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    let hf = match (module, param) {
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        ("attn_norm", "weight") => "input_layernorm",
        ("ffn_norm", "weight") => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Reorders the rows of a row-major `[rows, cols]` matrix (or a bias, `cols` = 1) from
/// llama.cpp's interleaved RoPE layout back to HF's, `heads` heads of `rows / heads` rows each
/// (see the module docs). The inverse of `convert_hf_to_gguf.py`'s `permute`.
///
/// # Panics
/// If `data.len() != rows * cols` or `rows` is not a multiple of `2 · heads`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols, "unpermute_rows: data is not [rows, cols]");
    assert!(
        heads > 0 && rows.is_multiple_of(2 * heads),
        "unpermute_rows: {rows} rows, {heads} heads"
    );
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                out[hf * cols..(hf + 1) * cols]
                    .copy_from_slice(&data[gguf * cols..(gguf + 1) * cols]);
            }
        }
    }
    out
}

/// One tensor of a GGUF Llama model under its HF name, ready to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensor {
    /// HF name (= module path of [`LlamaForCausalLM`]).
    pub hf_name: String,
    /// Name in the GGUF file.
    pub gguf_name: String,
    /// HF (PyTorch) shape, e.g. `[out, in]` for a linear weight.
    pub shape: Vec<usize>,
    /// `Some(heads)` when the rows must be un-permuted (Llama `q_proj` / `k_proj`).
    pub unpermute_heads: Option<usize>,
}

impl HfTensor {
    /// The tensor's values in HF layout: dequantized, then un-permuted if needed.
    ///
    /// # Errors
    /// As [`GgufFile::dequantize`].
    pub fn read(&self, file: &GgufFile) -> Result<Vec<f32>> {
        let values = file.dequantize(&self.gguf_name)?;
        Ok(match self.unpermute_heads {
            Some(heads) => {
                let rows = self.shape[0];
                let cols = self.shape.get(1).copied().unwrap_or(1);
                unpermute_rows(&values, rows, cols, heads)
            }
            None => values,
        })
    }
}

/// The HF shape every parameter of a [`LlamaForCausalLM`] with `config` must have (the head
/// included unless tied).
pub fn expected_shapes(config: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let (d, ffn, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.num_key_value_heads() * config.head_dim();
    let mut shapes = BTreeMap::new();
    shapes.insert("model.embed_tokens.weight".to_string(), vec![vocab, d]);
    shapes.insert("model.norm.weight".to_string(), vec![d]);
    if !config.tie_word_embeddings {
        shapes.insert("lm_head.weight".to_string(), vec![vocab, d]);
    }
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>| {
            shapes.insert(format!("{p}.{name}"), shape);
        };
        add("input_layernorm.weight", vec![d]);
        add("post_attention_layernorm.weight", vec![d]);
        for (name, rows, cols) in
            [("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)]
        {
            add(&format!("self_attn.{name}.weight"), vec![rows, cols]);
            let bias = if name == "o_proj" { config.o_bias() } else { config.qkv_bias() };
            if bias {
                add(&format!("self_attn.{name}.bias"), vec![rows]);
            }
        }
        for (name, rows, cols) in
            [("gate_proj", ffn, d), ("up_proj", ffn, d), ("down_proj", d, ffn)]
        {
            add(&format!("mlp.{name}.weight"), vec![rows, cols]);
            if config.mlp_bias() {
                add(&format!("mlp.{name}.bias"), vec![rows]);
            }
        }
    }
    shapes
}

/// Every tensor of a GGUF Llama-family model under its HF name, checked against `config`
/// (from [`llama_config`]): each GGUF tensor maps to an HF parameter of the right shape and
/// every parameter is present. Sorted by HF name.
///
/// # Errors
/// [`ModelError::KeyMismatch`] listing parameters absent from the file (`missing`, HF names),
/// GGUF tensors with no place in the model (`unexpected`, GGUF names), and tensors of the wrong
/// shape (`invalid`, plus one entry for the types that cannot be dequantized, if any);
/// otherwise, when tensors have types that cannot be dequantized, one
/// [`ModelError::Checkpoint`] naming each such type, how many tensors have it and the first
/// one, and the supported types.
pub fn hf_tensors(file: &GgufFile, config: &LlamaConfig) -> Result<Vec<HfTensor>> {
    plan(file, config, &BTreeSet::new())
}

/// [`hf_tensors`], accepting any ggml type for the tensors of `skip` (they are never read).
pub(crate) fn plan(
    file: &GgufFile,
    config: &LlamaConfig,
    skip: &BTreeSet<String>,
) -> Result<Vec<HfTensor>> {
    let mut expected = expected_shapes(config);
    let permute = config.model_type == LlamaFamily::Llama;
    let mut tensors = Vec::new();
    let mut unexpected = Vec::new();
    let mut invalid = Vec::new();
    // (type, tensor count, first tensor): one line per type, however many tensors have it.
    let mut unsupported: Vec<(GgmlType, usize, String)> = Vec::new();
    for info in file.tensors() {
        let Some(hf_name) = hf_tensor_name(&info.name) else {
            unexpected.push(info.name.clone());
            continue;
        };
        let Some(shape) = expected.remove(&hf_name) else {
            unexpected.push(info.name.clone());
            continue;
        };
        if info.shape() != shape {
            invalid.push(format!(
                "{} ({hf_name}): expected HF shape {shape:?}, found {:?} (ne {:?})",
                info.name,
                info.shape(),
                info.ne
            ));
            continue;
        }
        if !info.ggml_type.is_supported() && !skip.contains(&hf_name) {
            match unsupported.iter_mut().find(|(ty, ..)| *ty == info.ggml_type) {
                Some((_, count, _)) => *count += 1,
                None => unsupported.push((info.ggml_type, 1, info.name.clone())),
            }
            continue;
        }
        let unpermute_heads = if !permute {
            None
        } else if hf_name.contains(".self_attn.q_proj.") {
            Some(config.num_attention_heads)
        } else if hf_name.contains(".self_attn.k_proj.") {
            Some(config.num_key_value_heads())
        } else {
            None
        };
        tensors.push(HfTensor { hf_name, gguf_name: info.name.clone(), shape, unpermute_heads });
    }
    let missing: Vec<String> = expected.into_keys().collect();
    if !missing.is_empty() || !unexpected.is_empty() || !invalid.is_empty() {
        if !unsupported.is_empty() {
            invalid.push(unsupported_types_message(&unsupported));
        }
        return Err(ModelError::KeyMismatch {
            path: file.path().to_path_buf(),
            missing,
            unexpected,
            invalid,
        });
    }
    if !unsupported.is_empty() {
        return Err(ModelError::Checkpoint {
            path: file.path().to_path_buf(),
            message: unsupported_types_message(&unsupported),
        });
    }
    tensors.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    Ok(tensors)
}

/// One short line for the tensors whose types cannot be dequantized: per type the count and
/// the first tensor, then the supported types (a real file has hundreds of such tensors, and
/// listing each buried the point).
fn unsupported_types_message(unsupported: &[(GgmlType, usize, String)]) -> String {
    let types: Vec<String> = unsupported
        .iter()
        .map(|(ty, count, first)| {
            let tensors = if *count == 1 { "tensor" } else { "tensors" };
            format!("{count} {tensors} of ggml type {ty} (the first `{first}`)")
        })
        .collect();
    format!("cannot dequantize {}; supported types: {}", types.join(", "), supported_type_names())
}

impl LlamaForCausalLM {
    /// Loads a Llama-family model (`general.architecture` `llama` or `qwen2`) from a GGUF
    /// file: config from the metadata ([`llama_config`]), every tensor dequantized to `f32`,
    /// un-permuted and loaded under its HF name. The logits equal those of
    /// [`load`](Self::load) on the directory [`gguf_to_hf_dir`](super::gguf_to_hf_dir) writes,
    /// and those of HF transformers' own GGUF loading.
    ///
    /// Memory: tensors are dequantized one at a time, straight into their parameter, so the
    /// peak is the `f32` model plus two or three copies of its largest tensor (the GGUF file
    /// itself is read tensor by tensor, never whole). Measured on SmolLM2-135M (Q4_1, 98 MB
    /// file, 0.54 GB in `f32`, 113 MB embedding): 0.89 GB peak RSS for the whole test process.
    ///
    /// # Errors
    /// [`ModelError::Io`] / [`ModelError::Checkpoint`] for the file, [`ModelError::InvalidConfig`]
    /// / [`ModelError::ConfigValue`] / [`ModelError::Checkpoint`] for the metadata (see
    /// [`llama_config`]),
    /// [`ModelError::KeyMismatch`] / [`ModelError::Checkpoint`] for tensors (see
    /// [`hf_tensors`]).
    pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> Result<(Self, LlamaConfig)> {
        Self::load_gguf_skipping(path, device, &BTreeSet::new())
    }

    /// [`load_gguf`](Self::load_gguf), leaving out the parameters whose module paths (HF names,
    /// e.g. `model.layers.0.self_attn.q_proj.weight`) are in `skip`: their tensors are never
    /// read or dequantized and the parameters stay unmaterialised — how an emulator is loaded
    /// on a GGUF original without its dense weights (their ggml type may even be one this
    /// module cannot dequantize), as
    /// [`Checkpoint::load_into_skipping`](crate::loading::Checkpoint::load_into_skipping) does
    /// for safetensors.
    ///
    /// # Errors
    /// As [`load_gguf`](Self::load_gguf).
    pub fn load_gguf_skipping(
        path: impl AsRef<Path>,
        device: &Device,
        skip: &BTreeSet<String>,
    ) -> Result<(Self, LlamaConfig)> {
        let file = Arc::new(GgufFile::open(path.as_ref())?);
        let config = llama_config(&file)?;
        let tensors = plan(&file, &config, skip)?;
        let mut model = config.init(config.tie_word_embeddings, device);
        let pack: Vec<_> = tensors
            .into_iter()
            .filter(|t| !skip.contains(&t.hf_name))
            .map(|t| {
                let file = Arc::clone(&file);
                let shape = Shape::from(t.shape.clone());
                bridge::deferred(t.hf_name.clone(), DType::F32, shape, None, move || {
                    let values = t.read(&file).map_err(|e| PackError::IoError(e.to_string()))?;
                    Ok(TensorData::new(values, t.shape.clone()))
                })
            })
            .collect();
        let result = model.apply(pack, None, Some(Box::new(PyTorchToBurnAdapter)), false);
        let missing: Vec<String> =
            result.missing.into_iter().map(|(p, _)| p).filter(|p| !skip.contains(p)).collect();
        let invalid: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        if !missing.is_empty() || !result.unused.is_empty() || !invalid.is_empty() {
            return Err(ModelError::KeyMismatch {
                path: file.path().to_path_buf(),
                missing,
                unexpected: result.unused,
                invalid,
            });
        }
        Ok((model, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ConfigProblem;

    /// A tensor-less GGUF (version 3) with the given metadata, each `(key, type id, value)`.
    fn gguf(metadata: &[(&str, u32, Vec<u8>)]) -> GgufFile {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend((metadata.len() as u64).to_le_bytes());
        for (key, value_type, value) in metadata {
            bytes.extend((key.len() as u64).to_le_bytes());
            bytes.extend(key.as_bytes());
            bytes.extend(value_type.to_le_bytes());
            bytes.extend(value);
        }
        GgufFile::from_bytes(bytes, "tiny.gguf").unwrap()
    }

    fn string(s: &str) -> Vec<u8> {
        [(s.len() as u64).to_le_bytes().as_slice(), s.as_bytes()].concat()
    }

    /// A tiny Llama's metadata with `extra` appended (u32 values, type 4).
    fn llama(extra: &[(&str, u32, Vec<u8>)]) -> GgufFile {
        let u32_ = |v: u32| (4u32, v.to_le_bytes().to_vec());
        let mut metadata = vec![("general.architecture", 8, string("llama"))];
        for (key, v) in [
            ("llama.embedding_length", 16),
            ("llama.attention.head_count", 4),
            ("llama.feed_forward_length", 24),
            ("llama.block_count", 2),
            ("llama.vocab_size", 32),
        ] {
            let (t, bytes) = u32_(v);
            metadata.push((key, t, bytes));
        }
        metadata.extend(extra.iter().cloned());
        gguf(&metadata)
    }

    #[test]
    fn metadata_values_the_config_rejects_are_config_values() {
        let config = llama_config(&llama(&[])).unwrap();
        assert_eq!((config.hidden_size, config.num_key_value_heads()), (16, 4));

        let kv = llama(&[("llama.attention.head_count_kv", 4, 3u32.to_le_bytes().to_vec())]);
        match llama_config(&kv) {
            Err(ModelError::ConfigValue { path, problem }) => {
                assert_eq!(path, Path::new("tiny.gguf"));
                assert_eq!(problem.field, "num_attention_heads");
                assert_eq!(
                    problem.to_string(),
                    "`num_attention_heads` 4 is not a multiple of `num_key_value_heads` 3"
                );
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        }
        // Fields are named as in `config.json`, not by their GGUF keys.
        let theta = llama(&[("llama.rope.freq_base", 6, 0.5f32.to_le_bytes().to_vec())]);
        match llama_config(&theta) {
            Err(ModelError::ConfigValue { problem, .. }) => {
                assert_eq!(problem, ConfigProblem::new("rope_theta", "0.5 must be greater than 1"));
            }
            other => panic!("expected ConfigValue, got {other:?}"),
        }
        // A metadata size of 0 is caught before the config is built, as GGUF metadata.
        let zero = llama(&[("llama.context_length", 4, 0u32.to_le_bytes().to_vec())]);
        assert!(matches!(llama_config(&zero), Err(ModelError::InvalidConfig { .. })));
    }
}
