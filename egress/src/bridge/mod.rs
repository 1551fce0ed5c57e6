//! One bridge WebSocket: its configuration, the shared state of both versions, and [`Bridge::open`] for the client end; the read loop lives in `reader`.
//!
//! v1 and v2 coexist on one socket: text messages are always v1/control JSON,
//! binary messages are always yamux. Binary is sent only after the peer's
//! `hello` proved it is ours, so a reference peer never sees binary, and v1
//! streams opened before the negotiation finished simply carry on.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Sink, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::error::BridgeError;
use crate::frame_v1::TextFrame;
use crate::frame_v2::{OpenCode, OpenRequest};
use crate::mux::{MuxDriver, MuxHandle, MuxStream};
use crate::stats::SessionStats;
use crate::stream_v1::{V1Registry, V1Stream};
use crate::ws_io::{self, WRITE_QUEUE};

mod early;
mod reader;
pub(crate) use early::V2Stream;
use early::Warm;
use reader::Reader;

/// Largest v2 binary message accepted (our sender's limit is `ws_io::MAX_BINARY_MESSAGE`, 256 KiB).
const MAX_BINARY_IN: usize = 1 << 20;

/// Which end of the bridge this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Operator side: accepts opens, dials destinations.
    Host,
    /// Lease side: the HTTP proxy that opens streams.
    Client,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Client => "client",
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Host => Role::Client,
            Role::Client => Role::Host,
        }
    }
}

/// Tunables of one bridge end. [`BridgeConfig::client`] and
/// [`BridgeConfig::host`] give the defaults of each role.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Offer and accept protocol v2 (off = behave exactly like a reference v1 agent).
    pub enable_v2: bool,
    /// WebSocket ping interval towards the coordinator.
    pub keepalive_interval: Duration,
    /// The bridge is declared dead when nothing at all arrived for this long.
    pub keepalive_timeout: Duration,
    /// How often a v2 end sends its `stats` frame.
    pub stats_interval: Duration,
    /// Client: how long to wait for `open_ok`/`error` (reference: 20 s).
    pub open_timeout: Duration,
    /// Client: open wait while no frame from the peer was ever seen (the peer may be absent).
    pub unpaired_open_timeout: Duration,
    /// How often `hello` is repeated until the peer's `hello` (or a v1 frame) arrives:
    /// relays drop frames sent while the peer is absent or just after an upgrade.
    pub hello_interval: Duration,
    /// How many `hello`s are sent at most (the first one included).
    pub hello_attempts: u32,
    /// Bytes one v1 stream may queue towards its local socket before the
    /// bridge reader waits for it (v1 backpressure; one frame always fits an empty queue).
    pub v1_queue_cap: usize,
    /// Bytes all v1 streams of this bridge may queue together before the reader waits.
    pub v1_bridge_budget: usize,
    /// A v1 stream whose local reader leaves the bridge reader waiting this
    /// long is closed (and logged as stalled); the others then carry on.
    pub v1_stall_timeout: Duration,
    /// Concurrent streams on this bridge (yamux limit and v1 open limit).
    pub max_streams: usize,
    /// Host: opens being resolved/dialled at once on this bridge; more wait
    /// up to 5 s for a slot, then are refused.
    pub max_pending_opens: usize,
    /// Client, v2: answer a `CONNECT` to a destination that opened on this
    /// bridge in the last two minutes at once, before the host's reply (a
    /// failure then closes the browser's connection instead of a `502`).
    pub early_connect: bool,
}

impl BridgeConfig {
    /// Lease-side defaults: 1 MiB per v1 stream and 32 MiB per bridge, 20 s opens.
    pub fn client() -> Self {
        BridgeConfig {
            enable_v2: true,
            keepalive_interval: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(45),
            stats_interval: Duration::from_secs(10),
            open_timeout: Duration::from_secs(20),
            unpaired_open_timeout: Duration::from_secs(5),
            hello_interval: Duration::from_millis(250),
            hello_attempts: 20,
            v1_queue_cap: 1024 * 1024,
            v1_bridge_budget: 32 * 1024 * 1024,
            v1_stall_timeout: Duration::from_secs(5),
            max_streams: 1024,
            max_pending_opens: 64,
            early_connect: true,
        }
    }

    /// Host-side defaults: 4 MiB per v1 stream (uploads from a reference
    /// client to a slow destination) and 64 MiB per bridge.
    pub fn host() -> Self {
        BridgeConfig {
            v1_queue_cap: 4 * 1024 * 1024,
            v1_bridge_budget: 64 * 1024 * 1024,
            ..BridgeConfig::client()
        }
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig::client()
    }
}

/// An open request that reached the host end.
pub(crate) enum Incoming {
    /// v1: already registered, so data and `close` arriving during the dial are kept.
    V1 {
        stream: V1Stream,
        host: String,
        port: String,
    },
    /// v2: the open request is still to be read from the stream.
    V2(MuxStream),
}

/// Called with every open request that reaches the host end, in the bridge's
/// own task: it must hand the work off at once (spawn it, or queue it).
pub(crate) type IncomingFn = Arc<dyn Fn(Incoming) + Send + Sync>;

/// A stream the client end opened.
pub(crate) enum Opened {
    V1(V1Stream),
    V2(V2Stream),
}

/// Why [`Bridge::open`] failed.
#[derive(Debug)]
pub(crate) enum OpenFailure {
    /// The host refused; v2 gives a code, v1 only the host's text.
    Rejected {
        code: Option<OpenCode>,
        message: String,
    },
    TimedOut,
    BridgeDown,
}

/// Cheap handle to a running bridge.
#[derive(Clone)]
pub(crate) struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    role: Role,
    cfg: BridgeConfig,
    v1: Arc<V1Registry>,
    // A std mutex: set once by the read loop, read by openers; never held across await.
    mux: Mutex<Option<MuxHandle>>,
    stats: Arc<SessionStats>,
    out: mpsc::Sender<Message>,
    /// The socket's write half: the writer task's, and the yamux driver's for small messages.
    wire: Arc<ws_io::Wire>,
    id_prefix: u32,
    next_id: AtomicU64,
    peer_seen: AtomicBool,
    /// The reason in the peer's `bye`, if it said goodbye before leaving.
    peer_bye: Mutex<Option<String>>,
    /// Cancelled when the bridge ends, so tunnels of a dead bridge end too
    /// (a v2 stream would otherwise wait on an idle browser forever).
    ended: CancellationToken,
    /// Client: v2 destinations that opened recently (see [`Bridge::open_early`]).
    warm: Arc<Mutex<Warm>>,
}

impl Bridge {
    /// Protocol version currently used for new streams.
    pub(crate) fn version(&self) -> u8 {
        if self.inner.mux.lock().unwrap().is_some() {
            2
        } else {
            1
        }
    }

    /// Resolves when the bridge has ended.
    pub(crate) fn ended(&self) -> CancellationToken {
        self.inner.ended.clone()
    }

    /// What the peer said in its `bye`, if anything.
    pub(crate) fn peer_bye(&self) -> Option<String> {
        self.inner.peer_bye.lock().unwrap().clone()
    }

    /// Says goodbye (`bye`, then close `1000` with `reason`) and lets the
    /// writer flush; the read loop then ends.
    pub(crate) async fn say_goodbye(&self, reason: &str) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let bye = TextFrame::Bye {
            reason: reason.to_owned(),
        };
        let _ = self
            .inner
            .out
            .send(Message::text(crate::frame_v1::encode(&bye)))
            .await;
        let _ = self
            .inner
            .out
            .send(Message::Close(Some(CloseFrame {
                code: 1000.into(),
                reason: reason.to_owned().into(),
            })))
            .await;
    }

    pub(crate) fn stats(&self) -> &Arc<SessionStats> {
        &self.inner.stats
    }

    pub(crate) fn v1(&self) -> &Arc<V1Registry> {
        &self.inner.v1
    }

    /// Opens a stream to `host:port` (client end). Cancel-safe: dropping the
    /// future abandons the open and the host is sent `close`.
    pub(crate) async fn open(&self, host: &str, port: u16) -> Result<Opened, OpenFailure> {
        let mux = self.inner.mux.lock().unwrap().clone();
        match mux {
            Some(mux) => self.open_v2(mux, host, port).await,
            None => self.open_v1(host, port).await,
        }
    }

    /// Opens a v2 stream to a warm destination without waiting for the
    /// host's reply: the stream's first reads read it (see [`early`]).
    /// `None` when the destination is not warm, early answers are off, the
    /// bridge speaks v1, or the stream cannot be started: then use
    /// [`Bridge::open`], which answers exactly.
    pub(crate) async fn open_early(&self, host: &str, port: u16) -> Option<V2Stream> {
        if !self.inner.cfg.early_connect {
            return None;
        }
        let mux = self.inner.mux.lock().unwrap().clone()?;
        if !self
            .inner
            .warm
            .lock()
            .unwrap()
            .is_warm(host, port, tokio::time::Instant::now())
        {
            return None;
        }
        self.start_v2(&mux, host, port).await.ok()
    }

    async fn open_v2(&self, mux: MuxHandle, host: &str, port: u16) -> Result<Opened, OpenFailure> {
        let mut stream = self.start_v2(&mux, host, port).await?;
        std::future::poll_fn(|cx| stream.poll_reply(cx)).await?;
        Ok(Opened::V2(stream))
    }

    /// Starts a v2 stream: the open request travels with the stream's SYN
    /// (see `MuxHandle::open`); the reply is still to be read.
    async fn start_v2(
        &self,
        mux: &MuxHandle,
        host: &str,
        port: u16,
    ) -> Result<V2Stream, OpenFailure> {
        let req = OpenRequest {
            host: host.to_owned(),
            port,
        };
        let stream = mux
            .open(req.encode())
            .await
            .map_err(|_| OpenFailure::BridgeDown)?;
        let warm = self
            .inner
            .cfg
            .early_connect
            .then(|| self.inner.warm.clone());
        Ok(V2Stream::pending(
            stream,
            self.inner.cfg.open_timeout,
            warm,
            host,
            port,
        ))
    }

    async fn open_v1(&self, host: &str, port: u16) -> Result<Opened, OpenFailure> {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Unique per bridge (random prefix) and per stream (counter); never clock-derived.
        let id = format!("s{:08x}-{n}", self.inner.id_prefix);
        let (stream, result) = self.inner.v1.register_pending(&id);
        let frame = TextFrame::Open {
            id,
            host: host.to_owned(),
            port: port.to_string(),
        };
        if !self.inner.v1.send(frame).await {
            return Err(OpenFailure::BridgeDown);
        }
        let wait = if self.inner.peer_seen.load(Ordering::Relaxed) {
            self.inner.cfg.open_timeout
        } else {
            self.inner.cfg.unpaired_open_timeout
        };
        // On any failure `stream` is dropped here, which deregisters the id and
        // sends `close`, so a late `open_ok` cannot leak the host's connection.
        match tokio::time::timeout(wait, result).await {
            Ok(Ok(Ok(()))) => Ok(Opened::V1(stream)),
            Ok(Ok(Err(message))) => Err(OpenFailure::Rejected {
                code: None,
                message,
            }),
            Ok(Err(_)) => Err(OpenFailure::BridgeDown),
            Err(_) => Err(OpenFailure::TimedOut),
        }
    }
}

/// Creates a bridge end over `ws`. The returned future runs it until the
/// socket ends; the [`Bridge`] handle is usable as soon as it is polled.
/// `incoming` receives open requests (host end only).
pub(crate) fn start<W>(
    ws: W,
    role: Role,
    cfg: BridgeConfig,
    stats: Arc<SessionStats>,
    incoming: Option<IncomingFn>,
) -> (Bridge, impl Future<Output = Result<(), BridgeError>> + Send)
where
    W: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Send
        + Unpin
        + 'static,
{
    let (out, out_rx) = mpsc::channel(WRITE_QUEUE);
    let (sink, stream) = ws.split();
    let wire = ws_io::Wire::new(sink);
    let inner = Arc::new(Inner {
        role,
        v1: V1Registry::new(out.clone(), cfg.v1_queue_cap, cfg.v1_bridge_budget),
        cfg,
        mux: Mutex::new(None),
        stats,
        out,
        wire: wire.clone(),
        id_prefix: rand::random(),
        next_id: AtomicU64::new(1),
        peer_seen: AtomicBool::new(false),
        peer_bye: Mutex::new(None),
        ended: CancellationToken::new(),
        warm: Arc::default(),
    });
    let bridge = Bridge {
        inner: inner.clone(),
    };
    let fut = async move {
        let (mux_slot, mux_driver) = tokio::sync::oneshot::channel::<MuxDriver>();
        let mut reader = Reader {
            inner: inner.clone(),
            incoming,
            mux_in: None,
            mux_slot: Some(mux_slot),
            hellos_sent: 0,
            peer_spoke: false,
            malformed: 0,
        };
        // The writer runs in a task of its own, so it is scheduled (and
        // flushes the socket) independently of the read loop and the yamux
        // driver; in one task with them, under bulk load, tokio's cooperative
        // budget was spent by the reader and the driver before the writer's
        // turn, which held back window updates and let bursts pile up.
        // The yamux driver writes small messages to the socket itself while
        // this task is idle (`ws_io::DIRECT_MAX`), sparing a wake-up per message.
        let writer = tokio::spawn(ws_io::write_loop(wire, out_rx));
        let writer = tokio_util::task::AbortOnDropHandle::new(writer);
        // The read loop and (after negotiation) the yamux driver share this
        // task, polled together: a message read is handed to yamux in the
        // same pass, with no wake-up of another task. They still progress
        // independently: a read loop waiting for room in the driver's queue
        // does not stop the driver draining it.
        let mux = async move {
            match mux_driver.await {
                Ok(driver) => driver.await,
                Err(_) => std::future::pending().await,
            }
        };
        // The protocol is unknown (0) until the peer's first frame says which.
        inner.stats.set_connected(true, 0);
        let res = tokio::select! {
            biased;
            res = reader.run(stream) => res,
            res = mux => Err(BridgeError::Mux(match res {
                Ok(()) => "peer closed the multiplexer".into(),
                Err(e) => e,
            })),
            res = writer => Err(match res {
                Ok(Ok(())) => BridgeError::ConnectionLost,
                Ok(Err(e)) => BridgeError::Transport(e.to_string()),
                Err(e) => BridgeError::Transport(e.to_string()),
            }),
        };
        inner.stats.set_connected(false, 0);
        inner.v1.clear();
        *inner.mux.lock().unwrap() = None;
        inner.ended.cancel();
        res
    };
    (bridge, fut)
}
