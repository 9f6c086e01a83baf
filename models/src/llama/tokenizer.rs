//! [`LlamaTokenizer`]: text ↔ token ids through the `tokenizers` crate and `tokenizer.json`.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

/// A `tokenizer.json` (HF `tokenizers` format) for a causal LM.
pub struct LlamaTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for LlamaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaTokenizer").field("path", &self.path).finish_non_exhaustive()
    }
}

impl LlamaTokenizer {
    /// Loads `tokenizer.json` from a model directory.
    ///
    /// # Errors
    /// [`ModelError::MissingFile`] if the directory has none, [`ModelError::Tokenizer`] if it
    /// cannot be parsed.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_path_buf(),
                expected: "tokenizer.json".into(),
            });
        }
        Self::from_file(path)
    }

    /// Loads a `tokenizer.json` file.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if it cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        Ok(Self { tokenizer, path })
    }

    /// Wraps an already-built tokenizer; `path` names its source in errors (e.g. a GGUF file,
    /// see `LlamaTokenizer::from_gguf`).
    pub fn from_tokenizer(tokenizer: Tokenizer, path: impl Into<PathBuf>) -> Self {
        Self { tokenizer, path: path.into() }
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text`; with `add_special_tokens`, the tokenizer's post-processor adds what
    /// the model expects (e.g. `<s>` / BOS in front).
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if encoding fails.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(|e| {
            ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() }
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens dropped when `skip_special_tokens`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if decoding fails (e.g. an unknown id).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }
}
