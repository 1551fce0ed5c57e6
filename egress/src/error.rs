//! Bridge errors and their one-time classification into fatal (stop supervising) and retryable (back off, reconnect).

use std::fmt;

/// Why a bridge ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The coordinator (or peer) closed the WebSocket with a close frame.
    #[error("bridge closed by coordinator: code {code} {reason:?}")]
    Closed {
        /// The WebSocket close code, e.g. 1011 or 1012.
        code: u16,
        /// The close reason text as sent (already sanitised by the coordinator).
        reason: String,
    },
    /// The WebSocket ended without a close frame (TCP reset, EOF).
    #[error("bridge connection lost")]
    ConnectionLost,
    /// A WebSocket or transport error.
    #[error("bridge transport error: {0}")]
    Transport(String),
    /// Nothing arrived from the coordinator within the keepalive deadline.
    #[error("bridge keepalive timed out (nothing received for {0:?})")]
    KeepaliveTimeout(std::time::Duration),
    /// The v2 multiplexer failed.
    #[error("bridge multiplexer error: {0}")]
    Mux(String),
}

/// Whether retrying with a fresh ticket for the same session can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Stop supervising this session and record why.
    Fatal(FatalReason),
    /// Back off and reconnect (same session id, fresh ticket).
    Retryable,
}

/// The terminal conditions a bridge close can signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalReason {
    /// `1012 replaced by a newer egress session/host/client`: another session or socket took over.
    Replaced,
    /// `1008 lease ended` / `1008 lease expired`: the lease is no longer live.
    LeaseEnded,
}

impl fmt::Display for FatalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FatalReason::Replaced => "egress session replaced",
            FatalReason::LeaseEnded => "lease ended",
        })
    }
}

impl BridgeError {
    /// Classifies the error once, for the supervisor's restart policy.
    ///
    /// The reference CLI treats only `1012` + "replaced by a newer egress" as
    /// fatal; the daemon design also ends every task of a lease on
    /// `1008 lease ended/expired`, because "lease end is one event". Grant
    /// revocations (`1008 … access revoked`) stay retryable: the next ticket
    /// mint answers 403/404/409 and that decides.
    pub fn class(&self) -> ErrorClass {
        match self {
            BridgeError::Closed { code, reason } => classify_close(*code, reason),
            _ => ErrorClass::Retryable,
        }
    }

    /// Shorthand for `matches!(self.class(), ErrorClass::Fatal(_))`.
    pub fn is_fatal(&self) -> bool {
        matches!(self.class(), ErrorClass::Fatal(_))
    }
}

/// Classifies a WebSocket close code and reason as seen on an egress socket.
pub fn classify_close(code: u16, reason: &str) -> ErrorClass {
    let reason = reason.to_ascii_lowercase();
    match code {
        1012 if reason.contains("replaced by a newer egress") => {
            ErrorClass::Fatal(FatalReason::Replaced)
        }
        1008 if reason.contains("lease ended") || reason.contains("lease expired") => {
            ErrorClass::Fatal(FatalReason::LeaseEnded)
        }
        _ => ErrorClass::Retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_classification_table() {
        let cases: &[(u16, &str, ErrorClass)] = &[
            (
                1012,
                "replaced by a newer egress session",
                ErrorClass::Fatal(FatalReason::Replaced),
            ),
            (
                1012,
                "replaced by a newer egress host",
                ErrorClass::Fatal(FatalReason::Replaced),
            ),
            (
                1012,
                "replaced by a newer egress client",
                ErrorClass::Fatal(FatalReason::Replaced),
            ),
            (
                1011,
                "replaced by a newer egress session",
                ErrorClass::Retryable,
            ),
            (1012, "coordinator restarted", ErrorClass::Retryable),
            (1012, "coordinator shutting down", ErrorClass::Retryable),
            (
                1008,
                "lease ended",
                ErrorClass::Fatal(FatalReason::LeaseEnded),
            ),
            (
                1008,
                "lease expired",
                ErrorClass::Fatal(FatalReason::LeaseEnded),
            ),
            (1008, "shared access revoked", ErrorClass::Retryable),
            (1011, "egress host disconnected", ErrorClass::Retryable),
            (
                1011,
                "egress session state lost; reconnect",
                ErrorClass::Retryable,
            ),
            (1000, "egress stopped", ErrorClass::Retryable),
        ];
        for (code, reason, want) in cases {
            assert_eq!(classify_close(*code, reason), *want, "{code} {reason}");
        }
        assert!(!BridgeError::ConnectionLost.is_fatal());
    }
}
