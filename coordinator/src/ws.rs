//! Plumbing shared by the control socket and egress bridges: a writer task
//! fed by a bounded queue, and a close signal that never waits behind data.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

/// What the writer task should do next besides sending queued frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseState {
    /// Keep going.
    Open,
    /// Send this close frame, then stop.
    Close(u16, String),
    /// Stop without sending anything (the peer already closed).
    Stop,
}

/// Server pings keep NAT state alive and find dead peers, as the reference's 30 s ping.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(30);
/// How many queued frames the writer coalesces into one flush.
const BATCH: usize = 64;

/// A handle that can queue frames to a socket or close it.
#[derive(Clone, Debug)]
pub(crate) struct SocketHandle {
    /// Queued outbound frames.
    pub tx: mpsc::Sender<Message>,
    closer: watch::Sender<CloseState>,
}

impl SocketHandle {
    /// Close the socket with `code` and `reason` (first close wins).
    pub fn close(&self, code: u16, reason: &str) {
        self.closer.send_if_modified(|s| {
            if *s == CloseState::Open {
                *s = CloseState::Close(code, sanitize_reason(reason));
                true
            } else {
                false
            }
        });
    }

    /// Stop the writer without a close frame.
    pub fn stop(&self) {
        self.closer.send_if_modified(|s| {
            if *s == CloseState::Open {
                *s = CloseState::Stop;
                true
            } else {
                false
            }
        });
    }

    /// A receiver that observes the close signal.
    pub fn watch(&self) -> watch::Receiver<CloseState> {
        self.closer.subscribe()
    }
}

/// Sanitise a close reason as the reference: control characters become
/// spaces, whitespace collapses, at most 120 UTF-8 bytes, empty → `terminal error`.
pub(crate) fn sanitize_reason(reason: &str) -> String {
    let cleaned: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let collapsed = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = crate::runs::truncate_utf8(&collapsed, 120).to_owned();
    if cut.is_empty() {
        "terminal error".to_owned()
    } else {
        cut
    }
}

/// Spawn the writer half of `socket` and return the handle and the reader half.
pub(crate) fn spawn_writer(
    socket: WebSocket,
    queue: usize,
) -> (
    SocketHandle,
    futures_util::stream::SplitStream<WebSocket>,
    tokio::task::JoinHandle<()>,
) {
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(queue);
    let (closer, close_rx) = watch::channel(CloseState::Open);
    let task = tokio::spawn(writer(sink, rx, close_rx));
    (SocketHandle { tx, closer }, stream, task)
}

async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Message>,
    mut close: watch::Receiver<CloseState>,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            // Close first: a close must not wait behind a full data queue.
            biased;
            _ = close.changed() => {
                let state = close.borrow().clone();
                if let CloseState::Close(code, reason) = &state {
                    let (code, reason) = (*code, reason.clone());
                    let frame = CloseFrame { code, reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                if state != CloseState::Open {
                    return;
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                // Feed a batch of already-queued frames, then flush once: one
                // syscall for many small frames without delaying any of them.
                if sink.feed(msg).await.is_err() {
                    return;
                }
                for _ in 0..BATCH {
                    match rx.try_recv() {
                        Ok(m) => if sink.feed(m).await.is_err() { return },
                        Err(_) => break,
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// After a server-initiated close, keep reading (and discarding) for a short
/// grace so the peer's close reply is consumed and the close frame is not
/// lost to a TCP reset.
pub(crate) async fn drain(stream: &mut futures_util::stream::SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Completes once the close state leaves `Open`.
pub(crate) async fn closed(rx: &mut watch::Receiver<CloseState>) {
    let _ = rx.wait_for(|s| *s != CloseState::Open).await;
}

/// The sending half of a bridge socket, shared so the *other* end's reader
/// can write into it directly: relaying a frame costs no queue hop and no
/// task wakeup, just a lock that is uncontended in the common case.
pub(crate) type SharedSink = std::sync::Arc<tokio::sync::Mutex<SplitSink<WebSocket, Message>>>;

/// A bridge socket's sink plus its close signal.
#[derive(Clone)]
pub(crate) struct DirectHandle {
    /// The socket's sending half.
    pub sink: SharedSink,
    closer: std::sync::Arc<watch::Sender<CloseState>>,
}

impl DirectHandle {
    /// Split `socket` into a shared sink handle and the reading half.
    pub fn new(socket: WebSocket) -> (Self, futures_util::stream::SplitStream<WebSocket>) {
        let (sink, stream) = socket.split();
        let (closer, _) = watch::channel(CloseState::Open);
        let handle = Self {
            sink: std::sync::Arc::new(tokio::sync::Mutex::new(sink)),
            closer: std::sync::Arc::new(closer),
        };
        (handle, stream)
    }

    /// Send a close frame (first close wins) and tell the socket's reader to wind down.
    /// Must be called inside the tokio runtime: the frame is sent by a short task
    /// so callers holding registry locks never wait on a socket.
    pub fn close(&self, code: u16, reason: &str) {
        let reason = sanitize_reason(reason);
        let changed = self.closer.send_if_modified(|s| {
            if *s == CloseState::Open {
                *s = CloseState::Close(code, reason.clone());
                true
            } else {
                false
            }
        });
        if changed {
            let sink = self.sink.clone();
            tokio::spawn(async move {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let _ = sink.lock().await.send(Message::Close(Some(frame))).await;
            });
        }
    }

    /// A receiver that observes the close signal.
    pub fn watch(&self) -> watch::Receiver<CloseState> {
        self.closer.subscribe()
    }
}
