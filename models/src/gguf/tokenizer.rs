//! Tokenizers from GGUF metadata (`tokenizer.ggml.*`): the `tokenizer.json` HF transformers
//! builds for a GGUF file, and the special tokens and chat template around it.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM, Llama 3, Qwen2, ...)
//! is supported, assembled as transformers' `GGUFGPTConverter` does: a BPE model over
//! `tokenizer.ggml.tokens` / `merges`, GPT-2's `ByteLevel` pre-tokenizer (preceded by the split
//! regex of the pre-tokenizer `tokenizer.ggml.pre` names, where transformers knows one that
//! differs from GPT-2's), a `ByteLevel` decoder, a template post-processor adding BOS / EOS
//! only where `tokenizer.ggml.add_bos_token` / `add_eos_token` say, the control tokens
//! (`token_type` 3) plus BOS / EOS / UNK / PAD as special added tokens, and the user-defined
//! tokens (`token_type` 4) as non-special added tokens. SentencePiece
//! (`"llama"`) files give [`ModelError::Tokenizer`].
//!
//! Caveat (as in transformers 5.24): `tokenizer.ggml.pre = "smollm"` keeps GPT-2's split,
//! whereas llama.cpp and SmolLM's own `tokenizer.json` also split every digit apart; the two
//! differ on a few strings (whitespace runs before digits, `½`, ...).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;

use super::GgufFile;
use crate::error::{ModelError, Result};
use crate::llama::LlamaTokenizer;

/// Tokens that end a turn or a text in common chat formats; those present in the vocabulary
/// are [`GgufTokenizerInfo::end_tokens`].
pub const END_TOKENS: [&str; 7] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// `token_type` of a control token (`LLAMA_TOKEN_TYPE_CONTROL`).
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// `token_type` of a user-defined token (`LLAMA_TOKEN_TYPE_USER_DEFINED`, e.g. Qwen2's
/// `<tool_call>`): matched whole in the text like a control token, but not special.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A special token: its id and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub content: String,
}

/// The tokenizer facts of a GGUF file besides the vocabulary: model kind, special tokens, the
/// `add_bos` / `add_eos` flags and the chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTokenizerInfo {
    /// `tokenizer.ggml.model` (`gpt2`, `llama`, ...).
    pub model: String,
    /// `tokenizer.ggml.pre` (`smollm`, `llama-bpe`, `qwen2`, ...), if any.
    pub pre: Option<String>,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<SpecialToken>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<SpecialToken>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<SpecialToken>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<SpecialToken>,
    /// `tokenizer.ggml.add_bos_token` (llama.cpp prepends BOS), default false.
    pub add_bos_token: bool,
    /// `tokenizer.ggml.add_eos_token` (llama.cpp appends EOS), default false.
    pub add_eos_token: bool,
    /// `tokenizer.chat_template`, a Jinja template.
    pub chat_template: Option<String>,
    /// The [`END_TOKENS`] present in the vocabulary, in that order.
    pub end_tokens: Vec<SpecialToken>,
}

fn tokenizer_error(file: &GgufFile, message: String) -> ModelError {
    ModelError::Tokenizer { path: file.path().to_path_buf(), message }
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a [String]>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => {
            v.as_array().and_then(|a| a.as_strings()).map(Some).ok_or_else(|| {
                tokenizer_error(file, format!("`{key}` must be an array of strings"))
            })
        }
    }
}

fn flag(file: &GgufFile, key: &str) -> Result<bool> {
    match file.get(key) {
        None => Ok(false),
        Some(v) => {
            v.as_bool().ok_or_else(|| tokenizer_error(file, format!("`{key}` must be a bool")))
        }
    }
}

impl GgufTokenizerInfo {
    /// Reads the tokenizer facts of a GGUF file.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if `tokenizer.ggml.model` or `tokenizer.ggml.tokens` is
    /// absent or mistyped, or a special token id is outside the vocabulary.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = match file.get("tokenizer.ggml.model") {
            Some(v) => v
                .as_str()
                .ok_or_else(|| {
                    tokenizer_error(file, "`tokenizer.ggml.model` must be a string".into())
                })?
                .to_string(),
            None => {
                return Err(tokenizer_error(
                    file,
                    "the file has no tokenizer (`tokenizer.ggml.model`)".into(),
                ));
            }
        };
        let tokens = strings(file, "tokenizer.ggml.tokens")?
            .ok_or_else(|| tokenizer_error(file, "`tokenizer.ggml.tokens` is missing".into()))?;
        let special = |key: &str| -> Result<Option<SpecialToken>> {
            let key = format!("tokenizer.ggml.{key}");
            let Some(v) = file.get(&key) else {
                return Ok(None);
            };
            let id = v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                tokenizer_error(file, format!("`{key}` must be a token id, got {v:?}"))
            })?;
            let content = tokens.get(id as usize).ok_or_else(|| {
                tokenizer_error(
                    file,
                    format!("`{key}` {id} is outside the vocabulary of {}", tokens.len()),
                )
            })?;
            Ok(Some(SpecialToken { id, content: content.clone() }))
        };
        let pre = match file.get("tokenizer.ggml.pre") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| {
                        tokenizer_error(file, "`tokenizer.ggml.pre` must be a string".into())
                    })?
                    .to_string(),
            ),
        };
        let chat_template = match file.get("tokenizer.chat_template") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| {
                        tokenizer_error(file, "`tokenizer.chat_template` must be a string".into())
                    })?
                    .to_string(),
            ),
        };
        let index: BTreeMap<&str, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
        Ok(Self {
            model,
            pre,
            vocab_size: tokens.len(),
            bos: special("bos_token_id")?,
            eos: special("eos_token_id")?,
            unk: special("unknown_token_id")?,
            pad: special("padding_token_id")?,
            add_bos_token: flag(file, "tokenizer.ggml.add_bos_token")?,
            add_eos_token: flag(file, "tokenizer.ggml.add_eos_token")?,
            chat_template,
            end_tokens: END_TOKENS
                .iter()
                .filter_map(|t| index.get(t).map(|&id| SpecialToken { id, content: t.to_string() }))
                .collect(),
        })
    }

    /// Whether `tokenizer.ggml.model` is one [`tokenizer_json`] cannot build.
    pub fn is_unsupported_model(&self) -> bool {
        self.model != "gpt2"
    }

    /// The chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// BOS text, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.content.as_str())
    }

    /// EOS text, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.content.as_str())
    }

    /// The ids generation should stop at: EOS, then every [`END_TOKENS`] entry present in the
    /// vocabulary that the chat template writes (e.g. `<|im_end|>`), without repeats.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.generation_eos_ids()
    }

    /// As [`eos_token_ids`](Self::eos_token_ids) (what `generation_config.json` lists).
    pub fn generation_eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.iter().map(|t| t.id).collect();
        if let Some(template) = &self.chat_template {
            for t in &self.end_tokens {
                if template.contains(&t.content) && !ids.contains(&t.id) {
                    ids.push(t.id);
                }
            }
        }
        ids
    }

    /// Ids of the [`END_TOKENS`] present in the vocabulary, in that order.
    pub fn end_token_ids(&self) -> Vec<u32> {
        self.end_tokens.iter().map(|t| t.id).collect()
    }

    /// `tokenizer_config.json` for the directory [`gguf_to_hf_dir`](super::gguf_to_hf_dir)
    /// writes: chat template, special token strings, `add_bos_token` / `add_eos_token`.
    pub fn tokenizer_config_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (key, token) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("unk_token", &self.unk),
            ("pad_token", &self.pad),
        ] {
            if let Some(t) = token {
                map.insert(key.into(), json!(t.content));
            }
        }
        map.insert("add_bos_token".into(), json!(self.add_bos_token));
        map.insert("add_eos_token".into(), json!(self.add_eos_token));
        map.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(template) = &self.chat_template {
            map.insert("chat_template".into(), json!(template));
        }
        Value::Object(map)
    }
}

/// GPT-2's byte → character table (`bytes_to_unicode`): printable bytes map to themselves,
/// the other 68 to U+0100 onwards.
fn byte_level_alphabet() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

/// The `tokenizer.json` (as JSON) HF transformers builds for a byte-level BPE GGUF tokenizer
/// (see the module docs).
///
/// # Errors
/// [`ModelError::Tokenizer`] for a tokenizer model other than `gpt2`, absent or malformed
/// tokens / merges / token types, or a merge that is not two space-separated tokens.
pub fn tokenizer_json(file: &GgufFile) -> Result<Value> {
    let info = GgufTokenizerInfo::from_gguf(file)?;
    if info.is_unsupported_model() {
        return Err(tokenizer_error(
            file,
            format!(
                "tokenizer.ggml.model `{}` is not supported (only byte-level BPE, `gpt2`)",
                info.model
            ),
        ));
    }
    let tokens = strings(file, "tokenizer.ggml.tokens")?.unwrap_or_default();
    let merges = strings(file, "tokenizer.ggml.merges")?
        .ok_or_else(|| tokenizer_error(file, "`tokenizer.ggml.merges` is missing".into()))?;
    let token_type: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => {
            let types = v.as_array().and_then(|a| a.to_i64_vec()).ok_or_else(|| {
                tokenizer_error(
                    file,
                    "`tokenizer.ggml.token_type` must be an array of integers".into(),
                )
            })?;
            if types.len() != tokens.len() {
                return Err(tokenizer_error(
                    file,
                    format!(
                        "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                        types.len(),
                        tokens.len()
                    ),
                ));
            }
            types
        }
    };

    // Vocabulary keyed the way the merges spell it: a token with a character outside GPT-2's
    // byte alphabet is respelled from its UTF-8 bytes (later duplicates win, as in a dict).
    let table = byte_level_alphabet();
    let alphabet: std::collections::BTreeSet<char> = table.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let key = if in_alphabet(token) {
            token.clone()
        } else {
            token.bytes().map(|b| table[b as usize]).collect()
        };
        vocab.insert(key, json!(id));
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        let parts: Vec<&str> = merge.split(' ').collect();
        if parts.len() != 2 {
            return Err(tokenizer_error(
                file,
                format!("merge #{i} `{merge}` is not two space-separated tokens"),
            ));
        }
        merge_pairs.push(json!([parts[0], parts[1]]));
    }

    // Added tokens, by id: the control tokens and BOS / EOS / UNK / PAD as special tokens, the
    // user-defined ones (Qwen2's `<tool_call>`) as plain added tokens, matched whole in the
    // text but kept when decoding without special tokens.
    let mut added: BTreeMap<u32, (String, bool)> = BTreeMap::new();
    for (id, (token, kind)) in tokens.iter().zip(&token_type).enumerate() {
        if (*kind == TOKEN_TYPE_CONTROL || *kind == TOKEN_TYPE_USER_DEFINED) && in_alphabet(token) {
            added.insert(id as u32, (token.clone(), *kind == TOKEN_TYPE_CONTROL));
        }
    }
    for t in [&info.bos, &info.eos, &info.unk, &info.pad].into_iter().flatten() {
        added.entry(t.id).or_insert_with(|| (t.content.clone(), true)).1 = true;
    }
    let added_tokens: Vec<Value> = added
        .into_iter()
        .map(|(id, (content, special))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special
            })
        })
        .collect();

    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let pre_tokenizer = match info.pre.as_deref().and_then(pre_tokenizer_split) {
        Some(split) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]
        }),
        None => byte_level,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(&info),
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merge_pairs
        }
    }))
}

/// transformers' template post-processor: `[BOS] $A [EOS]` and `[BOS] $A [EOS] [BOS] $B [EOS]`
/// (`$B` with type id 1), BOS / EOS only where `add_bos_token` / `add_eos_token` say.
fn post_processor(info: &GgufTokenizerInfo) -> Value {
    let bos = info.bos.as_ref().filter(|_| info.add_bos_token);
    let eos = info.eos.as_ref().filter(|_| info.add_eos_token);
    let special = |t: &SpecialToken, type_id: u32| json!({"SpecialToken": {"id": t.content, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    single.extend(bos.map(|t| special(t, 0)));
    single.push(sequence("A", 0));
    single.extend(eos.map(|t| special(t, 0)));
    let mut pair = single.clone();
    pair.extend(bos.map(|t| special(t, 1)));
    pair.push(sequence("B", 1));
    pair.extend(eos.map(|t| special(t, 1)));
    let mut special_tokens = Map::new();
    for t in bos.into_iter().chain(eos) {
        special_tokens.insert(
            t.content.clone(),
            json!({"id": t.content, "ids": [t.id], "tokens": [t.content]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a `tokenizer.ggml.pre` whose pre-tokenizer differs from GPT-2's
/// (`None`: GPT-2's own, which `ByteLevel` applies).
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx"
        | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

impl LlamaTokenizer {
    /// Builds the tokenizer of a GGUF file (see [`tokenizer_json`]); errors name the file.
    ///
    /// # Errors
    /// As [`tokenizer_json`], and [`ModelError::Tokenizer`] if the `tokenizers` crate rejects
    /// the result.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = tokenizer_json(file)?;
        let tokenizer = Tokenizer::from_str(&json.to_string())
            .map_err(|e| tokenizer_error(file, format!("building the tokenizer: {e}")))?;
        Ok(Self::from_tokenizer(tokenizer, PathBuf::from(file.path())))
    }
}
