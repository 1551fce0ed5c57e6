//! Copies bytes both ways between a local socket and a bridge stream, counting them, with an idle timeout and either v2 half-close or v1 whole-close semantics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::stats::SessionStats;

/// First read buffer of each direction: small, so the many short-lived or
/// idle streams hold little.
const FIRST_CHUNK: usize = 8 * 1024;
/// A direction whose reads keep filling its buffer doubles it up to this:
/// bulk moves in fewer reads, writes and frames, and a stream holds at most
/// 2 × 32 KiB of relay buffer however long it lives (512 busy connections:
/// 32 MiB), the bound docs/security.md lists.
pub(crate) const MAX_CHUNK: usize = 32 * 1024;

/// Reads once into `buf`; `None` at EOF or on an error.
async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Option<usize> {
    match r.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

fn grow(buf: &mut Vec<u8>, n: usize) {
    if n == buf.len() && buf.len() < MAX_CHUNK {
        buf.resize(buf.len() * 2, 0);
    }
}

/// How a relay behaves at the end of one direction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayOpts {
    /// v2: EOF in one direction shuts down that direction only. v1: EOF ends both.
    pub half_close: bool,
    /// Both directions silent this long ends the stream.
    pub idle_timeout: Duration,
}

/// When either direction of an exchange last moved a byte; [`Activity::idle`]
/// resolves once neither has for a given time.
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Records that bytes moved now.
    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    pub(crate) async fn idle(&self, idle: Duration) {
        loop {
            let seen = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = self.start + seen + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Relays until both directions end (or one, without half-close), the idle
/// timeout passes, or an I/O error occurs. `local` is the TCP socket;
/// `bridge` is the stream to the peer (its reads count as bytes in).
pub(crate) async fn relay<L, B>(
    local: L,
    bridge: B,
    opts: RelayOpts,
    stats: &SessionStats,
) -> (u64, u64)
where
    L: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut br, mut bw) = tokio::io::split(bridge);
    let activity = Activity::new();

    let up = async {
        let mut buf = vec![0u8; FIRST_CHUNK];
        let mut total = 0u64;
        loop {
            let Some(n) = read_chunk(&mut lr, &mut buf).await else {
                break;
            };
            if bw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            total += n as u64;
            stats.add_out(n);
            activity.touch();
            grow(&mut buf, n);
        }
        let _ = bw.shutdown().await;
        total
    };
    let down = async {
        let mut buf = vec![0u8; FIRST_CHUNK];
        let mut total = 0u64;
        loop {
            let Some(n) = read_chunk(&mut br, &mut buf).await else {
                break;
            };
            if lw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            total += n as u64;
            stats.add_in(n);
            activity.touch();
            grow(&mut buf, n);
        }
        let _ = lw.shutdown().await;
        total
    };
    let idle = activity.idle(opts.idle_timeout);

    tokio::pin!(up, down, idle);
    let (mut up_total, mut down_total) = (None, None);
    loop {
        tokio::select! {
            n = &mut up, if up_total.is_none() => {
                up_total = Some(n);
                if !opts.half_close || down_total.is_some() { break; }
            }
            n = &mut down, if down_total.is_none() => {
                down_total = Some(n);
                if !opts.half_close || up_total.is_some() { break; }
            }
            () = &mut idle => break,
        }
    }
    (up_total.unwrap_or(0), down_total.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_buffers_grow_while_reads_fill_them_and_stop_at_32_kib() {
        let mut buf = vec![0u8; FIRST_CHUNK];
        grow(&mut buf, 100);
        assert_eq!(
            buf.len(),
            FIRST_CHUNK,
            "a short read does not grow the buffer"
        );
        for _ in 0..16 {
            let n = buf.len();
            grow(&mut buf, n);
        }
        assert_eq!(buf.len(), 32 * 1024, "full reads grow it only to the cap");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_streams_time_out_and_traffic_resets_the_clock() {
        let (local, mut browser) = tokio::io::duplex(1024);
        let (bridge, _peer) = tokio::io::duplex(1024);
        let stats = SessionStats::new();
        let opts = RelayOpts {
            half_close: true,
            idle_timeout: Duration::from_secs(600),
        };
        let start = Instant::now();
        let relay = tokio::spawn(async move {
            let stats = stats;
            relay(local, bridge, opts, &stats).await
        });
        tokio::time::sleep(Duration::from_secs(500)).await;
        browser.write_all(b"keepalive").await.unwrap();
        let (up, down) = relay.await.unwrap();
        assert_eq!(
            (up, down),
            (0, 0),
            "totals of unfinished directions are not reported"
        );
        let idle_for = start.elapsed();
        assert!(
            idle_for >= Duration::from_secs(1100) && idle_for < Duration::from_secs(1200),
            "{idle_for:?}"
        );
    }
}
