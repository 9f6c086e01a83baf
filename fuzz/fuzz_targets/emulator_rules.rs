//! Emulator rules file (the JSON `EmulatorConfig` of `emloc emulate --rules`): parse,
//! `validate()`, then the rank computation `EmulatorConfig::rank_of` for layer shapes taken from
//! the input (the first 16 bytes: d_in, d_out as u64 LE; the rest is the JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let d_in = u64::from_le_bytes(data[0..8].try_into().unwrap()) as usize;
    let d_out = u64::from_le_bytes(data[8..16].try_into().unwrap()) as usize;
    let text = String::from_utf8_lossy(&data[16..]);
    let Ok(config) = serde_json::from_str::<emloc::EmulatorConfig>(&text) else { return };
    if config.validate().is_err() {
        return;
    }
    for path in ["layers.0.attention.query", "embeddings.word_embeddings", "pooler.dense", ""] {
        if let Ok(Some(rank)) = config.rank_of(path, d_in, d_out) {
            assert!(rank >= 1 && rank <= d_in.min(d_out), "rank {rank} for [{d_in}, {d_out}]");
        }
    }
});
