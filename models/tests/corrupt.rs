//! Corrupt model directories: every one gives a typed `ModelError` whose message names the
//! file (and the key or field), never a panic. Each case starts from the tiny BERT fixture,
//! copied into a temporary directory, and damages one thing.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use emloc_models::ModelError;
use emloc_models::bert::{BertModel, SentenceEncoder};
use serde_json::Value;

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_bert")
}

/// A copy of the fixture in a temporary directory.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_dir().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// The fixture's safetensors header (JSON) and data section.
fn fixture_parts() -> (Value, Vec<u8>) {
    let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// A safetensors file from a header and a data section (the length prefix is computed).
fn assemble(header: &Value, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

/// A fixture copy whose `model.safetensors` is `bytes`.
fn with_weights(bytes: &[u8]) -> tempfile::TempDir {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    dir
}

/// A fixture copy whose `config.json` is edited by `edit`.
fn with_config(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = copy_fixture();
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

/// Loads `dir` both as a `BertModel` and as a `SentenceEncoder`; both must fail the same way.
/// Returns the error of the model loader, after checking that its message contains every
/// string of `names`.
fn load_error(dir: &Path, names: &[&str]) -> ModelError {
    let device = Device::default();
    let err = match BertModel::load(dir, &device) {
        Ok(_) => panic!("{} loaded, but it is corrupt", dir.display()),
        Err(e) => e,
    };
    let message = err.to_string();
    eprintln!("{message}");
    for name in names {
        assert!(message.contains(name), "`{name}` not named in: {message}");
    }
    match SentenceEncoder::load(dir, &device) {
        Ok(_) => panic!("SentenceEncoder loaded {}", dir.display()),
        Err(e) => assert_eq!(e.to_string(), message, "SentenceEncoder reports differently"),
    }
    err
}

fn assert_checkpoint_error(err: &ModelError, dir: &Path) {
    match err {
        ModelError::Checkpoint { path, .. } => assert_eq!(path, &dir.join("model.safetensors")),
        other => panic!("expected ModelError::Checkpoint, got {other:?}"),
    }
}

#[test]
fn fixture_copy_loads() {
    // The helpers themselves do not damage anything.
    let (header, data) = fixture_parts();
    let dir = with_weights(&assemble(&header, &data));
    BertModel::load(dir.path(), &Device::default()).unwrap();
}

#[test]
fn truncated_safetensors_is_a_checkpoint_error() {
    let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 100, 9, 4, 0] {
        let dir = with_weights(&bytes[..keep]);
        let err = load_error(dir.path(), &["model.safetensors"]);
        assert_checkpoint_error(&err, dir.path());
    }
}

#[test]
fn header_length_beyond_the_file_is_a_checkpoint_error() {
    let mut bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    for n in [bytes.len() as u64, u64::MAX, 1 << 40] {
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        let dir = with_weights(&bytes);
        let err = load_error(dir.path(), &["model.safetensors"]);
        assert_checkpoint_error(&err, dir.path());
    }
}

#[test]
fn invalid_header_json_is_a_checkpoint_error() {
    let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Same length, not JSON.
    let mut garbled = bytes.clone();
    garbled[8..8 + n].fill(b'#');
    // Valid JSON, but not a safetensors header.
    let mut not_a_header = b"[1, 2, 3]".to_vec();
    not_a_header.resize(n, b' ');
    let mut wrong_shape = bytes.clone();
    wrong_shape[8..8 + n].copy_from_slice(&not_a_header);
    for bytes in [garbled, wrong_shape] {
        let dir = with_weights(&bytes);
        let err = load_error(dir.path(), &["model.safetensors"]);
        assert_checkpoint_error(&err, dir.path());
    }
}

#[test]
fn data_offsets_outside_the_file_are_a_checkpoint_error() {
    let (header, data) = fixture_parts();
    let len = data.len() as u64;
    for offsets in [[len, len + 64 * 4], [0, len + 4], [8, 4]] {
        let mut header = header.clone();
        // A key in the middle of the file (neither the first nor the last tensor).
        header["embeddings.word_embeddings.weight"]["data_offsets"] = serde_json::json!(offsets);
        let dir = with_weights(&assemble(&header, &data));
        let err = load_error(dir.path(), &["model.safetensors"]);
        assert_checkpoint_error(&err, dir.path());
    }
}

#[test]
fn shape_disagreeing_with_the_byte_count_is_a_checkpoint_error() {
    let (header, data) = fixture_parts();
    let key = "encoder.layer.0.attention.self.query.weight";
    for (field, value) in [
        ("shape", serde_json::json!([16, 17])),
        ("shape", serde_json::json!([16])),
        ("dtype", serde_json::json!("F64")),
        ("dtype", serde_json::json!("F16")),
        ("dtype", serde_json::json!("NOT_A_DTYPE")),
    ] {
        let mut header = header.clone();
        header[key][field] = value;
        let dir = with_weights(&assemble(&header, &data));
        let err = load_error(dir.path(), &["model.safetensors"]);
        assert_checkpoint_error(&err, dir.path());
    }
}

#[test]
fn missing_config_field_is_named() {
    for field in ["vocab_size", "num_hidden_layers", "intermediate_size"] {
        let dir = with_config(|c| {
            c.remove(field);
        });
        let err = load_error(dir.path(), &["config.json", field]);
        match err {
            ModelError::MissingConfigField { path, field: f } => {
                assert_eq!(path, dir.path().join("config.json"));
                assert_eq!(f, field);
            }
            other => panic!("expected MissingConfigField, got {other:?}"),
        }
    }
}

#[test]
fn config_not_matching_the_weights_lists_the_keys() {
    // Wider model: every weight is mis-shaped.
    let dir = with_config(|c| {
        c.insert("hidden_size".into(), 32.into());
    });
    let err = load_error(dir.path(), &["model.safetensors", "embeddings.word_embeddings.weight"]);
    match err {
        ModelError::KeyMismatch { path, invalid, .. } => {
            assert_eq!(path, dir.path().join("model.safetensors"));
            assert!(
                invalid.iter().any(|k| k.starts_with("encoder.layer.1.output.dense.weight")),
                "{invalid:?}"
            );
        }
        other => panic!("expected KeyMismatch, got {other:?}"),
    }
    // One layer fewer: the checkpoint's layer 1 has no place in the model.
    let dir = with_config(|c| {
        c.insert("num_hidden_layers".into(), 1.into());
    });
    let err = load_error(
        dir.path(),
        &["model.safetensors", "encoder.layer.1.attention.self.query.weight"],
    );
    match err {
        ModelError::KeyMismatch { unexpected, missing, .. } => {
            assert!(missing.is_empty(), "{missing:?}");
            assert_eq!(unexpected.len(), 16, "{unexpected:?}");
        }
        other => panic!("expected KeyMismatch, got {other:?}"),
    }
    // A config value of the wrong type names the file.
    let dir = with_config(|c| {
        c.insert("hidden_size".into(), "sixteen".into());
    });
    let err = load_error(dir.path(), &["config.json"]);
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err:?}");
}
