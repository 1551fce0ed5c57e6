//! Layered configuration, merged in one place: defaults → `crabboxd.toml` →
//! the reference CLI's `config.yaml` → environment → flags. This module and
//! `telemetry` are the only readers of environment variables and config files.

mod env;
mod file;
mod secret;
mod yaml;

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

pub use env::{Env, MapEnv, ProcessEnv};
pub use file::{EXAMPLE as EXAMPLE_TOML, TargetToml as StaticTarget};
pub use secret::Secret;

use file::DaemonToml;
use yaml::CrabboxYaml;

/// The daemon's effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The coordinator to talk to, if any.
    pub coordinator: Option<CoordinatorConfig>,
    /// The API socket path; `None` means the platform default.
    pub socket: Option<PathBuf>,
    /// Where persisted state lives (created 0700 on start).
    pub state_dir: PathBuf,
    /// The initial log filter (`EnvFilter` syntax).
    pub log_filter: String,
    /// How long shutdown waits for tasks to drain before giving up on them.
    pub shutdown_grace: Duration,
    /// Named egress allowlist profiles from configuration files (the
    /// built-in `discord` and `slack` profiles live with the egress code).
    pub egress_profiles: BTreeMap<String, Vec<String>>,
    /// Every file that was considered, in layering order.
    pub files: Vec<SourceFile>,
    /// The user config directory; per-lease SSH files live under
    /// `<config dir>/crabbox/testboxes/<lease>/`.
    pub config_dir: PathBuf,
    /// The private key for leases without a per-lease key (`[ssh] key`).
    pub ssh_key: Option<PathBuf>,
    /// Static SSH targets (`[targets.<name>]`), usable wherever a lease id is.
    pub ssh_targets: BTreeMap<String, StaticTarget>,
    /// How long an SSH connection with no channel stays open (`[ssh]
    /// idle_close`, default 10 minutes).
    pub ssh_idle_close: Option<Duration>,
    /// The run environment allowlist (`[env] allow` in crabboxd.toml, or
    /// `env.allow` in config.yaml, which wins); `None` means the default
    /// `CI`, `NODE_OPTIONS`. A client's `CRABBOX_ENV_ALLOW` replaces it per
    /// run (the client reads it from its own environment and sends it).
    pub env_allow: Option<Vec<String>>,
    /// How often an SSH keepalive is sent (`[ssh] keepalive_interval`,
    /// default 15 s); two missed ones end the connection.
    pub ssh_keepalive_interval: Option<Duration>,
    /// How long a channel's output may wait for a reader that stopped
    /// reading before the channel is closed (`[ssh] stall_timeout`,
    /// default 10 s).
    pub ssh_stall_timeout: Option<Duration>,
}

/// How to reach and authenticate to a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The base URL, absolute, without a trailing `/`.
    pub url: url::Url,
    /// Where the bearer token comes from, if anywhere.
    pub token: Option<TokenSource>,
    /// Sent as `X-Crabbox-Owner`.
    pub owner: Option<String>,
    /// Sent as `X-Crabbox-Org`.
    pub org: Option<String>,
    /// How lease heartbeats travel (`[coordinator] heartbeat_transport`,
    /// `CRABBOX_HEARTBEAT_TRANSPORT`).
    pub heartbeat_transport: HeartbeatTransport,
    /// How often the control socket is pinged; a socket silent for two
    /// intervals is replaced (`[coordinator] control_ping_interval`).
    pub control_ping_interval: Duration,
}

/// How lease heartbeats travel to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeartbeatTransport {
    /// The shared control socket first, with HTTP in the same tick when it
    /// gives no answer; after the first unanswered control heartbeat, HTTP
    /// only for the rest of the daemon's life (an unpatched reference
    /// 0.46.0 deadlocks on control heartbeats: openclaw/crabbox#1555).
    #[default]
    Auto,
    /// Always the control socket first (HTTP in the same tick on a miss).
    Control,
    /// Only `POST /v1/leases/{id}/heartbeat`.
    Http,
}

impl HeartbeatTransport {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HeartbeatTransport::Auto => "auto",
            HeartbeatTransport::Control => "control",
            HeartbeatTransport::Http => "http",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw.trim() {
            "auto" => Some(HeartbeatTransport::Auto),
            "control" => Some(HeartbeatTransport::Control),
            "http" => Some(HeartbeatTransport::Http),
            _ => None,
        }
    }
}

/// The default control-socket ping interval (as the egress bridge's).
pub const DEFAULT_CONTROL_PING_INTERVAL: Duration = Duration::from_secs(15);

/// Where a coordinator token comes from. The `origin` names the layer (a
/// file path or a variable name) so diagnostics can say where to fix it
/// without printing the token.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A literal token.
    Literal {
        /// The token.
        token: Secret,
        /// Which layer supplied it.
        origin: String,
    },
    /// A command whose stdout is the token.
    Command {
        /// The argv, run without a shell.
        argv: Vec<String>,
        /// Which layer supplied it.
        origin: String,
    },
}

impl TokenSource {
    /// Which layer supplied the token.
    pub fn origin(&self) -> &str {
        match self {
            TokenSource::Literal { origin, .. } | TokenSource::Command { origin, .. } => origin,
        }
    }
}

/// A configuration file that was considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Its path.
    pub path: PathBuf,
    /// Which layer it is.
    pub kind: SourceKind,
    /// Its permission bits, when it exists.
    pub mode: Option<u32>,
}

/// The layer a configuration file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// `crabboxd.toml`.
    DaemonToml,
    /// The reference CLI's `config.yaml`.
    CrabboxYaml,
}

/// Values given on the command line; they override every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`: the daemon TOML file to read instead of the default.
    pub config_file: Option<PathBuf>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--coordinator`.
    pub coordinator: Option<String>,
    /// `--log`.
    pub log: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
}

/// The per-user base directories the defaults are derived from; injectable so
/// tests never touch the real home directory.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// The user config directory (`~/.config` on Linux).
    pub config: PathBuf,
    /// The user state directory (`~/.local/state` on Linux).
    pub state: PathBuf,
}

impl Dirs {
    /// The platform's directories for the current user.
    pub fn for_user() -> Result<Self, ConfigError> {
        let base = directories::BaseDirs::new().ok_or(ConfigError::NoHome)?;
        let state = base
            .state_dir()
            .unwrap_or_else(|| base.data_local_dir())
            .to_path_buf();
        Ok(Dirs {
            config: base.config_dir().to_path_buf(),
            state,
        })
    }
}

/// Why configuration could not be loaded. Each variant names the file or
/// variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No home directory could be determined.
    #[error("cannot determine the home directory (is $HOME set?)")]
    NoHome,
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be parsed (including unknown keys in our TOML).
    #[error("invalid configuration in {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and position.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid {key} (from {origin}): {message}")]
    Invalid {
        /// The key or variable.
        key: String,
        /// Which layer supplied it.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Default shutdown grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default log filter.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// A value together with the layer it came from, for error messages.
#[derive(Debug, Clone)]
struct Layered<T> {
    value: T,
    origin: String,
}

/// The partially merged configuration: each field remembers its origin.
#[derive(Debug, Default)]
struct Merge {
    url: Option<Layered<String>>,
    token: Option<TokenSource>,
    owner: Option<String>,
    org: Option<String>,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    log: Option<String>,
    shutdown_grace: Option<Duration>,
    profiles: BTreeMap<String, Vec<String>>,
    ssh_key: Option<PathBuf>,
    ssh_idle_close: Option<Duration>,
    ssh_keepalive_interval: Option<Duration>,
    ssh_stall_timeout: Option<Duration>,
    targets: BTreeMap<String, StaticTarget>,
    heartbeat_transport: Option<Layered<String>>,
    control_ping_interval: Option<Duration>,
    env_allow: Option<Vec<String>>,
}

impl Config {
    /// Loads the configuration of the current user from the process
    /// environment and the real config directories.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_from(overrides, &ProcessEnv, &Dirs::for_user()?)
    }

    /// Loads configuration from explicit sources. This is the one function
    /// that decides precedence.
    pub fn load_from(
        overrides: &Overrides,
        env: &dyn Env,
        dirs: &Dirs,
    ) -> Result<Self, ConfigError> {
        let mut m = Merge::default();
        let mut files = Vec::new();

        // Layer 1: crabboxd.toml.
        let toml_path = overrides
            .config_file
            .clone()
            .unwrap_or_else(|| dirs.config.join("crabbox").join("crabboxd.toml"));
        let toml_text = read_optional(&toml_path, overrides.config_file.is_some())?;
        files.push(SourceFile {
            mode: toml_text.as_ref().map(|(_, mode)| *mode),
            path: toml_path.clone(),
            kind: SourceKind::DaemonToml,
        });
        if let Some((text, _)) = toml_text {
            let t: DaemonToml = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: toml_path.clone(),
                message: e.message().to_owned() + &span_suffix(&text, e.span()),
            })?;
            m.apply_toml(t, &toml_path);
        }

        // Layer 2: the reference CLI's config.yaml (or $CRABBOX_CONFIG).
        let (yaml_path, yaml_required) = match env.get(env::CRABBOX_CONFIG) {
            Some(p) => (PathBuf::from(p), true),
            None => (dirs.config.join("crabbox").join("config.yaml"), false),
        };
        let yaml_text = read_optional(&yaml_path, yaml_required)?;
        files.push(SourceFile {
            mode: yaml_text.as_ref().map(|(_, mode)| *mode),
            path: yaml_path.clone(),
            kind: SourceKind::CrabboxYaml,
        });
        if let Some((text, _)) = yaml_text {
            // An empty file is a valid (empty) config, as in the reference CLI.
            let y: CrabboxYaml = if text.trim().is_empty() {
                CrabboxYaml::default()
            } else {
                serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: yaml_path.clone(),
                    message: e.to_string(),
                })?
            };
            m.apply_yaml(y, &yaml_path);
        }

        // Layer 3: environment.
        m.apply_env(env)?;

        // Layer 4: flags.
        if let Some(url) = &overrides.coordinator {
            m.url = Some(Layered {
                value: url.clone(),
                origin: "--coordinator".into(),
            });
        }
        if let Some(s) = &overrides.socket {
            m.socket = Some(s.clone());
        }
        if let Some(l) = &overrides.log {
            m.log = Some(l.clone());
        }
        if let Some(d) = &overrides.state_dir {
            m.state_dir = Some(d.clone());
        }

        m.finish(dirs, files)
    }
}

impl Merge {
    fn apply_toml(&mut self, t: DaemonToml, path: &Path) {
        let origin = path.display().to_string();
        if let Some(url) = t.coordinator.url {
            self.url = Some(Layered {
                value: url,
                origin: origin.clone(),
            });
        }
        if let Some(token) = t.coordinator.token {
            self.token = Some(TokenSource::Literal {
                token,
                origin: origin.clone(),
            });
        }
        if let Some(argv) = t.coordinator.token_command {
            self.token = Some(TokenSource::Command {
                argv,
                origin: origin.clone(),
            });
        }
        if let Some(t) = t.coordinator.heartbeat_transport {
            self.heartbeat_transport = Some(Layered {
                value: t,
                origin: origin.clone(),
            });
        }
        self.control_ping_interval = t
            .coordinator
            .control_ping_interval
            .or(self.control_ping_interval);
        self.owner = t.coordinator.owner.or(self.owner.take());
        self.org = t.coordinator.org.or(self.org.take());
        self.socket = t.daemon.socket.or(self.socket.take());
        self.state_dir = t.daemon.state_dir.or(self.state_dir.take());
        self.log = t.daemon.log.or(self.log.take());
        self.shutdown_grace = t.daemon.shutdown_grace.or(self.shutdown_grace);
        self.profiles.extend(t.egress.profiles);
        self.ssh_key = t.ssh.key.or(self.ssh_key.take());
        self.ssh_idle_close = t.ssh.idle_close.or(self.ssh_idle_close);
        self.ssh_keepalive_interval = t.ssh.keepalive_interval.or(self.ssh_keepalive_interval);
        self.ssh_stall_timeout = t.ssh.stall_timeout.or(self.ssh_stall_timeout);
        self.targets.extend(t.targets);
        self.env_allow = t.env.allow.or(self.env_allow.take());
    }

    fn apply_yaml(&mut self, y: CrabboxYaml, path: &Path) {
        let origin = path.display().to_string();
        if let Some(url) = y.broker.url.filter(|u| !u.is_empty()) {
            self.url = Some(Layered {
                value: url,
                origin: origin.clone(),
            });
        }
        if let Some(token) = y.broker.token.filter(|t| !t.is_empty()) {
            self.token = Some(TokenSource::Literal { token, origin });
        }
        self.profiles.extend(y.egress.profiles);
        self.env_allow = y.env.allow.or(self.env_allow.take());
    }

    fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        if let Some(url) = env.get(env::COORDINATOR) {
            self.url = Some(Layered {
                value: url,
                origin: env::COORDINATOR.into(),
            });
        }
        if let Some(token) = env.get(env::COORDINATOR_TOKEN) {
            self.token = Some(TokenSource::Literal {
                token: Secret::new(token),
                origin: env::COORDINATOR_TOKEN.into(),
            });
        }
        // The reference CLI gives the token command as a JSON argv array;
        // a command in the environment wins over a literal token there.
        if let Some(cmd) = env.get(env::COORDINATOR_TOKEN_COMMAND) {
            let argv: Vec<String> =
                serde_json::from_str(&cmd).map_err(|e| ConfigError::Invalid {
                    key: env::COORDINATOR_TOKEN_COMMAND.into(),
                    origin: "environment".into(),
                    message: format!("must be a JSON array of strings: {e}"),
                })?;
            self.token = Some(TokenSource::Command {
                argv,
                origin: env::COORDINATOR_TOKEN_COMMAND.into(),
            });
        }
        if let Some(t) = env.get(env::HEARTBEAT_TRANSPORT) {
            self.heartbeat_transport = Some(Layered {
                value: t,
                origin: env::HEARTBEAT_TRANSPORT.into(),
            });
        }
        if let Some(owner) = env.get(env::OWNER) {
            self.owner = Some(owner);
        }
        if let Some(org) = env.get(env::ORG) {
            self.org = Some(org);
        }
        if let Some(log) = env.get(env::LOG) {
            self.log = Some(log);
        }
        if let Some(socket) = env.get(env::SOCKET) {
            self.socket = Some(PathBuf::from(socket));
        }
        Ok(())
    }

    /// The validation pass: fills derived values and names the bad key.
    fn finish(self, dirs: &Dirs, files: Vec<SourceFile>) -> Result<Config, ConfigError> {
        let heartbeat_transport = match &self.heartbeat_transport {
            None => HeartbeatTransport::default(),
            Some(Layered { value, origin }) => {
                HeartbeatTransport::parse(value).ok_or_else(|| ConfigError::Invalid {
                    key: "heartbeat_transport".into(),
                    origin: origin.clone(),
                    message: format!("{value:?} is not one of \"auto\", \"control\", \"http\""),
                })?
            }
        };
        let control_ping_interval = self
            .control_ping_interval
            .unwrap_or(DEFAULT_CONTROL_PING_INTERVAL);
        if control_ping_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "control_ping_interval".into(),
                origin: "configuration".into(),
                message: "must be longer than zero".into(),
            });
        }
        let coordinator = match self.url {
            None => None,
            Some(Layered { value, origin }) => Some(CoordinatorConfig {
                url: parse_coordinator_url(&value).map_err(|message| ConfigError::Invalid {
                    key: "coordinator url".into(),
                    origin,
                    message,
                })?,
                token: self.token,
                owner: self.owner,
                org: self.org,
                heartbeat_transport,
                control_ping_interval,
            }),
        };
        if let Some(TokenSource::Command { argv, origin }) =
            coordinator.as_ref().and_then(|c| c.token.as_ref())
            && argv.first().is_none_or(String::is_empty)
        {
            return Err(ConfigError::Invalid {
                key: "coordinator token command".into(),
                origin: origin.clone(),
                message: "the command is empty".into(),
            });
        }
        for (name, patterns) in &self.profiles {
            if let Some(bad) = patterns.iter().find(|p| p.trim() == "*") {
                return Err(ConfigError::Invalid {
                    key: format!("egress profile {name:?}"),
                    origin: "configuration".into(),
                    message: format!(
                        "pattern {bad:?} would allow every host; list hosts or *.domain patterns"
                    ),
                });
            }
        }
        let log_filter = self.log.unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned());
        if let Err(e) = log_filter.parse::<tracing_subscriber::EnvFilter>() {
            return Err(ConfigError::Invalid {
                key: "log filter".into(),
                origin: "configuration".into(),
                message: e.to_string(),
            });
        }
        for (name, t) in &self.targets {
            if t.host.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("targets.{name}.host"),
                    origin: "configuration".into(),
                    message: "a static target needs a host".into(),
                });
            }
        }
        Ok(Config {
            config_dir: dirs.config.clone(),
            ssh_key: self.ssh_key,
            ssh_targets: self.targets,
            ssh_idle_close: self.ssh_idle_close,
            ssh_keepalive_interval: self.ssh_keepalive_interval,
            ssh_stall_timeout: self.ssh_stall_timeout,
            coordinator,
            socket: self.socket,
            state_dir: self.state_dir.unwrap_or_else(|| dirs.state.join("crabbox")),
            log_filter,
            shutdown_grace: self.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            egress_profiles: self.profiles,
            env_allow: self.env_allow,
            files,
        })
    }
}

/// Validates a coordinator base URL the way the reference CLI does: absolute
/// http(s), trailing `/` stripped; credentials in the URL are refused so they
/// can never be logged.
pub fn parse_coordinator_url(raw: &str) -> Result<url::Url, String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = url::Url::parse(trimmed)
        .map_err(|e| format!("{e} (want e.g. https://crabbox.example.com)"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not allowed; use a token".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a base URL has no query or fragment".into());
    }
    Ok(url)
}

/// Reads a file that may be absent. `required` files must exist (a file
/// named by a flag or `$CRABBOX_CONFIG`).
fn read_optional(path: &Path, required: bool) -> Result<Option<(String, u32)>, ConfigError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mode = fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0);
            Ok(Some((text, mode)))
        }
        Err(e) if e.kind() == ErrorKind::NotFound && !required => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// " at line L column C" for a parser error span.
fn span_suffix(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {col})")
}

#[cfg(test)]
mod tests;
