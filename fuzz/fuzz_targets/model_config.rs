//! Model `config.json` files (`emloc eval/emulate/... --model DIR`): the BERT, Llama/Qwen2, ViT
//! and CLIP parsers with their validation. Property: no input panics; a parsed config passes its
//! own `validate()`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One file per fuzzing process (the parsers read from a path, as the loaders do).
fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("emloc-fuzz-config-{}.json", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = config_path();
    std::fs::write(path, data).expect("temp file");
    if let Ok(c) = emloc_models::bert::BertConfig::from_file(path) {
        assert!(c.validate().is_ok());
    }
    if let Ok(c) = emloc_models::llama::LlamaConfig::from_file(path) {
        assert!(c.validate().is_ok());
    }
    if let Ok(c) = emloc_models::vit::ViTConfig::from_file(path) {
        assert!(c.validate().is_ok());
    }
    if let Ok(c) = emloc_models::clip::ClipVisionConfig::from_file(path) {
        assert!(c.validate().is_ok());
    }
});
