//! A v2 stream whose open reply is read by its first reads, so a proxy may answer a `CONNECT` before the reply arrives, and the set of warm destinations that may be answered that early.
//!
//! Every v2 stream starts with the host's [`OpenReply`]. [`Bridge::open`]
//! waits for it before answering the browser: a refusal becomes a `403` or
//! `502`. That wait costs one round trip across the whole path (helper →
//! coordinator → host → destination and back) before the browser may send
//! its first byte, and a second round trip then carries the request. For a
//! destination that opened on this bridge within [`WARM_FOR`], the proxy may
//! instead answer `200` at once and let the browser's first bytes travel with
//! the open request: the host reads them only after its dial, and the reply
//! is read here, ahead of the destination's first byte. If the open fails
//! after all (the destination went away, the operator narrowed the
//! allowlist), the browser's connection is closed instead of answered, and
//! the destination is no longer warm, so the browser's retry gets the exact
//! answer.
//!
//! [`Bridge::open`]: super::Bridge::open

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::OpenFailure;
use crate::frame_v2::{OpenCode, OpenReply};
use crate::mux::MuxStream;

/// How long a destination stays warm after it last opened.
pub(crate) const WARM_FOR: Duration = Duration::from_secs(120);
/// Warm destinations remembered per bridge; the oldest makes room.
pub(crate) const WARM_MAX: usize = 256;

/// Destinations (`host`, `port`) that opened on this bridge recently, and
/// those that failed since (so a success of an older stream, read after the
/// failure, does not warm them again).
#[derive(Default)]
pub(crate) struct Warm {
    seen: HashMap<(String, u16), Seen>,
}

#[derive(Clone, Copy)]
enum Seen {
    Opened(Instant),
    Failed(Instant),
}

impl Seen {
    fn at(self) -> Instant {
        match self {
            Seen::Opened(at) | Seen::Failed(at) => at,
        }
    }
}

impl Warm {
    pub(crate) fn is_warm(&self, host: &str, port: u16, now: Instant) -> bool {
        matches!(
            self.seen.get(&(host.to_owned(), port)),
            Some(Seen::Opened(at)) if now.saturating_duration_since(*at) < WARM_FOR
        )
    }

    /// A stream started at `started` opened at `now`.
    pub(crate) fn opened(&mut self, host: &str, port: u16, started: Instant, now: Instant) {
        let key = (host.to_owned(), port);
        if let Some(Seen::Failed(at)) = self.seen.get(&key)
            && started <= *at
        {
            return;
        }
        self.record(key, Seen::Opened(now), now);
    }

    pub(crate) fn failed(&mut self, host: &str, port: u16, now: Instant) {
        self.record((host.to_owned(), port), Seen::Failed(now), now);
    }

    /// Every destination is cold again (a new host joined the bridge).
    pub(crate) fn clear(&mut self) {
        self.seen.clear();
    }

    fn record(&mut self, key: (String, u16), seen: Seen, now: Instant) {
        if !self.seen.contains_key(&key) && self.seen.len() >= WARM_MAX {
            self.seen
                .retain(|_, s| now.saturating_duration_since(s.at()) < WARM_FOR);
            if self.seen.len() >= WARM_MAX
                && let Some(oldest) = self
                    .seen
                    .iter()
                    .min_by_key(|(_, s)| s.at())
                    .map(|(k, _)| k.clone())
            {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(key, seen);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}

/// Told once how an early-answered open ended, if it failed (to count and log it).
pub(crate) type OnFailure = Box<dyn FnOnce(&OpenFailure) + Send>;

/// The reply being read: its bytes so far and the deadline.
struct Pending {
    reply: Vec<u8>,
    deadline: Pin<Box<Sleep>>,
    started: Instant,
    /// The warm set to tell (`None` while early answers are off).
    warm: Option<Arc<Mutex<Warm>>>,
    host: String,
    port: u16,
    on_failure: Option<OnFailure>,
}

enum State {
    Pending(Box<Pending>),
    Open,
    Failed,
}

/// A v2 stream: its open reply is read first (by [`V2Stream::poll_reply`],
/// or by the first reads), then bytes pass straight through. A stream dropped
/// before its reply was read (the browser left, the bridge ended) records
/// nothing: the destination stays as warm or cold as it was, and the host,
/// told by the stream's reset, closes its side.
pub(crate) struct V2Stream {
    stream: MuxStream,
    state: State,
}

impl V2Stream {
    /// A stream whose reply is still to come, due within `wait`.
    pub(crate) fn pending(
        stream: MuxStream,
        wait: Duration,
        warm: Option<Arc<Mutex<Warm>>>,
        host: &str,
        port: u16,
    ) -> V2Stream {
        V2Stream {
            stream,
            state: State::Pending(Box::new(Pending {
                reply: Vec::with_capacity(2),
                deadline: Box::pin(tokio::time::sleep(wait)),
                started: Instant::now(),
                warm,
                host: host.to_owned(),
                port,
                on_failure: None,
            })),
        }
    }

    /// Sets who is told if the reply, read later by this stream's reads, is a failure.
    pub(crate) fn on_failure(&mut self, f: OnFailure) {
        if let State::Pending(p) = &mut self.state {
            p.on_failure = Some(f);
        }
    }

    /// Reads the reply: `Ok` once the destination is open (at once if it
    /// already was). Reads exactly the reply, so the destination's bytes stay
    /// queued until the caller reads them.
    pub(crate) fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OpenFailure>> {
        let State::Pending(p) = &mut self.state else {
            return Poll::Ready(match self.state {
                State::Open => Ok(()),
                _ => Err(OpenFailure::BridgeDown),
            });
        };
        let res = loop {
            // Two bytes (code, message length), then the message.
            let want = if p.reply.len() < 2 {
                2
            } else {
                2 + p.reply[1] as usize
            };
            if p.reply.len() >= 2 && p.reply.len() == want {
                break decode(&p.reply);
            }
            let mut tmp = [0u8; 2 + u8::MAX as usize];
            let mut rb = ReadBuf::new(&mut tmp[..want - p.reply.len()]);
            // The read first, as `tokio::time::timeout` does: a reply already
            // there wins over a deadline passed meanwhile.
            match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    break Err(OpenFailure::BridgeDown);
                }
                Poll::Ready(Ok(())) => p.reply.extend_from_slice(rb.filled()),
                Poll::Ready(Err(_)) => break Err(OpenFailure::BridgeDown),
                Poll::Pending => {
                    ready!(p.deadline.as_mut().poll(cx));
                    break Err(OpenFailure::TimedOut);
                }
            }
        };
        let State::Pending(p) = std::mem::replace(
            &mut self.state,
            if res.is_ok() {
                State::Open
            } else {
                State::Failed
            },
        ) else {
            unreachable!("checked above")
        };
        let now = Instant::now();
        match &res {
            Ok(()) => {
                if let Some(warm) = &p.warm {
                    warm.lock().unwrap().opened(&p.host, p.port, p.started, now);
                }
            }
            Err(failure) => {
                if let Some(warm) = &p.warm {
                    warm.lock().unwrap().failed(&p.host, p.port, now);
                }
                if let Some(f) = p.on_failure {
                    f(failure);
                }
            }
        }
        Poll::Ready(res)
    }
}

fn decode(whole: &[u8]) -> Result<(), OpenFailure> {
    match OpenReply::decode(whole) {
        Ok(Some((reply, _))) if reply.code == OpenCode::Ok => Ok(()),
        Ok(Some((reply, _))) => Err(OpenFailure::Rejected {
            code: Some(reply.code),
            message: reply.message,
        }),
        _ => Err(OpenFailure::Rejected {
            code: None,
            message: "malformed open reply".into(),
        }),
    }
}

fn failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the host refused the open",
    )
}

impl AsyncRead for V2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) && ready!(this.poll_reply(cx)).is_err() {
            return Poll::Ready(Err(failed()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for V2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Before the reply, bytes go out behind the open request (the host
        // reads them only after its dial); after a refusal, nowhere.
        if matches!(this.state, State::Failed) {
            return Poll::Ready(Err(failed()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_warm_until_they_fail_or_age_out() {
        let mut w = Warm::default();
        let t = Instant::now();
        let s = Duration::from_secs(1);
        assert!(!w.is_warm("a.test", 443, t), "nothing is warm at first");
        w.opened("a.test", 443, t, t);
        assert!(w.is_warm("a.test", 443, t + s));
        assert!(!w.is_warm("a.test", 80, t), "the port is part of it");
        assert!(
            !w.is_warm("a.test", 443, t + WARM_FOR),
            "warm for WARM_FOR only"
        );
        w.failed("a.test", 443, t + s);
        assert!(
            !w.is_warm("a.test", 443, t + s),
            "a failure cools it at once"
        );
        w.opened("a.test", 443, t, t + 2 * s);
        assert!(
            !w.is_warm("a.test", 443, t + 2 * s),
            "a stream started before the failure does not warm it again"
        );
        w.opened("a.test", 443, t + 2 * s, t + 3 * s);
        assert!(
            w.is_warm("a.test", 443, t + 3 * s),
            "one started after it does"
        );
        w.clear();
        assert!(!w.is_warm("a.test", 443, t + 3 * s));
    }

    #[test]
    fn the_warm_set_is_bounded_and_the_oldest_makes_room() {
        let mut w = Warm::default();
        let t = Instant::now();
        for i in 0..WARM_MAX + 50 {
            let at = t + Duration::from_millis(i as u64);
            w.opened(&format!("h{i}.test"), 443, at, at);
        }
        assert_eq!(w.len(), WARM_MAX);
        assert!(!w.is_warm("h0.test", 443, t + Duration::from_secs(1)));
        let last = format!("h{}.test", WARM_MAX + 49);
        assert!(w.is_warm(&last, 443, t + Duration::from_secs(1)));
    }
}
