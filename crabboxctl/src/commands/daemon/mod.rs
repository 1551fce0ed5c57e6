//! `crabboxctl daemon …`: the daemon process itself — start, stop, restart,
//! status, install, uninstall and logs. Each verb has its own file; this one
//! holds the flags and `daemon status`.

mod install;
mod logs;
mod start;
mod stop;

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    Ctx, connect, dirs,
    exit::Code,
    output,
    service::{ManagerState, Platform},
};

/// Start, stop, install or inspect the daemon process itself.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, clap::Subcommand)]
enum Verb {
    /// Start crabboxd: through systemd or launchd when its unit is installed,
    /// else in the background with its log in the user state directory.
    /// Waits until the daemon answers.
    Start(start::StartArgs),
    /// Ask crabboxd to shut down (the Shutdown RPC) and wait until it has
    /// drained its tasks and exited.
    Stop(stop::StopArgs),
    /// Restart crabboxd: through its service manager, or stop then start.
    Restart(start::StartArgs),
    /// Say whether crabboxd answers, and what its service manager reports.
    /// Exits 3 when the daemon is not reachable.
    Status(StatusArgs),
    /// Install crabboxd as a user service (systemd user unit or launchd
    /// agent), enable it and start it.
    Install(install::InstallArgs),
    /// Stop and remove the user service that `install` created.
    Uninstall(install::UninstallArgs),
    /// Show crabboxd's logs (the user journal, or its log file).
    Logs(logs::LogsArgs),
}

/// Flags of `daemon status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON (for scripts; the format is unstable until promised).
    #[arg(long)]
    json: bool,
}

/// Runs `crabboxctl daemon …`.
pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<Code> {
    match args.command {
        Verb::Start(a) => start::start(ctx, &a).await,
        Verb::Stop(a) => stop::stop(ctx, &a).await,
        Verb::Restart(a) => start::restart(ctx, &a).await,
        Verb::Status(a) => status(ctx, &a).await,
        Verb::Install(a) => install::install(ctx, &a).await,
        Verb::Uninstall(a) => install::uninstall(&a).await,
        Verb::Logs(a) => logs::logs(&a).await,
    }
}

/// `daemon status --json`.
#[derive(Debug, Serialize)]
struct DaemonStatusJson {
    running: bool,
    socket: PathBuf,
    pid: Option<u32>,
    version: Option<String>,
    error: Option<String>,
    manager: Option<ManagerState>,
}

async fn status(ctx: &Ctx, args: &StatusArgs) -> anyhow::Result<Code> {
    let probe = async {
        let client = connect::connect(&ctx.socket).await?;
        connect::call(&ctx.socket, "GetStatus", client.status()).await
    };
    let (manager, probe) = tokio::join!(
        async {
            match Platform::native() {
                Some(p) if dirs::is_manager_socket(&ctx.socket) => Some(p.state().await),
                _ => None,
            }
        },
        probe
    );
    let mut json = DaemonStatusJson {
        running: false,
        socket: ctx.socket.clone(),
        pid: None,
        version: None,
        error: None,
        manager,
    };
    let mut human = String::new();
    match &probe {
        Ok((s, _)) => {
            json.running = true;
            json.pid = Some(s.pid);
            json.version = Some(s.version.clone());
            human.push_str(&format!(
                "crabboxd is running: pid {}, version {}, up {}, at {}\n",
                s.pid,
                s.version,
                s.started_at
                    .as_ref()
                    .map_or("-".to_owned(), |t| output::ago(
                        output::unix_ms(t),
                        output::now_unix_ms()
                    )),
                ctx.socket.display()
            ));
        }
        Err(err) => {
            json.error = Some(format!("{err:#}"));
            human.push_str(&format!("crabboxd is not running: {err:#}\n"));
        }
    }
    if let Some(m) = &json.manager {
        human.push_str(&manager_line(m));
    }
    if args.json {
        output::print_json(&json)?;
    } else {
        out!("{human}")?;
    }
    Ok(if json.running {
        Code::Ok
    } else {
        Code::Unreachable
    })
}

fn manager_line(m: &ManagerState) -> String {
    if let Some(why) = &m.unavailable {
        return format!("{}: not available ({why})\n", m.manager);
    }
    match (&m.unit_file, &m.state) {
        (None, _) => format!(
            "{}: not installed (run `crabboxctl daemon install` to start crabboxd at login)\n",
            m.manager
        ),
        (Some(file), state) => {
            let mut line = format!(
                "{}: {} ({})",
                m.manager,
                state.as_deref().unwrap_or("unknown"),
                file.display()
            );
            if let Some(pid) = m.pid {
                line.push_str(&format!(", pid {pid}"));
            }
            if m.socket_activation {
                line.push_str(", socket activation on");
            }
            line.push('\n');
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_lines_say_what_to_do() {
        let mut m = ManagerState {
            manager: "systemd",
            ..ManagerState::default()
        };
        assert!(manager_line(&m).contains("crabboxctl daemon install"));
        m.unit_file = Some("/h/.config/systemd/user/crabboxd.service".into());
        m.state = Some("active (running), enabled".into());
        m.pid = Some(7);
        assert_eq!(
            manager_line(&m),
            "systemd: active (running), enabled (/h/.config/systemd/user/crabboxd.service), pid 7\n"
        );
        m.unavailable = Some("no user manager".into());
        assert_eq!(
            manager_line(&m),
            "systemd: not available (no user manager)\n"
        );
    }
}
