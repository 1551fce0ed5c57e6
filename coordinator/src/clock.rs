//! Wall-clock time for expiry decisions, injectable so tests can jump ahead.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// The coordinator's notion of "now", in Unix milliseconds.
///
/// It is the system clock plus an offset that only tests move. Everything
/// that compares against a deadline (ticket expiry, lease expiry, token
/// expiry) reads this clock, so a test can age a 120 s ticket without
/// waiting 120 s. Advancing wakes the expiry sweeper.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    inner: Arc<ClockInner>,
}

#[derive(Debug, Default)]
struct ClockInner {
    offset_ms: AtomicI64,
    advanced: Notify,
}

impl Clock {
    /// The system clock with no offset.
    pub fn system() -> Self {
        Self::default()
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        sys.as_millis() as i64 + self.inner.offset_ms.load(Ordering::Relaxed)
    }

    /// Move the clock forward (tests only need this; it is harmless in production).
    pub fn advance(&self, by: Duration) {
        self.inner
            .offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
        self.inner.advanced.notify_waiters();
    }

    /// Completes the next time [`Clock::advance`] is called.
    pub(crate) async fn advanced(&self) {
        self.inner.advanced.notified().await;
    }
}

/// Format Unix milliseconds like JavaScript's `Date.toISOString()`.
pub fn iso(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parse an ISO-8601/RFC 3339 timestamp into Unix milliseconds.
pub fn parse_iso(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trips() {
        let s = iso(1_700_000_000_123);
        assert_eq!(s, "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_iso(&s), Some(1_700_000_000_123));
    }
}
