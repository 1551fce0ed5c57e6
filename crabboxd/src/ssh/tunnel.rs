//! Byte streams to an address on the lease over the mux: `direct-tcpip`
//! to a host and port as the lease sees them, or `direct-streamlocal` to a
//! Unix socket on the lease. The base of local forwards, of probing a
//! helper's listener and of talking to its control socket, with no shell
//! and nothing in any argv.
//!
//! OpenSSH's `MaxSessions` counts session channels only, so tunnels take
//! no command permit; each counts as an open channel (keeping the mux from
//! its idle close) and adds its bytes to the mux's counters.

use std::{
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use russh::{ChannelStream, client::Msg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    SshError,
    conn::{ChannelGuard, Conn, Stats},
};

/// Where a tunnel goes, as the lease sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host and port (`direct-tcpip`); `127.0.0.1` is the lease's
    /// loopback.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket path on the lease (`direct-streamlocal@openssh.com`).
    Unix(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{path}"),
        }
    }
}

/// An open tunnel: read and write it like a socket. Dropping it closes the
/// channel.
pub struct Tunnel {
    stream: ChannelStream<Msg>,
    stats: Arc<Stats>,
    _guard: ChannelGuard,
    _conn: Arc<Conn>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

/// How long the lease's sshd may take to answer a channel open.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(30);

/// Opens a tunnel on `conn`, within [`OPEN_DEADLINE`]. A refusal by the
/// server (nothing listening, forwarding disabled) is `SshError::Channel`
/// naming the endpoint; no answer in time is `SshError::Lost`.
pub async fn open(conn: Arc<Conn>, to: &Endpoint) -> Result<Tunnel, SshError> {
    let opening = async {
        match to {
            Endpoint::Tcp { host, port } => {
                conn.handle
                    .channel_open_direct_tcpip(host.as_str(), u32::from(*port), "127.0.0.1", 0)
                    .await
            }
            Endpoint::Unix(path) => {
                conn.handle
                    .channel_open_direct_streamlocal(path.as_str())
                    .await
            }
        }
    };
    let opened = tokio::time::timeout(OPEN_DEADLINE, opening)
        .await
        .map_err(|_| {
            SshError::Lost(format!(
                "the lease did not answer a channel to {to} within {OPEN_DEADLINE:?}"
            ))
        })?;
    let channel = opened.map_err(|e| match e {
        russh::Error::ChannelOpenFailure(reason) => SshError::Channel(format!(
            "the lease refused a channel to {to}: {reason:?} (nothing listening there, or sshd \
             forbids forwarding: AllowTcpForwarding / AllowStreamLocalForwarding)"
        )),
        other if conn.handle.is_closed() => {
            SshError::Lost(format!("the SSH connection was lost opening {to}: {other}"))
        }
        other => SshError::Channel(format!("opening a channel to {to}: {other}")),
    })?;
    Ok(Tunnel::from_channel(channel, conn))
}

impl Tunnel {
    /// Wraps an open channel of `conn` (one we opened, or one the lease's
    /// sshd opened for a remote forward of ours) as a byte stream that
    /// counts as an open channel of the mux and adds to its counters.
    pub fn from_channel(channel: russh::Channel<Msg>, conn: Arc<Conn>) -> Self {
        Tunnel {
            _guard: ChannelGuard::new(&conn.stats),
            stats: Arc::clone(&conn.stats),
            stream: channel.into_stream(),
            _conn: conn,
        }
    }

    /// The connection's stall deadline (how long whoever is fed from this
    /// tunnel may stop reading before it is closed).
    pub fn stall(&self) -> Duration {
        self._conn.stall
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.stats.bytes_out.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
