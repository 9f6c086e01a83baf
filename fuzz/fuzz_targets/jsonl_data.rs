//! The JSONL data parsers: question/answer pairs (`emloc_models::retrieval::parse_jsonl`) and
//! supervised causal-LM examples (`emloc_models::causal_lm::parse_jsonl`), on the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = std::path::Path::new("data.jsonl");
    if let Ok(pairs) = emloc_models::retrieval::parse_jsonl(&text, path) {
        assert!(!pairs.is_empty());
        assert!(pairs.iter().all(|p| !p.question.trim().is_empty() && !p.answer.trim().is_empty()));
    }
    if let Ok(examples) = emloc_models::causal_lm::parse_jsonl(&text, path) {
        assert!(!examples.is_empty());
        for e in &examples {
            assert!(!e.targets.is_empty() && e.targets.iter().all(|t| !t.is_empty()));
            if let Some(c) = &e.choices {
                assert!(c.options.len() >= 2 && c.answer < c.options.len());
            }
        }
    }
});
