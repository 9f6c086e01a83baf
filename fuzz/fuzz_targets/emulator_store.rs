//! Emulator directory: `emulator.json` text + `emulator.safetensors` bytes, through
//! `emloc::emulator::parse_emulator` (the code path of `read_emulator` / `load_emulator`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let (description, factors) = split::split(data);
    if let Ok((description, factors)) = emloc::emulator::parse_emulator(&description, factors) {
        assert_eq!(factors.len(), description.report.layers.len());
    }
});
