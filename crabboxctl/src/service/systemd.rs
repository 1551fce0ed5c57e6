//! systemd user units: rendering `systemd/crabboxd.{service,socket}`, and the
//! `systemctl --user` calls that install, start and inspect them.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::{ManagerState, Rendered, remove_file, run, run_ok};
use crate::dirs;

const SERVICE_TEMPLATE: &str = include_str!("../../../systemd/crabboxd.service");
const SOCKET_TEMPLATE: &str = include_str!("../../../systemd/crabboxd.socket");
const SERVICE: &str = "crabboxd.service";
const SOCKET: &str = "crabboxd.socket";

/// `~/.config/systemd/user` (or under `$XDG_CONFIG_HOME`).
fn user_unit_dir() -> anyhow::Result<PathBuf> {
    Ok(dirs::config_dir()?.join("systemd/user"))
}

/// The crabboxd.service systemd would load for this user: ours first, then
/// the directories packages install into.
pub(super) fn installed_unit() -> Option<PathBuf> {
    let mine = user_unit_dir().ok().map(|d| d.join(SERVICE));
    mine.into_iter()
        .chain(
            [
                "/etc/systemd/user",
                "/usr/local/lib/systemd/user",
                "/usr/lib/systemd/user",
            ]
            .map(|d| Path::new(d).join(SERVICE)),
        )
        .find(|p| p.is_file())
}

/// Quotes `ExecStart`'s executable for systemd: `%` starts a specifier and
/// `$` a variable, and whitespace splits arguments unless quoted.
fn exec_quote(path: &Path) -> String {
    let s = path
        .display()
        .to_string()
        .replace('%', "%%")
        .replace('$', "$$");
    if s.chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// Renders the service unit for a daemon at `crabboxd` (and the socket unit
/// when asked). Only the `ExecStart=` line is substituted, so the template's
/// comments keep naming the placeholder.
pub(super) fn render(crabboxd: &Path, socket_activation: bool) -> anyhow::Result<Vec<Rendered>> {
    let dir = user_unit_dir()?;
    let placeholder = "ExecStart={{crabboxd}}";
    anyhow::ensure!(
        SERVICE_TEMPLATE.lines().any(|l| l == placeholder),
        "the embedded crabboxd.service has no `{placeholder}` line"
    );
    let service = SERVICE_TEMPLATE
        .lines()
        .map(|l| {
            if l == placeholder {
                format!("ExecStart={}", exec_quote(crabboxd))
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let mut files = vec![Rendered {
        path: dir.join(SERVICE),
        contents: service,
    }];
    if socket_activation {
        files.push(Rendered {
            path: dir.join(SOCKET),
            contents: SOCKET_TEMPLATE.to_owned(),
        });
    }
    Ok(files)
}

pub(super) fn install_commands(socket_activation: bool) -> Vec<String> {
    let mut cmds = vec!["systemctl --user daemon-reload".to_owned()];
    if socket_activation {
        cmds.push(format!("systemctl --user disable --now {SERVICE}"));
        cmds.push(format!("systemctl --user enable --now {SOCKET}"));
    } else {
        cmds.push(format!("systemctl --user enable {SERVICE}"));
        cmds.push(format!("systemctl --user restart {SERVICE}"));
    }
    cmds
}

pub(super) async fn available() -> Result<(), String> {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        return Err(
            "XDG_RUNTIME_DIR is not set, so this session has no systemd user manager".to_owned(),
        );
    }
    match run("systemctl", &["--user", "show-environment"]).await {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "there is no systemd user manager for this session (`systemctl --user` says: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Parses `systemctl show` output (`Key=Value` lines).
fn show_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

pub(super) async fn fill_state(state: &mut ManagerState) {
    let props = [
        "LoadState",
        "ActiveState",
        "SubState",
        "UnitFileState",
        "MainPID",
    ];
    let mut args = vec!["--user", "show", SERVICE];
    for p in &props {
        args.extend(["-p", p]);
    }
    if let Ok(out) = run_ok("systemctl", &args).await {
        let load = show_value(&out, "LoadState").unwrap_or("unknown");
        let active = show_value(&out, "ActiveState").unwrap_or("unknown");
        let sub = show_value(&out, "SubState").unwrap_or("unknown");
        let enabled = show_value(&out, "UnitFileState").unwrap_or("unknown");
        state.state = Some(if load == "loaded" {
            format!("{active} ({sub}), {enabled}")
        } else {
            load.to_owned()
        });
        state.running = active == "active" || active == "reloading";
        state.pid = show_value(&out, "MainPID")
            .and_then(|p| p.parse().ok())
            .filter(|p| *p != 0);
    }
    if let Ok(out) = run_ok(
        "systemctl",
        &["--user", "show", SOCKET, "-p", "ActiveState"],
    )
    .await
    {
        state.socket_activation = show_value(&out, "ActiveState") == Some("active");
    }
}

pub(super) async fn start() -> anyhow::Result<()> {
    run_ok("systemctl", &["--user", "start", SERVICE])
        .await
        .map(drop)
}

pub(super) async fn restart() -> anyhow::Result<()> {
    run_ok("systemctl", &["--user", "restart", SERVICE])
        .await
        .map(drop)
}

pub(super) async fn activate(socket_activation: bool) -> anyhow::Result<()> {
    run_ok("systemctl", &["--user", "daemon-reload"]).await?;
    if socket_activation {
        // systemd must own the socket path before anything connects, so a
        // daemon started by the plain service goes first.
        let _ = run("systemctl", &["--user", "disable", "--now", SERVICE]).await;
        run_ok("systemctl", &["--user", "enable", "--now", SOCKET]).await?;
    } else {
        let socket_unit = user_unit_dir()?.join(SOCKET);
        if socket_unit.is_file() {
            // Switching back from socket activation: the socket unit would
            // otherwise keep the path and fight the service for it.
            let _ = run("systemctl", &["--user", "disable", "--now", SOCKET]).await;
            remove_file(&socket_unit)?;
            run_ok("systemctl", &["--user", "daemon-reload"]).await?;
        }
        run_ok("systemctl", &["--user", "enable", SERVICE]).await?;
        // restart, not start: a reinstall must pick up a new ExecStart.
        run_ok("systemctl", &["--user", "restart", SERVICE]).await?;
    }
    Ok(())
}

pub(super) async fn uninstall(dry_run: bool) -> anyhow::Result<Vec<PathBuf>> {
    let dir = user_unit_dir()?;
    let files: Vec<PathBuf> = [SOCKET, SERVICE]
        .iter()
        .map(|u| dir.join(u))
        .filter(|p| p.is_file())
        .collect();
    if dry_run || files.is_empty() {
        return Ok(files);
    }
    let manager = available().await.is_ok();
    for file in &files {
        if manager {
            let unit = file
                .file_name()
                .context("unit file name")?
                .to_string_lossy();
            let _ = run("systemctl", &["--user", "disable", "--now", &unit]).await;
        }
        remove_file(file)?;
    }
    if manager {
        run_ok("systemctl", &["--user", "daemon-reload"]).await?;
    }
    Ok(files)
}

pub(super) fn logs_command(follow: bool, lines: u32) -> Vec<String> {
    let mut cmd = ["journalctl", "--user", "-u", SERVICE, "--no-pager", "-n"]
        .map(str::to_owned)
        .to_vec();
    cmd.push(lines.to_string());
    if follow {
        cmd.push("-f".to_owned());
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_renders_exec_start_and_keeps_the_contract() {
        let files = render(Path::new("/opt/crabbox/bin/crabboxd"), false).unwrap();
        assert_eq!(files.len(), 1);
        let unit = &files[0].contents;
        assert!(files[0].path.ends_with("systemd/user/crabboxd.service"));
        assert!(unit.contains("\nExecStart=/opt/crabbox/bin/crabboxd\n"));
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=30s",
            "RestartPreventExitStatus=64",
            "WantedBy=default.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "missing {line}");
        }
        let active: Vec<_> = unit.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!active.iter().any(|l| l.contains("{{")), "{active:?}");
    }

    #[test]
    fn socket_unit_matches_the_default_socket() {
        let files = render(Path::new("/usr/bin/crabboxd"), true).unwrap();
        assert_eq!(files.len(), 2);
        let socket = &files[1].contents;
        assert!(files[1].path.ends_with("crabboxd.socket"));
        assert!(socket.contains("ListenStream=%t/crabbox/crabboxd.sock"));
        assert!(socket.contains("SocketMode=0600"));
        assert!(socket.contains("DirectoryMode=0700"));
        assert!(crabbox_api::paths::SOCKET_FILE == "crabboxd.sock");
    }

    #[test]
    fn exec_paths_are_escaped() {
        assert_eq!(
            exec_quote(Path::new("/usr/bin/crabboxd")),
            "/usr/bin/crabboxd"
        );
        assert_eq!(
            exec_quote(Path::new("/home/a b/100%/$x/crabboxd")),
            "\"/home/a b/100%%/$$x/crabboxd\""
        );
    }

    #[test]
    fn show_output_parses() {
        let out = "LoadState=loaded\nActiveState=active\nMainPID=0\nUnitFileState=\n";
        assert_eq!(show_value(out, "ActiveState"), Some("active"));
        assert_eq!(show_value(out, "UnitFileState"), None);
        assert_eq!(show_value(out, "State"), None);
    }

    #[test]
    fn logs_use_the_user_journal() {
        assert_eq!(
            logs_command(true, 50).join(" "),
            "journalctl --user -u crabboxd.service --no-pager -n 50 -f"
        );
    }
}
