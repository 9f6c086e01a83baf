//! Owns running a Python peer of a benchmark (PEFT, transformers): the script shipped inside the
//! binary, its JSON spec in a fresh temporary directory, its one JSON result line.

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::CliResult;
use crate::output::write_json;

/// A peer script: its file name, its text and what it needs installed (for the error message).
pub struct PeerScript {
    /// File name to write the script under.
    pub name: &'static str,
    /// The script's text (`include_str!` of `benches/peers/...`).
    pub text: &'static str,
    /// The peer's name in messages, e.g. `"the PEFT peer"`.
    pub what: &'static str,
    /// The packages it imports, space-separated (`"torch transformers peft"`).
    pub needs: &'static str,
}

/// Runs `python SCRIPT SPEC.json` with `spec` written beside the script in a fresh temporary
/// directory (removed afterwards) and parses the last JSON object line it prints.
///
/// # Errors
/// The interpreter cannot start, the script fails (its stderr included, with what it needs), or
/// prints no parsable result.
pub fn run_peer<T: DeserializeOwned>(
    python: &Path,
    script: &PeerScript,
    spec: &impl Serialize,
) -> CliResult<T> {
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    let script_path = dir.path().join(script.name);
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&script_path, script.text)
        .map_err(|e| format!("{}: {e}", script_path.display()))?;
    write_json(&spec_path, spec)?;
    eprintln!("running {} ({} {})", script.what, python.display(), script_path.display());
    let output = Command::new(python).arg(&script_path).arg(&spec_path).output().map_err(|e| {
        format!("--python {}: {e} (use --no-peer to skip the peer)", python.display())
    })?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}); it needs {} (pip install {}; --python picks the interpreter, --no-peer skips it):\n{}",
            script.what,
            output.status,
            script.needs,
            script.needs,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    serde_json::from_str(line)
        .map_err(|e| format!("{} printed no result ({e}): {stdout}", script.what).into())
}
