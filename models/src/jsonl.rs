//! The line loop every JSONL data parser shares: blank lines skipped, each other line parsed as
//! JSON and handed to the task's record parser, errors located as `FILE:LINE`.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// Parses every non-blank line of `text` as JSON and maps it with `record`, whose error message
/// is reported at that line; `path` only names the source. `none` is the message (at line 0)
/// when there is no record at all.
pub(crate) fn parse_records<T>(
    text: &str,
    path: &Path,
    none: &str,
    mut record: impl FnMut(&Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| ModelError::Data {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| error(format!("invalid JSON: {e}")))?;
        records.push(record(&value).map_err(error)?);
    }
    if records.is_empty() {
        return Err(ModelError::Data { path: path.to_path_buf(), line: 0, message: none.into() });
    }
    Ok(records)
}

/// The string field `name` of `value`, which must be present and not blank.
pub(crate) fn nonblank_string(
    value: Option<&Value>,
    name: &str,
) -> std::result::Result<String, String> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("`{name}` is empty")),
        Some(other) => Err(format!("`{name}` must be a string, found {other}")),
        None => Err(format!("missing field `{name}`")),
    }
}
