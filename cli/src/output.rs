//! Writing outputs: stage directories that are complete or absent, atomic JSON reports, and
//! adapter metadata.
//!
//! Stage outputs are complete or absent.
//!
//! `emloc emulate`, `correct` and `merge` write every file into a fresh hidden staging directory
//! beside `--out` (`.emloc-NAME-XXXXXX`, same parent, so the same filesystem) and rename it to
//! `--out` at the end. So:
//! - `--out` never holds part of an output: a failed run removes its staging directory; a killed
//!   process (SIGKILL, power loss) leaves at most that hidden staging directory, never `--out`;
//! - an existing non-empty `--out` is refused before any work (a path the user gave is never
//!   overwritten); an existing empty directory is replaced by the rename;
//! - of two runs racing for one `--out`, the second rename fails (`rename(2)` of a directory
//!   onto a non-empty one fails with ENOTEMPTY/EEXIST): that run reports it and discards its
//!   own output, the first's stays as it was.

use std::fs::File;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use serde::Serialize;

use crate::CliResult;

/// A stage's output under construction: a staging directory that becomes `out` on
/// [`StagedDir::commit`] and is removed if dropped before.
#[derive(Debug)]
pub struct StagedDir {
    staging: TempDir,
    out: PathBuf,
}

impl StagedDir {
    /// Checks that `out` is absent or an empty directory, creates its parent if missing and the
    /// staging directory beside it.
    ///
    /// # Errors
    /// `out` exists and is not an empty directory, or it has no file name (`/`, `..`), or the
    /// parent or the staging directory cannot be created; each message names the path.
    pub fn begin(out: &Path) -> CliResult<Self> {
        check_absent_or_empty(out)?;
        let name = out.file_name().filter(|n| *n != "." && *n != "..").ok_or_else(|| {
            format!("--out {}: not a directory name; give a path such as ./out", out.display())
        })?;
        let parent = parent_of(out);
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".emloc-{}-", name.to_string_lossy()))
            .tempdir_in(parent)
            .map_err(|e| {
                format!("cannot create a staging directory in {}: {e}", parent.display())
            })?;
        Ok(Self { staging, out: out.to_path_buf() })
    }

    /// Where the stage writes its files.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Syncs the staged files and renames the staging directory to `out`.
    ///
    /// # Errors
    /// The rename fails, typically because another run created `out` meanwhile; the staging
    /// directory is then removed and `out` left as it is.
    pub fn commit(self) -> CliResult<PathBuf> {
        // Durable before visible: after a power loss `out` must not hold empty files.
        sync_tree(self.staging.path())?;
        let staging = self.staging.keep();
        if let Err(e) = std::fs::rename(&staging, &self.out) {
            let _ = std::fs::remove_dir_all(&staging);
            let taken = std::fs::read_dir(&self.out).is_ok_and(|mut d| d.next().is_some());
            return Err(if taken {
                format!(
                    "--out {} was written by another process during this run ({e}); it is left as it is and this run's output is discarded",
                    self.out.display()
                )
            } else {
                format!("cannot move the output into place at {}: {e}", self.out.display())
            }
            .into());
        }
        if let Ok(dir) = File::open(parent_of(&self.out)) {
            let _ = dir.sync_all();
        }
        Ok(self.out)
    }
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Refuses an `out` that exists and is not an empty directory.
fn check_absent_or_empty(out: &Path) -> CliResult<()> {
    let meta = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("--out {}: {e}", out.display()).into()),
        Ok(meta) => meta,
    };
    if !meta.is_dir() {
        let message = "exists and is not a directory; emloc never overwrites it: choose a new path";
        return Err(format!("--out {} {message}", out.display()).into());
    }
    let mut entries =
        std::fs::read_dir(out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    if entries.next().is_some() {
        return Err(format!(
            "--out {} already exists and is not empty; emloc never overwrites it: choose a new path or remove it",
            out.display()
        )
        .into());
    }
    Ok(())
}

/// fsyncs every regular file under `dir` (one level of subdirectories is all a stage writes,
/// but any depth is handled) and the directories themselves.
fn sync_tree(dir: &Path) -> CliResult<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let kind = entry.file_type().map_err(|e| format!("{}: {e}", entry.path().display()))?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            let path = entry.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    // Best effort: not every platform can open a directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> CliResult<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    emloc::io::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Writes a recipe's `report` as `out/report.json` ([`write_json`]) and says where.
pub fn write_report(out: &Path, report: &impl Serialize) -> CliResult<()> {
    let path = out.join("report.json");
    write_json(&path, report)?;
    eprintln!("report: {}", path.display());
    Ok(())
}

/// PEFT's task type for sentence-encoder adapters (read by `AutoPeftModelForFeatureExtraction`).
pub const ENCODER_TASK_TYPE: &str = "FEATURE_EXTRACTION";

/// Marks an adapter as a feature-extraction adapter of the encoder in `model_dir`, the metadata
/// PEFT's `AutoPeftModel` classes need to load it.
pub fn describe_encoder_adapter(
    mut adapter: emloc::peft::PeftAdapter,
    model_dir: &Path,
) -> emloc::peft::PeftAdapter {
    adapter.config.task_type = Some(ENCODER_TASK_TYPE.into());
    adapter.config.base_model_name_or_path = Some(absolute(model_dir));
    adapter
}

/// `path` made absolute (canonical where it exists), for metadata read from another directory:
/// PEFT resolves a relative `base_model_name_or_path` against its own working directory.
pub fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
        .display()
        .to_string()
}
