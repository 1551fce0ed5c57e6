//! Persisted desired state: one JSON file per feature under the state
//! directory (`leases.json`, `egress.json`), versioned, 0600, written
//! atomically, so a daemon restart restores what was running.

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::platform::fs::write_private;

#[derive(Serialize, Deserialize)]
struct File<T> {
    version: u32,
    entries: Vec<T>,
}

/// A list of `T` saved in one file.
#[derive(Debug, Clone)]
pub struct StateFile<T> {
    path: PathBuf,
    _t: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Clone> StateFile<T> {
    /// The file at `path`.
    pub fn new(path: PathBuf) -> Self {
        StateFile {
            path,
            _t: PhantomData,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved entries; none when the file does not exist.
    pub fn load(&self) -> std::io::Result<Vec<T>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice::<File<T>>(&bytes)
                .map(|f| f.entries)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the saved entries.
    pub fn save(&self, entries: &[T]) -> std::io::Result<()> {
        let file = File {
            version: 1,
            entries: entries.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        write_private(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_private() {
        let t = tempfile::tempdir().unwrap();
        let s: StateFile<(String, u32)> = StateFile::new(t.path().join("state/x.json"));
        assert!(s.load().unwrap().is_empty());
        let entries = vec![("a".to_owned(), 1), ("b".to_owned(), 2)];
        s.save(&entries).unwrap();
        assert_eq!(s.load().unwrap(), entries);
        assert_eq!(crate::platform::fs::mode_of(s.path()).unwrap(), 0o600);
        std::fs::write(s.path(), b"not json").unwrap();
        assert!(s.load().is_err());
    }
}
