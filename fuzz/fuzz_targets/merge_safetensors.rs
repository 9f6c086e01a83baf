//! `emloc merge` / `emloc::merge_adapter_into_safetensors`: the input is a model's `model.safetensors`,
//! merged with a fixed valid adapter (layer `encoder.dense`, r = 2, `[d_out, d_in] = [4, 6]`).
//! Property: no input panics; an `Ok` merge writes a file that parses, with the same tensor
//! names as the input, and the merged weight as F32 `[4, 6]`.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use emloc::Matrix;
use emloc::peft::{PeftAdapter, PeftConfig, PeftLayer};
use libfuzzer_sys::fuzz_target;

fn dirs() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("emloc-fuzz-merge-{}", std::process::id()));
        std::fs::create_dir_all(root.join("in")).expect("temp dir");
        (root.join("in"), root.join("out"))
    })
}

fn adapter() -> &'static PeftAdapter {
    static ADAPTER: OnceLock<PeftAdapter> = OnceLock::new();
    ADAPTER.get_or_init(|| {
        let values = |n: usize| (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        PeftAdapter {
            config: PeftConfig::new(2, 4.0, vec!["dense".into()]),
            layers: BTreeMap::from([(
                "encoder.dense".to_string(),
                PeftLayer::new(Matrix::new(2, 6, values(12)), Matrix::new(4, 2, values(8))),
            )]),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let (input_dir, out_dir) = dirs();
    let input = input_dir.join("model.safetensors");
    std::fs::write(&input, data).expect("temp file");
    let _ = std::fs::remove_dir_all(out_dir);
    if let Ok(merged) = emloc::merge_adapter_into_safetensors(adapter(), std::slice::from_ref(&input), out_dir) {
        let before = safetensors::SafeTensors::deserialize(data).expect("a merged input parses");
        let bytes = std::fs::read(&merged.files[0]).expect("merged file written");
        let after = safetensors::SafeTensors::deserialize(&bytes).expect("the merged file parses");
        let (mut a, mut b) = (before.names(), after.names());
        a.sort();
        b.sort();
        assert_eq!(a, b);
        let (_, key) = &merged.merged[0];
        let tensor = after.tensor(key).expect("merged key present");
        assert_eq!(tensor.shape(), [4, 6]);
        assert_eq!(tensor.dtype(), safetensors::Dtype::F32);
    }
});
