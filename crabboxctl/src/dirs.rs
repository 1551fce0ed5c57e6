//! Where crabboxctl looks for and puts things on this machine: the socket a
//! service-managed daemon binds, the background log file, the reference
//! config files, and the binaries it starts.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use crabbox_api::paths;

/// The socket a daemon started by systemd or launchd binds: the default
/// runtime-dir path, ignoring `CRABBOX_SOCKET`, because a unit does not see
/// the user's shell environment.
pub fn manager_socket() -> Option<PathBuf> {
    paths::default_runtime_dir().map(|d| d.join(paths::SOCKET_FILE))
}

/// Whether `socket` is the one a service-managed daemon would bind.
pub fn is_manager_socket(socket: &Path) -> bool {
    manager_socket().is_some_and(|m| m == socket)
}

fn base() -> anyhow::Result<directories::BaseDirs> {
    directories::BaseDirs::new().context("cannot find your home directory (is $HOME set?)")
}

/// The log file of a daemon started in the background by `daemon start` or by
/// launchd: `$XDG_STATE_HOME/crabbox/crabboxd.log` on Linux,
/// `~/Library/Logs/crabbox/crabboxd.log` on macOS.
pub fn default_log_file() -> anyhow::Result<PathBuf> {
    let base = base()?;
    let dir = if cfg!(target_os = "macos") {
        base.home_dir().join("Library/Logs/crabbox")
    } else {
        base.state_dir()
            .map(|d| d.join("crabbox"))
            .unwrap_or_else(|| base.data_local_dir().join("crabbox"))
    };
    Ok(dir.join("crabboxd.log"))
}

/// The user's configuration directory (`~/.config` or `$XDG_CONFIG_HOME` on
/// Linux, `~/Library/Application Support` on macOS).
pub fn config_dir() -> anyhow::Result<PathBuf> {
    Ok(base()?.config_dir().to_path_buf())
}

/// Directories that hold crabbox's credentials, keys and state, and the
/// user's SSH keys: the MCP copy tools neither read from nor write into them
/// (an agent asked to copy a file must not hand the lease a token or a key,
/// nor plant a `token_command` in the daemon's configuration).
pub fn private_roots() -> anyhow::Result<Vec<PathBuf>> {
    let base = base()?;
    let mut roots = vec![
        base.config_dir().join("crabbox"),
        base.home_dir().join(".ssh"),
        base.data_local_dir().join("crabbox"),
    ];
    roots.extend(base.state_dir().map(|d| d.join("crabbox")));
    roots.extend(base.runtime_dir().map(|d| d.join("crabbox")));
    if cfg!(target_os = "macos") {
        roots.push(base.home_dir().join("Library/Logs/crabbox"));
    }
    if let Some(p) = env::var_os("CRABBOX_CONFIG").filter(|p| !p.is_empty()) {
        roots.push(PathBuf::from(p));
    }
    Ok(roots)
}

/// `p` with its longest existing ancestor's symlinks resolved and the rest
/// folded on top (`..` removing a component), so a path through a link or
/// a `..` is compared where it really points.
pub fn resolved(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(mut out) = existing.canonicalize() {
            for part in rest.iter().rev() {
                if part == ".." {
                    out.pop();
                } else if part != "." {
                    out.push(part);
                }
            }
            return out;
        }
        let Some(last) = existing.components().next_back() else {
            return p.to_path_buf();
        };
        rest.push(last.as_os_str().to_os_string());
        if !existing.pop() {
            return p.to_path_buf();
        }
    }
}

/// The user's home directory.
pub fn home_dir() -> anyhow::Result<PathBuf> {
    Ok(base()?.home_dir().to_path_buf())
}

/// The configuration files the daemon layers, for checks made while the
/// daemon is down: its own TOML, then the reference CLI's YAML (or
/// `$CRABBOX_CONFIG`, which replaces it).
pub fn config_files() -> anyhow::Result<Vec<PathBuf>> {
    let dir = config_dir()?.join("crabbox");
    let yaml = match env::var_os("CRABBOX_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => dir.join("config.yaml"),
    };
    Ok(vec![dir.join("crabboxd.toml"), yaml])
}

/// Finds the `crabboxd` binary: `explicit` when given, else next to this
/// executable (how release tarballs and `cargo build` lay them out), else on
/// `PATH`. The result is absolute, because units and agents need it so.
pub fn find_crabboxd(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return std::path::absolute(p)
            .with_context(|| format!("cannot resolve the crabboxd path {}", p.display()));
    }
    // Beside the path crabboxctl was started as, where the OS reports a
    // symlink's own path (macOS; a symlink farm such as ~/.local/bin), then
    // beside the file it resolves to (the unpacked tarball).
    if let Ok(exe) = env::current_exe() {
        let resolved = exe.canonicalize().ok();
        let sibling = [Some(exe), resolved]
            .into_iter()
            .flatten()
            .filter_map(|e| e.parent().map(|d| d.join("crabboxd")))
            .find(|p| p.is_file());
        if let Some(p) = sibling {
            return Ok(p);
        }
    }
    if let Some(p) = env::var_os("PATH")
        .iter()
        .flat_map(env::split_paths)
        .map(|d| d.join("crabboxd"))
        .find(|p| p.is_file())
    {
        return std::path::absolute(&p)
            .with_context(|| format!("cannot resolve the crabboxd path {}", p.display()));
    }
    Err(crate::exit::Failure::error(
        "cannot find the crabboxd binary next to crabboxctl or on PATH",
    )
    .hint("pass --daemon-bin /path/to/crabboxd, or set CRABBOXD_BIN")
    .into())
}

/// Quotes a path for a shell command line shown to the user, only when it
/// needs it.
pub fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_only_when_needed() {
        assert_eq!(
            shell_quote(Path::new("/run/user/1/x.sock")),
            "/run/user/1/x.sock"
        );
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }

    #[test]
    fn explicit_daemon_bin_is_made_absolute() {
        let p = find_crabboxd(Some(Path::new("bin/crabboxd"))).unwrap();
        assert!(p.is_absolute());
        assert!(p.ends_with("bin/crabboxd"));
    }
}
