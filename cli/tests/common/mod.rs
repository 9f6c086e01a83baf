//! Running the `emloc` binary from the integration tests.

#![allow(dead_code)] // each test crate uses part of it

use std::process::{Command, Output};

/// Runs `emloc ARGS`, echoing the command and its stderr into the test log.
pub fn emloc(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_emloc")).args(args).output().expect("runs");
    eprintln!("$ emloc {}\n{}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    output
}

/// Runs `emloc ARGS`, asserts success and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let output = emloc(args);
    assert!(output.status.success(), "emloc {args:?} failed");
    String::from_utf8(output.stdout).unwrap()
}

/// Runs `emloc ARGS` and asserts that it fails with `needle` in its stderr.
pub fn fails_with(args: &[&str], needle: &str) {
    let output = emloc(args);
    assert!(!output.status.success(), "emloc {args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
}
