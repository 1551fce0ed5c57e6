//! The one bridge dialler, shared by the daemon's host end and the lease-side helper: builds the upgrade request with the ticket in a header (never the URL), falls back once to `Authorization: Bearer <ticket>` for older coordinators, and classifies a failure once as fatal, refused or retryable.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, protocol::WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::memory::ws_config;

/// A connected bridge WebSocket.
pub type BridgeSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a bridge upgrade failed, classified once for both ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// `404`, `409` or `410`: the lease is gone or the session was replaced. Stop.
    #[error("bridge upgrade refused with HTTP {0}: lease unavailable or session replaced")]
    Fatal(u16),
    /// `401`/`403` after the fallback: the ticket was spent, expired or refused; a fresh one is needed.
    #[error("bridge upgrade refused with HTTP {0}: the ticket was not accepted")]
    TicketRefused(u16),
    /// Network trouble, TLS, `429`/`5xx`: the same ticket may still work shortly.
    #[error("bridge upgrade failed: {0}")]
    Retryable(String),
    /// The URL or a header value is unusable (configuration).
    #[error("bridge upgrade cannot be built: {0}")]
    Invalid(String),
}

impl ConnectError {
    /// True for [`ConnectError::Fatal`] and [`ConnectError::Invalid`]: retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ConnectError::Fatal(_) | ConnectError::Invalid(_))
    }

    /// The HTTP status of a refused upgrade, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Fatal(s) | ConnectError::TicketRefused(s) => Some(*s),
            _ => None,
        }
    }
}

/// The WebSocket limits both ends use (16 MiB messages).
pub fn bridge_ws_config() -> WebSocketConfig {
    ws_config()
}

/// Dials `url` (`ws://…/v1/leases/{lease}/egress/{role}`) with `ticket` in
/// `X-Crabbox-Bridge-Ticket` (plus `Authorization: Bearer <coordinator_token>`
/// when given); on 401/403 retries once with `Authorization: Bearer <ticket>`.
pub async fn connect_bridge(
    url: &str,
    ticket: &str,
    coordinator_token: Option<&str>,
) -> Result<BridgeSocket, ConnectError> {
    match attempt(url, ticket, coordinator_token, false).await {
        Err(ConnectError::TicketRefused(_)) => attempt(url, ticket, None, true).await,
        other => other,
    }
}

fn secret_header(value: &str) -> Result<HeaderValue, ConnectError> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| ConnectError::Invalid("a credential is not a valid header value".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

async fn attempt(
    url: &str,
    ticket: &str,
    coordinator_token: Option<&str>,
    ticket_as_bearer: bool,
) -> Result<BridgeSocket, ConnectError> {
    let mut req = url
        .into_client_request()
        .map_err(|e| ConnectError::Invalid(format!("bad bridge URL: {e}")))?;
    let headers = req.headers_mut();
    if ticket_as_bearer {
        headers.insert("authorization", secret_header(&format!("Bearer {ticket}"))?);
    } else {
        if let Some(token) = coordinator_token {
            headers.insert("authorization", secret_header(&format!("Bearer {token}"))?);
        }
        headers.insert("x-crabbox-bridge-ticket", secret_header(ticket)?);
    }
    match tokio_tungstenite::connect_async_with_config(req, Some(bridge_ws_config()), true).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(classify_status(resp.status().as_u16())),
        Err(e) => Err(ConnectError::Retryable(e.to_string())),
    }
}

/// The classification of an upgrade's HTTP status, as the reference CLI does it.
pub fn classify_status(status: u16) -> ConnectError {
    match status {
        401 | 403 => ConnectError::TicketRefused(status),
        404 | 409 | 410 => ConnectError::Fatal(status),
        _ => ConnectError::Retryable(format!("HTTP {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classification() {
        assert!(classify_status(404).is_fatal());
        assert!(classify_status(409).is_fatal());
        assert!(classify_status(410).is_fatal());
        assert_eq!(classify_status(401), ConnectError::TicketRefused(401));
        assert!(!classify_status(503).is_fatal());
        assert!(!classify_status(429).is_fatal());
    }
}
