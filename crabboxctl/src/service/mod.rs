//! The platform's service manager (systemd user units on Linux, launchd
//! agents on macOS): rendering the embedded templates, installing them,
//! asking the manager to start or restart crabboxd, and reading its state.

mod launchd;
mod systemd;

use std::{
    ffi::OsStr,
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;

use crate::exit::Failure;

/// A service manager crabboxctl knows how to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    /// A systemd user unit (`~/.config/systemd/user/crabboxd.service`).
    Systemd,
    /// A launchd LaunchAgent (`~/Library/LaunchAgents/dev.crabbox.crabboxd.plist`).
    Launchd,
}

/// A rendered unit, socket or plist file and where it is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Where the file goes.
    pub path: PathBuf,
    /// Its contents.
    pub contents: String,
}

/// What the service manager says about crabboxd, for `daemon status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ManagerState {
    /// `systemd` or `launchd`.
    pub manager: &'static str,
    /// Why the manager cannot be used in this session, if it cannot.
    pub unavailable: Option<String>,
    /// The installed unit or plist file, if any.
    pub unit_file: Option<PathBuf>,
    /// The manager's own words for the service state (for example
    /// `active (running)`, `enabled`).
    pub state: Option<String>,
    /// Whether the manager says the daemon process is running.
    pub running: bool,
    /// The daemon's pid according to the manager.
    pub pid: Option<u32>,
    /// Whether systemd socket activation (`crabboxd.socket`) is enabled.
    pub socket_activation: bool,
}

impl Platform {
    /// The manager of the OS crabboxctl was built for, if it has one we drive.
    pub fn native() -> Option<Platform> {
        if cfg!(target_os = "macos") {
            Some(Platform::Launchd)
        } else if cfg!(target_os = "linux") {
            Some(Platform::Systemd)
        } else {
            None
        }
    }

    /// The manager's name.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Systemd => "systemd",
            Platform::Launchd => "launchd",
        }
    }

    /// What the installed thing is called in sentences.
    pub fn unit_noun(self) -> &'static str {
        match self {
            Platform::Systemd => "systemd user unit",
            Platform::Launchd => "launchd agent",
        }
    }

    /// The installed unit or plist, found by file presence alone so that
    /// error hints stay cheap (no subprocess).
    pub fn installed_unit(self) -> Option<PathBuf> {
        match self {
            Platform::Systemd => systemd::installed_unit(),
            Platform::Launchd => launchd::plist_path().ok().filter(|p| p.is_file()),
        }
    }

    /// The command that starts the installed service, for hints.
    pub fn start_command(self) -> String {
        match self {
            Platform::Systemd => "systemctl --user start crabboxd".to_owned(),
            Platform::Launchd => format!("launchctl kickstart {}", launchd::target()),
        }
    }

    /// The command that shows the service's state, for hints.
    pub fn status_command(self) -> String {
        match self {
            Platform::Systemd => "systemctl --user status crabboxd".to_owned(),
            Platform::Launchd => format!("launchctl print {}", launchd::target()),
        }
    }

    /// Renders the files `daemon install` writes for a daemon at `crabboxd`.
    pub fn render(
        self,
        crabboxd: &Path,
        socket_activation: bool,
        log_file: &Path,
    ) -> anyhow::Result<Vec<Rendered>> {
        match self {
            Platform::Systemd => systemd::render(crabboxd, socket_activation),
            Platform::Launchd => {
                anyhow::ensure!(
                    !socket_activation,
                    "--socket-activation is a systemd feature; the launchd agent starts crabboxd at login"
                );
                launchd::render(crabboxd, log_file)
            }
        }
    }

    /// The manager commands `daemon install` runs after writing the files.
    pub fn install_commands(self, socket_activation: bool) -> Vec<String> {
        match self {
            Platform::Systemd => systemd::install_commands(socket_activation),
            Platform::Launchd => launchd::install_commands(),
        }
    }

    /// `Err(why)` when the manager cannot be used from this session (no user
    /// systemd in a container or SSH session without lingering, no GUI
    /// domain for launchd).
    pub async fn available(self) -> Result<(), String> {
        match self {
            Platform::Systemd => systemd::available().await,
            Platform::Launchd => launchd::available().await,
        }
    }

    /// Asks the manager for crabboxd's state.
    pub async fn state(self) -> ManagerState {
        let mut state = ManagerState {
            manager: self.name(),
            unit_file: self.installed_unit(),
            ..ManagerState::default()
        };
        if let Err(why) = self.available().await {
            state.unavailable = Some(why);
            return state;
        }
        match self {
            Platform::Systemd => systemd::fill_state(&mut state).await,
            Platform::Launchd => launchd::fill_state(&mut state).await,
        }
        state
    }

    /// Starts the installed service.
    pub async fn start(self) -> anyhow::Result<()> {
        match self {
            Platform::Systemd => systemd::start().await,
            Platform::Launchd => launchd::start().await,
        }
    }

    /// Restarts the installed service (starting it if it is stopped).
    pub async fn restart(self) -> anyhow::Result<()> {
        match self {
            Platform::Systemd => systemd::restart().await,
            Platform::Launchd => launchd::restart().await,
        }
    }

    /// Loads freshly written files into the manager and starts the service.
    pub async fn activate(self, socket_activation: bool) -> anyhow::Result<()> {
        match self {
            Platform::Systemd => systemd::activate(socket_activation).await,
            Platform::Launchd => launchd::activate().await,
        }
    }

    /// Stops and unloads the service and removes the files crabboxctl
    /// installed; returns the files removed. `dry_run` only lists them.
    pub async fn uninstall(self, dry_run: bool) -> anyhow::Result<Vec<PathBuf>> {
        match self {
            Platform::Systemd => systemd::uninstall(dry_run).await,
            Platform::Launchd => launchd::uninstall(dry_run).await,
        }
    }

    /// The command that shows crabboxd's logs under this manager, or `None`
    /// when they go to the log file.
    pub fn logs_command(self, follow: bool, lines: u32) -> Option<Vec<String>> {
        match self {
            Platform::Systemd => Some(systemd::logs_command(follow, lines)),
            Platform::Launchd => None,
        }
    }
}

// === helpers shared by the managers ===

/// How long a manager command may take. `systemctl start` of a `Type=notify`
/// unit waits for READY=1, which can include a slow first config load.
const MANAGER_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a manager command and returns its output whatever the exit status.
async fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(MANAGER_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Failure::error(format!("`{program}` is not installed or not on PATH")).into())
        }
        Ok(Err(e)) => Err(e).with_context(|| format!("cannot run `{program}`")),
        Err(_) => Err(Failure::error(format!(
            "`{}` did not finish within {}s",
            command_line(program, args),
            MANAGER_TIMEOUT.as_secs()
        ))
        .into()),
    }
}

/// Runs a manager command that must succeed; its stderr becomes the error.
async fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S]) -> anyhow::Result<String> {
    let out = run(program, args).await?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(Failure::error(format!(
        "`{}` failed ({}): {}",
        command_line(program, args),
        out.status,
        stderr.trim()
    ))
    .into())
}

fn command_line<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    std::iter::once(program.to_owned())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes a file through a temporary sibling and a rename, so a manager
/// never reads half a unit.
pub fn write_atomically(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .context("a unit path has a parent directory")?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().context("a unit path has a file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes a file; a missing file is not an error.
fn remove_file(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}
