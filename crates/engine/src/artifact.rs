//! Content-addressed storage of components and their compiled artifacts.
//!
//! `components/<sha256>.wasm` keeps every uploaded component (the source of
//! truth, so a new engine version can recompile it) and
//! `compiled/<sha256>-<engine fingerprint>.cwasm` the native code compiled from
//! it. Both are written to a temporary file, fsync'd, then renamed into place,
//! so a crash never leaves a half-written file under a final name.

use sha2::{Digest, Sha256};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The sha256 of a component's bytes, as 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentDigest(String);

impl ComponentDigest {
    /// Digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// Parses a digest previously produced by [`ComponentDigest::of`].
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(text.to_owned()))
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ComponentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The on-disk store of components and compiled artifacts.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    components: PathBuf,
    compiled: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        let components = root.join("components");
        let compiled = root.join("compiled");
        fs::create_dir_all(&components)?;
        fs::create_dir_all(&compiled)?;
        for dir in [&components, &compiled] {
            remove_stale_temporaries(dir);
        }
        Ok(Self {
            components,
            compiled,
        })
    }

    /// Path of a stored component.
    pub fn component_path(&self, digest: &ComponentDigest) -> PathBuf {
        self.components.join(format!("{digest}.wasm"))
    }

    /// Path of the artifact compiled from `digest` by an engine whose
    /// fingerprint is `fingerprint`.
    pub fn compiled_path(&self, digest: &ComponentDigest, fingerprint: &str) -> PathBuf {
        self.compiled.join(format!("{digest}-{fingerprint}.cwasm"))
    }

    /// Stores a component unless already present.
    pub fn put_component(&self, digest: &ComponentDigest, bytes: &[u8]) -> io::Result<()> {
        let path = self.component_path(digest);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes)
    }

    /// Reads a stored component.
    pub fn read_component(&self, digest: &ComponentDigest) -> io::Result<Vec<u8>> {
        fs::read(self.component_path(digest))
    }

    /// Stores a compiled artifact.
    pub fn put_compiled(
        &self,
        digest: &ComponentDigest,
        fingerprint: &str,
        bytes: &[u8],
    ) -> io::Result<PathBuf> {
        let path = self.compiled_path(digest, fingerprint);
        write_atomically(&path, bytes)?;
        Ok(path)
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over
/// `path` and syncs the directory, so that `path` holds either nothing or all
/// of `bytes`, whatever happens to the process.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("artifact path has no parent directory"))?;
    let mut suffix = [0u8; 8];
    temp_suffix(&mut suffix);
    let tmp = dir.join(format!(".tmp-{}", hex::encode(suffix)));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Unique-enough suffix for temporary files: the process id and a clock
/// reading, mixed through sha256 (no secrecy is needed here).
fn temp_suffix(out: &mut [u8; 8]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = format!(
        "{}-{now}-{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    let digest = Sha256::digest(seed.as_bytes());
    out.copy_from_slice(&digest[..8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_and_rejects_garbage() {
        let d = ComponentDigest::of(b"hello");
        assert_eq!(ComponentDigest::parse(d.as_str()), Some(d.clone()));
        assert_eq!(ComponentDigest::parse("../etc/passwd"), None);
        assert_eq!(ComponentDigest::parse(&d.as_str().to_uppercase()), None);
    }

    #[test]
    fn writes_are_whole_and_leave_no_temporaries() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = ArtifactStore::open(dir.path())?;
        let d = ComponentDigest::of(b"component");
        store.put_component(&d, b"component")?;
        assert_eq!(store.read_component(&d)?, b"component");
        fs::write(dir.path().join("compiled/.tmp-deadbeef"), b"half")?;
        let _reopened = ArtifactStore::open(dir.path())?;
        let names: Vec<_> = fs::read_dir(dir.path().join("compiled"))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(names.is_empty(), "stale temporaries remain: {names:?}");
        Ok(())
    }
}
