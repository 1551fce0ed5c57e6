//! Plumbing shared by the control socket and egress bridges: a writer task
//! fed by a bounded queue, and a close signal that never waits behind data.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::config::Limits;

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

/// How many queued frames the writer takes into one batch.
const BATCH: usize = 64;
/// Bytes taken into one batch (written in flushes of [`FLUSH_BYTES`]).
const BATCH_BYTES: usize = 1024 * 1024;
/// How long a close frame may take to go out before the socket is dropped anyway.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Frames queued per control socket (the byte budget is the real bound).
const QUEUE_FRAMES: usize = 4096;

/// Bytes a frame holds in a queue.
pub(crate) fn frame_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) => 0,
    }
}

/// Whether a read error is the library refusing a frame or message over its size limit.
pub(crate) fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

/// A queued frame and the share of its socket's byte budget it holds until written.
struct Queued {
    msg: Message,
    _bytes: OwnedSemaphorePermit,
}

/// A handle that can queue frames to a socket or close it.
#[derive(Clone, Debug)]
pub(crate) struct SocketHandle {
    tx: mpsc::Sender<Queued>,
    /// Bytes that may still be queued toward this socket.
    budget: Arc<Semaphore>,
    closer: Arc<watch::Sender<CloseState>>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queued({} bytes)", frame_len(&self.msg))
    }
}

fn permits(n: usize) -> u32 {
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

impl SocketHandle {
    /// Queue a frame if the socket's byte budget has room now; false otherwise.
    pub fn try_send(&self, msg: Message) -> bool {
        let Ok(bytes) = self
            .budget
            .clone()
            .try_acquire_many_owned(permits(frame_len(&msg)))
        else {
            return false;
        };
        self.tx.try_send(Queued { msg, _bytes: bytes }).is_ok()
    }

    /// Reserve `n` bytes of the budget, waiting at most `wait` for the socket to drain.
    pub async fn reserve(&self, n: usize, wait: Duration) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(wait, self.budget.clone().acquire_many_owned(permits(n)))
            .await
            .ok()?
            .ok()
    }

    /// Queue a frame against bytes already reserved with [`SocketHandle::reserve`];
    /// the unused part of the reservation is released.
    pub fn send_reserved(&self, msg: Message, mut reserved: OwnedSemaphorePermit) -> bool {
        let want = permits(frame_len(&msg)) as usize;
        let bytes = if reserved.num_permits() > want {
            reserved.split(want).expect("split within the reservation")
        } else {
            reserved
        };
        self.tx.try_send(Queued { msg, _bytes: bytes }).is_ok()
    }

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
///
/// The writer stops, and the socket counts as dead, when one batch makes no
/// progress for `write_timeout`; the reader should select on the returned task.
pub(crate) fn spawn_writer(
    socket: WebSocket,
    limits: &Limits,
    queue_bytes: usize,
) -> (
    SocketHandle,
    futures_util::stream::SplitStream<WebSocket>,
    tokio::task::JoinHandle<()>,
) {
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
    let (closer, close_rx) = watch::channel(CloseState::Open);
    let task = tokio::spawn(writer(
        sink,
        rx,
        close_rx,
        limits.ping_every,
        limits.write_timeout,
    ));
    let handle = SocketHandle {
        tx,
        budget: Arc::new(Semaphore::new(queue_bytes)),
        closer: Arc::new(closer),
    };
    (handle, stream, task)
}

/// Send a close frame, giving up after [`CLOSE_GRACE`] (a peer that does not
/// read would otherwise hold the socket open forever).
async fn send_close(sink: &mut SplitSink<WebSocket, Message>, code: u16, reason: String) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
}

async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Queued>,
    mut close: watch::Receiver<CloseState>,
    ping_every: Duration,
    write_timeout: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let state = close.borrow_and_update().clone();
        if state != CloseState::Open {
            if let CloseState::Close(code, reason) = state {
                send_close(&mut sink, code, reason).await;
            }
            return;
        }
        let mut held = Vec::new();
        let msgs: Vec<Message> = tokio::select! {
            // Close first: a close must not wait behind a full data queue;
            // then a due ping, which a queue that never empties would starve.
            biased;
            changed = close.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = ping.tick() => vec![Message::Ping(Default::default())],
            item = rx.recv() => {
                let Some(first) = item else { return };
                // Feed a batch of already-queued frames, then flush once: one
                // syscall for many small frames without delaying any of them.
                let mut bytes = frame_len(&first.msg);
                let mut msgs = vec![first.msg];
                held.push(first._bytes);
                while msgs.len() < BATCH && bytes < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(q) => {
                            bytes += frame_len(&q.msg);
                            msgs.push(q.msg);
                            held.push(q._bytes);
                        }
                        Err(_) => break,
                    }
                }
                msgs
            }
        };
        // The write has a progress deadline and yields to a close: a peer
        // that stops reading can neither pin this task nor delay its own close.
        let outcome = tokio::select! {
            biased;
            _ = close.wait_for(|s| *s != CloseState::Open) => None,
            r = write_batch(&mut sink, msgs, write_timeout, || {}) => Some(r),
        };
        // The frames are written (or abandoned): their bytes leave the budget.
        drop(held);
        match outcome {
            // Closed while writing: the top of the loop sends the close frame.
            None => continue,
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(_))) => return,
            Some(Err(_)) => {
                tracing::debug!(timeout = ?write_timeout, "websocket peer stopped reading; dropping it");
                return;
            }
        }
    }
}

/// Bytes of a batch written (flushed) as one step of a write deadline. The
/// library buffers what it is fed and writes it on the flush, so a step is a
/// flush of at most this much plus one frame.
pub(crate) const FLUSH_BYTES: usize = 256 * 1024;

/// Feeds `msgs` into `sink`, flushing every [`FLUSH_BYTES`] and at the end,
/// each step under its own `limit` and followed by `progressed()`: the
/// deadline is for progress, not for the batch, so a peer that reads slowly
/// but steadily is not taken for one that stopped reading. `Err` means a step
/// made no progress in time. (The kernel reports a full socket writable again
/// only once a good part of its send buffer drained, so on a fast link a
/// step can still wait for that much to be read.)
pub(crate) async fn write_batch<S>(
    sink: &mut S,
    msgs: impl IntoIterator<Item = Message>,
    limit: Duration,
    mut progressed: impl FnMut(),
) -> Result<Result<(), S::Error>, tokio::time::error::Elapsed>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut unflushed = 0;
    for m in msgs {
        if unflushed >= FLUSH_BYTES {
            if let Err(e) = tokio::time::timeout(limit, sink.flush()).await? {
                return Ok(Err(e));
            }
            progressed();
            unflushed = 0;
        }
        unflushed += frame_len(&m);
        if let Err(e) = tokio::time::timeout(limit, sink.feed(m)).await? {
            return Ok(Err(e));
        }
        progressed();
    }
    let flushed = tokio::time::timeout(limit, sink.flush()).await?;
    progressed();
    Ok(flushed)
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
    /// Steps (a frame taken, a flush done) of relayed writes into this
    /// socket: a peer that only reads is alive while this moves.
    pub written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    closer: std::sync::Arc<watch::Sender<CloseState>>,
}

impl DirectHandle {
    /// Split `socket` into a shared sink handle and the reading half.
    pub fn new(socket: WebSocket) -> (Self, futures_util::stream::SplitStream<WebSocket>) {
        let (sink, stream) = socket.split();
        let (closer, _) = watch::channel(CloseState::Open);
        let handle = Self {
            sink: std::sync::Arc::new(tokio::sync::Mutex::new(sink)),
            written: Default::default(),
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
            // Relays writing into this sink give up as soon as they see the
            // close signal, so the lock comes free; every wait is still bounded.
            tokio::spawn(async move {
                if let Ok(mut sink) = tokio::time::timeout(CLOSE_GRACE, sink.lock()).await {
                    send_close(&mut sink, code, reason).await;
                }
            });
        }
    }

    /// A receiver that observes the close signal.
    pub fn watch(&self) -> watch::Receiver<CloseState> {
        self.closer.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes `per_frame` to accept each frame, or never when `None`.
    fn slow_sink(
        per_frame: Option<Duration>,
    ) -> impl futures_util::Sink<Message, Error = std::convert::Infallible> + Unpin {
        Box::pin(futures_util::sink::unfold(
            (),
            move |(), _m: Message| async move {
                match per_frame {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
                Ok(())
            },
        ))
    }

    fn frame(len: usize) -> Message {
        Message::Binary(vec![0u8; len].into())
    }

    /// A peer that takes every frame, slowly: the batch takes longer than the
    /// limit in all, and still completes, because each step made progress.
    #[tokio::test(start_paused = true)]
    async fn a_batch_slower_than_the_limit_in_all_completes_while_each_step_moves() {
        let mut sink = slow_sink(Some(Duration::from_millis(200)));
        let mut steps = 0;
        let started = tokio::time::Instant::now();
        let res = write_batch(
            &mut sink,
            (0..10).map(|_| frame(1024)),
            Duration::from_millis(500),
            || steps += 1,
        )
        .await;
        assert!(matches!(res, Ok(Ok(()))));
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(steps, 11, "ten frames and the flush");
    }

    /// A peer that stops taking frames: the step times out.
    #[tokio::test(start_paused = true)]
    async fn a_step_without_progress_times_out() {
        let mut sink = slow_sink(None);
        let res = write_batch(
            &mut sink,
            (0..3).map(|_| frame(1024)),
            Duration::from_millis(500),
            || {},
        )
        .await;
        assert!(res.is_err());
    }

    /// Big batches are flushed every FLUSH_BYTES, so no step holds more.
    #[tokio::test(start_paused = true)]
    async fn big_batches_are_flushed_in_steps() {
        let mut sink = slow_sink(Some(Duration::ZERO));
        let mut steps = 0;
        let n = 3 * FLUSH_BYTES / (64 * 1024);
        let res = write_batch(
            &mut sink,
            (0..n).map(|_| frame(64 * 1024)),
            Duration::from_millis(500),
            || steps += 1,
        )
        .await;
        assert!(matches!(res, Ok(Ok(()))));
        // n frames, a flush after each FLUSH_BYTES but the last, and the final flush.
        assert_eq!(steps, n + 2 + 1, "{steps}");
    }
}
