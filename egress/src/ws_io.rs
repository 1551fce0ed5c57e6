//! WebSocket plumbing under both protocol versions: the single writer task that owns the sink, and [`MuxIo`], the byte pipe yamux runs on (binary messages in and out).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
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

/// Runs until the channel closes or the sink fails. Batches whatever is
/// queued before flushing so small frames share a syscall.
pub(crate) async fn write_loop<Si>(
    mut sink: Si,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(), WsError>
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    while let Some(first) = rx.recv().await {
        let closing = matches!(first, Message::Close(_));
        sink.feed(first).await?;
        if !closing {
            for _ in 0..WRITE_QUEUE {
                match rx.try_recv() {
                    Ok(msg) => {
                        let closing = matches!(msg, Message::Close(_));
                        sink.feed(msg).await?;
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
/// buffer, sends whatever accumulated as one message.
pub(crate) struct MuxIo {
    rx: mpsc::Receiver<Bytes>,
    rbuf: Bytes,
    out: Arc<Mutex<Out>>,
}

/// The write half shared by [`MuxIo`] (inside yamux) and the driver's [`MuxFlush`].
struct Out {
    tx: PollSender<Message>,
    wbuf: BytesMut,
}

impl Out {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.wbuf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let msg = Message::Binary(self.wbuf.split().freeze());
        self.tx
            .send_item(msg)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Poll::Ready(Ok(()))
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
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>, tx: mpsc::Sender<Message>) -> (Self, MuxFlush) {
        // A std mutex shared by two halves polled by the same task: never contended.
        let out = Arc::new(Mutex::new(Out {
            tx: PollSender::new(tx),
            wbuf: BytesMut::new(),
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
            // once; a small exchange only what it needs.
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
