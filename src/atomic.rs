//! Writing files so that a crash never leaves a half-written artifact.

use std::fs::{self, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{EmlocError, Result};

static TEMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Replaces `target` with `bytes` via a synced temporary file in the same directory and a
/// rename, so readers see either the old file or the new one, never a partial write.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(target, |file| file.write_all(bytes))
}

/// [`write_atomic`] for content that `write` streams into the (buffered) temporary file, so
/// that it never has to be held in memory whole.
pub fn write_atomic_with(
    target: &Path,
    write: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp: PathBuf = target.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let file = OpenOptions::new().write(true).create_new(true).open(&temp)?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        write(&mut file)?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, target)
    })();
    if let Err(e) = written {
        // Best effort: the temp file may not exist if creating it was what failed.
        let _ = fs::remove_file(&temp);
        return Err(EmlocError::io(target, e));
    }
    sync_parent(target);
    Ok(())
}

/// Makes the rename durable; best effort, since not every platform can open a directory.
fn sync_parent(target: &Path) {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = fs::File::open(parent) {
        let _ = dir.sync_all();
    }
}
