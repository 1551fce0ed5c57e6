//! Serving one proxy connection from any byte stream with no bridge: [`serve`] parses the request with the same proxy code, checks the host [`Policy`] and dials with the host side's resolve-and-pin dialer, counting in one [`SessionStats`] (the daemon hands it, e.g., forwarded SSH channels).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tracing::{info, warn};

use super::conn::{ConnLimits, Link, Upstream, forbidden, serve_connection};
use super::text_response;
use crate::host::dial::{self, DialError, Resolver, system_resolver};
use crate::host::{HostConfig, Policy, reply_message};
use crate::stats::SessionStats;

/// Settings of a [`LocalProxy`]: the lease side's per-connection bounds plus
/// the host side's dial settings.
#[derive(Clone)]
pub struct LocalConfig {
    /// Concurrent connections with a complete request head; beyond this new ones get `503`.
    pub max_streams: usize,
    /// Connections still waiting for their request head; beyond this new ones get `503` at once.
    pub max_pending_heads: usize,
    /// A connection that sends no byte at all within this is closed silently.
    pub first_byte_timeout: Duration,
    /// Deadline for a complete request head (then `408`).
    pub head_timeout: Duration,
    /// Size cap of a request head (then `431`).
    pub max_head_bytes: usize,
    /// A stream with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Budget for resolution plus every connect attempt of one open.
    pub dial_budget: Duration,
    /// DNS resolver (replaceable in tests).
    pub resolver: Resolver,
    /// Destination sockets allowed across everything sharing this semaphore;
    /// when none is left a request gets `503` at once. `None`: only `max_streams`.
    pub socket_budget: Option<Arc<Semaphore>>,
    /// Counters shared with whoever displays them.
    pub stats: Arc<SessionStats>,
    /// How the 403 tells the operator to allow a host (`{host}` is replaced).
    pub allow_hint: String,
    /// A write toward the destination that makes no progress for this long
    /// closes that stream (with a warning), so a destination that stops
    /// reading cannot hold the carrier's data in its queues. `None`: no
    /// deadline (only `idle_timeout`).
    pub stall: Option<Duration>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        let host = HostConfig::default();
        let client = crate::client::ClientConfig::default();
        LocalConfig {
            max_streams: client.max_connections,
            max_pending_heads: client.max_pending_heads,
            first_byte_timeout: client.first_byte_timeout,
            head_timeout: client.head_timeout,
            max_head_bytes: client.max_head_bytes,
            idle_timeout: host.idle_timeout,
            dial_budget: host.dial_budget,
            resolver: system_resolver(),
            socket_budget: None,
            stats: Arc::new(SessionStats::new()),
            allow_hint: String::new(),
            stall: None,
        }
    }
}

impl LocalConfig {
    /// Takes the dial settings (resolver, dial budget, socket budget, idle
    /// timeout) and the counters of `host`; the rest keeps its defaults.
    pub fn from_host(host: &HostConfig) -> Self {
        LocalConfig {
            idle_timeout: host.idle_timeout,
            dial_budget: host.dial_budget,
            resolver: host.resolver.clone(),
            socket_budget: host.socket_budget.clone(),
            stats: host.stats.clone(),
            ..LocalConfig::default()
        }
    }
}

impl std::fmt::Debug for LocalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalConfig")
            .field("max_streams", &self.max_streams)
            .field("max_pending_heads", &self.max_pending_heads)
            .field("head_timeout", &self.head_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("dial_budget", &self.dial_budget)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

/// One egress session served without a bridge: share it (`Arc`) among
/// every connection of the session and call [`serve`] for each.
pub struct LocalProxy {
    policy: Arc<Policy>,
    cfg: LocalConfig,
    limits: ConnLimits,
    streams: Semaphore,
    heads: Arc<Semaphore>,
    warned: AtomicBool,
}

impl LocalProxy {
    /// A session that allows what `policy` allows.
    pub fn new(policy: Arc<Policy>, cfg: LocalConfig) -> Self {
        LocalProxy {
            limits: ConnLimits {
                first_byte_timeout: cfg.first_byte_timeout,
                head_timeout: cfg.head_timeout,
                max_head_bytes: cfg.max_head_bytes,
                idle_timeout: cfg.idle_timeout,
            },
            streams: Semaphore::new(cfg.max_streams),
            heads: Arc::new(Semaphore::new(cfg.max_pending_heads.max(1))),
            warned: AtomicBool::new(false),
            policy,
            cfg,
        }
    }

    /// The session counters.
    pub fn stats(&self) -> &Arc<SessionStats> {
        &self.cfg.stats
    }

    /// The allowlist.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The settings.
    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }
}

impl std::fmt::Debug for LocalProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProxy")
            .field("policy", &self.policy.summary())
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Serves one HTTP proxy connection (`CONNECT` or absolute-form) arriving on
/// `stream` to completion: the same head rules and answers as the lease-side
/// proxy, then the host side's policy check and pinned dial. Cancel-safe:
/// dropping the future closes the stream and the destination socket.
pub async fn serve<S>(mut stream: S, proxy: &LocalProxy)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Ok(permit) = proxy.heads.clone().try_acquire_owned() else {
        let _ = stream
            .write_all(&text_response(
                "503 Service Unavailable",
                "too many connections waiting to send a request",
            ))
            .await;
        let _ = stream.shutdown().await;
        return;
    };
    serve_connection(stream, &Direct(proxy), proxy.limits, &proxy.streams, permit).await;
}

struct Direct<'a>(&'a LocalProxy);

impl Upstream for Direct<'_> {
    type Stream = Guarded;

    async fn open(&self, host: &str, port: u16) -> Result<Link<Guarded>, Vec<u8>> {
        let proxy = self.0;
        let cfg = &proxy.cfg;
        let stats = &cfg.stats;
        let guard = match &cfg.socket_budget {
            None => None,
            Some(budget) => match budget.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    stats.rejected();
                    if !proxy.warned.swap(true, Ordering::Relaxed) {
                        warn!(
                            "egress: refusing requests at the socket budget (logged once per session)"
                        );
                    }
                    return Err(text_response(
                        "503 Service Unavailable",
                        "crabbox egress: too many open destination sockets",
                    ));
                }
            },
        };
        let dialled = match dial::validate_destination(host) {
            Ok(host) => dial::dial(
                &proxy.policy,
                &host,
                &port.to_string(),
                &cfg.resolver,
                cfg.dial_budget,
            )
            .await
            .map(|(tcp, _)| tcp),
            Err(e) => Err(e),
        };
        match dialled {
            Ok(tcp) => Ok(Link {
                stream: Guarded {
                    tcp,
                    stall: cfg.stall,
                    timer: None,
                    stalled: false,
                    reader: None,
                    host: Preview(host).to_string(),
                },
                stats: stats.clone(),
                half_close: true,
                ended: None,
                guard,
            }),
            Err(e) => {
                stats.rejected();
                // The parsed host is bounded by the head cap; still logged quoted.
                info!(host = %Preview(host), port, reason = %e, "open refused");
                Err(match e {
                    DialError::NotAllowed if cfg.allow_hint.is_empty() => forbidden(host),
                    DialError::NotAllowed => forbidden_with(host, &cfg.allow_hint),
                    e => text_response(
                        "502 Bad Gateway",
                        &format!("crabbox egress: {}: {}", e.code(), reply_message(&e)),
                    ),
                })
            }
        }
    }
}

fn forbidden_with(host: &str, hint: &str) -> Vec<u8> {
    text_response(
        "403 Forbidden",
        &format!(
            "crabbox egress: {host} is not on this egress session's allowlist; {}",
            hint.replace("{host}", host)
        ),
    )
}

/// Peer-supplied text for a log line: at most 64 characters, Debug-escaped
/// (quotes, `\n`, `\u{1b}`), so it can never forge a line nor fill one.
struct Preview<'a>(&'a str);

impl std::fmt::Display for Preview<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: String = self.0.chars().take(64).collect();
        if cut.len() < self.0.len() {
            write!(f, "{cut:?}…")
        } else {
            write!(f, "{cut:?}")
        }
    }
}

/// The destination socket with the write-stall deadline: a write that stays
/// pending for `stall` fails, and so does every read after it (the relay's
/// other direction, which would otherwise wait for the destination forever).
pub(crate) struct Guarded {
    tcp: TcpStream,
    stall: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    reader: Option<Waker>,
    /// The destination, already cut and quoted for the warning.
    host: String,
}

impl Guarded {
    fn stalled_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the destination read nothing within the stall deadline",
        )
    }

    /// Polls a pending write's deadline: `Ready` once it has passed.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(stall) = self.stall else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = true;
        self.timer = None;
        warn!(
            host = %self.host,
            stall = ?stall,
            "egress: a write toward the destination made no progress within the stall deadline; closing the stream"
        );
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        Poll::Ready(Self::stalled_error())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stalled {
            return Poll::Ready(Err(Self::stalled_error()));
        }
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if r.is_pending() {
            self.reader = Some(cx.waker().clone());
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stalled {
            return Poll::Ready(Err(Self::stalled_error()));
        }
        match Pin::new(&mut self.tcp).poll_write(cx, buf) {
            Poll::Pending => self.poll_stall(cx).map(Err),
            r => {
                self.timer = None;
                r
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.stalled {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::Preview;

    #[test]
    fn a_refused_host_is_logged_quoted_and_cut() {
        let long = format!("evil\n{}", "a".repeat(64 * 1024));
        let shown = Preview(&long).to_string();
        assert!(shown.starts_with("\"evil\\n"), "{shown}");
        assert!(shown.ends_with('…'), "{shown}");
        assert!(
            shown.chars().count() < 100,
            "{} chars",
            shown.chars().count()
        );
        assert_eq!(Preview("example.com").to_string(), "\"example.com\"");
    }
}
