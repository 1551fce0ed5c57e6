//! The control WebSocket's wire shapes (protocol doc §2): dialling
//! `/v1/control` with the normal auth headers, the JSON frames the daemon
//! sends, and the frames it understands. The task that owns the socket is
//! `crate::control`.

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{
    self, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig,
};

use super::{
    client::{Client, CoordinatorError},
    egress::Bridge,
};

/// The largest control message accepted. The reference CLI keeps its
/// library's 32 KiB default, which a page of 16 KiB events overflows; ours
/// is far above a full page (500 events × 2 × 16 KiB).
pub const MAX_CONTROL_MESSAGE: usize = 32 << 20;

/// A frame from the coordinator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Sent at once on accept.
    Hello {
        /// The control protocol (1).
        #[serde(default)]
        protocol: u32,
    },
    /// The answer to a `heartbeat`.
    Heartbeat {
        /// The lease.
        #[serde(rename = "leaseID", default)]
        lease_id: String,
        /// Whether it worked.
        #[serde(default)]
        ok: bool,
        /// The new expiry, when ok.
        #[serde(rename = "expiresAt", default)]
        expires_at: Option<String>,
        /// The error code, when not ok (`lease_ended`, `not_found`, …).
        #[serde(default)]
        error: Option<String>,
    },
    /// A page of run events, or one pushed event.
    RunEvents {
        /// The run.
        #[serde(rename = "runID", default)]
        run_id: String,
        /// The events.
        #[serde(default)]
        events: Vec<super::RunEvent>,
    },
    /// The answer to a `ping`.
    Pong,
    /// A protocol error.
    Error {
        /// The code.
        #[serde(default)]
        code: String,
        /// The message.
        #[serde(default)]
        message: String,
    },
    /// A frame this daemon does not know; ignored.
    #[serde(other)]
    Unknown,
}

/// A `heartbeat` frame: `idleTimeoutSeconds` only for an explicit override,
/// as the reference CLI sends it.
pub fn heartbeat_frame(lease: &str, idle_override_secs: Option<u64>) -> String {
    #[derive(Serialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(rename = "leaseID")]
        lease_id: &'a str,
        #[serde(rename = "idleTimeoutSeconds", skip_serializing_if = "Option::is_none")]
        idle: Option<u64>,
    }
    serde_json::to_string(&Frame {
        kind: "heartbeat",
        lease_id: lease,
        idle: idle_override_secs,
    })
    .expect("a heartbeat frame serialises")
}

/// A `subscribe_run` frame: a page of events after `after`, and live pushes
/// from then on.
pub fn subscribe_frame(run: &str, after: u64, limit: u32) -> String {
    serde_json::json!({"type": "subscribe_run", "runID": run, "after": after, "limit": limit})
        .to_string()
}

/// An `ack` frame: moves this socket's cursor for `run` to `seq`.
pub fn ack_frame(run: &str, seq: u64) -> String {
    serde_json::json!({"type": "ack", "runID": run, "seq": seq}).to_string()
}

impl Client {
    /// Opens `/v1/control` with the same headers as HTTP requests (it is
    /// not a bridge route: the coordinator authenticates it normally).
    pub async fn connect_control(&self) -> Result<Bridge, CoordinatorError> {
        const PATH: &str = "/v1/control";
        let mut url = self.base().clone();
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .expect("ws and wss are valid schemes");
        let url = format!("{}{}", url.as_str().trim_end_matches('/'), PATH);
        let mut req = url
            .into_client_request()
            .map_err(|e| CoordinatorError::Token(format!("bad control URL: {e}")))?;
        let invalid = |_| CoordinatorError::Token("a header value is invalid".into());
        if let Some(token) = self.bearer().await? {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(invalid)?,
            );
        }
        for (name, value) in self.identity_headers() {
            req.headers_mut()
                .insert(name, HeaderValue::from_str(value).map_err(invalid)?);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_CONTROL_MESSAGE))
            .max_frame_size(Some(MAX_CONTROL_MESSAGE));
        match tokio_tungstenite::connect_async_with_config(req, Some(config), true).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(resp)) => Err(CoordinatorError::Status {
                method: "GET",
                path: PATH.to_owned(),
                status: resp.status().as_u16(),
                code: format!("http_{}", resp.status().as_u16()),
                message: Some("control socket refused".into()),
            }),
            Err(e) => Err(CoordinatorError::Bridge {
                path: PATH.to_owned(),
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_frames() {
        let f: ServerFrame =
            serde_json::from_str(r#"{"type":"hello","protocol":1,"clientID":"x"}"#).unwrap();
        assert_eq!(f, ServerFrame::Hello { protocol: 1 });
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"heartbeat","leaseID":"cbx_1","ok":false,"error":"lease_ended"}"#,
        )
        .unwrap();
        assert!(
            matches!(f, ServerFrame::Heartbeat { ok: false, error: Some(e), .. } if e == "lease_ended")
        );
        let f: ServerFrame = serde_json::from_str(r#"{"type":"something_new","x":1}"#).unwrap();
        assert_eq!(f, ServerFrame::Unknown);
    }

    #[test]
    fn heartbeat_frame_omits_absent_override() {
        assert_eq!(
            heartbeat_frame("cbx_1", None),
            r#"{"type":"heartbeat","leaseID":"cbx_1"}"#
        );
        assert_eq!(
            heartbeat_frame("cbx_1", Some(60)),
            r#"{"type":"heartbeat","leaseID":"cbx_1","idleTimeoutSeconds":60}"#
        );
    }
}
