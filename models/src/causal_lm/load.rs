//! [`load_causal_lm`]: a decoder LM with its tokenizer, chat template and stop ids, from an HF
//! directory or a GGUF file, in one call.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::Value;

use super::chat::ChatTemplate;
use super::task::CausalLmTask;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufTokenizerInfo};
use crate::llama::{LlamaConfig, LlamaForCausalLM, LlamaTokenizer};
use crate::loading::read_json;

/// A loaded decoder LM and the task that formats data for it.
#[derive(Debug)]
pub struct CausalLm {
    /// The model (its skipped weights, if any, left unmaterialised).
    pub model: LlamaForCausalLM,
    /// Its configuration.
    pub config: LlamaConfig,
    /// Tokenizer, chat template (the prompt style defaults to chat when there is one) and stop
    /// ids.
    pub task: CausalLmTask,
    /// Where it was loaded from (a directory or a `.gguf` file).
    pub source: PathBuf,
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Tokens that end an assistant turn in common chat templates; those the vocabulary has stop
/// generation besides the config's end-of-sequence ids.
const END_OF_TURN_TOKENS: [&str; 5] =
    ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"];

/// Adds the ids of the end-of-turn tokens the template uses (and the vocabulary has) to `ids`.
fn with_end_of_turn_ids(
    mut ids: Vec<u32>,
    template: Option<&str>,
    tokenizer: &LlamaTokenizer,
) -> Vec<u32> {
    if let Some(template) = template {
        for token in END_OF_TURN_TOKENS {
            if template.contains(token)
                && let Some(id) = tokenizer.inner().token_to_id(token)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
    }
    ids
}

/// A special-token string of `tokenizer_config.json` (a string, or `{"content": ...}`).
fn token_string(config: &Value, name: &str) -> String {
    match config.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => {
            o.get("content").and_then(Value::as_str).unwrap_or("").to_string()
        }
        _ => String::new(),
    }
}

/// The chat template of `tokenizer_config.json` (a string, or a list of named templates of
/// which `default` is taken) with its BOS/EOS strings.
fn chat_template_of(dir: &Path) -> Result<Option<(String, String, String)>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let config = read_json(&path)?;
    let template = match config.get("chat_template") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template")?.as_str())
            };
            match named("default") {
                Some(t) => t.to_string(),
                None => {
                    return Err(ModelError::InvalidConfig {
                        path,
                        message: "`chat_template` list has no `default`".into(),
                    });
                }
            }
        }
        _ => return Ok(None),
    };
    Ok(Some((template, token_string(&config, "bos_token"), token_string(&config, "eos_token"))))
}

/// The end-of-sequence ids of `generation_config.json`, if it has any.
fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let ids = match read_json(&path)?.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    };
    Ok(ids.into_iter().map(|i| i as u32).collect())
}

/// Loads a decoder LM from an HF directory (`config.json`, safetensors, `tokenizer.json`, and
/// `tokenizer_config.json`'s chat template / `generation_config.json`'s stop ids when present)
/// or from a `.gguf` file, on `device`. The weights at the module paths in `skip` are neither
/// read nor materialised (what an emulator replaces). Generation stops at the config's and
/// generation config's end-of-sequence ids and at the end-of-turn token the chat template uses
/// (e.g. `<|im_end|>`).
///
/// # Errors
/// Loading errors of the config, checkpoint and tokenizer (each names its file);
/// [`ModelError::InvalidConfig`] for a `config.json` whose `model_type` is not a decoder this
/// zoo has (naming it); [`ModelError::InvalidInput`] for a model without end-of-sequence id.
pub fn load_causal_lm(path: &Path, device: &Device, skip: &BTreeSet<String>) -> Result<CausalLm> {
    if is_gguf(path) {
        return load_gguf(path, device, skip);
    }
    let (model, config, _) = LlamaForCausalLM::load_skipping(path, device, skip)?;
    let tokenizer = LlamaTokenizer::from_dir(path)?;
    let mut eos = config.eos_token_ids();
    for id in generation_eos_ids(path)? {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    assemble(model, config, tokenizer, chat_template_of(path)?, eos, path)
}

/// [`load_causal_lm`] for a GGUF file: weights (dequantized to f32), tokenizer, chat template and
/// stop ids all come from the file.
fn load_gguf(path: &Path, device: &Device, skip: &BTreeSet<String>) -> Result<CausalLm> {
    let (model, config) = LlamaForCausalLM::load_gguf_skipping(path, device, skip)?;
    let file = GgufFile::open(path)?;
    let tokenizer = LlamaTokenizer::from_gguf(&file)?;
    let info = GgufTokenizerInfo::from_gguf(&file)?;
    let chat = info.chat_template().map(|t| {
        (
            t.to_string(),
            info.bos_token().unwrap_or_default().to_string(),
            info.eos_token().unwrap_or_default().to_string(),
        )
    });
    assemble(model, config, tokenizer, chat, info.eos_token_ids(), path)
}

/// Builds the [`CausalLm`] of a loaded model from its tokenizer, optional chat template
/// (source, BOS and EOS strings) and end-of-sequence ids (the template's end-of-turn ids are
/// added): the part every format's loader shares.
fn assemble(
    model: LlamaForCausalLM,
    config: LlamaConfig,
    tokenizer: LlamaTokenizer,
    chat: Option<(String, String, String)>,
    eos_token_ids: Vec<u32>,
    source: &Path,
) -> Result<CausalLm> {
    let eos = with_end_of_turn_ids(eos_token_ids, chat.as_ref().map(|c| c.0.as_str()), &tokenizer);
    let template = chat.map(|(s, bos, eos)| ChatTemplate::new(&s, &bos, &eos)).transpose()?;
    let task = CausalLmTask::new(tokenizer, template, eos)?;
    Ok(CausalLm { model, config, task, source: source.to_path_buf() })
}
