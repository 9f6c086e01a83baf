//! Running the `emloc` binary from the integration tests, and the fixtures they share.

#![allow(dead_code)] // each test crate uses part of it

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `Command` for `emloc ARGS`, for runs that need more than [`emloc`] (an environment
/// variable, other standard streams, a spawned child).
pub fn command<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_emloc"));
    command.args(args);
    command
}

/// Runs `emloc ARGS`, echoing the command and its stderr into the test log.
pub fn emloc<S: AsRef<str>>(args: &[S]) -> Output {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let output = command(&args).output().expect("runs");
    eprintln!("$ emloc {}\n{}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    output
}

/// Runs `emloc ARGS`, asserts success and returns its stdout.
pub fn ok<S: AsRef<str> + std::fmt::Debug>(args: &[S]) -> String {
    let output = emloc(args);
    assert!(output.status.success(), "emloc {args:?} failed");
    String::from_utf8(output.stdout).unwrap()
}

/// Runs `emloc ARGS` and asserts that it fails with `needle` in its stderr.
pub fn fails_with<S: AsRef<str> + std::fmt::Debug>(args: &[S], needle: &str) {
    let output = emloc(args);
    assert!(!output.status.success(), "emloc {args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
}

/// The model fixture `name` of `models/tests/fixtures` (`tiny_bert`, `tiny_llama`,
/// `gguf/tiny_llama.gguf`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures").join(name)
}

/// A copy of the tiny BERT fixture (`config.json`, `model.safetensors`, `tokenizer.json`) in a
/// new directory `dir`.
pub fn copy_tiny_bert(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny_bert").join(file), dir.join(file)).unwrap();
    }
}

/// Words of the tiny BERT fixture's vocabulary.
pub const WORDS: [&str; 20] = [
    "cat", "dog", "sat", "on", "mat", "runs", "fast", "park", "big", "small", "red", "blue",
    "bird", "sings", "tree", "house", "sun", "moon", "night", "day",
];

/// 40 question/answer pairs in the tiny BERT vocabulary whose answer repeats two words of the
/// question, so retrieval is learnable.
pub fn write_retrieval_data(path: &Path) {
    let lines: Vec<String> = (0..40usize)
        .map(|i| {
            let w = |k: usize| WORDS[(i * 7 + k * 3) % WORDS.len()];
            let question = format!("the {} {} on the {} .", w(0), w(1), w(2));
            let answer = format!("a {} and the {} .", w(0), w(2));
            serde_json::json!({"question": question, "answer": answer}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// Reads and parses a JSON file a command wrote (`report.json`, `emulator.json`,
/// `adapter_config.json`, ...).
pub fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The arguments of `emloc correct`: the adapter at `adapter`, trained on the emulator at
/// `emulator`, corrected for `model` and written to `out`, then `extra`.
pub fn correct_args<'a>(
    model: &'a str,
    emulator: &'a str,
    adapter: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "correct",
        "--model",
        model,
        "--emulator",
        emulator,
        "--adapter",
        adapter,
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    args
}
