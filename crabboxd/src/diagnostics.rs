//! The daemon's diagnostics (`RunDiagnostics`, shown by `crabboxctl doctor`):
//! configuration file modes, the state directory, coordinator reachability
//! and token presence. No check ever reports a secret.

use crate::{
    config::{SourceKind, TokenSource},
    daemon::DaemonState,
    platform,
};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Passed.
    Ok,
    /// Works, but should be fixed.
    Warn,
    /// Broken.
    Fail,
    /// Did not apply.
    Skipped,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found and, when not OK, what to do.
    pub detail: String,
}

fn check(name: &str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        status,
        detail: detail.into(),
    }
}

/// Runs every check.
pub async fn run(state: &DaemonState) -> Vec<Check> {
    let config = state.config();
    let mut checks = Vec::new();

    for file in &config.files {
        let name = match file.kind {
            SourceKind::DaemonToml => "crabboxd.toml",
            SourceKind::CrabboxYaml => "crabbox config.yaml",
        };
        let path = file.path.display();
        checks.push(match file.mode {
            None => check(name, Status::Skipped, format!("{path} does not exist")),
            Some(mode) if mode & 0o077 == 0 => check(name, Status::Ok, format!("{path} mode {mode:04o}")),
            Some(mode) => check(
                name,
                Status::Fail,
                format!("{path} mode {mode:04o}, want 0600 (it may hold a token): run `chmod 600 {path}`"),
            ),
        });
    }

    let state_dir = &config.state_dir;
    checks.push(match platform::fs::mode_of(state_dir) {
        Ok(0o700) => check(
            "state directory",
            Status::Ok,
            format!("{} mode 0700", state_dir.display()),
        ),
        Ok(mode) => check(
            "state directory",
            Status::Fail,
            format!(
                "{} mode {mode:04o}, want 0700: run `chmod 700 {}`",
                state_dir.display(),
                state_dir.display()
            ),
        ),
        Err(e) => check(
            "state directory",
            Status::Fail,
            format!("{}: {e}", state_dir.display()),
        ),
    });

    match (&config.coordinator, state.coordinator()) {
        (Some(coord), Some(client)) => {
            checks.push(match &coord.token {
                Some(TokenSource::Literal { origin, .. }) => {
                    check("coordinator token", Status::Ok, format!("configured (from {origin})"))
                }
                Some(TokenSource::Command { origin, argv }) => check(
                    "coordinator token",
                    Status::Ok,
                    format!("token command `{}` configured (from {origin})", argv.first().map(String::as_str).unwrap_or("")),
                ),
                None => check(
                    "coordinator token",
                    Status::Fail,
                    "no token: set CRABBOX_COORDINATOR_TOKEN, CRABBOX_COORDINATOR_TOKEN_COMMAND or broker.token",
                ),
            });
            let t0 = tokio::time::Instant::now();
            checks.push(match client.health().await {
                Ok(h) if h.ok => check(
                    "coordinator reachable",
                    Status::Ok,
                    format!(
                        "{} answered /v1/health in {} ms ({})",
                        client.base(),
                        t0.elapsed().as_millis(),
                        h.service
                    ),
                ),
                Ok(_) => check(
                    "coordinator reachable",
                    Status::Fail,
                    format!("{} answered /v1/health without ok=true", client.base()),
                ),
                Err(e) => check(
                    "coordinator reachable",
                    Status::Fail,
                    format!("{e}; check the URL and your network"),
                ),
            });
        }
        _ => {
            checks.push(check(
                "coordinator",
                Status::Skipped,
                "no coordinator configured: set CRABBOX_COORDINATOR, broker.url in config.yaml, or [coordinator] url in crabboxd.toml",
            ));
        }
    }
    checks
}
