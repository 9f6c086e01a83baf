//! PEFT adapter: `adapter_config.json` text + `adapter_model.safetensors` bytes, through
//! `PeftAdapter::from_parts` (the code path of `PeftAdapter::load`). Any input must give `Ok`
//! or a typed `EmlocError`, never a panic; an `Ok` adapter must validate and survive a save.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = split::split(data);
    if let Ok(adapter) = emloc::peft::PeftAdapter::from_parts(&config, weights) {
        adapter.validate().expect("a loaded adapter validates");
    }
});
