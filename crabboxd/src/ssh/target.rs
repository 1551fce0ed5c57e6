//! Where a lease's SSH server is and how to prove who we are to it: the
//! target (host, user, port order, pinned host key) from the coordinator's
//! lease record or a static `[targets.<name>]`, and the per-lease files
//! under `<config dir>/crabbox/testboxes/<lease>/`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::StaticTarget;
use crate::coordinator::Lease;

/// The user when a lease names none (the reference's default).
pub const DEFAULT_USER: &str = "crabbox";
/// The lease port when a lease names none (the reference's default).
pub const DEFAULT_PORT: u16 = 2222;
/// The fallback port when a lease does not list any (the reference's default).
pub const DEFAULT_FALLBACK: u16 = 22;

/// Where the target came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The coordinator's lease record.
    Coordinator,
    /// A static `[targets.<name>]` in `crabboxd.toml`.
    Static,
}

impl Origin {
    /// A short name for labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Coordinator => "coordinator",
            Origin::Static => "static",
        }
    }
}

/// One lease's SSH target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The lease id (or static target name).
    pub lease: String,
    /// Host name or address.
    pub host: String,
    /// The SSH user.
    pub user: String,
    /// Ports in the order they are tried: the lease port, then fallbacks.
    pub ports: Vec<u16>,
    /// A configured private key (static target key, else `[ssh] key`).
    pub configured_key: Option<PathBuf>,
    /// The pinned host key, `"<alg> <base64>"`, if any.
    pub pin: Option<String>,
    /// Where this came from.
    pub origin: Origin,
}

/// Why a lease id cannot name per-lease files.
#[derive(Debug, thiserror::Error)]
#[error("invalid lease id {0:?}: want ^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,127}}$")]
pub struct BadLeaseId(pub String);

/// Checks a lease id before it becomes a path component.
pub fn check_lease_id(id: &str) -> Result<(), BadLeaseId> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BadLeaseId(id.to_owned()))
    }
}

/// Whether `host` is an IP literal or a host name: letters, digits, '-',
/// '.' and '_', at most 253 bytes, not starting with '-' (which OpenSSH
/// would read as an option).
pub fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Whether `s` is a plain name: 1 to `max` bytes of `[A-Za-z0-9._-]`, not
/// starting with '-' (so it is never an option either).
pub fn plain_name(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Whether `user` is a plain login name: `[A-Za-z0-9._-]`, at most 64
/// bytes, not starting with '-'.
pub fn valid_user(user: &str) -> bool {
    plain_name(user, 64)
}

/// At most `max` characters of untrusted text, escaped and quoted, with an
/// ellipsis when it was cut.
pub fn preview(s: &str, max: usize) -> String {
    let cut: String = s.chars().take(max).collect();
    let more = if cut.len() < s.len() { "…" } else { "" };
    format!("{cut:?}{more}")
}

/// Candidates: `[port] + fallbacks`, de-duplicated, in order.
fn candidates(port: u16, fallbacks: impl IntoIterator<Item = u16>) -> Vec<u16> {
    let mut out = vec![port];
    for p in fallbacks {
        if p != 0 && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

impl Target {
    /// The target of a coordinator lease: `host`, `sshUser`, `sshPort`,
    /// `sshFallbackPorts` (absent: `["22"]`; present and empty: none) and
    /// `sshHostKey`.
    pub fn from_lease(lease: &Lease, configured_key: Option<PathBuf>) -> Result<Self, String> {
        if lease.host.trim().is_empty() {
            return Err(format!("lease {} has no host in its record", lease.id));
        }
        let port = match lease.ssh_port.trim() {
            "" => DEFAULT_PORT,
            p => p
                .parse()
                .map_err(|_| format!("lease {} has an invalid sshPort {p:?}", lease.id))?,
        };
        let fallbacks: Vec<u16> = match &lease.ssh_fallback_ports {
            None => vec![DEFAULT_FALLBACK],
            Some(list) => list.iter().filter_map(|p| p.trim().parse().ok()).collect(),
        };
        let user = match lease.ssh_user.trim() {
            "" => DEFAULT_USER.to_owned(),
            u => u.to_owned(),
        };
        let host = lease.host.trim();
        // Both end up in command lines (`ssh --print`, OpenSSH's own
        // parsing of `user@host`) and in messages: only plain names.
        if !valid_host(host) {
            return Err(format!(
                "lease {} has an invalid host {} in its record: want an IP address or a host name of letters, digits, '-', '.' and '_' (at most 253 bytes, not starting with '-')",
                lease.id,
                preview(host, 40)
            ));
        }
        if !valid_user(&user) {
            return Err(format!(
                "lease {} has an invalid sshUser {} in its record: want letters, digits, '.', '_' and '-' (at most 64 bytes, not starting with '-')",
                lease.id,
                preview(&user, 40)
            ));
        }
        Ok(Target {
            lease: lease.id.clone(),
            host: host.to_owned(),
            user,
            ports: candidates(port, fallbacks),
            configured_key,
            pin: lease
                .ssh_host_key
                .as_deref()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
            origin: Origin::Coordinator,
        })
    }

    /// A static target from `crabboxd.toml`.
    pub fn from_static(name: &str, t: &StaticTarget, default_key: Option<PathBuf>) -> Self {
        Target {
            lease: name.to_owned(),
            host: t.host.trim().to_owned(),
            user: t
                .user
                .clone()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_USER.to_owned()),
            ports: candidates(t.port.unwrap_or(22), t.fallback_ports.iter().copied()),
            configured_key: t.key.clone().or(default_key),
            pin: t.host_key.clone().filter(|k| !k.trim().is_empty()),
            origin: Origin::Static,
        }
    }

    /// `host:port` of the first candidate, for labels.
    pub fn display(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.ports[0])
    }
}

/// The per-lease files.
#[derive(Debug, Clone)]
pub struct LeaseFiles {
    /// `<config dir>/crabbox/testboxes/<lease>`.
    pub dir: PathBuf,
    /// The per-lease private key, used when present.
    pub key: PathBuf,
    /// The per-lease known_hosts (pinned or trusted on first use).
    pub known_hosts: PathBuf,
    /// The host-key alias the entries are recorded under, the same for
    /// every port and address of the lease.
    pub alias: String,
}

impl LeaseFiles {
    /// The files of `lease` under `config_dir`.
    pub fn new(config_dir: &Path, lease: &str) -> Self {
        let dir = config_dir.join("crabbox").join("testboxes").join(lease);
        LeaseFiles {
            key: dir.join("id_ed25519"),
            known_hosts: dir.join("known_hosts"),
            alias: host_key_alias(lease),
            dir,
        }
    }
}

/// `crabbox-lease-<hex of sha256(lease)[:16]>`, the reference's alias.
pub fn host_key_alias(lease: &str) -> String {
    let digest = Sha256::digest(lease.as_bytes());
    format!("crabbox-lease-{}", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ports_follow_the_reference() {
        let mut l = Lease {
            id: "cbx_000000000001".into(),
            host: "10.0.0.1".into(),
            ..Default::default()
        };
        let t = Target::from_lease(&l, None).unwrap();
        assert_eq!(t.ports, vec![2222, 22]);
        assert_eq!(t.user, "crabbox");
        l.ssh_port = "2200".into();
        l.ssh_fallback_ports = Some(vec![]);
        assert_eq!(Target::from_lease(&l, None).unwrap().ports, vec![2200]);
        l.ssh_fallback_ports = Some(vec!["2200".into(), "22".into(), "x".into()]);
        assert_eq!(Target::from_lease(&l, None).unwrap().ports, vec![2200, 22]);
        l.host.clear();
        assert!(Target::from_lease(&l, None).is_err());
    }

    #[test]
    fn a_lease_host_and_user_must_be_plain_names() {
        for good in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "box-1.example.com",
            "under_score.internal",
            "localhost",
        ] {
            assert!(valid_host(good), "{good}");
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            "-oProxyCommand=x",
            "a b",
            "a;b",
            "user@host",
            "$(id)",
            "h\n",
            "[::1]",
            "host:22",
            long.as_str(),
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
        assert!(valid_host(&"a".repeat(253)));
        for good in ["crabbox", "ci.user", "a_b-c", "0"] {
            assert!(valid_user(good), "{good}");
        }
        let long = "u".repeat(65);
        for bad in ["", "-l", "a b", "a@b", "a'b", "ü", long.as_str()] {
            assert!(!valid_user(bad), "{bad:?}");
        }
        assert!(valid_user(&"u".repeat(64)));

        let mut l = Lease {
            id: "cbx_000000000001".into(),
            host: "-oProxyCommand=touch\u{1b}[2J /tmp/x".into(),
            ..Default::default()
        };
        let e = Target::from_lease(&l, None).unwrap_err();
        assert!(
            e.contains("invalid host") && e.contains("cbx_000000000001"),
            "{e}"
        );
        assert!(!e.contains('\u{1b}'), "escaped: {e}");
        l.host = " 10.0.0.1 ".into();
        assert_eq!(Target::from_lease(&l, None).unwrap().host, "10.0.0.1");
        l.ssh_user = "root@evil".into();
        let e = Target::from_lease(&l, None).unwrap_err();
        assert!(e.contains("invalid sshUser"), "{e}");
        l.ssh_user = "x".repeat(1000);
        let e = Target::from_lease(&l, None).unwrap_err();
        assert!(e.len() < 300, "a short preview: {e}");
    }

    #[test]
    fn lease_ids_cannot_escape_the_directory() {
        assert!(check_lease_id("cbx_0123456789ab").is_ok());
        assert!(check_lease_id("lab").is_ok());
        for bad in ["", "..", ".x", "a/b", "a b", "-x"] {
            assert!(check_lease_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn alias_is_stable() {
        assert_eq!(host_key_alias("x").len(), "crabbox-lease-".len() + 32);
        assert_eq!(host_key_alias("a"), host_key_alias("a"));
        assert_ne!(host_key_alias("a"), host_key_alias("b"));
    }
}
