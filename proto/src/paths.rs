//! Where the daemon's socket lives by default, shared by the daemon (which
//! binds it) and every client (which connects to it).

use std::path::PathBuf;

/// The environment variable that overrides the socket path for both the
/// daemon and its clients.
pub const SOCKET_ENV: &str = "CRABBOX_SOCKET";

/// File name of the API socket inside the runtime directory.
pub const SOCKET_FILE: &str = "crabboxd.sock";

/// The per-user runtime directory that holds the socket and its lock.
///
/// On Linux this is `$XDG_RUNTIME_DIR/crabbox` (a tmpfs that systemd creates
/// per user and empties at logout). Where there is no runtime dir (macOS, or a
/// Linux session without one) it is `<local data dir>/crabbox/run`; the
/// daemon never uses `/tmp`, where temp cleaners delete sockets.
pub fn default_runtime_dir() -> Option<PathBuf> {
    let base = directories::BaseDirs::new()?;
    if let Some(run) = base.runtime_dir() {
        return Some(run.join("crabbox"));
    }
    Some(base.data_local_dir().join("crabbox").join("run"))
}

/// The default socket path: `$CRABBOX_SOCKET` when set and non-empty, else
/// [`SOCKET_FILE`] inside [`default_runtime_dir`].
pub fn default_socket_path() -> Option<PathBuf> {
    match std::env::var_os(SOCKET_ENV) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => default_runtime_dir().map(|d| d.join(SOCKET_FILE)),
    }
}
