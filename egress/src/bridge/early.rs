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

/// Destinations (`host`, `port`) that opened on this bridge recently.
#[derive(Default)]
pub(crate) struct Warm {
    opened: HashMap<(String, u16), Instant>,
}

impl Warm {
    pub(crate) fn is_warm(&self, host: &str, port: u16, now: Instant) -> bool {
        self.opened
            .get(&(host.to_owned(), port))
            .is_some_and(|at| now.saturating_duration_since(*at) < WARM_FOR)
    }

    pub(crate) fn opened(&mut self, host: &str, port: u16, now: Instant) {
        let key = (host.to_owned(), port);
        if !self.opened.contains_key(&key) && self.opened.len() >= WARM_MAX {
            self.opened
                .retain(|_, at| now.saturating_duration_since(*at) < WARM_FOR);
            if self.opened.len() >= WARM_MAX
                && let Some(oldest) = self
                    .opened
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone())
            {
                self.opened.remove(&oldest);
            }
        }
        self.opened.insert(key, now);
    }

    pub(crate) fn failed(&mut self, host: &str, port: u16) {
        self.opened.remove(&(host.to_owned(), port));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.opened.len()
    }
}

/// Told once how an early-answered open ended, if it failed (to count and log it).
pub(crate) type OnFailure = Box<dyn FnOnce(&OpenFailure) + Send>;

/// The reply being read: its bytes so far and the deadline.
struct Pending {
    reply: Vec<u8>,
    deadline: Pin<Box<Sleep>>,
    warm: Arc<Mutex<Warm>>,
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
/// or by the first reads), then bytes pass straight through.
pub(crate) struct V2Stream {
    stream: MuxStream,
    state: State,
}

impl V2Stream {
    /// A stream whose reply is still to come, due within `wait`.
    pub(crate) fn pending(
        stream: MuxStream,
        wait: Duration,
        warm: Arc<Mutex<Warm>>,
        host: &str,
        port: u16,
    ) -> V2Stream {
        V2Stream {
            stream,
            state: State::Pending(Box::new(Pending {
                reply: Vec::with_capacity(2),
                deadline: Box::pin(tokio::time::sleep(wait)),
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
            if p.deadline.as_mut().poll(cx).is_ready() {
                break Err(OpenFailure::TimedOut);
            }
            let mut tmp = [0u8; 2 + u8::MAX as usize];
            let mut rb = ReadBuf::new(&mut tmp[..want - p.reply.len()]);
            match ready!(Pin::new(&mut self.stream).poll_read(cx, &mut rb)) {
                Ok(()) if rb.filled().is_empty() => break Err(OpenFailure::BridgeDown),
                Ok(()) => p.reply.extend_from_slice(rb.filled()),
                Err(_) => break Err(OpenFailure::BridgeDown),
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
        let mut warm = p.warm.lock().unwrap();
        match &res {
            Ok(()) => warm.opened(&p.host, p.port, Instant::now()),
            Err(failure) => {
                warm.failed(&p.host, p.port);
                drop(warm);
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
        assert!(!w.is_warm("a.test", 443, t), "nothing is warm at first");
        w.opened("a.test", 443, t);
        assert!(w.is_warm("a.test", 443, t + Duration::from_secs(1)));
        assert!(!w.is_warm("a.test", 80, t), "the port is part of it");
        assert!(
            !w.is_warm("a.test", 443, t + WARM_FOR),
            "warm for WARM_FOR only"
        );
        w.failed("a.test", 443);
        assert!(!w.is_warm("a.test", 443, t), "a failure cools it at once");
    }

    #[test]
    fn the_warm_set_is_bounded_and_the_oldest_makes_room() {
        let mut w = Warm::default();
        let t = Instant::now();
        for i in 0..WARM_MAX + 50 {
            w.opened(
                &format!("h{i}.test"),
                443,
                t + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(w.len(), WARM_MAX);
        assert!(!w.is_warm("h0.test", 443, t + Duration::from_secs(1)));
        let last = format!("h{}.test", WARM_MAX + 49);
        assert!(w.is_warm(&last, 443, t + Duration::from_secs(1)));
    }
}
