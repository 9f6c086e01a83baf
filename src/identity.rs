//! Which input files an artifact was made from: path, size and content hash.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EmlocError, Result};

/// A file's identity: where it was read, its size and the SHA-256 of its content. Recorded in
/// artifacts (`emulator.json`, training checkpoints) so a later step can tell whether it works on
/// the same inputs; two identities name the same input when their content agrees, wherever the
/// file now lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// The path it was read from (canonical where possible), or a name for in-memory data.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

impl FileIdentity {
    /// Reads `path` in 1 MiB chunks (never whole) and hashes it.
    ///
    /// # Errors
    /// [`EmlocError::Io`] if it cannot be opened or read.
    pub fn of(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| EmlocError::io(path, e))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = file.read(&mut buffer).map_err(|e| EmlocError::io(path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            bytes += n as u64;
        }
        let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self { path: shown.display().to_string(), bytes, sha256: hex(&hasher.finalize()) })
    }

    /// The identity of in-memory `content` (e.g. data embedded in a binary), under `name`.
    pub fn of_bytes(name: &str, content: &[u8]) -> Self {
        Self {
            path: name.to_owned(),
            bytes: content.len() as u64,
            sha256: hex(&Sha256::digest(content)),
        }
    }

    /// Whether both name the same content (size and hash; the paths may differ).
    pub fn same_content(&self, other: &Self) -> bool {
        self.bytes == other.bytes && self.sha256 == other.sha256
    }

    /// Whether two lists name the same files, pairwise by content and in order.
    pub fn same_files(a: &[Self], b: &[Self]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_content(y))
    }

    /// The files of `list` for a message: `PATH (N bytes, sha256 HASH), ...`.
    pub fn describe(list: &[Self]) -> String {
        list.iter()
            .map(|f| format!("{} ({} bytes, sha256 {})", f.path, f.bytes, f.sha256))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_known_sha256_vectors() {
        // FIPS 180-2 test vectors.
        let abc = FileIdentity::of_bytes("abc", b"abc");
        assert_eq!(abc.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(abc.bytes, 3);
        let empty = FileIdentity::of_bytes("empty", b"");
        assert_eq!(
            empty.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );

        // A file larger than one read chunk hashes as its bytes do.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let content: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = FileIdentity::of(&path).unwrap();
        assert!(file.same_content(&FileIdentity::of_bytes("elsewhere", &content)));
        assert!(!file.same_content(&abc));
        assert!(matches!(
            FileIdentity::of(&dir.path().join("missing")),
            Err(EmlocError::Io { .. })
        ));
    }
}
