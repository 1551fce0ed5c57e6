//! Resolve once, keep only validated public addresses (or a literally listed private one under `allow_private`), order them, and dial the pinned addresses within one 15 s budget.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::warn;

use super::addr::is_public;
use super::policy::{Policy, normalize_host};
use crate::frame_v2::OpenCode;

/// Resolves a host name to addresses (A + AAAA), once per open.
pub type Resolver = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> + Send + Sync,
>;

/// The system resolver (`getaddrinfo` through tokio).
pub fn system_resolver() -> Resolver {
    Arc::new(|host: String| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    })
}

/// Why a destination was not dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// The port is not an integer 1–65535.
    #[error("invalid destination port")]
    InvalidPort,
    /// Empty host.
    #[error("missing destination host")]
    MissingHost,
    /// Not a host name or IP literal (bad characters, label or total length).
    #[error("invalid destination host")]
    InvalidHost,
    /// Not on the allowlist.
    #[error("host not allowed")]
    NotAllowed,
    /// DNS failed.
    #[error("resolve allowed destination: {0}")]
    Resolve(String),
    /// DNS gave no addresses.
    #[error("destination did not resolve to an address")]
    NoAddress,
    /// Only non-public addresses.
    #[error("destination did not resolve to a public address")]
    NoPublicAddress,
    /// Every connect attempt failed.
    #[error("dial allowed destination: {0}")]
    Connect(String),
    /// The budget ran out.
    #[error("dial allowed destination: timed out")]
    TimedOut,
}

impl DialError {
    /// The v2 reply code for this failure.
    pub fn code(&self) -> OpenCode {
        match self {
            DialError::InvalidPort | DialError::MissingHost | DialError::InvalidHost => {
                OpenCode::BadRequest
            }
            DialError::NotAllowed => OpenCode::NotAllowed,
            DialError::NoAddress | DialError::NoPublicAddress => OpenCode::NoPublicAddress,
            DialError::Resolve(_) | DialError::Connect(_) => OpenCode::ConnectFailed,
            DialError::TimedOut => OpenCode::TimedOut,
        }
    }
}

/// Parses a port string as the reference does (integer 1–65535).
pub fn parse_port(port: &str) -> Result<u16, DialError> {
    match port.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(DialError::InvalidPort),
    }
}

/// Longest destination host accepted as input (bracketed IPv6 literals and a
/// trailing dot included), before it is normalised.
pub const MAX_HOST_INPUT: usize = 255;

/// Validates a peer-supplied destination host before policy and logging:
/// an IP literal (brackets allowed), or a host name of at most 253 bytes made
/// of 1–63 byte labels of letters, digits, `-` and `_`. Returns it normalised.
pub fn validate_destination(host: &str) -> Result<String, DialError> {
    if host.len() > MAX_HOST_INPUT {
        // Normalising a megabyte is already too much work for a refusal.
        return Err(DialError::InvalidHost);
    }
    let host = normalize_host(host);
    if host.is_empty() {
        return Err(DialError::MissingHost);
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(DialError::InvalidHost);
    }
    Ok(host)
}

/// Checks the allowlist, resolves once and returns the pinned addresses to try, in order.
pub async fn candidates(
    policy: &Policy,
    host: &str,
    port: u16,
    resolver: &Resolver,
) -> Result<Vec<SocketAddr>, DialError> {
    let host = normalize_host(host);
    if host.is_empty() {
        return Err(DialError::MissingHost);
    }
    if !policy.allows(&host) {
        return Err(DialError::NotAllowed);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        // IP literal: no DNS.
        let ip = ip.to_canonical();
        if is_public(ip) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if policy.private_literal_allowed(ip) {
            warn!(%ip, "allow_private: dialling a private address because it is listed literally");
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        return Err(DialError::NoPublicAddress);
    }
    let answers = resolver(host.clone())
        .await
        .map_err(|e| DialError::Resolve(e.to_string()))?;
    let mut unique: Vec<IpAddr> = Vec::new();
    for ip in answers {
        let ip = ip.to_canonical();
        if !unique.contains(&ip) {
            unique.push(ip);
        }
    }
    if unique.is_empty() {
        return Err(DialError::NoAddress);
    }
    // Names never unlock private addresses, even with allow_private: a
    // rebinding DNS answer must not reach the operator's network.
    let public: Vec<IpAddr> = unique.into_iter().filter(|ip| is_public(*ip)).collect();
    if public.is_empty() {
        return Err(DialError::NoPublicAddress);
    }
    Ok(interleave(public)
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

/// Alternates address families starting with the resolver's first answer,
/// keeping resolver order within a family, so one broken family costs at most one attempt.
fn interleave(ips: Vec<IpAddr>) -> Vec<IpAddr> {
    let first_v6 = ips.first().is_some_and(IpAddr::is_ipv6);
    let (mut a, mut b): (Vec<IpAddr>, Vec<IpAddr>) =
        ips.into_iter().partition(|ip| ip.is_ipv6() == first_v6);
    a.reverse();
    b.reverse();
    let mut out = Vec::with_capacity(a.len() + b.len());
    while !a.is_empty() || !b.is_empty() {
        out.extend(a.pop());
        out.extend(b.pop());
    }
    out
}

/// Allowlist, resolve, filter, then connect to the pinned addresses, all within `budget`.
pub async fn dial(
    policy: &Policy,
    host: &str,
    port: &str,
    resolver: &Resolver,
    budget: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let port = parse_port(port)?;
    let deadline = tokio::time::Instant::now() + budget;
    let attempt = async {
        let addrs = candidates(policy, host, port, resolver).await?;
        let mut last = String::from("no address tried");
        let count = addrs.len();
        for (i, addr) in addrs.into_iter().enumerate() {
            // Share what is left of the budget among the remaining addresses
            // (at least 2 s each), so one black-holed address cannot eat it all.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = (left / (count - i) as u32)
                .max(Duration::from_secs(2))
                .min(left);
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, addr));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "connect timed out".to_owned(),
            }
        }
        Err(DialError::Connect(last))
    };
    tokio::time::timeout(budget, attempt)
        .await
        .unwrap_or(Err(DialError::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_families() {
        let ips: Vec<IpAddr> = ["2001:4860::1", "2001:4860::2", "8.8.8.8", "8.8.4.4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let got: Vec<String> = interleave(ips).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["2001:4860::1", "8.8.8.8", "2001:4860::2", "8.8.4.4"]);
    }
}
