//! OS glue, kept synchronous and free of domain types: private files and
//! directories, the API socket (bind, stale-socket removal, systemd socket
//! activation, the single-daemon lock, peer credentials), the open-file limit
//! and service-manager notifications.

pub mod fs;
pub mod nofile;
pub mod notify;
pub mod socket;
