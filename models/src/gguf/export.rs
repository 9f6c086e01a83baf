//! [`gguf_to_hf_dir`]: a GGUF Llama-family model written out as a standard HF model directory
//! (what `emloc merge` and every HF-directory loader take).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::GgufFile;
use super::llama::{hf_tensors, llama_config};
use super::tokenizer::{GgufTokenizerInfo, tokenizer_json};
use crate::error::{ModelError, Result};
use crate::llama::{LlamaConfig, LlamaFamily};
use crate::loading::SAFETENSORS_FILE;

/// What [`gguf_to_hf_dir`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct HfExport {
    /// The directory written.
    pub dir: PathBuf,
    /// The model's config (as written to `config.json`).
    pub config: LlamaConfig,
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// Whether the tokenizer files (`tokenizer.json`, `tokenizer_config.json`) were written:
    /// `false` when the file has no tokenizer or one [`tokenizer_json`] does not support
    /// (SentencePiece `llama`), whose reason is then in [`tokenizer_skipped`](Self::tokenizer_skipped).
    pub tokenizer_written: bool,
    /// Why no tokenizer was written.
    pub tokenizer_skipped: Option<String>,
}

/// Writes the Llama-family model of a GGUF file as an HF directory `out_dir`:
///
/// - `config.json`: the [`LlamaConfig`] of [`llama_config`] with HF's field names, plus
///   `architectures`, `torch_dtype: "float32"` and `tie_word_embeddings`;
/// - `model.safetensors`: every tensor dequantized to `F32` under its HF name, in PyTorch
///   layout (`[out, in]`) with the Q/K permutation undone;
/// - `tokenizer.json` (built as [`tokenizer_json`]) and `tokenizer_config.json` (chat
///   template, BOS / EOS / UNK / PAD strings) when the tokenizer is supported;
/// - `generation_config.json`: BOS, PAD and the EOS ids (the end-of-turn token too, e.g.
///   `<|im_end|>`, when the chat template uses it).
///
/// [`LlamaForCausalLM::load`](crate::llama::LlamaForCausalLM::load) on the result gives the
/// same model as [`LlamaForCausalLM::load_gguf`](crate::llama::LlamaForCausalLM::load_gguf).
/// Tensors are dequantized and written one at a time (memory: the largest tensor, not the
/// model; SmolLM2-135M: 0.25 GB peak RSS including its tokenizer, for a 0.54 GB
/// `model.safetensors`). Everything is written into a temporary directory beside `out_dir`, renamed into
/// place at the end, so `out_dir` either appears complete or not at all.
///
/// # Errors
/// [`ModelError::Io`] if `out_dir` already exists (kind `AlreadyExists`) or writing fails (the
/// temporary directory is removed); the errors of [`llama_config`] and [`hf_tensors`] for the
/// file; [`ModelError::Tokenizer`] for malformed tokenizer metadata.
pub fn gguf_to_hf_dir(gguf_path: impl AsRef<Path>, out_dir: impl AsRef<Path>) -> Result<HfExport> {
    let out_dir = out_dir.as_ref();
    if out_dir.exists() {
        return Err(ModelError::io(
            out_dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory already exists",
            ),
        ));
    }
    let file = GgufFile::open(gguf_path.as_ref())?;
    let config = llama_config(&file)?;
    let tensors = hf_tensors(&file, &config)?;
    let tokenizer = match GgufTokenizerInfo::from_gguf(&file) {
        Ok(info) => match tokenizer_json(&file) {
            Ok(json) => Ok((info, json)),
            Err(ModelError::Tokenizer { message, .. }) if info.is_unsupported_model() => {
                Err(message)
            }
            Err(e) => return Err(e),
        },
        Err(ModelError::Tokenizer { message, .. })
            if file.get("tokenizer.ggml.model").is_none() =>
        {
            Err(message)
        }
        Err(e) => return Err(e),
    };

    let name = out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = (|| -> Result<()> {
        write_json(&tmp.join("config.json"), &config_json(&config))?;
        write_safetensors(&tmp.join(SAFETENSORS_FILE), &file, &tensors)?;
        let mut generation = Map::new();
        generation.insert("_from_model_config".into(), json!(true));
        if let Ok((info, json)) = &tokenizer {
            write_json(&tmp.join("tokenizer.json"), json)?;
            write_json(&tmp.join("tokenizer_config.json"), &info.tokenizer_config_json())?;
            if let Some(bos) = &info.bos {
                generation.insert("bos_token_id".into(), json!(bos.id));
            }
            let eos = info.generation_eos_ids();
            match eos.as_slice() {
                [] => {}
                [one] => {
                    generation.insert("eos_token_id".into(), json!(one));
                }
                many => {
                    generation.insert("eos_token_id".into(), json!(many));
                }
            }
            if let Some(pad) = &info.pad {
                generation.insert("pad_token_id".into(), json!(pad.id));
            }
        } else {
            if let Some(bos) = &config.bos_token_id {
                generation.insert(
                    "bos_token_id".into(),
                    serde_json::to_value(bos).unwrap_or(Value::Null),
                );
            }
            if let Some(eos) = &config.eos_token_id {
                generation.insert(
                    "eos_token_id".into(),
                    serde_json::to_value(eos).unwrap_or(Value::Null),
                );
            }
        }
        write_json(&tmp.join("generation_config.json"), &Value::Object(generation))?;
        std::fs::rename(&tmp, out_dir).map_err(|e| ModelError::io(out_dir, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(HfExport {
        dir: out_dir.to_path_buf(),
        tensors: tensors.len(),
        config,
        tokenizer_written: tokenizer.is_ok(),
        tokenizer_skipped: tokenizer.err(),
    })
}

/// `config.json` for `config`: its fields under HF's names (absent optional fields left out),
/// plus `architectures` and `torch_dtype`.
pub fn config_json(config: &LlamaConfig) -> Value {
    let mut value = serde_json::to_value(config).expect("LlamaConfig serializes to JSON");
    if let Value::Object(map) = &mut value {
        map.retain(|_, v| !v.is_null());
        let arch = match config.model_type {
            LlamaFamily::Llama => "LlamaForCausalLM",
            LlamaFamily::Qwen2 => "Qwen2ForCausalLM",
        };
        map.insert("architectures".into(), json!([arch]));
        map.insert("torch_dtype".into(), json!("float32"));
        if config.model_type == LlamaFamily::Llama {
            map.remove("use_sliding_window");
        }
    }
    value
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// Streams the tensors into a safetensors file: the header first (shapes are known), then
/// each tensor dequantized and written in turn.
fn write_safetensors(
    path: &Path,
    file: &GgufFile,
    tensors: &[super::llama::HfTensor],
) -> Result<()> {
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for t in tensors {
        let len = t.shape.iter().product::<usize>() * 4;
        header.insert(
            t.hf_name.clone(),
            json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = Value::Object(header.into_iter().collect());
    header["__metadata__"] = json!({"format": "pt"});
    let mut header = serde_json::to_vec(&header).expect("JSON values serialize");
    // The data section starts 8-byte aligned, padded with spaces as the safetensors crate does.
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let io = |e| ModelError::io(path, e);
    let mut out = BufWriter::new(File::create(path).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for t in tensors {
        let values = t.read(file)?;
        let mut bytes = Vec::with_capacity(4 * 16384);
        for chunk in values.chunks(16384) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            out.write_all(&bytes).map_err(io)?;
        }
    }
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}
