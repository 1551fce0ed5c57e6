//! The persisted desired state of kept leases: `<state dir>/leases.json`.

use serde::{Deserialize, Serialize};

/// One kept lease as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    /// The lease id.
    pub id: String,
    /// The idle-timeout override, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
}

/// The file of kept leases.
pub type Store = crate::statefile::StateFile<SavedLease>;
