//! The allowlist: built-in profiles (`discord`, `slack`), profiles from configuration and explicit patterns, merged and normalised; `*.x` matches `x` and its subdomains; IP literals only when listed literally.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

/// The built-in `discord` profile (reference §3.9).
pub const DISCORD: &[&str] = &[
    "discord.com",
    "*.discord.com",
    "discordcdn.com",
    "*.discordcdn.com",
    "hcaptcha.com",
    "*.hcaptcha.com",
];
/// The built-in `slack` profile (reference §3.9).
pub const SLACK: &[&str] = &[
    "slack.com",
    "*.slack.com",
    "slack-edge.com",
    "*.slack-edge.com",
];

/// Patterns of a built-in profile (name is case-insensitive).
pub fn builtin_profile(name: &str) -> Option<&'static [&'static str]> {
    match name.trim().to_ascii_lowercase().as_str() {
        "discord" => Some(DISCORD),
        "slack" => Some(SLACK),
        _ => None,
    }
}

/// One normalised allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Exactly this host name.
    Exact(String),
    /// `*.suffix`: `suffix` itself and any name ending in `.suffix`.
    Wildcard(String),
    /// An IP literal; matches only the same literal destination.
    Ip(IpAddr),
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(h) => f.write_str(h),
            Pattern::Wildcard(s) => write!(f, "*.{s}"),
            Pattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a policy cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Nothing allowed at all.
    #[error("egress host requires a profile or allow patterns; refusing to start an open proxy")]
    Empty,
    /// A bare `*`.
    #[error("allow pattern \"*\" would allow every destination; refusing to start an open proxy")]
    BareWildcard,
    /// A pattern that is neither a host name, `*.suffix` nor an IP literal.
    #[error("invalid allow pattern {0:?}: use a host name, *.domain or an IP literal")]
    InvalidPattern(String),
    /// A profile name that is neither built in nor configured.
    #[error("unknown egress profile {0:?} (built in: discord, slack)")]
    UnknownProfile(String),
    /// `*.suffix` where the suffix is a public suffix (`*.com`, `*.co.uk`, `*.github.io`).
    #[error(
        "allow pattern {0:?} covers a whole public suffix (every site under it); list the sites you need, e.g. \"*.example{1}\""
    )]
    PublicSuffix(String, String),
    /// A private, loopback or otherwise non-public IP literal without the opt-in.
    #[error(
        "allow pattern {0} is a private or local address, and egress never dials those unless --allow-private is also given (meant for tests and local demos)"
    )]
    PrivateAddress(IpAddr),
    /// More patterns than [`MAX_PATTERNS`].
    #[error("the allowlist has {0} patterns; at most {max} are accepted (use wildcards such as *.example.com)", max = MAX_PATTERNS)]
    TooManyPatterns(usize),
}

/// Most patterns one policy may hold (after merging profiles).
pub const MAX_PATTERNS: usize = 4096;

/// The merged allowlist plus the `allow_private` opt-in.
#[derive(Debug, Clone)]
pub struct Policy {
    patterns: Vec<Pattern>,
    profiles: Vec<String>,
    allow_private: bool,
}

/// Builds a [`Policy`]; see [`Policy::builder`].
#[derive(Debug, Clone, Default)]
pub struct PolicyBuilder {
    allow: Vec<String>,
    profiles: Vec<String>,
    defined: HashMap<String, Vec<String>>,
    allow_private: bool,
}

impl PolicyBuilder {
    /// Adds explicit patterns (each may itself be a comma-separated list, as `--allow a,b`).
    pub fn allow<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for p in patterns {
            self.allow.extend(p.as_ref().split(',').map(str::to_owned));
        }
        self
    }

    /// Uses a profile by name (built in, or defined with [`PolicyBuilder::define_profile`]).
    pub fn profile(mut self, name: impl AsRef<str>) -> Self {
        let name = name.as_ref().trim().to_ascii_lowercase();
        if !name.is_empty() {
            self.profiles.push(name);
        }
        self
    }

    /// Defines a profile from configuration; it replaces a built-in one of the same name.
    pub fn define_profile<I, S>(mut self, name: impl AsRef<str>, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = patterns
            .into_iter()
            .map(|p| p.as_ref().to_owned())
            .collect();
        self.defined
            .insert(name.as_ref().trim().to_ascii_lowercase(), list);
        self
    }

    /// Opt-in for tests and local demos: private/loopback destinations are
    /// dialled when, and only when, their IP literal is itself listed. Each use logs a warning.
    pub fn allow_private(mut self, yes: bool) -> Self {
        self.allow_private = yes;
        self
    }

    /// Normalises and merges: explicit patterns first, then profiles; duplicates dropped.
    pub fn build(self) -> Result<Policy, PolicyError> {
        let mut raw: Vec<String> = self.allow;
        for name in &self.profiles {
            if let Some(list) = self.defined.get(name) {
                raw.extend(list.iter().cloned());
            } else if let Some(list) = builtin_profile(name) {
                raw.extend(list.iter().map(|s| (*s).to_owned()));
            } else {
                return Err(PolicyError::UnknownProfile(name.clone()));
            }
        }
        // Checked before any parsing, so the raw count bounds the work; the
        // exact cap applies to distinct patterns below.
        if raw.len() > 4 * MAX_PATTERNS {
            return Err(PolicyError::TooManyPatterns(raw.len()));
        }
        let mut patterns = Vec::new();
        let mut seen = HashSet::new();
        for entry in raw {
            if let Some(p) = Pattern::parse(&entry)? {
                if let Pattern::Ip(ip) = p
                    && !self.allow_private
                    && !super::addr::is_public(ip)
                {
                    return Err(PolicyError::PrivateAddress(ip));
                }
                if seen.insert(p.clone()) {
                    patterns.push(p);
                }
            }
        }
        if patterns.is_empty() {
            return Err(PolicyError::Empty);
        }
        if patterns.len() > MAX_PATTERNS {
            return Err(PolicyError::TooManyPatterns(patterns.len()));
        }
        Ok(Policy {
            patterns,
            profiles: self.profiles,
            allow_private: self.allow_private,
        })
    }
}

impl Pattern {
    /// Parses one entry: trimmed, lowercased, one trailing dot dropped. Empty → `None`.
    pub fn parse(entry: &str) -> Result<Option<Pattern>, PolicyError> {
        let s = entry.trim().to_ascii_lowercase();
        let s = s.strip_suffix('.').unwrap_or(&s);
        if s.is_empty() {
            return Ok(None);
        }
        if s == "*" || s == "*." {
            return Err(PolicyError::BareWildcard);
        }
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Some(Pattern::Ip(ip.to_canonical())));
        }
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if name.is_empty() || name.len() > 253 || !name.bytes().all(ok) || name.starts_with('.') {
            return Err(PolicyError::InvalidPattern(entry.trim().to_owned()));
        }
        if wild && is_public_suffix(name) {
            let dot = if name.starts_with('.') { "" } else { "." };
            return Err(PolicyError::PublicSuffix(
                entry.trim().to_owned(),
                format!("{dot}{name}"),
            ));
        }
        Ok(Some(if wild {
            Pattern::Wildcard(name.to_owned())
        } else {
            Pattern::Exact(name.to_owned())
        }))
    }

    fn matches(&self, host: &str, ip: Option<IpAddr>) -> bool {
        match (self, ip) {
            (Pattern::Ip(p), Some(ip)) => *p == ip,
            (_, Some(_)) | (Pattern::Ip(_), None) => false,
            (Pattern::Exact(h), None) => h == host,
            (Pattern::Wildcard(s), None) => {
                host == s
                    || (host.len() > s.len()
                        && host.ends_with(s.as_str())
                        && host.as_bytes()[host.len() - s.len() - 1] == b'.')
            }
        }
    }
}

/// True when `name` is itself a public suffix on the Public Suffix List
/// (ICANN or private section), e.g. `com`, `co.uk`, `github.io`.
fn is_public_suffix(name: &str) -> bool {
    match psl::suffix(name.as_bytes()) {
        Some(s) => s.is_known() && s.as_bytes() == name.as_bytes(),
        None => false,
    }
}

/// Lowercases, trims, strips `[]` and one trailing dot.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    let h = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(&h);
    h.strip_suffix('.').unwrap_or(h).to_owned()
}

impl Policy {
    /// Starts a builder.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// Whether `host` (name or IP literal) is on the allowlist. Addresses are checked separately when dialling.
    pub fn allows(&self, host: &str) -> bool {
        let host = normalize_host(host);
        let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        self.patterns.iter().any(|p| p.matches(&host, ip))
    }

    /// True when `ip` may be dialled although it is not public: only with
    /// `allow_private` and only if that very literal is listed.
    pub fn private_literal_allowed(&self, ip: IpAddr) -> bool {
        self.allow_private && self.patterns.contains(&Pattern::Ip(ip.to_canonical()))
    }

    /// Whether the `allow_private` opt-in is on.
    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// The merged patterns, explicit ones first.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Profile names in use.
    pub fn profiles(&self) -> &[String] {
        &self.profiles
    }

    /// `profile=<p|-> allow=<a,b>` as in the reference's connect line.
    pub fn summary(&self) -> String {
        let profile = if self.profiles.is_empty() {
            "-".to_owned()
        } else {
            self.profiles.join(",")
        };
        let allow: Vec<String> = self.patterns.iter().map(ToString::to_string).collect();
        format!("profile={profile} allow={}", allow.join(","))
    }
}
