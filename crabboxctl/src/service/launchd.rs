//! launchd LaunchAgents: rendering `launchd/dev.crabbox.crabboxd.plist`, and
//! the `launchctl` calls that bootstrap, kick and inspect it in the user's
//! `gui/<uid>` domain.

use std::{fs, os::unix::fs::DirBuilderExt as _, path::Path, path::PathBuf};

use anyhow::Context as _;

use super::{ManagerState, Rendered, remove_file, run, run_ok};
use crate::dirs;

const TEMPLATE: &str = include_str!("../../../launchd/dev.crabbox.crabboxd.plist");

/// The agent's launchd label.
pub(super) const LABEL: &str = "dev.crabbox.crabboxd";

/// `~/Library/LaunchAgents/dev.crabbox.crabboxd.plist`.
pub(super) fn plist_path() -> anyhow::Result<PathBuf> {
    Ok(dirs::home_dir()?.join(format!("Library/LaunchAgents/{LABEL}.plist")))
}

fn domain() -> String {
    format!("gui/{}", nix::unistd::getuid())
}

/// `gui/<uid>/dev.crabbox.crabboxd`, the service target of launchctl.
pub(super) fn target() -> String {
    format!("{}/{LABEL}", domain())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the plist for a daemon at `crabboxd` logging to `log_file`. Only
/// the `<string>` placeholders are substituted, so the header comment keeps
/// naming them.
pub(super) fn render(crabboxd: &Path, log_file: &Path) -> anyhow::Result<Vec<Rendered>> {
    let mut contents = TEMPLATE.to_owned();
    for (placeholder, value) in [("{{crabboxd}}", crabboxd), ("{{log_file}}", log_file)] {
        let from = format!("<string>{placeholder}</string>");
        anyhow::ensure!(
            contents.contains(&from),
            "the embedded plist has no `{from}`"
        );
        let to = format!(
            "<string>{}</string>",
            xml_escape(&value.display().to_string())
        );
        contents = contents.replace(&from, &to);
    }
    Ok(vec![Rendered {
        path: plist_path()?,
        contents,
    }])
}

pub(super) fn install_commands() -> Vec<String> {
    let plist = plist_path()
        .map(|p| dirs::shell_quote(&p))
        .unwrap_or_else(|_| format!("~/Library/LaunchAgents/{LABEL}.plist"));
    vec![
        format!("launchctl bootout {} (if loaded)", target()),
        format!("launchctl bootstrap {} {plist}", domain()),
    ]
}

pub(super) async fn available() -> Result<(), String> {
    match run("launchctl", &["print", &domain()]).await {
        Ok(out) if out.status.success() => Ok(()),
        Ok(_) => Err(format!(
            "there is no launchd {} domain (LaunchAgents need a GUI login session)",
            domain()
        )),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Whether the agent is loaded, and launchctl's description of it.
async fn print() -> Option<String> {
    let out = run("launchctl", &["print", &target()]).await.ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads `key = value` from the top level of `launchctl print`.
fn print_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.trim_start().strip_prefix('='))
        .map(str::trim)
}

pub(super) async fn fill_state(state: &mut ManagerState) {
    match print().await {
        Some(out) => {
            let s = print_value(&out, "state").unwrap_or("unknown");
            state.running = s == "running";
            state.state = Some(format!("loaded, {s}"));
            state.pid = print_value(&out, "pid").and_then(|p| p.parse().ok());
        }
        None => state.state = Some("not loaded".to_owned()),
    }
}

async fn bootstrap() -> anyhow::Result<()> {
    let plist = plist_path()?.display().to_string();
    run_ok("launchctl", &["bootstrap", &domain(), &plist])
        .await
        .map(drop)
}

pub(super) async fn start() -> anyhow::Result<()> {
    if print().await.is_none() {
        // RunAtLoad starts it as it loads.
        return bootstrap().await;
    }
    run_ok("launchctl", &["kickstart", &target()])
        .await
        .map(drop)
}

pub(super) async fn restart() -> anyhow::Result<()> {
    if print().await.is_none() {
        return bootstrap().await;
    }
    run_ok("launchctl", &["kickstart", "-k", &target()])
        .await
        .map(drop)
}

pub(super) async fn activate() -> anyhow::Result<()> {
    // launchd reads a plist only at bootstrap, so an installed agent is
    // unloaded first; it is fine for that to fail when none is loaded.
    let _ = run("launchctl", &["bootout", &target()]).await;
    let log_dir = dirs::default_log_file()?
        .parent()
        .context("the log file has a directory")?
        .to_path_buf();
    // launchd opens StandardOutPath itself and fails silently when the
    // directory is missing.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    bootstrap().await
}

pub(super) async fn uninstall(dry_run: bool) -> anyhow::Result<Vec<PathBuf>> {
    let plist = plist_path()?;
    if !plist.is_file() {
        return Ok(Vec::new());
    }
    if !dry_run {
        let _ = run("launchctl", &["bootout", &target()]).await;
        remove_file(&plist)?;
    }
    Ok(vec![plist])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plist_renders_paths_escaped() {
        let files = render(
            Path::new("/Users/a&b/bin/crabboxd"),
            Path::new("/Users/a&b/Library/Logs/crabbox/crabboxd.log"),
        )
        .unwrap();
        let plist = &files[0].contents;
        assert!(
            files[0]
                .path
                .ends_with("Library/LaunchAgents/dev.crabbox.crabboxd.plist")
        );
        assert!(plist.contains("<string>/Users/a&amp;b/bin/crabboxd</string>"));
        assert_eq!(
            plist
                .matches("<string>/Users/a&amp;b/Library/Logs/crabbox/crabboxd.log</string>")
                .count(),
            2
        );
        assert!(!plist.contains("<string>{{"));
        assert!(plist.contains("<key>RunAtLoad</key>\n  <true/>"));
        assert!(plist.contains("<key>SuccessfulExit</key>\n    <false/>"));
        assert!(plist.contains(&format!("<string>{LABEL}</string>")));
    }

    #[test]
    fn print_output_parses() {
        let out = "gui/501/dev.crabbox.crabboxd = {\n\tstate = running\n\tpid = 812\n}";
        assert_eq!(print_value(out, "state"), Some("running"));
        assert_eq!(print_value(out, "pid"), Some("812"));
    }
}
