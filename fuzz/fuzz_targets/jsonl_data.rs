//! The JSONL question/answer data parser, `emloc_models::retrieval::parse_jsonl`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(pairs) = emloc_models::retrieval::parse_jsonl(&text, std::path::Path::new("data.jsonl")) {
        assert!(!pairs.is_empty());
        assert!(pairs.iter().all(|p| !p.question.trim().is_empty() && !p.answer.trim().is_empty()));
    }
});
