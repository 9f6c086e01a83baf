//! Where models come from and what they are: the default model (fetched on first use) and the
//! content identities that tie emulators, adapters and checkpoints to their model and data.

use std::path::{Path, PathBuf};
use std::process::Command;

use emloc::EmulatorDescription;
use emloc::io::FileIdentity;

use crate::CliResult;

/// Where `scripts/fetch_minilm.sh` puts all-MiniLM-L6-v2 unless told otherwise.
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMLOC_MINILM_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/emloc/all-MiniLM-L6-v2")
}

/// `scripts/fetch_minilm.sh`, embedded so an installed binary does not depend on the source tree.
const FETCH_MINILM_SCRIPT: &str = include_str!("../../scripts/fetch_minilm.sh");

/// Runs the embedded fetch script for `dir`. The script never deletes or replaces an existing
/// path: a `dir` that exists and is not the model makes it fail, and that failure is reported.
pub fn fetch_minilm(dir: &Path) -> CliResult<()> {
    // `bash -c SCRIPT NAME ARG`: the script text is an argument, so nothing it runs can read it.
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_MINILM_SCRIPT)
        .arg("fetch_minilm.sh")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run bash to fetch all-MiniLM-L6-v2: {e}; pass --model DIR"))?;
    if !status.success() {
        return Err(format!(
            "fetching all-MiniLM-L6-v2 into {} failed ({status}, see above); pass --model DIR or set EMLOC_MINILM_DIR",
            dir.display()
        )
        .into());
    }
    Ok(())
}

/// The identity of a model: its `config.json` and weight files (safetensors, or the shards of
/// an index), or the GGUF file itself.
pub fn model_identity(source: &Path) -> CliResult<Vec<FileIdentity>> {
    if source.is_file() {
        return Ok(vec![FileIdentity::of(source)?]);
    }
    let mut files = vec![source.join("config.json")];
    files.extend(emloc_models::loading::Checkpoint::open_dir(source)?.files());
    Ok(files.iter().map(|f| FileIdentity::of(f)).collect::<Result<_, _>>()?)
}

/// Refuses an emulator whose `emulator.json` records that it was built from another model than
/// the one at `source` (by content): its factors approximate other weights, so training on it or
/// correcting against `source` would be silently wrong. Emulators without a record pass.
pub fn check_emulator_source(
    description: &EmulatorDescription,
    emulator_dir: &Path,
    source: &Path,
) -> CliResult<()> {
    let Some(provenance) = &description.provenance else { return Ok(()) };
    let now = model_identity(source)?;
    if FileIdentity::same_files(&provenance.model, &now) {
        return Ok(());
    }
    let show = FileIdentity::describe;
    Err(format!(
        "{}: the emulator was built from {}, not from --model {} ({}); use the model it was built from or emulate this one",
        emulator_dir.display(),
        show(&provenance.model),
        source.display(),
        show(&now)
    )
    .into())
}

/// The identity of an emulator directory: its description and its factors.
pub fn emulator_identity(dir: &Path) -> CliResult<Vec<FileIdentity>> {
    let files = [emloc::emulator::DESCRIPTION_FILE, emloc::emulator::FACTORS_FILE];
    Ok(files.iter().map(|f| FileIdentity::of(&dir.join(f))).collect::<Result<_, _>>()?)
}
