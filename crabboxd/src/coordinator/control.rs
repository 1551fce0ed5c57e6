//! The control WebSocket's wire shapes (protocol doc §2): dialling
//! `/v1/control` with the normal auth headers, the JSON frames the daemon
//! sends, and the frames it understands, behind [`ControlSocket`] so the
//! task that owns the socket (`crate::control`) never sees the WebSocket
//! library or JSON.

use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{
    self, Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig,
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

/// A frame the daemon sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `heartbeat` for a lease, by its canonical id; `idleTimeoutSeconds`
    /// only for an explicit override, as the reference CLI sends it.
    Heartbeat {
        /// The canonical lease id.
        lease: String,
        /// The idle-timeout override in seconds.
        idle_override_secs: Option<u64>,
    },
    /// `subscribe_run`: a page of events after `after`, and live pushes
    /// from then on.
    Subscribe {
        /// The run.
        run: String,
        /// The cursor.
        after: u64,
        /// The page size.
        limit: u32,
    },
    /// `ack`: moves this socket's cursor for `run` to `seq`.
    Ack {
        /// The run.
        run: String,
        /// The sequence number.
        seq: u64,
    },
}

impl ClientFrame {
    /// The JSON text of the frame.
    pub fn to_json(&self) -> String {
        match self {
            ClientFrame::Heartbeat {
                lease,
                idle_override_secs,
            } => heartbeat_frame(lease, *idle_override_secs),
            ClientFrame::Subscribe { run, after, limit } => serde_json::json!(
                {"type": "subscribe_run", "runID": run, "after": after, "limit": limit}
            )
            .to_string(),
            ClientFrame::Ack { run, seq } => {
                serde_json::json!({"type": "ack", "runID": run, "seq": seq}).to_string()
            }
        }
    }
}

fn heartbeat_frame(lease: &str, idle_override_secs: Option<u64>) -> String {
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

/// What the control socket delivered.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A JSON frame.
    Frame(ServerFrame),
    /// Something that only proves the peer is alive (a pong, a ping, a
    /// frame that does not parse).
    Alive,
}

/// An open `/v1/control` socket. It hides the WebSocket library and the
/// JSON: the control task sends [`ClientFrame`]s and receives [`Inbound`]s.
pub struct ControlSocket {
    ws: Bridge,
}

impl std::fmt::Debug for ControlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSocket").finish_non_exhaustive()
    }
}

/// The sending half of a [`ControlSocket`].
pub struct ControlSender {
    sink: SplitSink<Bridge, Message>,
}

/// The receiving half of a [`ControlSocket`].
pub struct ControlReceiver {
    stream: SplitStream<Bridge>,
}

/// Why the control socket is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// The coordinator closed it (with the close frame, if any).
    #[error("control socket closed by the coordinator{0}")]
    Closed(String),
    /// The transport failed.
    #[error("control socket: {0}")]
    Transport(String),
}

impl ControlSocket {
    /// Splits the socket so reads and writes can be awaited together.
    pub fn split(self) -> (ControlSender, ControlReceiver) {
        let (sink, stream) = self.ws.split();
        (ControlSender { sink }, ControlReceiver { stream })
    }
}

impl ControlSender {
    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ControlSocketError> {
        self.sink
            .send(Message::text(frame.to_json()))
            .await
            .map_err(|e| ControlSocketError::Transport(e.to_string()))
    }

    /// Sends a WebSocket ping (the coordinator's WebSocket layer answers
    /// with a pong even when its handlers are busy).
    pub async fn ping(&mut self) -> Result<(), ControlSocketError> {
        self.sink
            .send(Message::Ping(Default::default()))
            .await
            .map_err(|e| ControlSocketError::Transport(e.to_string()))
    }

    /// Closes the socket politely.
    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}

impl ControlReceiver {
    /// The next thing the coordinator sent. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Inbound, ControlSocketError> {
        match self.stream.next().await {
            Some(Ok(Message::Text(text))) => {
                match serde_json::from_str::<ServerFrame>(text.as_str()) {
                    Ok(frame) => Ok(Inbound::Frame(frame)),
                    Err(e) => {
                        tracing::debug!(error = %e, "unparsable control frame ignored");
                        Ok(Inbound::Alive)
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => Err(ControlSocketError::Closed(
                frame
                    .map(|f| format!(": {} {:?}", u16::from(f.code), f.reason.as_str()))
                    .unwrap_or_default(),
            )),
            // Pings are answered by the library; pongs, pings and binary
            // frames only prove liveness.
            Some(Ok(_)) => Ok(Inbound::Alive),
            Some(Err(e)) => Err(ControlSocketError::Transport(e.to_string())),
            None => Err(ControlSocketError::Closed(String::new())),
        }
    }
}

impl Client {
    /// Opens `/v1/control` with the same headers as HTTP requests (it is
    /// not a bridge route: the coordinator authenticates it normally).
    pub async fn connect_control(&self) -> Result<ControlSocket, CoordinatorError> {
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
            Ok((ws, _)) => Ok(ControlSocket { ws }),
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
        let hb = |idle| ClientFrame::Heartbeat {
            lease: "cbx_1".into(),
            idle_override_secs: idle,
        };
        assert_eq!(
            hb(None).to_json(),
            r#"{"type":"heartbeat","leaseID":"cbx_1"}"#
        );
        assert_eq!(
            hb(Some(60)).to_json(),
            r#"{"type":"heartbeat","leaseID":"cbx_1","idleTimeoutSeconds":60}"#
        );
    }
}
