//! WebSocket plumbing under both protocol versions: the socket's write half ([`Wire`]) shared by the writer task and the yamux driver, and [`MuxIo`], the byte pipe yamux runs on (binary messages in and out).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, SinkExt};
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::PollSender;

/// Largest binary message [`MuxIo`] emits: yamux frames are coalesced into
/// messages of up to this size (every v2 peer accepts 1 MiB, see
/// `bridge::MAX_BINARY_IN`), so one WebSocket frame, one relay hop and one
/// channel send carry many yamux frames under bulk load.
pub(crate) const MAX_BINARY_MESSAGE: usize = 256 * 1024;

/// How many outgoing messages may wait for the socket. Senders (stream tasks,
/// the yamux driver) wait when it is full, which is the backpressure that
/// keeps a fast local socket from queueing unbounded frames. At
/// [`MAX_BINARY_MESSAGE`] each this holds at most 4 MiB per bridge (the
/// bound docs/security.md lists), so a small response waits behind at most
/// that much bulk.
pub(crate) const WRITE_QUEUE: usize = 16;

/// The per-bridge outgoing queue's byte bound, checked when this builds.
pub(crate) const WRITE_QUEUE_BYTES: usize = WRITE_QUEUE * MAX_BINARY_MESSAGE;
const _: () = assert!(WRITE_QUEUE_BYTES <= 4 * 1024 * 1024);

/// Largest message the yamux driver writes to the socket itself instead of
/// queueing it for the writer task (when nothing of its own is queued and the
/// writer is not writing). A small exchange (an open, its reply, a request,
/// a response, a window update) then leaves without waking another task;
/// bulk messages still go through the writer task, which writes the socket
/// in parallel with the driver reading it.
pub(crate) const DIRECT_MAX: usize = 16 * 1024;

/// The boxed WebSocket sink both writers share.
type BoxSink = Pin<Box<dyn Sink<Message, Error = WsError> + Send>>;

/// The socket's write half, shared by the writer task (everything queued)
/// and the yamux driver (small messages while the writer is idle).
pub(crate) struct Wire {
    sink: Arc<tokio::sync::Mutex<BoxSink>>,
    /// Binary messages queued for the writer and not yet handed to the sink.
    /// Only the yamux driver sends binary, and it writes directly only while
    /// this is zero, so yamux's bytes reach the socket in order.
    binary_queued: AtomicUsize,
}

impl Wire {
    pub(crate) fn new<Si>(sink: Si) -> Arc<Self>
    where
        Si: Sink<Message, Error = WsError> + Send + 'static,
    {
        Arc::new(Wire {
            sink: Arc::new(tokio::sync::Mutex::new(Box::pin(sink))),
            binary_queued: AtomicUsize::new(0),
        })
    }
}

/// Runs until the channel closes or the sink fails. Batches whatever is
/// queued before flushing so small frames share a syscall.
pub(crate) async fn write_loop(
    wire: Arc<Wire>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(), WsError> {
    async fn feed(sink: &mut BoxSink, wire: &Wire, msg: Message) -> Result<(), WsError> {
        let binary = matches!(msg, Message::Binary(_));
        sink.feed(msg).await?;
        if binary {
            // Under the sink's lock: a direct write after this lands behind it.
            wire.binary_queued.fetch_sub(1, Ordering::Release);
        }
        Ok(())
    }
    while let Some(first) = rx.recv().await {
        let mut sink = wire.sink.lock().await;
        let closing = matches!(first, Message::Close(_));
        feed(&mut sink, &wire, first).await?;
        if !closing {
            for _ in 0..WRITE_QUEUE {
                match rx.try_recv() {
                    Ok(msg) => {
                        let closing = matches!(msg, Message::Close(_));
                        feed(&mut sink, &wire, msg).await?;
                        if closing {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        sink.flush().await?;
    }
    Ok(())
}

/// The byte stream yamux sees: reads come from binary messages the bridge
/// reader forwards; writes are buffered and leave as one binary message when
/// the buffer reaches [`MAX_BINARY_MESSAGE`] or when the multiplexer driver
/// has nothing more to write ([`MuxFlush::poll_flush`]).
///
/// yamux flushes after every frame it writes; sending a message per flush
/// cost one WebSocket message (and a wake-up of the writer, the relay and the
/// peer's reader) per 16 KiB frame. The flush is therefore only recorded
/// here, and the driver, once yamux has drained every queued frame into this
/// buffer, sends whatever accumulated as one message: a small one
/// ([`DIRECT_MAX`]) straight to the socket when the writer task is idle and
/// none of yamux's messages wait in its queue, any other through the queue.
pub(crate) struct MuxIo {
    rx: mpsc::Receiver<Bytes>,
    rbuf: Bytes,
    out: Arc<Mutex<Out>>,
}

/// The write half shared by [`MuxIo`] (inside yamux) and the driver's [`MuxFlush`].
struct Out {
    tx: PollSender<Message>,
    wire: Arc<Wire>,
    wbuf: BytesMut,
    /// A message the driver is writing to the socket itself: the sink's lock
    /// (held until the flush completes) and the message if the sink has not
    /// taken it yet.
    direct: Option<(OwnedMutexGuard<BoxSink>, Option<Message>)>,
}

/// A socket error met by a direct write, with the kind the writer task's would have.
fn ws_err(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::other(other.to_string()),
    }
}

impl Out {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_direct(cx))?;
        if self.wbuf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        // Nothing queued at all (so a queued text message, e.g. a `hello`
        // reply, is not overtaken, short of one the writer has just taken
        // and not yet fed), and none of our own binary still unfed.
        let queue_empty = self
            .tx
            .get_ref()
            .is_some_and(|tx| tx.capacity() == tx.max_capacity());
        if self.wbuf.len() <= DIRECT_MAX
            && queue_empty
            && self.wire.binary_queued.load(Ordering::Acquire) == 0
            && let Ok(sink) = self.wire.sink.clone().try_lock_owned()
        {
            let msg = self.take_message();
            self.direct = Some((sink, Some(msg)));
            return self.poll_direct(cx);
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let msg = self.take_message();
        self.wire.binary_queued.fetch_add(1, Ordering::AcqRel);
        self.tx
            .send_item(msg)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Poll::Ready(Ok(()))
    }

    /// The buffered bytes as a message (the buffer keeps its spare room for the next one).
    fn take_message(&mut self) -> Message {
        Message::Binary(self.wbuf.split().freeze())
    }

    /// Drives a direct write to the end of its flush, then releases the sink.
    /// On an error the sink is released too (the writer task then meets the
    /// same broken socket), never kept locked by a write that cannot finish.
    fn poll_direct(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((sink, msg)) = &mut self.direct else {
            return Poll::Ready(Ok(()));
        };
        let res = (|| {
            if msg.is_some() {
                ready!(sink.as_mut().poll_ready(cx))?;
                sink.as_mut().start_send(msg.take().unwrap())?;
            }
            sink.as_mut().poll_flush(cx)
        })();
        match res {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                self.direct = None;
                Poll::Ready(res.map_err(ws_err))
            }
        }
    }
}

/// The driver's handle on [`MuxIo`]'s write buffer: sends what yamux wrote once it went idle.
pub(crate) struct MuxFlush {
    out: Arc<Mutex<Out>>,
}

impl MuxFlush {
    /// Sends the buffered bytes as one message (pending while the write queue is full).
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.lock().unwrap().poll_send(cx)
    }
}

impl MuxIo {
    pub(crate) fn new(
        rx: mpsc::Receiver<Bytes>,
        tx: mpsc::Sender<Message>,
        wire: Arc<Wire>,
    ) -> (Self, MuxFlush) {
        // A std mutex shared by two halves polled by the same task: never contended.
        let out = Arc::new(Mutex::new(Out {
            tx: PollSender::new(tx),
            wire,
            wbuf: BytesMut::new(),
            direct: None,
        }));
        let io = MuxIo {
            rx,
            rbuf: Bytes::new(),
            out: out.clone(),
        };
        (io, MuxFlush { out })
    }
}

impl futures::io::AsyncRead for MuxIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if !self.rbuf.is_empty() {
                let n = self.rbuf.len().min(buf.len());
                buf[..n].copy_from_slice(&self.rbuf[..n]);
                self.rbuf.advance(n);
                return Poll::Ready(Ok(n));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(chunk) => self.rbuf = chunk,
                None => return Poll::Ready(Ok(0)),
            }
        }
    }
}

impl futures::io::AsyncWrite for MuxIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut out = self.out.lock().unwrap();
        if out.wbuf.len() >= MAX_BINARY_MESSAGE {
            ready!(out.poll_send(cx))?;
        }
        let room = MAX_BINARY_MESSAGE - out.wbuf.len();
        let n = buf.len().min(room);
        if out.wbuf.is_empty() {
            // Bulk (a large first write) gets room for a whole message at
            // once; a small exchange only what it needs. (Reserving a whole
            // message whenever the room runs out, or reusing sent buffers,
            // made the daemon fault in several times the pages under glibc's malloc:
            // the smaller allocations this makes are served from its free lists.)
            let want = if n >= 16 * 1024 {
                MAX_BINARY_MESSAGE
            } else {
                n.max(4096)
            };
            out.wbuf.reserve(want);
        }
        out.wbuf.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Deferred: the driver sends the buffer once yamux has nothing more
        // to write (see the type's docs), so frames written back to back
        // share one message.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.out.lock().unwrap();
        ready!(out.poll_send(cx))?;
        out.tx.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncWriteExt;

    type Socket = futures::channel::mpsc::UnboundedReceiver<Message>;

    /// A [`MuxIo`] over a recording socket, with the writer task not running:
    /// only a direct write can reach the socket.
    fn pipe() -> (MuxIo, MuxFlush, Arc<Wire>, Socket, mpsc::Receiver<Message>) {
        let (sock_tx, socket) = futures::channel::mpsc::unbounded();
        let wire = Wire::new(sock_tx.sink_map_err(|_| WsError::ConnectionClosed));
        let (_in_tx, in_rx) = mpsc::channel(1);
        let (q_tx, queue) = mpsc::channel(WRITE_QUEUE);
        let (io, flush) = MuxIo::new(in_rx, q_tx, wire.clone());
        (io, flush, wire, socket, queue)
    }

    async fn flush(f: &MuxFlush) {
        futures::future::poll_fn(|cx| f.poll_flush(cx))
            .await
            .unwrap();
    }

    fn binary(b: &[u8]) -> Message {
        Message::Binary(Bytes::copy_from_slice(b))
    }

    #[tokio::test]
    async fn a_small_message_is_written_by_the_driver_while_the_writer_is_idle() {
        let (mut io, f, _wire, mut socket, mut queue) = pipe();
        io.write_all(b"open request").await.unwrap();
        flush(&f).await;
        assert_eq!(socket.try_recv().ok(), Some(binary(b"open request")));
        assert!(queue.try_recv().is_err(), "nothing went through the queue");
    }

    /// Takes the next queued message as the writer task does (its binary count drops).
    fn writer_takes(queue: &mut mpsc::Receiver<Message>, wire: &Wire) -> Option<Message> {
        let msg = queue.try_recv().ok()?;
        if matches!(msg, Message::Binary(_)) {
            wire.binary_queued.fetch_sub(1, Ordering::Release);
        }
        Some(msg)
    }

    #[tokio::test]
    async fn bulk_and_a_busy_writer_go_through_the_queue_and_order_is_kept() {
        let (mut io, f, wire, mut socket, mut queue) = pipe();
        let big = vec![7u8; DIRECT_MAX + 1];
        io.write_all(&big).await.unwrap();
        flush(&f).await;
        // A small message behind a queued one must not overtake it.
        io.write_all(b"after").await.unwrap();
        flush(&f).await;
        assert!(socket.try_recv().is_err(), "nothing written directly");
        assert_eq!(writer_takes(&mut queue, &wire), Some(binary(&big)));
        assert_eq!(writer_takes(&mut queue, &wire), Some(binary(b"after")));
        // The writer is writing (holds the sink): small messages queue too.
        let held = wire.sink.clone().lock_owned().await;
        io.write_all(b"busy").await.unwrap();
        flush(&f).await;
        assert_eq!(writer_takes(&mut queue, &wire), Some(binary(b"busy")));
        drop(held);
        // Once the writer has fed everything and let go, the driver writes again.
        io.write_all(b"idle").await.unwrap();
        flush(&f).await;
        assert_eq!(socket.try_recv().ok(), Some(binary(b"idle")));
    }

    #[tokio::test]
    async fn the_writer_task_hands_queued_messages_to_the_socket_in_order() {
        let (mut io, f, wire, mut socket, queue) = pipe();
        let big = vec![1u8; DIRECT_MAX * 2];
        io.write_all(&big).await.unwrap();
        flush(&f).await;
        io.write_all(b"small").await.unwrap();
        flush(&f).await;
        assert_eq!(wire.binary_queued.load(Ordering::Acquire), 2);
        drop((io, f));
        write_loop(wire.clone(), queue).await.unwrap();
        assert_eq!(socket.try_recv().ok(), Some(binary(&big)));
        assert_eq!(socket.try_recv().ok(), Some(binary(b"small")));
        assert_eq!(wire.binary_queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_small_message_does_not_overtake_a_queued_text_message() {
        let (sock_tx, mut socket) = futures::channel::mpsc::unbounded();
        let wire = Wire::new(sock_tx.sink_map_err(|_| WsError::ConnectionClosed));
        let (_in_tx, in_rx) = mpsc::channel(1);
        let (q_tx, mut queue) = mpsc::channel(WRITE_QUEUE);
        let (mut io, f) = MuxIo::new(in_rx, q_tx.clone(), wire);
        q_tx.send(Message::text("hello reply")).await.unwrap();
        io.write_all(b"syn").await.unwrap();
        flush(&f).await;
        assert!(socket.try_recv().is_err(), "nothing written directly");
        assert_eq!(queue.try_recv().ok(), Some(Message::text("hello reply")));
        assert_eq!(queue.try_recv().ok(), Some(binary(b"syn")));
    }

    /// The real writer task and the driver's direct writes racing on two
    /// threads, with text messages queued in between: the binary bytes reach
    /// the socket whole and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn yamux_bytes_reach_the_socket_in_order_while_both_paths_race() {
        let (sock_tx, mut socket) = futures::channel::mpsc::unbounded();
        let wire = Wire::new(sock_tx.sink_map_err(|_| WsError::ConnectionClosed));
        let (_in_tx, in_rx) = mpsc::channel(1);
        let (q_tx, queue) = mpsc::channel(WRITE_QUEUE);
        let writer = tokio::spawn(write_loop(wire.clone(), queue));
        let (mut io, f) = MuxIo::new(in_rx, q_tx.clone(), wire);
        let mut sent = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..3000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // 1 byte to 40 KiB: both sides of DIRECT_MAX.
            let len = 1 + (seed % (40 * 1024)) as usize;
            let chunk: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            io.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            if seed.is_multiple_of(3) {
                flush(&f).await;
            }
            if seed.is_multiple_of(7) {
                q_tx.send(Message::text("stats")).await.unwrap();
            }
            if seed.is_multiple_of(5) {
                tokio::task::yield_now().await;
            }
        }
        flush(&f).await;
        drop((io, f, q_tx));
        writer.await.unwrap().unwrap();
        let mut got = Vec::new();
        while let Ok(msg) = socket.try_recv() {
            if let Message::Binary(b) = msg {
                got.extend_from_slice(&b);
            }
        }
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "binary bytes reordered");
    }
}
