//! The GGUF reader, `emloc_models::gguf::GgufFile::from_bytes` (same parser as
//! `GgufFile::open`, `LlamaForCausalLM::load_gguf`, `gguf_to_hf_dir`), then every tensor read
//! and dequantized, and the Llama config / tokenizer built from the metadata.
#![no_main]

use emloc_models::gguf::{GgufFile, GgufTokenizerInfo, llama_config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") {
        assert!(file.data_start() % file.alignment() == 0);
        for t in file.tensors() {
            if let Ok(values) = file.dequantize(&t.name) {
                assert_eq!(values.len() as u64, t.n_elements());
            }
        }
        let _ = llama_config(&file);
        let _ = GgufTokenizerInfo::from_gguf(&file);
    }
});
