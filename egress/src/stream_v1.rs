//! v1 streams: the per-bridge registry of stream ids and [`V1Stream`], an `AsyncRead + AsyncWrite` over `data`/`close` frames with inbound queues bounded per stream and per bridge.
//!
//! The shared read loop only ever *appends* to a stream's queue; a per-stream
//! task drains it into the local socket. v1 has no flow control, so when a
//! queue (or the bridge's byte budget) is full the read loop waits for space
//! (backpressure, head-of-line blocking on v1 only) instead of cutting the
//! stream; a stream that stays full is closed by the read loop after its
//! stall timeout ([`V1Registry::kill`]), which also frees its queue at once.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::{CancellationToken, PollSender};

use crate::frame_v1::{self, TextFrame, V1_CHUNK};

/// Result of a pending open as seen by the client: `Err` carries the host's error text.
pub(crate) type OpenResult = Result<(), String>;

/// All v1 streams of one bridge, by id.
pub(crate) struct V1Registry {
    // A std mutex: every critical section is a map operation, never an await.
    entries: Mutex<HashMap<String, Entry>>,
    out: mpsc::Sender<Message>,
    queue_cap: usize,
    budget: usize,
    /// Bytes queued across every stream of the bridge.
    total: Arc<AtomicUsize>,
    /// Notified whenever a stream drains or goes away.
    space: Arc<Notify>,
    /// Control frames waiting in tasks for room in the write queue.
    control_backlog: Arc<AtomicUsize>,
}

/// Control frames (`close`, `error`) that may wait for room in a full write
/// queue at once. A burst of refused opens (thousands over the stream limit)
/// fits; a peer that stops reading while it keeps sending opens would
/// otherwise grow one waiting task per frame. Each waits as a small task with
/// a frame of at most a few hundred bytes (ids are bounded), so this is
/// about 2 MiB at most; beyond it the frame is dropped (the peer's stream
/// then ends by its own timeout).
const MAX_CONTROL_BACKLOG: usize = 4096;

struct Entry {
    tx: mpsc::UnboundedSender<Bytes>,
    shared: Arc<Shared>,
    pending: Option<oneshot::Sender<OpenResult>>,
}

#[derive(Default)]
struct Shared {
    queued: AtomicUsize,
    overflowed: AtomicBool,
    peer_closed: AtomicBool,
    /// Cancelled when the read loop closes this stream as stalled: its holder
    /// must drop it (which frees the queue) even if it is blocked elsewhere.
    killed: CancellationToken,
}

/// What the read loop should do after handing a `data` frame to the registry.
pub(crate) enum DataOutcome {
    Queued,
    UnknownId,
    /// The stream's queue or the bridge budget is full: wait for space and retry with the body.
    Full(Bytes),
}

impl V1Registry {
    pub(crate) fn new(out: mpsc::Sender<Message>, queue_cap: usize, budget: usize) -> Arc<Self> {
        Arc::new(V1Registry {
            entries: Mutex::new(HashMap::new()),
            out,
            queue_cap,
            budget,
            total: Arc::new(AtomicUsize::new(0)),
            space: Arc::new(Notify::new()),
            control_backlog: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Resolves after the next time queue space is freed (create it before retrying).
    pub(crate) fn space_freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.space.notified()
    }

    /// The stream to close when the read loop has waited too long for space
    /// for a frame of `id`: `id` itself if its own queue is full, otherwise the
    /// stream holding the most queued bytes. Returns its id and queued bytes.
    pub(crate) fn stalled_victim(&self, id: &str) -> Option<(String, usize)> {
        let entries = self.entries.lock().unwrap();
        if let Some(e) = entries.get(id) {
            let q = e.shared.queued.load(Ordering::Acquire);
            if q >= self.queue_cap {
                return Some((id.to_owned(), q));
            }
        }
        entries
            .iter()
            .map(|(k, e)| (k, e.shared.queued.load(Ordering::Acquire)))
            .max_by_key(|(_, q)| *q)
            .filter(|(_, q)| *q > 0)
            .map(|(k, q)| (k.clone(), q))
    }

    /// Closes a stalled stream: removed from the registry, its holder told to
    /// drop it (freeing its queue). True if it was registered (`close` is owed).
    pub(crate) fn kill(&self, id: &str) -> bool {
        let Some(entry) = self.entries.lock().unwrap().remove(id) else {
            return false;
        };
        entry.shared.overflowed.store(true, Ordering::Release);
        entry.shared.peer_closed.store(true, Ordering::Release);
        entry.shared.killed.cancel();
        true
    }

    /// Registers an open stream (host side after a successful dial).
    pub(crate) fn register(self: &Arc<Self>, id: &str) -> V1Stream {
        self.insert(id, None)
    }

    /// Registers a stream awaiting `open_ok`/`error` (client side).
    pub(crate) fn register_pending(
        self: &Arc<Self>,
        id: &str,
    ) -> (V1Stream, oneshot::Receiver<OpenResult>) {
        let (tx, rx) = oneshot::channel();
        (self.insert(id, Some(tx)), rx)
    }

    fn insert(
        self: &Arc<Self>,
        id: &str,
        pending: Option<oneshot::Sender<OpenResult>>,
    ) -> V1Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let entry = Entry {
            tx,
            shared: shared.clone(),
            pending,
        };
        self.entries.lock().unwrap().insert(id.to_owned(), entry);
        V1Stream {
            id: id.into(),
            rx,
            rbuf: Bytes::new(),
            shared,
            total: self.total.clone(),
            space: self.space.clone(),
            reg: self.clone(),
            tx: PollSender::new(self.out.clone()),
            closed: false,
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.entries.lock().unwrap().contains_key(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    /// Appends bytes to a stream's queue, or hands them back when the
    /// stream's queue or the bridge budget is full. Never blocks. A frame
    /// always fits an empty stream queue and an empty budget, so one large
    /// frame cannot wedge the bridge.
    pub(crate) fn on_data(&self, id: &str, body: Bytes) -> DataOutcome {
        let entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get(id) else {
            return DataOutcome::UnknownId;
        };
        let queued = entry.shared.queued.load(Ordering::Acquire);
        let total = self.total.load(Ordering::Acquire);
        if (queued > 0 && queued + body.len() > self.queue_cap)
            || (total > 0 && total + body.len() > self.budget)
        {
            return DataOutcome::Full(body);
        }
        entry.shared.queued.fetch_add(body.len(), Ordering::AcqRel);
        self.total.fetch_add(body.len(), Ordering::AcqRel);
        // The receiver may be gone (stream dropped); the entry is then removed by its Drop.
        let _ = entry.tx.send(body);
        DataOutcome::Queued
    }

    /// The peer closed `id`: the reader sees EOF after the queued bytes, writes fail.
    pub(crate) fn on_close(&self, id: &str) {
        if let Some(entry) = self.entries.lock().unwrap().remove(id) {
            entry.shared.peer_closed.store(true, Ordering::Release);
            if let Some(pending) = entry.pending {
                let _ = pending.send(Err("closed by host".into()));
            }
        }
    }

    /// Returns false when nobody waits for this id any more (abandoned open): the caller must send `close`.
    pub(crate) fn on_open_ok(&self, id: &str) -> bool {
        let mut entries = self.entries.lock().unwrap();
        match entries.get_mut(id) {
            Some(entry) => {
                if let Some(pending) = entry.pending.take()
                    && pending.send(Ok(())).is_err()
                {
                    entries.remove(id);
                    return false;
                }
                true
            }
            None => false,
        }
    }

    pub(crate) fn on_error(&self, id: &str, error: String) {
        if let Some(entry) = self.entries.lock().unwrap().remove(id) {
            entry.shared.peer_closed.store(true, Ordering::Release);
            if let Some(pending) = entry.pending {
                let _ = pending.send(Err(error));
            }
        }
    }

    /// Removes `id`; true if it was registered (so a `close` is owed to the peer).
    pub(crate) fn remove(&self, id: &str) -> bool {
        self.entries.lock().unwrap().remove(id).is_some()
    }

    /// Ends every stream (bridge gone): readers see EOF, writers fail.
    pub(crate) fn clear(&self) {
        let entries = std::mem::take(&mut *self.entries.lock().unwrap());
        for (_, entry) in entries {
            entry.shared.peer_closed.store(true, Ordering::Release);
            if let Some(pending) = entry.pending {
                let _ = pending.send(Err("bridge closed".into()));
            }
        }
    }

    /// Sends a control frame without ever waiting in the caller (the shared
    /// read loop must not block on the write queue): falls back to a task,
    /// at most [`MAX_CONTROL_BACKLOG`] of them at once.
    pub(crate) fn send_control(&self, frame: TextFrame) {
        let msg = Message::text(frame_v1::encode(&frame));
        let Err(mpsc::error::TrySendError::Full(msg)) = self.out.try_send(msg) else {
            return;
        };
        if self.control_backlog.fetch_add(1, Ordering::AcqRel) >= MAX_CONTROL_BACKLOG {
            self.control_backlog.fetch_sub(1, Ordering::AcqRel);
            return tracing::debug!("write queue full: dropping a v1 control frame");
        }
        let (out, backlog) = (self.out.clone(), self.control_backlog.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = out.send(msg).await;
                    backlog.fetch_sub(1, Ordering::AcqRel);
                });
            }
            Err(_) => {
                backlog.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Control frames waiting for room in the write queue (tests).
    #[cfg(test)]
    pub(crate) fn control_backlog(&self) -> usize {
        self.control_backlog.load(Ordering::Acquire)
    }

    /// Sends a frame, waiting for queue space (never call from the read loop).
    pub(crate) async fn send(&self, frame: TextFrame) -> bool {
        self.out
            .send(Message::text(frame_v1::encode(&frame)))
            .await
            .is_ok()
    }
}

/// One v1 stream as a byte pipe. Dropping it (or shutting it down) sends
/// `close` unless the peer closed first.
pub(crate) struct V1Stream {
    id: Arc<str>,
    rx: mpsc::UnboundedReceiver<Bytes>,
    rbuf: Bytes,
    shared: Arc<Shared>,
    total: Arc<AtomicUsize>,
    space: Arc<Notify>,
    reg: Arc<V1Registry>,
    tx: PollSender<Message>,
    closed: bool,
}

impl V1Stream {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Cancelled when the bridge closed this stream as stalled; whoever holds
    /// the stream must then drop it.
    pub(crate) fn killed(&self) -> CancellationToken {
        self.shared.killed.clone()
    }

    fn release(&self, n: usize) {
        self.shared.queued.fetch_sub(n, Ordering::AcqRel);
        self.total.fetch_sub(n, Ordering::AcqRel);
        self.space.notify_waiters();
    }
}

impl AsyncRead for V1Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.rbuf.is_empty() {
                let n = self.rbuf.len().min(buf.remaining());
                buf.put_slice(&self.rbuf[..n]);
                self.rbuf.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(chunk) => {
                    self.release(chunk.len());
                    self.rbuf = chunk;
                }
                None if self.shared.overflowed.load(Ordering::Acquire) => {
                    return Poll::Ready(Err(io::Error::other("stream queue overflow")));
                }
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for V1Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed || self.shared.peer_closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let n = buf.len().min(V1_CHUNK);
        let frame = TextFrame::Data {
            id: self.id.to_string(),
            body: Bytes::copy_from_slice(&buf[..n]),
        };
        let msg = Message::text(frame_v1::encode(&frame));
        self.tx
            .send_item(msg)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// v1 has no half-close: shutting down the write side closes the whole stream.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        if self.reg.contains(&self.id) {
            ready!(self.tx.poll_reserve(cx))
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
            if self.reg.remove(&self.id) {
                let msg = Message::text(frame_v1::encode(&TextFrame::Close {
                    id: self.id.to_string(),
                }));
                let _ = self.tx.send_item(msg);
            } else {
                self.tx.abort_send();
            }
        }
        self.closed = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for V1Stream {
    fn drop(&mut self) {
        if !self.closed && self.reg.remove(&self.id) {
            self.reg.send_control(TextFrame::Close {
                id: self.id.to_string(),
            });
        }
        // Deregistered now, so nothing is added any more: give back what is still queued.
        self.rx.close();
        let mut left = 0;
        while let Ok(chunk) = self.rx.try_recv() {
            left += chunk.len();
        }
        if left > 0 {
            self.release(left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that stops reading while it keeps the host refusing opens:
    /// the refusals waiting for the full write queue stay bounded.
    #[tokio::test]
    async fn control_frames_waiting_for_a_full_queue_are_bounded() {
        let (out, mut rx) = mpsc::channel(1);
        let reg = V1Registry::new(out, 1024, 1 << 20);
        for i in 0..MAX_CONTROL_BACKLOG + 500 {
            reg.send_control(TextFrame::Error {
                id: format!("conn_{i}"),
                error: "too many streams".into(),
            });
        }
        tokio::task::yield_now().await;
        assert_eq!(reg.control_backlog(), MAX_CONTROL_BACKLOG);
        // The queue's frame and every waiting one arrive; the rest were dropped.
        let mut got = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await
        {
            got += 1;
        }
        assert_eq!(got, 1 + MAX_CONTROL_BACKLOG);
        assert_eq!(reg.control_backlog(), 0);
    }
}
