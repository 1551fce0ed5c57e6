//! The API socket: a private directory, a lock so only one daemon per socket
//! runs, stale-socket removal, binding with mode 0600, and systemd socket
//! activation.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::{
        fs::{FileTypeExt, OpenOptionsExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use super::fs::ensure_private_dir;

/// A bound (or inherited) API socket, plus the lock that makes this process
/// its only server. Dropping it removes the socket file if this process
/// created it.
#[derive(Debug)]
pub struct ApiListener {
    listener: Option<UnixListener>,
    path: PathBuf,
    remove_on_drop: bool,
    _lock: Flock<File>,
}

/// Why the socket could not be set up. Each message is a sentence a person
/// can act on.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The socket's directory could not be created or secured.
    #[error("cannot prepare the socket directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another daemon holds the lock.
    #[error(
        "another crabboxd is already running for this socket ({}); \
         use `crabboxctl status` to talk to it or `crabboxctl daemon stop` to stop it",
        socket.display()
    )]
    AlreadyRunning {
        /// The socket path.
        socket: PathBuf,
    },
    /// Something other than a stale socket is in the way.
    #[error("{} is in use by another process; stop it or choose another path with --socket", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Binding or setting the mode failed.
    #[error("cannot bind {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl ApiListener {
    /// Binds the socket at `path`: creates the directory 0700, takes the lock
    /// `<path>.lock`, removes a stale socket (only when connecting to it is
    /// refused), binds, and sets mode 0600.
    pub fn bind(path: &Path) -> Result<Self, BindError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        ensure_private_dir(dir).map_err(|source| BindError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let lock = take_lock(path)?;
        if let Ok(meta) = fs::symlink_metadata(path) {
            // Connecting to a regular file is also "refused" on Linux, so
            // only a socket can ever count as stale.
            if !meta.file_type().is_socket() {
                return Err(BindError::InUse { path: path.into() });
            }
            match UnixStream::connect(path) {
                // Something answers: a daemon started with another lock
                // (e.g. an older version) or some other program.
                Ok(_) => return Err(BindError::InUse { path: path.into() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale socket");
                    fs::remove_file(path).map_err(|source| BindError::Bind {
                        path: path.into(),
                        source,
                    })?;
                }
                // Not a socket, or not ours to touch: never delete it.
                Err(_) => return Err(BindError::InUse { path: path.into() }),
            }
        }
        let bind_err = |source| BindError::Bind {
            path: path.into(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        // The directory is already 0700; the socket's own mode is a second
        // wall in case the directory is ever shared.
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiListener {
            listener: Some(listener),
            path: path.to_owned(),
            remove_on_drop: true,
            _lock: lock,
        })
    }

    /// Takes the socket passed by systemd socket activation (`LISTEN_FDS`),
    /// if there is one. The socket file belongs to systemd and is not removed
    /// on exit; the lock is still taken beside it.
    pub fn from_systemd() -> Result<Option<Self>, BindError> {
        let mut fds = listenfd::ListenFd::from_env();
        let listener = match fds.take_unix_listener(0) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(BindError::Bind {
                    path: "LISTEN_FDS".into(),
                    source,
                });
            }
        };
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .ok_or_else(|| BindError::Bind {
                path: "LISTEN_FDS".into(),
                source: io::Error::other("the activated socket has no path"),
            })?;
        let lock = take_lock(&path)?;
        listener
            .set_nonblocking(true)
            .map_err(|source| BindError::Bind {
                path: path.clone(),
                source,
            })?;
        Ok(Some(ApiListener {
            listener: Some(listener),
            path,
            remove_on_drop: false,
            _lock: lock,
        }))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the listener out to serve on; the lock and the cleanup stay
    /// with `self`. Call once.
    pub fn take(&mut self) -> io::Result<UnixListener> {
        self.listener
            .take()
            .ok_or_else(|| io::Error::other("listener already taken"))
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn take_lock(socket: &Path) -> Result<Flock<File>, BindError> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| BindError::Bind {
            path: lock_path.clone(),
            source,
        })?;
    // The lock lives as long as the open file: it is released by the kernel
    // when the process dies, so a crash never leaves a lock behind.
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            BindError::AlreadyRunning {
                socket: socket.to_owned(),
            }
        } else {
            BindError::Bind {
                path: lock_path,
                source: io::Error::from(errno),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_sets_modes_and_a_second_bind_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("run/crabboxd.sock");
        let l = ApiListener::bind(&sock).unwrap();
        assert_eq!(super::super::fs::mode_of(&sock).unwrap() & 0o777, 0o600);
        assert_eq!(
            super::super::fs::mode_of(sock.parent().unwrap()).unwrap(),
            0o700
        );
        let err = ApiListener::bind(&sock).unwrap_err();
        assert!(matches!(err, BindError::AlreadyRunning { .. }), "{err}");
        assert!(err.to_string().contains("already running"));
        drop(l);
        assert!(!sock.exists(), "socket removed on drop");
        ApiListener::bind(&sock).unwrap();
    }

    #[test]
    fn stale_socket_is_removed_but_a_regular_file_is_not() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("crabboxd.sock");
        // A socket nobody listens on: bind then drop the std listener
        // without removing the file.
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let l = ApiListener::bind(&sock).unwrap();
        drop(l);

        let file = t.path().join("notasocket");
        fs::write(&file, b"precious").unwrap();
        let err = ApiListener::bind(&file).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        assert_eq!(fs::read(&file).unwrap(), b"precious");
    }

    #[test]
    fn a_live_foreign_server_is_not_removed() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("crabboxd.sock");
        let _other = UnixListener::bind(&sock).unwrap();
        let err = ApiListener::bind(&sock).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        assert!(sock.exists());
    }
}
