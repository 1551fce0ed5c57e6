//! The environment as a source of configuration: the process environment in
//! production, a map in tests. No other module of the daemon reads
//! environment variables.

use std::collections::BTreeMap;

/// Reads variables from some environment.
pub trait Env {
    /// The value of `name`, or `None` when it is unset or empty. Empty values
    /// are treated as unset, as the reference CLI does.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    #[expect(
        clippy::disallowed_methods,
        reason = "config/ is where the daemon reads its environment"
    )]
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// A fixed environment, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl MapEnv {
    /// Builds an environment from `(name, value)` pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        MapEnv(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// `CRABBOX_COORDINATOR`: the coordinator base URL.
pub const COORDINATOR: &str = "CRABBOX_COORDINATOR";
/// `CRABBOX_COORDINATOR_TOKEN`: the coordinator bearer token.
pub const COORDINATOR_TOKEN: &str = "CRABBOX_COORDINATOR_TOKEN";
/// `CRABBOX_COORDINATOR_TOKEN_COMMAND`: a JSON argv array whose stdout is the token.
pub const COORDINATOR_TOKEN_COMMAND: &str = "CRABBOX_COORDINATOR_TOKEN_COMMAND";
/// `CRABBOX_OWNER`: the owner sent in `X-Crabbox-Owner`.
pub const OWNER: &str = "CRABBOX_OWNER";
/// `CRABBOX_ORG`: the org sent in `X-Crabbox-Org`.
pub const ORG: &str = "CRABBOX_ORG";
/// `CRABBOX_LOG`: the log filter.
pub const LOG: &str = "CRABBOX_LOG";
/// `CRABBOX_SOCKET`: the API socket path.
pub const SOCKET: &str = crabbox_api::paths::SOCKET_ENV;
/// `CRABBOX_CONFIG`: when set, the only reference YAML file read.
pub const CRABBOX_CONFIG: &str = "CRABBOX_CONFIG";
