//! The reference crabbox CLI's YAML file (`<config dir>/crabbox/config.yaml`,
//! or `$CRABBOX_CONFIG`): the subset the daemon uses, so existing crabbox
//! users need no setup.
//!
//! That file belongs to another program with a much larger schema, so unlike
//! our TOML its unknown keys are ignored, not errors.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Secret;

/// The parts of `config.yaml` the daemon reads.
#[derive(Debug, Default, Deserialize)]
pub struct CrabboxYaml {
    /// `broker:`
    #[serde(default)]
    pub broker: Broker,
    /// `egress:`
    #[serde(default)]
    pub egress: Egress,
    /// `env:`
    #[serde(default)]
    pub env: EnvYaml,
}

/// `env:` — environment forwarding for runs.
#[derive(Debug, Default, Deserialize)]
pub struct EnvYaml {
    /// `env.allow`: replaces the default allowlist.
    pub allow: Option<Vec<String>>,
}

/// `broker:` — the coordinator.
#[derive(Debug, Default, Deserialize)]
pub struct Broker {
    /// `broker.url`
    pub url: Option<String>,
    /// `broker.token`
    pub token: Option<Secret>,
}

/// `egress:` — egress settings.
#[derive(Debug, Default, Deserialize)]
pub struct Egress {
    /// `egress.profiles`: named allowlists.
    #[serde(default)]
    pub profiles: BTreeMap<String, Vec<String>>,
}
