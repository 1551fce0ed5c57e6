//! Persisted desired state: one JSON file per feature under the state
//! directory (`leases.json`, `egress.json`), versioned, 0600, written
//! atomically, so a daemon restart restores what was running.

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::platform::fs::write_private;

/// The format this daemon writes and reads.
const VERSION: u32 = 1;

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

    /// The saved entries; none when the file does not exist. A file this
    /// daemon cannot read (not JSON of the expected shape, or written by a
    /// newer version) is an error, and is first copied aside to
    /// `<name>.unreadable` (0600, like the file): the next save replaces
    /// the file, and what it held must not be lost with it.
    pub fn load(&self) -> std::io::Result<Vec<T>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let why = match serde_json::from_slice::<File<T>>(&bytes) {
            Ok(f) if f.version == VERSION => return Ok(f.entries),
            Ok(f) => format!(
                "version {} (this crabboxd reads version {VERSION}; was it written by a newer one?)",
                f.version
            ),
            Err(e) => e.to_string(),
        };
        let aside = self.aside();
        let kept = match write_private(&aside, &bytes) {
            Ok(()) => format!("a copy is kept at {}", aside.display()),
            Err(e) => format!("it could not be copied to {}: {e}", aside.display()),
        };
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {why}; {kept}", self.path.display()),
        ))
    }

    /// Where an unreadable file is copied before it is replaced.
    fn aside(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".unreadable");
        self.path.with_file_name(name)
    }

    /// Replaces the saved entries.
    pub fn save(&self, entries: &[T]) -> std::io::Result<()> {
        let file = File {
            version: VERSION,
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
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("a copy is kept at"), "{err}");
        let aside = t.path().join("state/x.json.unreadable");
        assert_eq!(std::fs::read(&aside).unwrap(), b"not json");
        assert_eq!(crate::platform::fs::mode_of(&aside).unwrap(), 0o600);
    }

    #[test]
    fn a_newer_version_is_refused_and_kept_aside() {
        let t = tempfile::tempdir().unwrap();
        let s: StateFile<(String, u32)> = StateFile::new(t.path().join("x.json"));
        let newer = br#"{"version": 2, "entries": [["a", 1]], "more": true}"#;
        std::fs::write(s.path(), newer).unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        assert_eq!(
            std::fs::read(t.path().join("x.json.unreadable")).unwrap(),
            newer
        );
    }
}
