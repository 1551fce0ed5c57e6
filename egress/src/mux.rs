//! v2 multiplexer: a yamux session over [`MuxIo`] and the driver future that alone polls it, serving open requests from any task and handing out inbound streams.
//!
//! yamux 0.13 has no cloneable control handle: every outbound open and every
//! byte of I/O goes through `Connection::poll_*`, so one driver future owns
//! the connection and other tasks talk to it over channels.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use yamux::{Config, Connection, Mode};

use crate::ws_io::{MuxFlush, MuxIo};

/// A yamux stream with tokio's I/O traits.
pub(crate) type MuxStream = Compat<yamux::Stream>;

/// Called with each inbound stream (host side).
pub(crate) type InboundFn = Box<dyn Fn(MuxStream) + Send + Sync>;

/// An open request: the stream's first bytes, and where to send the stream
/// with how many of those bytes the driver already wrote.
type OpenReq = (
    Vec<u8>,
    oneshot::Sender<Result<(yamux::Stream, usize), String>>,
);

/// Cloneable way to open outbound streams on a running session.
#[derive(Clone)]
pub(crate) struct MuxHandle {
    open_tx: mpsc::Sender<OpenReq>,
}

impl MuxHandle {
    /// Opens a stream whose first bytes are `first`. The driver writes them
    /// as it creates the stream, so they leave in the same poll as the
    /// stream's SYN instead of after a round of wake-ups through this task;
    /// whatever it could not write at once is written here.
    pub(crate) async fn open(&self, first: Vec<u8>) -> Result<MuxStream, String> {
        use tokio::io::AsyncWriteExt;
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send((first.clone(), tx))
            .await
            .map_err(|_| "bridge multiplexer stopped".to_owned())?;
        let (stream, written) = rx
            .await
            .map_err(|_| "bridge multiplexer stopped".to_owned())??;
        let mut stream = stream.compat();
        if written < first.len() {
            stream
                .write_all(&first[written..])
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(stream)
    }
}

/// Largest yamux data frame we send. yamux's default (16 KiB) cost a frame
/// header, a channel send from the stream task and a copy per 16 KiB; the
/// relays read 64 KiB at a time, so one read is one frame. Every yamux peer
/// accepts bodies up to 1 MiB.
pub(crate) const SPLIT_SEND_SIZE: usize = 64 * 1024;

/// yamux settings for a bridge allowing `max_streams` concurrent streams.
pub(crate) fn config(max_streams: usize) -> Config {
    let mut cfg = Config::default();
    cfg.set_split_send_size(SPLIT_SEND_SIZE);
    // Each stream may buffer up to its 256 KiB window (auto-tuned upwards on
    // a slow path); the connection cap must allow every stream its base window.
    let window = (max_streams * 256 * 1024).max(1 << 30);
    cfg.set_max_connection_receive_window(Some(window));
    cfg.set_max_num_streams(max_streams);
    cfg
}

/// Starts a session; the returned driver must be polled for anything to happen.
pub(crate) fn start(
    (io, flush): (MuxIo, MuxFlush),
    mode: Mode,
    max_streams: usize,
    inbound: Option<InboundFn>,
) -> (MuxHandle, MuxDriver) {
    let (open_tx, open_rx) = mpsc::channel(16);
    let driver = MuxDriver {
        conn: Connection::new(io, config(max_streams), mode),
        flush,
        open_rx,
        open_closed: false,
        pending: None,
        inbound,
    };
    (MuxHandle { open_tx }, driver)
}

/// Drives the yamux connection; resolves when the session ends.
pub(crate) struct MuxDriver {
    conn: Connection<MuxIo>,
    /// Sends what yamux wrote into [`MuxIo`] once it has nothing more to write.
    flush: MuxFlush,
    open_rx: mpsc::Receiver<OpenReq>,
    open_closed: bool,
    pending: Option<OpenReq>,
    inbound: Option<InboundFn>,
}

impl Future for MuxDriver {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            let mut progressed = false;
            if this.pending.is_none() && !this.open_closed {
                match this.open_rx.poll_recv(cx) {
                    Poll::Ready(Some(req)) => this.pending = Some(req),
                    Poll::Ready(None) => this.open_closed = true,
                    Poll::Pending => {}
                }
            }
            if this.pending.is_some() {
                match this.conn.poll_new_outbound(cx) {
                    Poll::Ready(res) => {
                        let (first, reply) = this.pending.take().unwrap();
                        let res = res.map(|mut stream| {
                            // A fresh stream has a full send window and an empty
                            // queue, so this is normally all of it at once.
                            let written = match Pin::new(&mut stream).poll_write(cx, &first) {
                                Poll::Ready(Ok(n)) => n,
                                _ => 0,
                            };
                            (stream, written)
                        });
                        let _ = reply.send(res.map_err(|e| e.to_string()));
                        progressed = true;
                    }
                    Poll::Pending => {}
                }
            }
            match this.conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // The client end never accepts inbound streams; dropping closes them.
                    if let Some(accept) = &this.inbound {
                        accept(stream.compat());
                    }
                    progressed = true;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.to_string())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {}
            }
            if !progressed {
                // yamux's poll above is pending: it wrote every frame it had
                // queued, or tokio's cooperative budget ran out (the task is
                // woken again at once). Either way, the coalesced bytes go
                // out now as one message.
                // Pending here means the write queue is full (the channel
                // wakes this task when it has room) or a small message the
                // driver writes itself waits for the socket (the socket wakes it).
                if let Poll::Ready(Err(e)) = this.flush.poll_flush(cx) {
                    return Poll::Ready(Err(e.to_string()));
                }
                return Poll::Pending;
            }
        }
    }
}
