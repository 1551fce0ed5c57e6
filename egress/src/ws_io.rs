//! WebSocket plumbing under both protocol versions: the single writer task that owns the sink, and [`MuxIo`], the byte pipe yamux runs on (binary messages in and out).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::PollSender;

/// Largest binary message [`MuxIo`] emits. yamux already splits data frames
/// at its `split_send_size`, so this only bounds coalesced small frames.
pub(crate) const MAX_BINARY_MESSAGE: usize = 64 * 1024;

/// How many outgoing messages may wait for the socket. Senders (stream tasks,
/// the yamux driver) wait when it is full, which is the backpressure that
/// keeps a fast local socket from queueing unbounded frames.
pub(crate) const WRITE_QUEUE: usize = 64;

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
/// reader forwards, writes are buffered and sent as one binary message per flush.
pub(crate) struct MuxIo {
    rx: mpsc::Receiver<Bytes>,
    rbuf: Bytes,
    tx: PollSender<Message>,
    wbuf: BytesMut,
}

impl MuxIo {
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>, tx: mpsc::Sender<Message>) -> Self {
        MuxIo {
            rx,
            rbuf: Bytes::new(),
            tx: PollSender::new(tx),
            wbuf: BytesMut::new(),
        }
    }

    fn poll_send_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.wbuf.len() >= MAX_BINARY_MESSAGE {
            ready!(self.poll_send_buf(cx))?;
        }
        let n = buf.len().min(MAX_BINARY_MESSAGE);
        self.wbuf.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_buf(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_buf(cx))?;
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}
