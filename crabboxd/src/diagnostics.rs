//! The daemon's diagnostics (`RunDiagnostics`, shown by `crabboxctl doctor`):
//! configuration file modes, the state directory, coordinator reachability
//! and token presence; and one lease's SSH setup (`doctor --id`). No check
//! ever reports a secret.

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

/// The SSH checks of one lease (`crabboxctl doctor --id L`): the target,
/// the key and its mode, the per-lease known_hosts, the agent when there is
/// no key file, and which port answers. Nothing runs on the lease and no
/// key material, passphrase or agent path is reported.
pub async fn ssh(state: &DaemonState, lease: &str, agent: Option<&std::path::Path>) -> Vec<Check> {
    use crate::ssh::conn;
    let mut checks = Vec::new();
    let info = match state.ssh().target_info(lease).await {
        Ok(i) => i,
        Err(e) => {
            checks.push(check("ssh target", Status::Fail, e.to_string()));
            return checks;
        }
    };
    let t = &info.target;
    checks.push(check(
        "ssh target",
        Status::Ok,
        format!(
            "{}@{} ports {:?} (from the {})",
            t.user,
            t.host,
            t.ports,
            if t.origin == crate::ssh::target::Origin::Static {
                "static target in crabboxd.toml"
            } else {
                "coordinator's lease record"
            }
        ),
    ));

    // The key: the per-lease key when present, else the configured one.
    match &info.key {
        Some(key) => {
            let path = key.display();
            checks.push(match platform::fs::mode_of(key) {
                Ok(mode) if mode & 0o077 == 0 => check("ssh key", Status::Ok, format!("{path} mode {mode:04o}")),
                Ok(mode) => check(
                    "ssh key",
                    Status::Fail,
                    format!("{path} mode {mode:04o}, want 0600 (OpenSSH refuses a key others can read): run `chmod 600 {path}`"),
                ),
                Err(e) => check(
                    "ssh key",
                    Status::Fail,
                    format!("{path}: {e}; fix the key setting in crabboxd.toml or put the key there"),
                ),
            });
            checks.push(check(
                "ssh agent",
                Status::Skipped,
                "not needed: a key file is used",
            ));
        }
        None => {
            checks.push(check(
                "ssh key",
                Status::Skipped,
                format!(
                    "no key file ({} does not exist and no key is configured); the SSH agent is used",
                    state.ssh().lease_key_path(lease).display()
                ),
            ));
            checks.push(match agent {
                None => check(
                    "ssh agent",
                    Status::Fail,
                    "no key file and no SSH agent (SSH_AUTH_SOCK is not set): start ssh-agent and ssh-add a key, or set [ssh] key in crabboxd.toml",
                ),
                Some(sock) => match conn::agent_keys(sock).await {
                    Ok(0) => check("ssh agent", Status::Fail, "the SSH agent holds no keys: add one with ssh-add"),
                    Ok(n) => check("ssh agent", Status::Ok, format!("reachable, {n} key(s)")),
                    Err(e) => check("ssh agent", Status::Fail, format!("{e}; check SSH_AUTH_SOCK")),
                },
            });
        }
    }

    // known_hosts: one pinned entry when the key is pinned, else the keys
    // learned on first use.
    let kh = info.known_hosts.display();
    let reset = format!("rm {kh}");
    checks.push(match state.ssh().audit_host_keys(t) {
        Err(e) => check("known_hosts", Status::Fail, e.to_string()),
        Ok(a) => {
            let mode = platform::fs::mode_of(&info.known_hosts).ok();
            match (t.pin.is_some(), a) {
                (_, a) if a.exists && mode.is_some_and(|m| m & 0o077 != 0) => check(
                    "known_hosts",
                    Status::Fail,
                    format!("{kh} mode {:04o}, want 0600: run `chmod 600 {kh}`", mode.unwrap_or(0)),
                ),
                (_, a) if a.bad_lines > 0 => check(
                    "known_hosts",
                    Status::Fail,
                    format!("{kh} has {} line(s) that are not host keys: run `{reset}` (the next connection writes it again)", a.bad_lines),
                ),
                (true, a) if a.entries == 1 && a.not_pinned == 0 => {
                    check("known_hosts", Status::Ok, format!("{kh}: the one pinned host key"))
                }
                (true, a) => check(
                    "known_hosts",
                    Status::Fail,
                    format!(
                        "{kh} has {} entries ({} not the pinned key), want only the pinned one: run `{reset}`",
                        a.entries, a.not_pinned
                    ),
                ),
                (false, a) if !a.exists || a.entries == 0 => check(
                    "known_hosts",
                    Status::Ok,
                    format!("{kh}: no key yet; the first connection trusts the host key and records it"),
                ),
                (false, a) => check(
                    "known_hosts",
                    Status::Ok,
                    format!("{kh}: {} host key(s) trusted on first use", a.entries),
                ),
            }
        }
    });

    // Which port answers: the lease port, then the fallbacks.
    let mut tried = Vec::new();
    let mut answered = None;
    for &port in &t.ports {
        match conn::probe_port(&t.host, port).await {
            Ok(ident) => {
                answered = Some((port, ident));
                break;
            }
            Err(e) => tried.push(format!("{port}: {e}")),
        }
    }
    checks.push(match answered {
        Some((port, ident)) if tried.is_empty() => check(
            "ssh port",
            Status::Ok,
            format!("{}:{port} answers ({ident})", t.host),
        ),
        Some((port, ident)) => check(
            "ssh port",
            Status::Warn,
            format!(
                "{}:{port} answers ({ident}); falling back from {} ({})",
                t.host,
                t.ports[0],
                tried.join("; ")
            ),
        ),
        None => check(
            "ssh port",
            Status::Fail,
            format!(
                "no SSH on {} (tried {}); is the lease up and its sshd running?",
                t.host,
                tried.join("; ")
            ),
        ),
    });
    checks
}
