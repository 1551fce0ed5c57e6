//! Bridge protocol v1: the reference's JSON text frames, plus the two JSON control frames (`hello`, `stats`) that v2 adds on the same wire.
//!
//! One JSON object per WebSocket text message. Keys are `type`, `id`, `host`,
//! `port`, `body`, `error`; every key is omitted when empty; `port` is a JSON
//! *string*; `body` is standard padded base64. Unknown `type`s decode to
//! [`TextFrame::Unknown`] and are ignored by both ends.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame_v2::{Hello, StatsFrame};

/// Largest stream payload we put in one v1 `data` frame (matches the reference's 32 KiB read chunk).
pub const V1_CHUNK: usize = 32 * 1024;

/// One decoded text frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextFrame {
    /// Client → host: open a TCP stream to `host:port`.
    Open {
        /// Opaque stream id chosen by the client.
        id: String,
        /// Destination host name or IP literal.
        host: String,
        /// Destination port, as the string the peer sent.
        port: String,
    },
    /// Host → client: the destination is connected.
    OpenOk {
        /// Stream id.
        id: String,
    },
    /// Host → client: the open failed; `error` is a short text.
    Error {
        /// Stream id.
        id: String,
        /// Why the open failed.
        error: String,
    },
    /// Either direction: stream bytes.
    Data {
        /// Stream id.
        id: String,
        /// Raw bytes (base64 on the wire).
        body: Bytes,
    },
    /// Either direction: tear the stream down.
    Close {
        /// Stream id.
        id: String,
    },
    /// v2 negotiation (ignored by reference peers as an unknown type).
    Hello(Hello),
    /// v2 counters.
    Stats(StatsFrame),
    /// Our own farewell before an orderly close (`{"type":"bye","error":"egress stopped"}`),
    /// so the other end can say why; reference peers ignore it.
    Bye {
        /// Why the sender is leaving.
        reason: String,
    },
    /// Any other `type`; ignored.
    Unknown(String),
}

/// Why a text message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a JSON object of the expected shape.
    #[error("bridge text frame is not valid JSON: {0}")]
    Json(String),
    /// A `data` frame whose body is not valid standard base64; the reference drops these silently.
    #[error("bridge data frame for {id:?} has an invalid base64 body")]
    BadBody {
        /// Stream id the frame named.
        id: String,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct Wire<'a> {
    #[serde(
        rename = "type",
        default,
        borrow,
        skip_serializing_if = "str::is_empty"
    )]
    kind: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    id: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    host: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<Port<'a>>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    body: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    error: Cow<'a, str>,
    // v2 control fields; Go's decoder ignores unknown keys, so reference peers are unaffected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    role: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    reply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<u64>,
    #[serde(rename = "bytesIn", default, skip_serializing_if = "Option::is_none")]
    bytes_in: Option<u64>,
    #[serde(rename = "bytesOut", default, skip_serializing_if = "Option::is_none")]
    bytes_out: Option<u64>,
}

/// The reference always sends `port` as a string; we also accept a number when decoding.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Port<'a> {
    Str(#[serde(borrow)] Cow<'a, str>),
    Num(u64),
}

impl Port<'_> {
    fn into_string(self) -> String {
        match self {
            Port::Str(s) => s.into_owned(),
            Port::Num(n) => n.to_string(),
        }
    }
}

/// Encodes a frame as the JSON text of one WebSocket message.
pub fn encode(frame: &TextFrame) -> String {
    let mut w = Wire::default();
    let body;
    match frame {
        TextFrame::Open { id, host, port } => {
            w.kind = "open".into();
            w.id = id.as_str().into();
            w.host = host.as_str().into();
            if !port.is_empty() {
                w.port = Some(Port::Str(port.as_str().into()));
            }
        }
        TextFrame::OpenOk { id } => {
            w.kind = "open_ok".into();
            w.id = id.as_str().into();
        }
        TextFrame::Error { id, error } => {
            w.kind = "error".into();
            w.id = id.as_str().into();
            w.error = error.as_str().into();
        }
        TextFrame::Data { id, body: raw } => {
            w.kind = "data".into();
            w.id = id.as_str().into();
            body = STANDARD.encode(raw);
            w.body = body.as_str().into();
        }
        TextFrame::Close { id } => {
            w.kind = "close".into();
            w.id = id.as_str().into();
        }
        TextFrame::Hello(h) => {
            w.kind = "hello".into();
            w.version = Some(h.version);
            w.role = h.role.as_str().into();
            w.reply = h.reply;
        }
        TextFrame::Stats(s) => {
            w.kind = "stats".into();
            w.active = Some(s.active);
            w.bytes_in = Some(s.bytes_in);
            w.bytes_out = Some(s.bytes_out);
        }
        TextFrame::Bye { reason } => {
            w.kind = "bye".into();
            w.error = reason.as_str().into();
        }
        TextFrame::Unknown(kind) => w.kind = kind.as_str().into(),
    }
    // Serialising a struct of strings and integers cannot fail.
    serde_json::to_string(&w).unwrap_or_default()
}

/// Decodes the JSON text of one WebSocket message.
pub fn decode(text: &str) -> Result<TextFrame, DecodeError> {
    // serde_json's message quotes the offending value (a peer's string of
    // any length): keep only what kind of error it was and where.
    let w: Wire<'_> = serde_json::from_str(text).map_err(|e| {
        DecodeError::Json(format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let id = w.id.into_owned();
    Ok(match &*w.kind {
        "open" => TextFrame::Open {
            id,
            host: w.host.into_owned(),
            port: w.port.map(Port::into_string).unwrap_or_default(),
        },
        "open_ok" => TextFrame::OpenOk { id },
        "error" => TextFrame::Error {
            id,
            error: w.error.into_owned(),
        },
        "data" => match STANDARD.decode(w.body.as_bytes()) {
            Ok(body) => TextFrame::Data {
                id,
                body: Bytes::from(body),
            },
            Err(_) => return Err(DecodeError::BadBody { id }),
        },
        "close" => TextFrame::Close { id },
        "hello" => TextFrame::Hello(Hello {
            version: w.version.unwrap_or(1),
            role: w.role.into_owned(),
            reply: w.reply,
        }),
        "stats" => TextFrame::Stats(StatsFrame {
            active: w.active.unwrap_or(0),
            bytes_in: w.bytes_in.unwrap_or(0),
            bytes_out: w.bytes_out.unwrap_or(0),
        }),
        "bye" => TextFrame::Bye {
            reason: w.error.chars().take(120).collect(),
        },
        other => TextFrame::Unknown(other.chars().take(32).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes_match_the_reference() {
        let open = TextFrame::Open {
            id: "c1".into(),
            host: "discord.com".into(),
            port: "443".into(),
        };
        assert_eq!(
            encode(&open),
            r#"{"type":"open","id":"c1","host":"discord.com","port":"443"}"#
        );
        let data = TextFrame::Data {
            id: "c1".into(),
            body: Bytes::from_static(b"hi"),
        };
        assert_eq!(encode(&data), r#"{"type":"data","id":"c1","body":"aGk="}"#);
        assert_eq!(
            encode(&TextFrame::OpenOk { id: "c1".into() }),
            r#"{"type":"open_ok","id":"c1"}"#
        );
        assert_eq!(
            encode(&TextFrame::Error {
                id: "c1".into(),
                error: "host not allowed".into()
            }),
            r#"{"type":"error","id":"c1","error":"host not allowed"}"#
        );
        // Empty fields are omitted, including an empty body.
        let empty = TextFrame::Data {
            id: "c1".into(),
            body: Bytes::new(),
        };
        assert_eq!(encode(&empty), r#"{"type":"data","id":"c1"}"#);
    }

    #[test]
    fn decoding_is_lenient_where_the_reference_is() {
        assert_eq!(
            decode(r#"{"type":"open","id":"x","host":"a","port":443}"#).unwrap(),
            TextFrame::Open {
                id: "x".into(),
                host: "a".into(),
                port: "443".into()
            }
        );
        assert_eq!(
            decode(r#"{"type":"wat","extra":[1]}"#).unwrap(),
            TextFrame::Unknown("wat".into())
        );
        assert_eq!(
            decode(r#"{"type":"data","id":"x","body":"!!"}"#),
            Err(DecodeError::BadBody { id: "x".into() })
        );
        assert!(matches!(decode("not json"), Err(DecodeError::Json(_))));
        // A wrong type names the value in serde_json's own message: ours does not.
        let secretish = "x".repeat(10_000);
        let Err(DecodeError::Json(e)) =
            decode(&format!(r#"{{"type":"hello","version":"{secretish}"}}"#))
        else {
            panic!("a string version must not decode");
        };
        assert!(!e.contains("xxxx") && e.len() < 100, "{e}");
        assert_eq!(
            decode(r#"{"type":"data","id":"x"}"#).unwrap(),
            TextFrame::Data {
                id: "x".into(),
                body: Bytes::new()
            }
        );
    }
}
