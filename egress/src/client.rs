//! The lease side: [`ProxyServer`] owns the loopback listener for its whole life and serves through whichever bridge is attached at the moment, so the pair heals without reconfiguring the browser.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
use crate::proxy::{self, ConnLimits, ViaBridge, text_response};
use crate::stats::SessionStats;

/// Lease-side settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bridge tunables (v2 on/off, keepalive, open timeout, queue cap).
    pub bridge: BridgeConfig,
    /// Concurrent proxied connections with a complete request head; beyond this new ones get `503`.
    pub max_connections: usize,
    /// Connections still waiting for their request head; beyond this new ones are closed at once.
    pub max_pending_heads: usize,
    /// A connection that sends no byte at all within this is closed silently.
    pub first_byte_timeout: Duration,
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
            max_pending_heads: 1024,
            first_byte_timeout: Duration::from_secs(5),
            head_timeout: Duration::from_secs(15),
            max_head_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(600),
            stats: Arc::new(SessionStats::new()),
        }
    }
}

/// The loopback HTTP proxy. Dropping it stops accepting and closes the listener.
pub struct ProxyServer {
    slot: watch::Sender<Option<Bridge>>,
    /// What a request is told while no bridge is up.
    down: Arc<Mutex<String>>,
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
        let down = Arc::new(Mutex::new(
            "egress bridge is not connected yet; retry shortly".to_owned(),
        ));
        let accept = tokio::spawn(accept_loop(listener, slot_rx, cfg.clone(), down.clone()));
        Ok(ProxyServer {
            slot,
            down,
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
        let bridge_handle = bridge.clone();
        self.slot.send_replace(Some(bridge));
        info!(listen = %self.local_addr, "egress client: bridge connected");
        let ended = bridge_handle.clone();
        let res = run.await;
        let why = match ended.peer_bye() {
            Some(bye) if bye.contains("egress stopped") => STOPPED.to_owned(),
            _ => down_reason(&res).to_owned(),
        };
        *self.down.lock().unwrap() = why;
        self.slot.send_replace(None);
        res
    }

    /// Sets what requests are told while no bridge is up (e.g. after a fatal end).
    pub fn set_down_reason(&self, reason: impl Into<String>) {
        *self.down.lock().unwrap() = reason.into();
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

const STOPPED: &str = "the egress host side was stopped (crabboxctl egress stop); start it again with `crabboxctl egress host`";

/// The 503 text after a bridge ended, from the coordinator's close code and reason.
fn down_reason(res: &Result<(), BridgeError>) -> &'static str {
    match res {
        Err(BridgeError::Closed { reason, .. }) if reason.contains("egress stopped") => STOPPED,
        Err(BridgeError::Closed { code: 1011, reason }) if reason.contains("host disconnected") => {
            "the egress host side left the bridge (stopped, or restarting); waiting for it to rejoin"
        }
        Err(e) if e.is_fatal() => "this egress session is over (replaced, or the lease ended)",
        _ => "egress bridge is not connected; it is reconnecting, retry shortly",
    }
}

async fn accept_loop(
    listener: TcpListener,
    slot: watch::Receiver<Option<Bridge>>,
    cfg: Arc<ClientConfig>,
    down: Arc<Mutex<String>>,
) {
    // Each admitted connection holds at most one stream, and yamux ends the
    // whole bridge (not one open) when a side goes over its stream limit, so
    // the bridge's limit caps the connections too.
    let max_connections = cfg.max_connections.min(cfg.bridge.max_streams);
    if max_connections < cfg.max_connections {
        warn!(
            requested = cfg.max_connections,
            max_connections, "max connections capped to the bridge's stream limit"
        );
    }
    let limit = Arc::new(Semaphore::new(max_connections));
    let heads = Arc::new(Semaphore::new(cfg.max_pending_heads.max(1)));
    let limits = ConnLimits {
        first_byte_timeout: cfg.first_byte_timeout,
        head_timeout: cfg.head_timeout,
        max_head_bytes: cfg.max_head_bytes,
        idle_timeout: cfg.idle_timeout,
    };
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
        // Every accepted socket holds a descriptor, so even connections that
        // have not sent a head yet are bounded (each for `first_byte_timeout`
        // plus `head_timeout` at most).
        let Ok(permit) = heads.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = sock
                    .write_all(&text_response(
                        "503 Service Unavailable",
                        "too many connections waiting to send a request",
                    ))
                    .await;
                let _ = sock.shutdown().await;
            });
            continue;
        };
        let _ = sock.set_nodelay(true);
        let upstream = ViaBridge {
            slot: slot.clone(),
            down: down.clone(),
        };
        let limit = limit.clone();
        tokio::spawn(async move {
            proxy::serve_connection(sock, &upstream, limits, &limit, permit).await;
        });
    }
}
