//! Local forwards (`SshForward{lease:local}` tasks): a loopback listener on
//! this machine whose every accepted connection becomes a tunnel to an
//! address on the lease, over the lease's mux.
//!
//! A connection that arrives while the mux is down waits for it to come
//! back (at most [`PENDING_MAX`] connections, each for at most
//! [`PENDING_WAIT`]); more than that are closed at once and counted as
//! refused. At most [`OPEN_MAX`] connections are carried at a time; beyond
//! that new ones wait in the kernel's accept backlog. A running forward
//! keeps its mux from the idle close, and ends when its lease ends.

use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{StreamExt as _, stream::FuturesUnordered};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};

use super::{SshError, SshManager, conn::Stats, tunnel::Endpoint};
use crate::{
    daemon::LeaseEnds,
    supervisor::{TaskCtx, TaskError},
};

/// Connections carried at once by one forward.
pub const OPEN_MAX: usize = 256;
/// Connections that may wait for the mux to (re)connect at once.
pub const PENDING_MAX: usize = 32;
/// How long a connection waits for the mux before it is closed.
pub const PENDING_WAIT: Duration = Duration::from_secs(30);
/// How often the task table's counters are refreshed.
const TICK: Duration = Duration::from_secs(1);

/// A forward to start.
#[derive(Debug, Clone)]
pub struct ForwardSpec {
    /// The lease id or static target name.
    pub lease: String,
    /// The local listen address (loopback; port 0 picks one).
    pub local: SocketAddr,
    /// Where connections go, as the lease sees it.
    pub remote: Endpoint,
    /// The calling client's SSH agent socket, if any.
    pub agent: Option<std::path::PathBuf>,
}

/// A forward's counters.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections waiting for the mux now.
    pub pending: AtomicUsize,
    /// Connections accepted.
    pub total: AtomicU64,
    /// Connections closed at once because too many were waiting.
    pub refused: AtomicU64,
    /// Connections closed because their local peer stopped reading.
    pub stalled: AtomicU64,
    /// Bytes sent to the lease.
    pub bytes_out: AtomicU64,
    /// Bytes received from the lease.
    pub bytes_in: AtomicU64,
}

/// What `forward list` shows of one forward.
#[derive(Debug, Clone)]
pub struct ForwardInfo {
    /// `LEASE:LOCAL`, the key of its task.
    pub id: String,
    /// The lease.
    pub lease: String,
    /// The address it listens on.
    pub local: SocketAddr,
    /// Where connections go.
    pub remote: Endpoint,
    /// Connections open now.
    pub open: u64,
    /// Connections accepted.
    pub total: u64,
    /// Connections refused.
    pub refused: u64,
    /// Bytes sent to the lease.
    pub bytes_out: u64,
    /// Bytes received from the lease.
    pub bytes_in: u64,
}

impl ForwardInfo {
    /// A snapshot of a forward's counters.
    pub fn new(
        id: &str,
        lease: &str,
        local: SocketAddr,
        remote: &Endpoint,
        s: &ForwardStats,
    ) -> Self {
        ForwardInfo {
            id: id.to_owned(),
            lease: lease.to_owned(),
            local,
            remote: remote.clone(),
            open: s.open.load(Ordering::SeqCst) as u64,
            total: s.total.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
        }
    }
}

/// Refuses a listen address that is not loopback, with the sentence a
/// person needs.
pub fn check_local(local: &SocketAddr) -> Result<(), SshError> {
    if local.ip().is_loopback() {
        return Ok(());
    }
    Err(SshError::Invalid(format!(
        "refusing to listen on {local}: a forward listens on loopback only, so nothing else on \
         the network can reach the lease through it; use --local 127.0.0.1:PORT (or [::1]:PORT)"
    )))
}

/// Parses `HOST:PORT` (or `[V6]:PORT`) as an endpoint on the lease.
pub fn parse_remote(raw: &str) -> Result<Endpoint, SshError> {
    let bad = || {
        SshError::Invalid(format!(
            "the remote address {raw:?} is not HOST:PORT (for example 127.0.0.1:8080)"
        ))
    };
    let (host, port) = raw.trim().rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if port == 0 || !host_ok {
        return Err(bad());
    }
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// Counts an open forward on its mux while alive (a mux with a forward is
/// never idle).
struct ForwardGuard(Arc<Stats>);

impl ForwardGuard {
    fn new(stats: Arc<Stats>) -> Self {
        stats.forwards.fetch_add(1, Ordering::SeqCst);
        ForwardGuard(stats)
    }
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.0.forwards.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One forward task's inputs.
pub struct ForwardTask {
    /// The manager, to reach the lease's mux (restarted when needed).
    pub manager: SshManager,
    /// The spec; `local` is the bound address.
    pub spec: ForwardSpec,
    /// The listener, taken by the one attempt.
    pub listener: std::sync::Mutex<Option<TcpListener>>,
    /// Counters shared with `forward list`.
    pub stats: Arc<ForwardStats>,
    /// The mux's counters.
    pub mux_stats: Arc<Stats>,
    /// Lease end.
    pub ends: LeaseEnds,
}

impl ForwardTask {
    /// Accepts and carries connections until stopped or the lease ends.
    pub async fn run(self: Arc<Self>, ctx: TaskCtx) -> Result<(), TaskError> {
        let Some(listener) = self.listener.lock().unwrap().take() else {
            return Err(TaskError::fatal(SshError::Invalid(
                "the forward's listener is gone".into(),
            )));
        };
        let _guard = ForwardGuard::new(Arc::clone(&self.mux_stats));
        let ended = self.ends.wait_for(&self.spec.lease);
        tokio::pin!(ended);
        let mut conns = FuturesUnordered::new();
        let mut tick = tokio::time::interval(TICK);
        let mut last = (u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        ctx.running();
        tracing::info!(lease = %self.spec.lease, local = %self.spec.local, remote = %self.spec.remote, "forward listening");
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                over = &mut ended => {
                    tracing::info!(lease = %self.spec.lease, local = %self.spec.local, "forward ends with its lease");
                    if over.orderly {
                        ctx.token().cancel();
                        return Ok(());
                    }
                    return Err(TaskError::fatal(SshError::LeaseEnded(over.reason)));
                }
                accepted = listener.accept(), if conns.len() < OPEN_MAX => match accepted {
                    Ok((sock, peer)) => {
                        self.stats.total.fetch_add(1, Ordering::SeqCst);
                        if self.stats.pending.load(Ordering::SeqCst) >= PENDING_MAX {
                            self.stats.refused.fetch_add(1, Ordering::SeqCst);
                            tracing::warn!(%peer, "forward: too many connections waiting for the SSH connection; closing this one");
                            drop(sock);
                        } else {
                            // Counted here, not when first polled, so the
                            // bound holds however fast connections arrive.
                            self.stats.pending.fetch_add(1, Ordering::SeqCst);
                            conns.push(Arc::clone(&self).carry(sock, peer));
                        }
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly.
                        tracing::warn!(error = %e, "forward: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(()) = conns.next(), if !conns.is_empty() => {}
                _ = tick.tick() => {}
            }
            let now = (
                self.stats.open.load(Ordering::SeqCst) as u64,
                self.stats.total.load(Ordering::SeqCst),
                self.stats.bytes_out.load(Ordering::Relaxed),
                self.stats.bytes_in.load(Ordering::Relaxed),
                self.stats.stalled.load(Ordering::SeqCst),
            );
            if now != last {
                last = now;
                ctx.set_label("connections", now.0.to_string());
                ctx.set_label("total", now.1.to_string());
                ctx.set_label("bytes_out", now.2.to_string());
                ctx.set_label("bytes_in", now.3.to_string());
                ctx.set_label("stalled", now.4.to_string());
            }
        }
    }

    /// Carries one accepted connection (counted as pending by the caller):
    /// waits (bounded) for the mux, opens
    /// a tunnel, copies both ways until both sides are done.
    async fn carry(self: Arc<Self>, sock: TcpStream, peer: SocketAddr) {
        let _ = sock.set_nodelay(true);
        let conn = tokio::time::timeout(
            PENDING_WAIT,
            self.manager
                .connection_within(&self.spec.lease, self.spec.agent.clone(), PENDING_WAIT),
        )
        .await;
        self.stats.pending.fetch_sub(1, Ordering::SeqCst);
        let conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "forward: no SSH connection for a connection");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "forward: no SSH connection within {PENDING_WAIT:?}; closing a connection");
                return;
            }
        };
        let opened =
            tokio::time::timeout(PENDING_WAIT, super::tunnel::open(conn, &self.spec.remote)).await;
        let mut tunnel = match opened {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "forward: cannot open the tunnel");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "forward: the tunnel did not open within {PENDING_WAIT:?}");
                return;
            }
        };
        self.stats.open.fetch_add(1, Ordering::SeqCst);
        let mut counted = Counted {
            inner: sock,
            stats: Arc::clone(&self.stats),
            stall: tunnel.stall(),
            waiting: None,
            stalled: false,
        };
        let r = tokio::io::copy_bidirectional(&mut counted, &mut tunnel).await;
        self.stats.open.fetch_sub(1, Ordering::SeqCst);
        if counted.stalled {
            self.stats.stalled.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                lease = %self.spec.lease,
                local = %self.spec.local,
                remote = %self.spec.remote,
                %peer,
                stall = ?counted.stall,
                "forward: the local peer stopped reading; closing its connection"
            );
        } else if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "forward: a connection ended with an error");
        }
    }
}

/// The local socket, counting bytes both ways into the forward's counters.
/// A write that cannot make progress for `stall` fails (and sets
/// `stalled`): a local peer that stops reading must not keep the tunnel's
/// channel full, since a full channel pauses the lease's whole connection.
struct Counted {
    inner: TcpStream,
    stats: Arc<ForwardStats>,
    stall: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
}

impl Counted {
    /// Whether a pending write has waited past the deadline (arming the
    /// deadline on the first pending poll).
    fn overdue(&mut self, cx: &mut Context<'_>) -> bool {
        let stall = self.stall;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = true;
            return true;
        }
        false
    }

    fn stalled_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the local peer read nothing for {:?}", self.stall),
        )
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) => {
                self.waiting = None;
                self.stats.bytes_in.fetch_add(*n as u64, Ordering::Relaxed);
            }
            Poll::Ready(Err(_)) => self.waiting = None,
            Poll::Pending if self.overdue(cx) => return Poll::Ready(Err(self.stalled_error())),
            Poll::Pending => {}
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listens() {
        assert!(check_local(&"127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(check_local(&"[::1]:8080".parse().unwrap()).is_ok());
        let e = check_local(&"0.0.0.0:8080".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("loopback only"), "{e}");
        assert!(check_local(&"192.168.1.2:80".parse().unwrap()).is_err());
    }

    #[test]
    fn remote_addresses_parse() {
        assert_eq!(
            parse_remote("127.0.0.1:8080").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(
            parse_remote("[::1]:22").unwrap(),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 22
            }
        );
        for bad in ["", "host", "host:0", ":80", "a b:80", "host:99999"] {
            assert!(parse_remote(bad).is_err(), "{bad}");
        }
    }
}
