//! `daemon install` and `daemon uninstall`: render the embedded systemd unit
//! or launchd plist for this crabboxd, write it, and have the manager enable
//! and start it (or undo all that). `--dry-run` prints instead of writing.

use std::{path::PathBuf, time::Duration};

use super::{start, stop};
use crate::{
    Ctx, dirs,
    exit::{Code, Failure},
    service::{Platform, write_atomically},
};

/// Flags of `daemon install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Print the files that would be written and the commands that would
    /// run; change nothing.
    #[arg(long, visible_alias = "print")]
    dry_run: bool,

    /// The crabboxd binary the unit runs [default: next
    /// to crabboxctl, else on PATH].
    #[arg(long, env = "CRABBOXD_BIN", value_name = "PATH")]
    daemon_bin: Option<PathBuf>,

    /// Also install crabboxd.socket, so systemd owns the socket and starts
    /// crabboxd on first use (systemd only).
    #[arg(long)]
    socket_activation: bool,

    /// Render for this service manager rather than this OS's (only with
    /// --dry-run on another OS).
    #[arg(long, value_enum)]
    platform: Option<Platform>,

    /// How long to wait for the started daemon to answer, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    timeout: u64,
}

/// Flags of `daemon uninstall`.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Print what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn no_manager() -> Failure {
    Failure::error(
        "crabboxctl can install crabboxd only as a systemd user unit (Linux) or a launchd agent (macOS)",
    )
    .hint("run `crabboxd` in the foreground, or `crabboxctl daemon start` to run it in the background")
}

/// Runs `daemon install`.
pub async fn install(ctx: &Ctx, args: &InstallArgs) -> anyhow::Result<Code> {
    let native = Platform::native();
    let platform = args.platform.or(native).ok_or_else(no_manager)?;
    let bin = dirs::find_crabboxd(args.daemon_bin.as_deref())?;
    let log_file = dirs::default_log_file()?;
    let files = platform.render(&bin, args.socket_activation, &log_file)?;

    if args.dry_run {
        for file in &files {
            outln!("# ==> {} <==", file.path.display())?;
            out!("{}", file.contents)?;
            outln!("")?;
        }
        outln!("# then run:")?;
        for cmd in platform.install_commands(args.socket_activation) {
            outln!("#   {cmd}")?;
        }
        return Ok(Code::Ok);
    }

    if Some(platform) != native {
        return Err(Failure::error(format!(
            "--platform {} works only with --dry-run on this OS",
            platform.name()
        ))
        .into());
    }
    if !bin.is_file() {
        return Err(
            Failure::error(format!("there is no crabboxd at {}", bin.display()))
                .hint("pass --daemon-bin /path/to/crabboxd")
                .into(),
        );
    }
    if let Err(why) = platform.available().await {
        return Err(Failure::error(format!(
            "cannot install the {}: {why}",
            platform.unit_noun()
        ))
        .hint(format!(
            "run crabboxd in the foreground instead: `{}`",
            dirs::shell_quote(&bin)
        ))
        .hint(format!(
            "or in the background with its log in {}: `crabboxctl daemon start`",
            log_file.display()
        ))
        .into());
    }

    let Some(socket) = dirs::manager_socket() else {
        return Err(Failure::error(
            "cannot work out the service's socket path (no home directory)",
        )
        .into());
    };
    let managed = Ctx {
        socket: socket.clone(),
    };
    // A daemon started outside the manager holds the socket and its lock, so
    // the managed one would refuse to start; hand the socket over.
    if let Some(running) = start::probe(&socket).await {
        let state = platform.state().await;
        if state.pid != Some(running.pid) {
            eprintln!(
                "stopping the crabboxd started outside {} (pid {}) so {} can own it",
                platform.name(),
                running.pid,
                platform.name()
            );
            stop::stop_running(&managed, None).await?;
        }
    }

    for file in &files {
        write_atomically(&file.path, &file.contents, 0o644)?;
        outln!("wrote {}", file.path.display())?;
    }
    platform.activate(args.socket_activation).await?;
    if args.socket_activation {
        outln!(
            "systemd now listens on {} and starts crabboxd on first use",
            socket.display()
        )?;
    } else {
        let status =
            start::wait_until_answering(&socket, Duration::from_secs(args.timeout), None).await?;
        outln!(
            "crabboxd is running under {}: pid {}, version {}, at {}",
            platform.name(),
            status.pid,
            status.version,
            socket.display()
        )?;
    }
    if ctx.socket != socket {
        eprintln!(
            "note: the service's crabboxd listens on {}, not on {} (from --socket or CRABBOX_SOCKET)",
            socket.display(),
            ctx.socket.display()
        );
    }
    if platform == Platform::Systemd && !lingering() {
        eprintln!(
            "note: systemd stops user services when you log out; `loginctl enable-linger` keeps crabboxd running"
        );
    }
    Ok(Code::Ok)
}

/// Whether systemd keeps this user's services running after logout.
fn lingering() -> bool {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name);
    user.is_some_and(|name| {
        std::path::Path::new("/var/lib/systemd/linger")
            .join(name)
            .exists()
    })
}

/// Runs `daemon uninstall`.
pub async fn uninstall(args: &UninstallArgs) -> anyhow::Result<Code> {
    let platform = Platform::native().ok_or_else(no_manager)?;
    let removed = platform.uninstall(args.dry_run).await?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for file in &removed {
        outln!("{verb} {}", file.display())?;
    }
    if removed.is_empty() {
        outln!(
            "nothing to uninstall: crabboxctl installed no {}",
            platform.unit_noun()
        )?;
    }
    if !args.dry_run
        && let Some(other) = platform.installed_unit()
    {
        eprintln!(
            "note: {} is still installed (by a package?); remove it with the package manager",
            other.display()
        );
    }
    Ok(Code::Ok)
}
