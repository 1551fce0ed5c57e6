//! The bridge read loop: dispatches text frames (v1 and control JSON), feeds binary messages to yamux, negotiates v2 on `hello`, and sends keepalive pings and `stats` frames.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use tracing::{debug, info, warn};

use super::{Incoming, IncomingFn, Inner, MAX_BINARY_IN, Role};
use crate::error::BridgeError;
use crate::frame_v1::{self, DecodeError, TextFrame};
use crate::frame_v2::{Hello, StatsFrame};
use crate::host::dial::{DialError, MAX_HOST_INPUT, parse_port};
use crate::mux::{self, MuxDriver, MuxStream};
use crate::stats::PeerStats;
use crate::stream_v1::DataOutcome;
use crate::ws_io::MuxIo;

/// State of the read loop of one bridge.
pub(super) struct Reader {
    pub(super) inner: Arc<Inner>,
    pub(super) incoming: Option<IncomingFn>,
    pub(super) mux_in: Option<mpsc::Sender<Bytes>>,
    /// Where the yamux driver goes once v2 is negotiated: the bridge's own
    /// task polls it beside this loop (see `bridge::start`).
    pub(super) mux_slot: Option<oneshot::Sender<MuxDriver>>,
    /// `hello`s sent so far (repeated until the peer answers or shows it is v1-only).
    pub(super) hellos_sent: u32,
    /// A v1 frame or our peer's `hello` arrived: stop repeating `hello`.
    pub(super) peer_spoke: bool,
    /// Text frames that were not JSON of the expected shape (the first is a
    /// warning, the rest debug lines, so a peer cannot fill the log).
    pub(super) malformed: u64,
}

/// Longest v1 stream id accepted. The reference's are `conn_` and the wall
/// clock in base 36 (about 18 bytes); ids become map keys, are copied into
/// every frame of their stream and appear in log lines, so a peer's id is
/// bounded and printable before any of that.
pub(crate) const MAX_V1_ID: usize = 128;

/// Whether a peer's v1 stream id may be registered, echoed or logged.
pub(crate) fn valid_v1_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_V1_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

impl Reader {
    pub(super) async fn run<St>(&mut self, mut stream: St) -> Result<(), BridgeError>
    where
        St: Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let cfg = self.inner.cfg.clone();
        // The first hello goes out at once; the timer repeats it (a relay may
        // drop frames sent just after an upgrade, or while the peer is absent).
        let mut hello_tick =
            tokio::time::interval(cfg.hello_interval.max(Duration::from_millis(10)));
        hello_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ping = tokio::time::interval(cfg.keepalive_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut stats_tick = tokio::time::interval(cfg.stats_interval);
        stats_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut last_rx = Instant::now();
        loop {
            tokio::select! {
                msg = stream.next() => {
                    last_rx = Instant::now();
                    match msg {
                        None => return Err(BridgeError::ConnectionLost),
                        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Err(BridgeError::ConnectionLost),
                        Some(Err(e)) => return Err(BridgeError::Transport(e.to_string())),
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                            return Err(BridgeError::Closed { code, reason });
                        }
                        Some(Ok(Message::Text(text))) => {
                            self.inner.peer_seen.store(true, Ordering::Relaxed);
                            self.on_text(text.as_str()).await;
                        }
                        Some(Ok(Message::Binary(bytes))) => {
                            self.inner.peer_seen.store(true, Ordering::Relaxed);
                            if bytes.len() > MAX_BINARY_IN {
                                // Our writer never exceeds 256 KiB; a bigger message is not from a well-behaved peer.
                                return Err(BridgeError::Mux(format!("binary message of {} bytes exceeds the v2 limit", bytes.len())));
                            }
                            if self.mux_in.is_none() && cfg.enable_v2 {
                                // Only our peer sends binary, and only after it received our
                                // hello: its own hello (or reply) was lost on the way.
                                debug!("binary frame before the peer's hello arrived; switching to v2");
                                self.switch_to_v2();
                            }
                            match &self.mux_in {
                                // Waiting here is bounded: the yamux driver drains this
                                // channel continuously and buffers per stream within windows.
                                Some(tx) => { let _ = tx.send(bytes).await; }
                                None => debug!(len = bytes.len(), "binary frame before v2 negotiation; dropped"),
                            }
                        }
                        Some(Ok(_)) => {} // Ping/Pong are answered by tungstenite itself.
                    }
                }
                _ = hello_tick.tick(), if cfg.enable_v2 && self.mux_in.is_none() && !self.peer_spoke && self.hellos_sent < cfg.hello_attempts.max(1) => {
                    self.hellos_sent += 1;
                    self.send_hello(false).await;
                }
                _ = ping.tick() => {
                    if last_rx.elapsed() > cfg.keepalive_timeout {
                        return Err(BridgeError::KeepaliveTimeout(cfg.keepalive_timeout));
                    }
                    let _ = self.inner.out.try_send(Message::Ping(Bytes::new()));
                }
                _ = stats_tick.tick(), if self.mux_in.is_some() => {
                    let s = self.inner.stats.snapshot();
                    let frame = TextFrame::Stats(StatsFrame { active: s.active_streams, bytes_in: s.bytes_in, bytes_out: s.bytes_out });
                    let _ = self.inner.out.try_send(Message::text(frame_v1::encode(&frame)));
                }
            }
        }
    }

    async fn send_hello(&self, reply: bool) {
        let hello = Hello {
            version: 2,
            role: self.inner.role.as_str().into(),
            reply,
        };
        let _ = self
            .inner
            .out
            .send(Message::text(frame_v1::encode(&TextFrame::Hello(hello))))
            .await;
    }

    async fn on_text(&mut self, text: &str) {
        let frame = match frame_v1::decode(text) {
            Ok(frame) => frame,
            // The reference tears the bridge down on a non-JSON message; we drop
            // it instead, so one bad frame cannot cost every other stream.
            Err(DecodeError::Json(e)) => {
                self.malformed += 1;
                if self.malformed == 1 {
                    warn!(error = %e, "ignoring a malformed bridge text frame (further ones are logged at debug)");
                } else {
                    debug!(error = %e, count = self.malformed, "ignoring a malformed bridge text frame");
                }
                return;
            }
            Err(DecodeError::BadBody { .. }) => {
                return debug!("dropping a data frame with an invalid base64 body");
            }
        };
        if !matches!(
            frame,
            TextFrame::Hello(_)
                | TextFrame::Stats(_)
                | TextFrame::Bye { .. }
                | TextFrame::Unknown(_)
        ) {
            // A reference peer never says hello; its first v1 frame settles it.
            self.peer_spoke = true;
            if self.mux_in.is_none() {
                self.inner.stats.set_protocol_version(1);
            }
        }
        let v1 = self.inner.v1.clone();
        match frame {
            TextFrame::Open { id, host, port } => self.on_open(id, host, port),
            TextFrame::OpenOk { id } if self.inner.role == Role::Client => {
                if valid_v1_id(&id) && !v1.on_open_ok(&id) {
                    // Abandoned (timed out / cancelled) open: release the host's
                    // connection. (An id we could never have sent is not echoed.)
                    v1.send_control(TextFrame::Close { id });
                }
            }
            TextFrame::Error { id, error } => v1.on_error(&id, error),
            TextFrame::Data { id, body } => self.on_data(id, body).await,
            TextFrame::Close { id } => v1.on_close(&id),
            TextFrame::Hello(hello) => self.on_hello(hello).await,
            TextFrame::Stats(s) => self.inner.stats.set_peer(PeerStats {
                active: s.active,
                bytes_in: s.bytes_in,
                bytes_out: s.bytes_out,
            }),
            TextFrame::Bye { reason } => {
                *self.inner.peer_bye.lock().unwrap() = Some(reason);
            }
            TextFrame::OpenOk { .. } | TextFrame::Unknown(_) => {}
        }
    }

    /// v1 backpressure: while this stream's queue (or the bridge's budget) is
    /// full, stop reading the bridge. A reader that keeps up is never cut; one
    /// that stalls for `v1_stall_timeout` has its stream closed, and the
    /// others carry on.
    async fn on_data(&self, id: String, mut body: Bytes) {
        let v1 = self.inner.v1.clone();
        let stall = self.inner.cfg.v1_stall_timeout;
        let mut deadline = Instant::now() + stall;
        loop {
            let space = v1.space_freed();
            tokio::pin!(space);
            space.as_mut().enable();
            match v1.on_data(&id, body) {
                DataOutcome::Queued | DataOutcome::UnknownId => return,
                DataOutcome::Full(back) => body = back,
            }
            if tokio::time::timeout_at(deadline, space).await.is_ok() {
                continue;
            }
            // Stalled: close the stream that holds the queue up (this one if its own
            // queue is full, else the one with the most queued bytes).
            let Some((victim, queued)) = v1.stalled_victim(&id) else {
                return;
            };
            warn!(stream = ?victim, queued_bytes = queued, stalled_for = ?stall, "closing a v1 stream whose local reader stalled (its queue stayed full)");
            if v1.kill(&victim) {
                v1.send_control(TextFrame::Close { id: victim.clone() });
            }
            if victim == id {
                return;
            }
            // Someone else was closed to make room; this frame gets another full wait.
            deadline = Instant::now() + stall;
        }
    }

    fn on_open(&self, id: String, host: String, port: String) {
        let Some(incoming) = &self.incoming else {
            return;
        };
        let v1 = &self.inner.v1;
        if !valid_v1_id(&id) {
            // Not answerable: an error frame would echo the id.
            return debug!(
                id_len = id.len(),
                "dropping a v1 open with an invalid stream id"
            );
        }
        if v1.contains(&id) {
            return;
        }
        // Held until the open is served (up to the pending-open wait): refuse
        // what no destination can be before keeping it, with the answer the
        // host's serving would give. (A shorter host that is not valid is
        // refused there, with its log line.)
        let bad = if host.len() > MAX_HOST_INPUT {
            Some(DialError::InvalidHost)
        } else {
            parse_port(&port).err()
        };
        if let Some(e) = bad {
            self.inner.stats.rejected();
            v1.send_control(TextFrame::Error {
                id,
                error: e.to_string(),
            });
            return;
        }
        if v1.len() >= self.inner.cfg.max_streams {
            self.inner.stats.rejected();
            v1.send_control(TextFrame::Error {
                id,
                error: "too many streams".into(),
            });
            return;
        }
        let stream = v1.register(&id);
        incoming(Incoming::V1 { stream, host, port });
    }

    async fn on_hello(&mut self, hello: Hello) {
        if !self.inner.cfg.enable_v2
            || hello.version < 2
            || hello.role != self.inner.role.peer().as_str()
        {
            return;
        }
        self.peer_spoke = true;
        if !hello.reply && self.mux_in.is_some() {
            // A hello after the switch: our reply was lost, or a new host
            // joined the session. Either way no destination is warm any more
            // (a new host may allow less), so the next CONNECTs wait for it.
            self.inner.warm.lock().unwrap().clear();
        }
        if !hello.reply {
            // Our own hello may have been dropped while the peer was absent;
            // answer (queued before any binary; see docs/protocol.md for the
            // race in which binary overtakes it) so the peer switches too. A repeated
            // hello after we switched means our reply was lost: answer again.
            self.send_hello(true).await;
        }
        if self.mux_in.is_none() {
            self.switch_to_v2();
        }
    }

    fn switch_to_v2(&mut self) {
        let (tx, rx) = mpsc::channel(64);
        let io = MuxIo::new(rx, self.inner.out.clone(), self.inner.wire.clone());
        let mode = match self.inner.role {
            Role::Client => yamux::Mode::Client,
            Role::Host => yamux::Mode::Server,
        };
        let accept = self.incoming.clone().map(|incoming| {
            Box::new(move |s: MuxStream| {
                incoming(Incoming::V2(s));
            }) as mux::InboundFn
        });
        let (handle, driver) = mux::start(io, mode, self.inner.cfg.max_streams, accept);
        if let Some(slot) = self.mux_slot.take() {
            let _ = slot.send(driver);
        }
        self.mux_in = Some(tx);
        *self.inner.mux.lock().unwrap() = Some(handle);
        self.inner.stats.set_protocol_version(2);
        info!(
            role = self.inner.role.as_str(),
            "bridge protocol v2 negotiated"
        );
    }
}
