//! The persisted desired state of kept leases: `<state dir>/leases.json`,
//! 0600, written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::platform::fs::write_private;

/// One kept lease as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    /// The lease id.
    pub id: String,
    /// The idle-timeout override, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    leases: Vec<SavedLease>,
}

/// Reads and writes the file.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// A store at `path`.
    pub fn new(path: PathBuf) -> Self {
        Store { path }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved leases; none when the file does not exist.
    pub fn load(&self) -> std::io::Result<Vec<SavedLease>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                Ok(file.leases)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the saved leases.
    pub fn save(&self, leases: &[SavedLease]) -> std::io::Result<()> {
        let file = File {
            version: 1,
            leases: leases.to_vec(),
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
        let s = Store::new(t.path().join("state/leases.json"));
        assert!(s.load().unwrap().is_empty());
        let leases = vec![
            SavedLease {
                id: "cbx_000000000001".into(),
                idle_timeout_seconds: Some(60),
            },
            SavedLease {
                id: "cbx_000000000002".into(),
                idle_timeout_seconds: None,
            },
        ];
        s.save(&leases).unwrap();
        assert_eq!(s.load().unwrap(), leases);
        assert_eq!(crate::platform::fs::mode_of(s.path()).unwrap(), 0o600);
    }
}
