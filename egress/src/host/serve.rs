//! [`run_host`]: serves one bridge WebSocket on the operator side: every open gets its own task (allowlist, dial, answer, relay), so a slow destination stalls only its own stream.

use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dial::{self, DialError, Resolver, system_resolver};
use super::policy::Policy;
use crate::bridge::{self, Bridge, BridgeConfig, Incoming, IncomingFn, Role};
use crate::error::BridgeError;
use crate::frame_v1::TextFrame;
use crate::frame_v2::{OpenCode, OpenReply, OpenRequest};
use crate::mux::MuxStream;
use crate::relay::{RelayOpts, relay};
use crate::stats::SessionStats;
use crate::stream_v1::V1Stream;

/// Operator-side settings.
#[derive(Clone)]
pub struct HostConfig {
    /// Bridge tunables.
    pub bridge: BridgeConfig,
    /// Budget for resolution plus every connect attempt of one open (reference: 15 s).
    pub dial_budget: Duration,
    /// A stream with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// v2: how long a new stream may take to send its open request.
    pub open_read_timeout: Duration,
    /// Counters shared with the daemon.
    pub stats: Arc<SessionStats>,
    /// DNS resolver (replaceable in tests).
    pub resolver: Resolver,
    /// Destination sockets (dialling or open) allowed across every bridge
    /// that shares this semaphore: one permit per stream for its whole life.
    /// When none is left an open is refused at once, so the process keeps
    /// descriptors in reserve (the daemon sizes it from `RLIMIT_NOFILE`).
    /// `None`: no process-wide bound beyond `max_streams` per bridge.
    pub socket_budget: Option<Arc<Semaphore>>,
    /// Cancel for an orderly stop: the host says `bye`, closes `1000 egress
    /// stopped` (so the lease side can tell the user the host was stopped) and
    /// [`run_host`] returns `Ok(())`.
    pub stop: CancellationToken,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            bridge: BridgeConfig::host(),
            dial_budget: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(600),
            open_read_timeout: Duration::from_secs(10),
            stats: Arc::new(SessionStats::new()),
            resolver: system_resolver(),
            socket_budget: None,
            stop: CancellationToken::new(),
        }
    }
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("bridge", &self.bridge)
            .field("dial_budget", &self.dial_budget)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Serves the host end of one bridge until the WebSocket ends.
///
/// Returns the reason it ended; classify it with [`BridgeError::class`]
/// (fatal: session replaced or lease ended; otherwise retry with a fresh
/// ticket for the same session). Cancel-safe: dropping the future closes the
/// socket and every stream of this bridge.
pub async fn run_host<W>(ws: W, policy: Arc<Policy>, config: HostConfig) -> Result<(), BridgeError>
where
    W: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Send
        + Unpin
        + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = Arc::new(config);
    let pending = Arc::new(Semaphore::new(config.bridge.max_pending_opens.max(1)));
    let warned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Cancelled when this function returns or is dropped: every stream task ends with it.
    let streams_end = CancellationToken::new();
    let _end_streams = streams_end.clone().drop_guard();
    // A v2 open gets its task straight from the bridge (no hop through the
    // loop below: one task wake less per request); v1 opens, which need the
    // bridge handle, are queued to the loop.
    let accept: IncomingFn = {
        let (policy, config) = (policy.clone(), config.clone());
        let (pending, warned, end) = (pending.clone(), warned.clone(), streams_end.clone());
        Arc::new(move |incoming| match incoming {
            Incoming::V2(stream) => {
                let work = serve_incoming(
                    None,
                    policy.clone(),
                    config.clone(),
                    pending.clone(),
                    warned.clone(),
                    Incoming::V2(stream),
                );
                tokio::spawn(end.clone().run_until_cancelled_owned(work));
            }
            v1 => {
                let _ = tx.send(v1);
            }
        })
    };
    let (bridge, run) = bridge::start(
        ws,
        Role::Host,
        config.bridge.clone(),
        config.stats.clone(),
        Some(accept),
    );
    // Dropping the set (when this function returns or is cancelled) aborts every v1 stream task.
    let mut streams = JoinSet::new();
    tokio::pin!(run);
    loop {
        tokio::select! {
            res = &mut run => return res,
            () = config.stop.cancelled() => {
                // One deadline for the goodbye and the bridge's end, polled
                // together (the bridge writes what the goodbye queues): a
                // relay that stopped reading cannot hold the stop.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    tokio::join!(bridge.say_goodbye("egress stopped"), &mut run)
                })
                .await;
                return Ok(());
            }
            Some(incoming) = rx.recv() => {
                streams.spawn(serve_incoming(
                    Some(bridge.clone()),
                    policy.clone(),
                    config.clone(),
                    pending.clone(),
                    warned.clone(),
                    incoming,
                ));
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// One open, from admission to the end of its stream. `bridge` is needed
/// (and given) for v1 opens only.
async fn serve_incoming(
    bridge: Option<Bridge>,
    policy: Arc<Policy>,
    config: Arc<HostConfig>,
    pending: Arc<Semaphore>,
    warned: Arc<std::sync::atomic::AtomicBool>,
    incoming: Incoming,
) {
    // A burst of opens waits briefly for a dial slot (holding no
    // descriptor); only then is it refused.
    let admitted = admit(&pending, config.socket_budget.as_ref()).await;
    let (dialling, socket) = match admitted {
        Ok(permits) => permits,
        Err(why) => {
            config.stats.rejected();
            if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                warn!(limit = %why, "egress host: refusing opens at a limit (logged once per bridge)");
            }
            refuse(bridge.as_ref(), incoming, why).await;
            return;
        }
    };
    let _socket = socket;
    match (incoming, bridge) {
        (Incoming::V1 { stream, host, port }, Some(bridge)) => {
            serve_v1(bridge, policy, config, stream, host, port, dialling).await
        }
        (Incoming::V1 { .. }, None) => {}
        (Incoming::V2(stream), _) => serve_v2(policy, config, stream, dialling).await,
    }
}

/// Why an open was refused before any work was done for it.
#[derive(Debug, Clone, Copy)]
enum Limit {
    PendingOpens,
    Sockets,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::PendingOpens => "too many pending opens on this bridge",
            Limit::Sockets => "too many open destination sockets",
        })
    }
}

/// How long an open may wait for one of the bridge's dial slots.
const PENDING_OPEN_WAIT: Duration = Duration::from_secs(5);

async fn admit(
    pending: &Arc<Semaphore>,
    sockets: Option<&Arc<Semaphore>>,
) -> Result<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>), Limit> {
    let dialling =
        match tokio::time::timeout(PENDING_OPEN_WAIT, pending.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => return Err(Limit::PendingOpens),
        };
    let socket = match sockets {
        Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| Limit::Sockets)?),
        None => None,
    };
    Ok((dialling, socket))
}

/// Answers an open refused at a limit without dialling: a v1 `error` frame,
/// or a v2 `too many streams` reply (written by a short-lived task).
async fn refuse(bridge: Option<&Bridge>, incoming: Incoming, why: Limit) {
    match incoming {
        Incoming::V1 { stream, .. } => {
            let id = stream.id().to_owned();
            debug!(stream = ?id, %why, "open refused");
            if let Some(bridge) = bridge
                && bridge.v1().remove(&id)
            {
                bridge.v1().send_control(TextFrame::Error {
                    id,
                    error: why.to_string(),
                });
            }
        }
        Incoming::V2(mut stream) => {
            let reply = OpenReply {
                code: OpenCode::Overloaded,
                message: why.to_string(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = stream.write_all(&reply.encode()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        }
    }
}

async fn serve_v1(
    bridge: Bridge,
    policy: Arc<Policy>,
    cfg: Arc<HostConfig>,
    stream: V1Stream,
    host: String,
    port: String,
    dialling: OwnedSemaphorePermit,
) {
    let id = stream.id().to_owned();
    let stats = &cfg.stats;
    let host = match dial::validate_destination(&host) {
        Ok(host) => host,
        Err(e) => {
            stats.rejected();
            // Peer text: never logged raw (newlines, escapes, megabytes).
            info!(host = ?Preview(&host), host_len = host.len(), reason = %e, "open refused");
            if bridge.v1().remove(&id) {
                bridge
                    .v1()
                    .send(TextFrame::Error {
                        id,
                        error: e.to_string(),
                    })
                    .await;
            }
            return;
        }
    };
    let dialled = dial::dial(&policy, &host, &port, &cfg.resolver, cfg.dial_budget).await;
    drop(dialling);
    match dialled {
        Err(e) => {
            stats.rejected();
            info!(host = ?host, port = ?Preview(&port), reason = %e, "open refused");
            // Deregister first so dropping the stream does not also send `close`.
            if bridge.v1().remove(&id) {
                bridge
                    .v1()
                    .send(TextFrame::Error {
                        id,
                        error: e.to_string(),
                    })
                    .await;
            }
        }
        Ok((tcp, _)) => {
            // The client may have sent `close` while we were dialling.
            if !bridge.v1().contains(&id) || !bridge.v1().send(TextFrame::OpenOk { id }).await {
                return;
            }
            let _active = stats.stream_opened(&host);
            let opts = RelayOpts {
                half_close: false,
                idle_timeout: cfg.idle_timeout,
            };
            let killed = stream.killed();
            let (up, down) = tokio::select! {
                r = relay(tcp, stream, opts, stats) => r,
                () = killed.cancelled() => (0, 0),
            };
            info!(host = ?host, bytes_out = up, bytes_in = down, "stream closed");
        }
    }
}

async fn read_open(stream: &mut MuxStream) -> std::io::Result<Result<OpenRequest, String>> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let mut whole = head.to_vec();
    whole.resize(4 + head[3] as usize, 0);
    stream.read_exact(&mut whole[4..]).await?;
    Ok(match OpenRequest::decode(&whole) {
        Ok(Some((req, _))) => Ok(req),
        Ok(None) => Err("truncated open request".into()),
        Err(e) => Err(e.to_string()),
    })
}

async fn serve_v2(
    policy: Arc<Policy>,
    cfg: Arc<HostConfig>,
    mut stream: MuxStream,
    dialling: OwnedSemaphorePermit,
) {
    let stats = &cfg.stats;
    let req = match tokio::time::timeout(cfg.open_read_timeout, read_open(&mut stream)).await {
        Ok(Ok(Ok(req))) => req,
        Ok(Ok(Err(e))) => {
            let reply = OpenReply {
                code: OpenCode::BadRequest,
                message: e,
            };
            let _ = stream.write_all(&reply.encode()).await;
            return;
        }
        _ => return,
    };
    let dialled = match dial::validate_destination(&req.host) {
        Ok(host) => dial::dial(
            &policy,
            &host,
            &req.port.to_string(),
            &cfg.resolver,
            cfg.dial_budget,
        )
        .await
        .map(|ok| (host, ok)),
        Err(e) => Err(e),
    };
    drop(dialling);
    match dialled {
        Err(e) => {
            stats.rejected();
            info!(host = ?Preview(&req.host), reason = %e, "open refused");
            let reply = OpenReply {
                code: e.code(),
                message: reply_message(&e),
            };
            let _ = stream.write_all(&reply.encode()).await;
            let _ = stream.shutdown().await;
        }
        Ok((host, (tcp, _))) => {
            let ok = OpenReply {
                code: OpenCode::Ok,
                message: String::new(),
            };
            if stream.write_all(&ok.encode()).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            let _active = stats.stream_opened(&host);
            let opts = RelayOpts {
                half_close: true,
                idle_timeout: cfg.idle_timeout,
            };
            let (up, down) = relay(tcp, stream, opts, stats).await;
            info!(host = ?host, bytes_out = up, bytes_in = down, "stream closed");
        }
    }
}

/// Peer-supplied text for a log line: at most 64 characters, shown with
/// Debug escaping (quotes, `\n`, `\u{1b}`), so it can never forge a line.
struct Preview<'a>(&'a str);

impl std::fmt::Debug for Preview<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: String = self.0.chars().take(64).collect();
        if cut.len() < self.0.len() {
            write!(f, "{cut:?}…")
        } else {
            write!(f, "{cut:?}")
        }
    }
}

/// The detail shown to the browser: short, and never an address of the operator's network.
pub(crate) fn reply_message(e: &DialError) -> String {
    match e {
        DialError::Connect(_) | DialError::Resolve(_) => e.code().phrase().to_owned(),
        other => other.to_string(),
    }
}
