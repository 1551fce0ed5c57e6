//! The `--listen` rule: the proxy binds only to loopback (`127.0.0.0/8`, `::1`, `localhost`), because anyone who can reach it exits through the operator's network; and [`bind`], a listener whose accept queue holds a browser's burst of connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A `--listen` value that is not a loopback `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Not of the form `host:port`.
    #[error("--listen must be host:port with a loopback host, such as 127.0.0.1:3128 (got {0:?})")]
    Malformed(String),
    /// A host other than localhost or a loopback IP.
    #[error(
        "--listen must use a loopback address (127.0.0.0/8, ::1 or localhost), not {0:?}: \
         anyone who can reach the proxy would exit through the operator's network"
    )]
    NotLoopback(String),
}

/// The accept queue asked for by [`bind`]; the kernel caps it at
/// `net.core.somaxconn` (4096 on current Linux).
pub const BACKLOG: u32 = 4096;

/// Binds a TCP listener with an accept queue of [`BACKLOG`].
///
/// `TcpListener::bind` asks for 128, the old `SOMAXCONN`: a page or a test
/// that opens a few hundred connections at once overflows it, and every
/// connection the kernel drops is retried by the client only after a 1 s SYN
/// timeout (measured: 1000 simultaneous connections took 1.1 s instead of
/// 0.2 s; docs/benchmarks.md).
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std does for `TcpListener::bind`: a restarted listener may reuse
    // a port whose old connections are still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Validates a `--listen` value and returns the address to bind.
/// `localhost` binds `127.0.0.1` (not whatever the resolver says).
pub fn validate_listen(value: &str) -> Result<SocketAddr, ListenError> {
    let malformed = || ListenError::Malformed(value.to_owned());
    let (host, port) = value.rsplit_once(':').ok_or_else(malformed)?;
    if port.is_empty() {
        return Err(malformed());
    }
    let port: u16 = port.parse().map_err(|_| malformed())?;
    let host_inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host_inner.is_empty() {
        return Err(ListenError::NotLoopback(value.to_owned()));
    }
    if host_inner.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if host_inner.contains(':') && host_inner.len() == host.len() {
        // An unbracketed IPv6 literal is ambiguous with the port separator.
        return Err(malformed());
    }
    match host_inner.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(SocketAddr::new(ip, port)),
        Ok(_) => Err(ListenError::NotLoopback(value.to_owned())),
        Err(_) => Err(ListenError::NotLoopback(value.to_owned())),
    }
}
