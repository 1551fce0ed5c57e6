//! One browser connection over any byte stream: read the request head under a deadline and size cap, open a stream through an [`Upstream`] (a bridge, or a direct policy-checked dial), answer exactly, then tunnel (`CONNECT`) or forward one request and close.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::request::{self, Action, BodyFraming, ChunkedScanner, RequestHead};
use super::{BAD_GATEWAY, BAD_REQUEST, CONNECT_OK, HEAD_TOO_LARGE, REQUEST_TIMEOUT, text_response};
use crate::bridge::{Bridge, OpenFailure, Opened, V2Stream};
use crate::frame_v2::OpenCode;
use crate::relay::{Activity, RelayOpts, relay};
use crate::stats::SessionStats;
use crate::stream_v1::V1Stream;

enum HeadError {
    TooLarge,
    Malformed,
    Closed,
}

/// The per-connection bounds, the same whichever [`Upstream`] serves it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// A connection that sends no byte at all within this is closed silently.
    pub first_byte_timeout: Duration,
    /// Deadline for a complete request head (then `408`).
    pub head_timeout: Duration,
    /// Size cap of a request head (then `431`).
    pub max_head_bytes: usize,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
}

/// A stream opened to the destination, ready to relay.
pub(crate) struct Link<S> {
    pub stream: S,
    /// The session counters this stream counts in.
    pub stats: Arc<SessionStats>,
    /// EOF in one direction shuts down only that direction (v2, TCP), or ends both (v1).
    pub half_close: bool,
    /// Resolves when the stream must end early (its bridge ended, a v1 stream was killed).
    pub ended: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Held for the stream's whole life (e.g. a socket-budget permit).
    pub guard: Option<OwnedSemaphorePermit>,
}

/// Where a request goes once its head is parsed.
pub(crate) trait Upstream {
    /// The stream to the destination.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send;
    /// Opens a stream to `host:port`, or returns the exact answer for the
    /// browser (the refusal already counted and logged).
    fn open(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = Result<Link<Self::Stream>, Vec<u8>>> + Send;

    /// For a `CONNECT`: a stream that may be answered `200` before the
    /// destination is known to be open, or `None` to [`Upstream::open`] it
    /// and answer exactly. A failure found later ends the stream's reads.
    fn open_early(
        &self,
        _host: &str,
        _port: u16,
    ) -> impl Future<Output = Option<Link<Self::Stream>>> + Send {
        std::future::ready(None)
    }
}

/// The coordinator path: whichever bridge is attached right now.
pub(crate) struct ViaBridge {
    pub slot: watch::Receiver<Option<Bridge>>,
    /// What a request is told while no bridge is up.
    pub down: Arc<Mutex<String>>,
}

impl Upstream for ViaBridge {
    type Stream = Either<V1Stream, V2Stream>;

    async fn open_early(&self, host: &str, port: u16) -> Option<Link<Self::Stream>> {
        let bridge = self.slot.borrow().clone()?;
        let mut stream = bridge.open_early(host, port).await?;
        let stats = bridge.stats().clone();
        // A failure ends the whole connection: with half-close, the browser's
        // direction would otherwise wait for it.
        let refused = CancellationToken::new();
        let (host, counted, cancel) = (host.to_owned(), stats.clone(), refused.clone());
        stream.on_failure(Box::new(move |failure| {
            counted.rejected();
            info!(host = %host, port = port, reason = %failure_phrase(failure),
                "open failed after an early answer; closing the connection");
            cancel.cancel();
        }));
        Some(link(bridge, Either::Right(stream), stats, true, refused))
    }

    async fn open(&self, host: &str, port: u16) -> Result<Link<Self::Stream>, Vec<u8>> {
        let bridge = self.slot.borrow().clone();
        let Some(bridge) = bridge else {
            // Fast and explicit, rather than a browser waiting 20 s for a dead bridge.
            let why = self.down.lock().unwrap().clone();
            return Err(text_response("503 Service Unavailable", &why));
        };
        let stats = bridge.stats().clone();
        let opened = match bridge.open(host, port).await {
            Ok(opened) => opened,
            Err(failure) => {
                stats.rejected();
                info!(host = %host, port = port, reason = %failure_phrase(&failure), "open failed");
                if not_allowed(&failure) {
                    return Err(forbidden(host));
                }
                return Err(bad_gateway(bridge.version(), &failure));
            }
        };
        Ok(match opened {
            // The bridge closes a v1 stream whose browser stopped reading.
            Opened::V1(s) => {
                let killed = s.killed();
                link(bridge, Either::Left(s), stats, false, killed)
            }
            Opened::V2(s) => link(
                bridge,
                Either::Right(s),
                stats,
                true,
                CancellationToken::new(),
            ),
        })
    }
}

/// A bridge stream's link: it ends early with its bridge, or when `also` is
/// cancelled (a v1 stream the bridge killed, an early-answered v2 open that
/// failed). v2 streams half-close; v1 streams end whole.
fn link(
    bridge: Bridge,
    stream: Either<V1Stream, V2Stream>,
    stats: Arc<SessionStats>,
    half_close: bool,
    also: CancellationToken,
) -> Link<Either<V1Stream, V2Stream>> {
    let ended = bridge.ended();
    Link {
        stream,
        stats,
        half_close,
        ended: Some(Box::pin(async move {
            let _bridge = bridge;
            tokio::select! {
                () = ended.cancelled() => {}
                () = also.cancelled() => {}
            }
        })),
        guard: None,
    }
}

/// Serves one accepted connection to completion. `streams` is the cap on
/// connections with a complete request head: one that has not sent its head
/// yet holds no slot, so idle connections cannot lock real requests out.
pub(crate) async fn serve_connection<S, U>(
    mut sock: S,
    upstream: &U,
    limits: ConnLimits,
    streams: &Semaphore,
    head_permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: Upstream,
{
    let mut buf = BytesMut::with_capacity(4096);
    // A connection that sends nothing at all is dropped quickly and silently.
    let cap = limits.max_head_bytes.max(1);
    match tokio::time::timeout(
        limits.first_byte_timeout,
        sock.read_buf(&mut (&mut buf).limit(cap)),
    )
    .await
    {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let head = tokio::time::timeout(limits.head_timeout, read_head(&mut sock, &mut buf, cap)).await;
    let (head, head_len) = match head {
        Err(_) => return answer(&mut sock, REQUEST_TIMEOUT).await,
        Ok(Err(HeadError::TooLarge)) => return answer(&mut sock, HEAD_TOO_LARGE).await,
        Ok(Err(HeadError::Malformed)) => return answer(&mut sock, BAD_REQUEST).await,
        Ok(Err(HeadError::Closed)) => return,
        Ok(Ok(parsed)) => parsed,
    };
    drop(head_permit);
    buf.advance(head_len);
    let action = match head.action() {
        Ok(action) => action,
        Err(e) => {
            debug!(error = %e, "refusing request");
            return answer(&mut sock, BAD_REQUEST).await;
        }
    };
    let framing = match &action {
        Action::Tunnel(_) => BodyFraming::None,
        Action::Forward { .. } => match head.body_framing() {
            Ok(f) => f,
            Err(_) => return answer(&mut sock, BAD_REQUEST).await,
        },
    };
    let dest = match &action {
        Action::Tunnel(d) | Action::Forward { dest: d, .. } => d.clone(),
    };
    let Ok(_permit) = streams.try_acquire() else {
        let body = text_response("503 Service Unavailable", "too many concurrent connections");
        return answer(&mut sock, &body).await;
    };
    let Link {
        stream,
        stats,
        half_close,
        ended,
        guard: _guard,
    } = match early_link(upstream, &action, &dest).await {
        Some(link) => link,
        None => match upstream.open(&dest.host, dest.port).await {
            Ok(link) => link,
            Err(refusal) => return answer(&mut sock, &refusal).await,
        },
    };
    let _active = stats.stream_opened(&dest.host);
    let opts = RelayOpts {
        half_close,
        idle_timeout: limits.idle_timeout,
    };
    let work = proceed(sock, stream, &head, action, framing, buf, opts, &stats);
    let (up, down) = match ended {
        Some(ended) => tokio::select! {
            res = work => res,
            () = ended => (0, 0),
        },
        None => work.await,
    };
    info!(host = %dest.host, port = dest.port, bytes_out = up, bytes_in = down, "stream closed");
}

/// Only a `CONNECT` has an answer of ours to give early (the `200`); a
/// forwarded request's answer comes from the destination.
async fn early_link<U: Upstream>(
    upstream: &U,
    action: &Action,
    dest: &request::Destination,
) -> Option<Link<U::Stream>> {
    match action {
        Action::Tunnel(_) => upstream.open_early(&dest.host, dest.port).await,
        Action::Forward { .. } => None,
    }
}

fn failure_phrase(failure: &OpenFailure) -> String {
    match failure {
        OpenFailure::Rejected {
            code: Some(code), ..
        } => code.phrase().to_owned(),
        OpenFailure::Rejected { code: None, .. } => "rejected by host".to_owned(),
        OpenFailure::TimedOut => "timed out".to_owned(),
        OpenFailure::BridgeDown => "bridge down".to_owned(),
    }
}

/// The host's policy refused the destination (v2 code, or the v1 text every host sends).
fn not_allowed(failure: &OpenFailure) -> bool {
    match failure {
        OpenFailure::Rejected {
            code: Some(code), ..
        } => *code == OpenCode::NotAllowed,
        OpenFailure::Rejected {
            code: None,
            message,
        } => message == "host not allowed",
        _ => false,
    }
}

/// `403` naming the host and how the operator allows it.
pub(crate) fn forbidden(host: &str) -> Vec<u8> {
    text_response(
        "403 Forbidden",
        &format!(
            "crabbox egress: {host} is not on this egress session's allowlist; \
             the operator can allow it with `crabboxctl egress host --allow {host}` \
             (or a profile that lists it)"
        ),
    )
}

/// v1 answers the reference's exact bytes; v2 adds a short reason body.
fn bad_gateway(version: u8, failure: &OpenFailure) -> Vec<u8> {
    if version < 2 {
        return BAD_GATEWAY.to_vec();
    }
    let reason = match failure {
        OpenFailure::Rejected {
            code: Some(code),
            message,
        } if !message.is_empty() => format!("{code}: {message}"),
        other => failure_phrase(other),
    };
    text_response("502 Bad Gateway", &format!("crabbox egress: {reason}"))
}

async fn answer<S: AsyncWrite + Unpin>(sock: &mut S, bytes: &[u8]) {
    let _ = sock.write_all(bytes).await;
    let _ = sock.shutdown().await;
}

async fn read_head<S: AsyncRead + Unpin>(
    sock: &mut S,
    buf: &mut BytesMut,
    cap: usize,
) -> Result<(RequestHead, usize), HeadError> {
    // A head ends with a newline: parse again only after one arrived, so a
    // peer sending a byte at a time costs a scan of what it sent, not of the
    // whole buffer per byte.
    let mut newline = true;
    loop {
        if newline {
            match request::parse_head(buf) {
                Ok(Some(parsed)) => return Ok(parsed),
                Ok(None) => {}
                Err(_) => return Err(HeadError::Malformed),
            }
        }
        if buf.len() >= cap {
            return Err(HeadError::TooLarge);
        }
        let want = (cap - buf.len()).min(8192);
        buf.reserve(want);
        let before = buf.len();
        // The limit is what is left of the cap, so the buffer never exceeds it.
        let n = sock
            .read_buf(&mut (&mut *buf).limit(cap - before))
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Malformed
            });
        }
        newline = buf[before..].contains(&b'\n');
    }
}

#[allow(clippy::too_many_arguments)]
async fn proceed<L, S>(
    mut sock: L,
    mut stream: S,
    head: &RequestHead,
    action: Action,
    framing: BodyFraming,
    leftover: BytesMut,
    opts: RelayOpts,
    stats: &SessionStats,
) -> (u64, u64)
where
    L: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    match action {
        Action::Tunnel(_) => {
            // Nothing from the destination has been read yet (it waits in the
            // stream's queue), so the 200 line always comes first. If writing it
            // fails, `stream` is dropped and the host is told to close.
            if sock.write_all(CONNECT_OK).await.is_err() {
                return (0, 0);
            }
            if !leftover.is_empty() {
                if stream.write_all(&leftover).await.is_err() {
                    return (0, 0);
                }
                stats.add_out(leftover.len());
            }
            relay(sock, stream, opts, stats).await
        }
        Action::Forward {
            path, host_header, ..
        } => {
            let rewritten = head.rewrite_origin_form(&path, &host_header);
            let idle = opts.idle_timeout;
            forward_one(sock, stream, rewritten, framing, leftover, idle, stats).await
        }
    }
}

/// Sends one request (head + exactly its body) and relays the response until
/// the destination closes (we asked for `Connection: close`), then closes.
/// Both directions silent for `idle` ends it, as for a tunnel: a destination
/// that accepts and never answers, or a browser that stops reading, holds
/// its socket no longer than that.
async fn forward_one<L, S>(
    sock: L,
    stream: S,
    head: Vec<u8>,
    framing: BodyFraming,
    leftover: BytesMut,
    idle: Duration,
    stats: &SessionStats,
) -> (u64, u64)
where
    L: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sr, mut sw) = tokio::io::split(stream);
    let (mut lr, mut lw) = tokio::io::split(sock);
    let activity = Activity::new();
    let upload = async {
        let mut sent = head.len() as u64;
        sw.write_all(&head).await?;
        activity.touch();
        sent += forward_body(&mut lr, &mut sw, framing, leftover, &activity).await?;
        sw.flush().await?;
        stats.add_out(sent as usize);
        Ok::<u64, std::io::Error>(sent)
    };
    let download = async {
        let n = copy_response(&mut sr, &mut lw, stats, &activity).await;
        let _ = lw.shutdown().await;
        n
    };
    let quiet = activity.idle(idle);
    tokio::pin!(upload, download, quiet);
    let mut up = 0;
    let down = loop {
        tokio::select! {
            res = &mut upload, if up == 0 => match res {
                Ok(n) => up = n.max(1),
                Err(_) => break 0,
            },
            n = &mut download => break n,
            () = &mut quiet => {
                debug!(idle = ?idle, "forwarded request idle; closing");
                break 0;
            }
        }
    };
    (up, down)
}

async fn forward_body<R, W>(
    lr: &mut R,
    sw: &mut W,
    framing: BodyFraming,
    mut pending: BytesMut,
    activity: &Activity,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    let mut sent = 0u64;
    match framing {
        BodyFraming::None => Ok(0),
        BodyFraming::Length(mut left) => {
            while left > 0 {
                if pending.is_empty() {
                    let n = lr.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
                let take = (left as usize).min(pending.len());
                sw.write_all(&pending[..take]).await?;
                activity.touch();
                pending.advance(take);
                left -= take as u64;
                sent += take as u64;
            }
            Ok(sent)
        }
        BodyFraming::Chunked => {
            let mut scanner = ChunkedScanner::new();
            loop {
                if pending.is_empty() {
                    let n = lr.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
                let end = scanner.feed(&pending).map_err(std::io::Error::other)?;
                let take = end.unwrap_or(pending.len());
                sw.write_all(&pending[..take]).await?;
                activity.touch();
                sent += take as u64;
                pending.advance(take);
                if end.is_some() {
                    return Ok(sent);
                }
            }
        }
    }
}

/// Copies the response, rewriting its head to say `Connection: close`
/// (the browser must not send a second request down this connection).
async fn copy_response<R, W>(
    sr: &mut R,
    lw: &mut W,
    stats: &SessionStats,
    activity: &Activity,
) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    const HEAD_CAP: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(8192);
    let mut total = 0u64;
    // Gather the response head, scanning each byte once (plus the three
    // before it, where an end split across reads starts).
    let mut scanned = 0usize;
    loop {
        let from = scanned.saturating_sub(3);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= HEAD_CAP {
            break;
        }
        scanned = buf.len();
        match sr.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => activity.touch(),
        }
    }
    stats.add_in(buf.len());
    total += buf.len() as u64;
    let out = rewrite_response_head(&buf).unwrap_or_else(|| buf.to_vec());
    if lw.write_all(&out).await.is_err() {
        return total;
    }
    let mut chunk = vec![0u8; 32 * 1024];
    loop {
        let n = match sr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lw.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        activity.touch();
        stats.add_in(n);
        total += n as u64;
    }
    total
}

fn rewrite_response_head(buf: &[u8]) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; request::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = resp.parse(buf).ok()? else {
        return None;
    };
    let mut out = Vec::with_capacity(buf.len() + 24);
    out.extend_from_slice(
        format!(
            "HTTP/1.{} {} {}\r\n",
            resp.version?,
            resp.code?,
            resp.reason.unwrap_or("")
        )
        .as_bytes(),
    );
    for h in resp.headers.iter() {
        let n = h.name.to_ascii_lowercase();
        if matches!(n.as_str(), "connection" | "keep-alive" | "proxy-connection") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&buf[len..]);
    Some(out)
}
