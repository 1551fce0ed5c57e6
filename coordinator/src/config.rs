//! Coordinator configuration: tokens (as masked secrets), identity defaults, storage path.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::clock::Clock;

/// A secret string whose `Debug` and `Display` print a mask, so a token can
/// never reach a log line or a panic message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call sites are the only places it is revealed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Everything [`crate::serve`] needs. Build it with [`Config::new`] or
/// [`Config::from_env`] and adjust the public fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// `CRABBOX_ADMIN_TOKEN`: full access to every lease and run.
    pub admin_token: Option<Secret>,
    /// `CRABBOX_SHARED_TOKEN`: the shared operator token; its identity is pinned
    /// to [`Config::shared_owner`] / [`Config::default_org`].
    pub shared_token: Option<Secret>,
    /// `CRABBOX_SHARED_OWNER`: owner of shared-token callers (`unknown` if unset).
    pub shared_owner: Option<String>,
    /// `CRABBOX_DEFAULT_ORG`: org of shared-token callers and of admin callers
    /// that send no `X-Crabbox-Org`.
    pub default_org: Option<String>,
    /// `CRABBOX_SESSION_SECRET`: HMAC key of signed `cbxu_` user tokens. Must
    /// differ from the shared token, else user tokens are all rejected.
    pub session_secret: Option<Secret>,
    /// `CRABBOX_ALLOW_QUERY_BRIDGE_TICKETS`: accept `?ticket=` on bridge upgrades.
    /// Off by default because a query string ends up in access logs.
    pub allow_query_bridge_tickets: bool,
    /// `CRABBOX_PUBLIC_URL`: the URL browsers use to reach this coordinator
    /// (e.g. `https://crabbox.example.com`). The portal takes its origin for
    /// cross-site checks from it, and marks its cookies `Secure` when it is https.
    pub public_url: Option<String>,
    /// `CRABBOX_TRUST_FORWARDED_PROTO`: believe `X-Forwarded-Proto: https`
    /// from the reverse proxy in front (only set this behind one that
    /// overwrites the header); the portal then marks its cookies `Secure`.
    pub trust_forwarded_proto: bool,
    /// SQLite database file; its parent directory is created 0700.
    pub db_path: PathBuf,
    /// The clock used for every expiry decision.
    pub clock: Clock,
    /// Bounds on what a caller can make the coordinator hold (see `docs/security.md`).
    pub limits: Limits,
}

/// Memory and time bounds for everything a caller drives. The defaults are
/// the documented ones; tests shorten the timings.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Interval of server pings on every WebSocket; a socket that sends nothing
    /// (not even a pong) for a whole interval is dropped at the next one.
    pub ping_every: Duration,
    /// How long one step of a write to a WebSocket (a frame taken, or a
    /// flush of at most 256 KiB plus a frame, of a batch or a relayed burst)
    /// may make no progress before the peer counts as dead.
    pub write_timeout: Duration,
    /// Bytes queued toward one control socket before the socket is closed
    /// `1011 "control send failed"` (replies wait for room up to `write_timeout`).
    pub control_queue_bytes: usize,
    /// Bytes of events in one `run_events` frame; a longer backlog continues
    /// in further frames as the socket drains.
    pub page_bytes: usize,
    /// Request-body bytes held in memory across all requests at once; a body
    /// waits for room (up to `body_wait`) before it is read.
    pub body_bytes_in_flight: usize,
    /// How long a request body may wait for [`Limits::body_bytes_in_flight`].
    pub body_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ping_every: Duration::from_secs(30),
            write_timeout: Duration::from_secs(20),
            control_queue_bytes: 4 * 1024 * 1024,
            page_bytes: 1024 * 1024,
            body_bytes_in_flight: 64 * 1024 * 1024,
            body_wait: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// A config with no tokens and the given database path.
    pub fn new(db_path: impl Into<PathBuf>) -> Self {
        Self {
            admin_token: None,
            shared_token: None,
            shared_owner: None,
            default_org: None,
            session_secret: None,
            allow_query_bridge_tickets: false,
            public_url: None,
            trust_forwarded_proto: false,
            db_path: db_path.into(),
            clock: Clock::system(),
            limits: Limits::default(),
        }
    }

    /// Read the reference coordinator's environment names on top of [`Config::new`].
    /// Empty values count as unset.
    pub fn from_env(db_path: impl Into<PathBuf>) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut cfg = Self::new(db_path);
        cfg.admin_token = var("CRABBOX_ADMIN_TOKEN").map(Secret::new);
        cfg.shared_token = var("CRABBOX_SHARED_TOKEN").map(Secret::new);
        cfg.shared_owner = std::env::var("CRABBOX_SHARED_OWNER").ok();
        cfg.default_org = var("CRABBOX_DEFAULT_ORG");
        cfg.session_secret = var("CRABBOX_SESSION_SECRET").map(Secret::new);
        cfg.allow_query_bridge_tickets =
            var("CRABBOX_ALLOW_QUERY_BRIDGE_TICKETS").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            });
        cfg.public_url =
            var("CRABBOX_PUBLIC_URL").map(|u| u.trim().trim_end_matches('/').to_owned());
        cfg.trust_forwarded_proto = var("CRABBOX_TRUST_FORWARDED_PROTO").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        cfg
    }

    /// Refuse configurations that would leave the coordinator open or broken.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.admin_token.is_none()
            && self.shared_token.is_none()
            && self.session_secret.is_none()
        {
            anyhow::bail!(
                "no token configured: set CRABBOX_ADMIN_TOKEN, CRABBOX_SHARED_TOKEN or CRABBOX_SESSION_SECRET"
            );
        }
        if let (Some(secret), Some(shared)) = (&self.session_secret, &self.shared_token)
            && secret == shared
        {
            anyhow::bail!("CRABBOX_SESSION_SECRET must differ from CRABBOX_SHARED_TOKEN");
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            anyhow::bail!("CRABBOX_PUBLIC_URL must start with https:// or http:// (got {url:?})");
        }
        Ok(())
    }

    /// The owner pinned to shared-token callers.
    ///
    /// Like the reference, a whitespace-only `CRABBOX_SHARED_OWNER` trims to the
    /// empty string rather than falling back to `unknown`.
    pub(crate) fn pinned_shared_owner(&self) -> String {
        match &self.shared_owner {
            Some(o) => o.trim().to_owned(),
            None => "unknown".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_masked() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "**** Secret(****)");
        let mut c = Config::new("/tmp/x");
        c.admin_token = Some(s);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn refuses_no_token() {
        assert!(Config::new("/tmp/x").validate().is_err());
    }
}
