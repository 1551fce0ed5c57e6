//! The lease side: [`ProxyServer`] owns the loopback listener for its whole life and serves through whichever bridge is attached at the moment, so the pair heals without reconfiguring the browser.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::bridge::{self, Bridge, BridgeConfig, Role};
use crate::error::BridgeError;
use crate::proxy::{self, text_response};
use crate::stats::SessionStats;

/// Lease-side settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bridge tunables (v2 on/off, keepalive, open timeout, queue cap).
    pub bridge: BridgeConfig,
    /// Concurrent proxied connections; beyond this new ones get `503`.
    pub max_connections: usize,
    /// Deadline for a complete request head (then `408`).
    pub head_timeout: Duration,
    /// Size cap of a request head (then `431`).
    pub max_head_bytes: usize,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Counters shared with whoever displays them.
    pub stats: Arc<SessionStats>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bridge: BridgeConfig::client(),
            max_connections: 512,
            head_timeout: Duration::from_secs(30),
            max_head_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(600),
            stats: Arc::new(SessionStats::new()),
        }
    }
}

/// The loopback HTTP proxy. Dropping it stops accepting and closes the listener.
pub struct ProxyServer {
    slot: watch::Sender<Option<Bridge>>,
    cfg: Arc<ClientConfig>,
    local_addr: SocketAddr,
    _accept: AbortOnDropHandle<()>,
}

impl ProxyServer {
    /// Starts serving `listener` (already bound, loopback-checked by the
    /// caller). Until a bridge is attached every request gets a fast `503`.
    pub fn start(listener: TcpListener, config: ClientConfig) -> io::Result<ProxyServer> {
        let local_addr = listener.local_addr()?;
        let cfg = Arc::new(config);
        let (slot, slot_rx) = watch::channel(None);
        let accept = tokio::spawn(accept_loop(listener, slot_rx, cfg.clone()));
        Ok(ProxyServer {
            slot,
            cfg,
            local_addr,
            _accept: AbortOnDropHandle::new(accept),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The session counters.
    pub fn stats(&self) -> Arc<SessionStats> {
        self.cfg.stats.clone()
    }

    /// Whether a bridge is attached right now.
    pub fn is_bridged(&self) -> bool {
        self.slot.borrow().is_some()
    }

    /// Runs one bridge over `ws` until it ends; new connections use it while
    /// it is up. Returns why it ended (see [`BridgeError::class`]). Streams of
    /// the ended bridge end with it; the listener stays.
    pub async fn attach<W>(&self, ws: W) -> Result<(), BridgeError>
    where
        W: Stream<Item = Result<Message, WsError>>
            + Sink<Message, Error = WsError>
            + Send
            + Unpin
            + 'static,
    {
        let (bridge, run) = bridge::start(
            ws,
            Role::Client,
            self.cfg.bridge.clone(),
            self.cfg.stats.clone(),
            None,
        );
        self.slot.send_replace(Some(bridge));
        info!(listen = %self.local_addr, "egress client: bridge connected");
        let res = run.await;
        self.slot.send_replace(None);
        res
    }
}

/// Serves `listener` through one bridge over `ws`; returns when the bridge ends.
/// For a proxy that survives reconnects use [`ProxyServer`] directly.
pub async fn run_client<W>(
    ws: W,
    listener: TcpListener,
    config: ClientConfig,
) -> Result<(), BridgeError>
where
    W: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Send
        + Unpin
        + 'static,
{
    let server =
        ProxyServer::start(listener, config).map_err(|e| BridgeError::Transport(e.to_string()))?;
    server.attach(ws).await
}

async fn accept_loop(
    listener: TcpListener,
    slot: watch::Receiver<Option<Bridge>>,
    cfg: Arc<ClientConfig>,
) {
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = sock
                    .write_all(&text_response(
                        "503 Service Unavailable",
                        "too many concurrent connections",
                    ))
                    .await;
                let _ = sock.shutdown().await;
            });
            continue;
        };
        let slot = slot.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            proxy::serve_connection(sock, slot, cfg).await;
            drop(permit);
        });
    }
}
