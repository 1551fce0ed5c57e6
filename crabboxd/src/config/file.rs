//! The daemon's own TOML file, `<config dir>/crabbox/crabboxd.toml`: its
//! schema, parsed strictly (an unknown key is an error naming the key and the
//! file).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::Secret;

/// The whole file. Every section and key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonToml {
    /// `[coordinator]`
    #[serde(default)]
    pub coordinator: CoordinatorToml,
    /// `[daemon]`
    #[serde(default)]
    pub daemon: DaemonSection,
    /// `[egress]`
    #[serde(default)]
    pub egress: EgressToml,
    /// `[ssh]`
    #[serde(default)]
    pub ssh: SshToml,
    /// `[targets.<name>]`: static SSH targets, usable wherever a lease id is.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetToml>,
    /// `[env]`
    #[serde(default)]
    pub env: EnvToml,
}

/// `[env]`: environment forwarding for `crabboxctl run`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvToml {
    /// Names (or `PREFIX*`) of the calling client's variables a run gets;
    /// replaces the default `["CI", "NODE_OPTIONS"]`.
    pub allow: Option<Vec<String>>,
}

/// `[ssh]`: SSH settings for every lease.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshToml {
    /// The private key used when a lease has no per-lease key.
    pub key: Option<PathBuf>,
    /// How long a connection with no channel stays open, e.g. `"10m"`.
    #[serde(default, with = "humantime_serde")]
    pub idle_close: Option<Duration>,
    /// How often a keepalive is sent, e.g. `"15s"`; two missed ones end
    /// the connection.
    #[serde(default, with = "humantime_serde")]
    pub keepalive_interval: Option<Duration>,
    /// How long a channel's output may wait for a reader that does not
    /// read (a forward's local peer, a shell or exec client) before that
    /// channel is closed, e.g. `"10s"`.
    #[serde(default, with = "humantime_serde")]
    pub stall_timeout: Option<Duration>,
}

/// `[targets.<name>]`: a box reached over SSH with no coordinator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetToml {
    /// The host name or address.
    pub host: String,
    /// The SSH user (default `crabbox`).
    pub user: Option<String>,
    /// The SSH port (default 22).
    pub port: Option<u16>,
    /// Ports to try, in order, when `port` cannot be reached.
    #[serde(default)]
    pub fallback_ports: Vec<u16>,
    /// The private key (default: `[ssh] key`, then the SSH agent).
    pub key: Option<PathBuf>,
    /// The host key, `"<alg> <base64>"`, enforced exactly; without it the
    /// first key seen is trusted and recorded.
    pub host_key: Option<String>,
}

/// `[coordinator]`: which coordinator to use and how to authenticate.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorToml {
    /// The base URL, e.g. `https://crabbox.example.com`.
    pub url: Option<String>,
    /// A bearer token. Prefer `token_command` so the file holds no secret.
    pub token: Option<Secret>,
    /// An argv whose stdout (one line) is the token.
    pub token_command: Option<Vec<String>>,
    /// Sent as `X-Crabbox-Owner`.
    pub owner: Option<String>,
    /// Sent as `X-Crabbox-Org`.
    pub org: Option<String>,
    /// `auto` (default), `control` or `http`.
    pub heartbeat_transport: Option<String>,
    /// How often the control socket is pinged, e.g. `"15s"`.
    #[serde(default, with = "humantime_serde")]
    pub control_ping_interval: Option<Duration>,
}

/// `[daemon]`: where the daemon keeps its socket and state, and how it logs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// The API socket path.
    pub socket: Option<PathBuf>,
    /// The directory for persisted state.
    pub state_dir: Option<PathBuf>,
    /// The log filter (`EnvFilter` syntax).
    pub log: Option<String>,
    /// How long shutdown waits for tasks to drain, e.g. `"10s"`.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
}

/// `[egress]`: egress settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressToml {
    /// Named allowlist profiles: `name = ["*.example.com", "api.example.org"]`.
    #[serde(default)]
    pub profiles: BTreeMap<String, Vec<String>>,
}

/// The commented example file, kept next to the schema so both change
/// together; a test parses it.
pub const EXAMPLE: &str = r#"# crabboxd configuration. Every key is optional; unknown keys are errors.
# Layering: defaults < this file < the crabbox CLI's config.yaml
#           < environment (CRABBOX_*) < command-line flags.
# Keep this file mode 0600 if it holds a token.

[coordinator]
# url = "https://crabbox.example.com"
# token_command = ["op", "read", "op://vault/crabbox/token"]
# owner = "me@example.com"
# org = "example"
# How lease heartbeats travel: "auto" (the control socket until its first
# unanswered heartbeat, then HTTP), "control" or "http".
# heartbeat_transport = "auto"
# control_ping_interval = "15s"

[daemon]
# socket = "/run/user/1000/crabbox/crabboxd.sock"
# log = "info"
# shutdown_grace = "10s"

[egress.profiles]
# docs = ["docs.example.com", "*.cdn.example.com"]

[ssh]
# key = "/home/me/.ssh/id_ed25519"   # when a lease has no per-lease key
# idle_close = "10m"                   # close a connection unused this long
# keepalive_interval = "15s"           # dead after two unanswered keepalives
# stall_timeout = "10s"                # close a channel whose reader stops reading

[env]
# The calling client's variables `crabboxctl run` forwards (default CI and
# NODE_OPTIONS; a trailing * is a prefix). CRABBOX_ENV_ALLOW replaces it.
# allow = ["CI", "NODE_OPTIONS", "NPM_CONFIG_*"]

# A box with no coordinator, usable as `--id lab`:
# [targets.lab]
# host = "10.0.0.5"
# user = "crabbox"
# port = 2222
# fallback_ports = [22]
# key = "/home/me/.ssh/lab_ed25519"
# host_key = "ssh-ed25519 AAAA..."
"#;
