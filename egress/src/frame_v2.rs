//! Bridge protocol v2 pieces of our own: the `hello`/`stats` JSON control frames and the binary open request/reply that starts every yamux stream.
//!
//! v2 carries a yamux session in WebSocket binary messages (see
//! `docs/protocol.md`). Each yamux stream opened by the client starts with an
//! [`OpenRequest`]; the host answers with one [`OpenReply`] and then both
//! directions carry raw stream bytes, with yamux's FIN as half-close.

use std::fmt;

/// The `hello` control frame: `{"type":"hello","version":2,"role":"client"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the sender speaks.
    pub version: u32,
    /// `"host"` or `"client"`.
    pub role: String,
    /// Set on the answer to a peer's `hello`, so two answers never bounce forever.
    pub reply: bool,
}

/// The `stats` control frame a v2 peer sends periodically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsFrame {
    /// Active streams at the sender.
    pub active: u64,
    /// Bytes the sender received over the bridge.
    pub bytes_in: u64,
    /// Bytes the sender sent over the bridge.
    pub bytes_out: u64,
}

/// First byte of every v2 open request; lets a future v3 change the layout.
pub const OPEN_MAGIC: u8 = 0x02;
/// Longest destination host name accepted (DNS limit).
pub const MAX_HOST_LEN: usize = 253;

/// A v2 stream's open request: `[0x02][port: u16 BE][len: u8][host: len bytes]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// Destination host (name or IP literal, no brackets).
    pub host: String,
    /// Destination port, 1–65535.
    pub port: u16,
}

/// Outcome codes of a v2 open; the text body of the lease-side 502 is derived from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpenCode {
    /// Connected; stream bytes follow.
    Ok = 0,
    /// The allowlist does not include the host.
    NotAllowed = 1,
    /// The host resolved only to non-public addresses (or none).
    NoPublicAddress = 2,
    /// Every connect attempt failed.
    ConnectFailed = 3,
    /// The 15 s resolve+connect budget ran out.
    TimedOut = 4,
    /// Malformed destination (bad port, empty host).
    BadRequest = 5,
    /// The host is at its concurrent-stream limit.
    Overloaded = 6,
}

impl OpenCode {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => OpenCode::Ok,
            1 => OpenCode::NotAllowed,
            2 => OpenCode::NoPublicAddress,
            3 => OpenCode::ConnectFailed,
            4 => OpenCode::TimedOut,
            5 => OpenCode::BadRequest,
            6 => OpenCode::Overloaded,
            _ => return None,
        })
    }

    /// The short phrase used in 502 bodies and logs.
    pub fn phrase(self) -> &'static str {
        match self {
            OpenCode::Ok => "ok",
            OpenCode::NotAllowed => "not allowed",
            OpenCode::NoPublicAddress => "no public address",
            OpenCode::ConnectFailed => "connect failed",
            OpenCode::TimedOut => "timed out",
            OpenCode::BadRequest => "bad destination",
            OpenCode::Overloaded => "too many streams",
        }
    }
}

impl fmt::Display for OpenCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.phrase())
    }
}

/// The host's answer: `[code: u8][len: u8][message: len bytes of UTF-8]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReply {
    /// Outcome.
    pub code: OpenCode,
    /// Human-readable detail (≤ 255 bytes; truncated on encode).
    pub message: String,
}

/// A malformed v2 open request or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V2Error {
    /// Wrong first byte.
    #[error("v2 open request has unknown magic {0:#04x}")]
    BadMagic(u8),
    /// Port 0.
    #[error("v2 open request has port 0")]
    BadPort,
    /// Empty host, or not printable ASCII.
    #[error("v2 open request has an invalid host")]
    BadHost,
    /// Unknown reply code.
    #[error("v2 open reply has unknown code {0}")]
    BadCode(u8),
    /// Reply message is not UTF-8.
    #[error("v2 open reply message is not UTF-8")]
    BadMessage,
}

impl OpenRequest {
    /// Encodes the request. Hosts longer than [`MAX_HOST_LEN`] are refused by the proxy before this point.
    pub fn encode(&self) -> Vec<u8> {
        let host = &self.host.as_bytes()[..self.host.len().min(MAX_HOST_LEN)];
        let mut out = Vec::with_capacity(4 + host.len());
        out.push(OPEN_MAGIC);
        out.extend_from_slice(&self.port.to_be_bytes());
        out.push(host.len() as u8);
        out.extend_from_slice(host);
        out
    }

    /// Decodes a request from the front of `buf`: `Ok(None)` means more bytes are needed.
    /// On success also returns how many bytes were consumed.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenRequest, usize)>, V2Error> {
        let Some(&magic) = buf.first() else {
            return Ok(None);
        };
        if magic != OPEN_MAGIC {
            return Err(V2Error::BadMagic(magic));
        }
        if buf.len() < 4 {
            return Ok(None);
        }
        let port = u16::from_be_bytes([buf[1], buf[2]]);
        if port == 0 {
            return Err(V2Error::BadPort);
        }
        let len = buf[3] as usize;
        if len == 0 || len > MAX_HOST_LEN {
            return Err(V2Error::BadHost);
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let host = &buf[4..4 + len];
        if !host.iter().all(|b| b.is_ascii_graphic()) {
            return Err(V2Error::BadHost);
        }
        let host = String::from_utf8(host.to_vec()).map_err(|_| V2Error::BadHost)?;
        Ok(Some((OpenRequest { host, port }, 4 + len)))
    }
}

impl OpenReply {
    /// Encodes the reply, truncating the message to 255 bytes on a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(255);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &self.message.as_bytes()[..end];
        let mut out = Vec::with_capacity(2 + msg.len());
        out.push(self.code as u8);
        out.push(msg.len() as u8);
        out.extend_from_slice(msg);
        out
    }

    /// Decodes a reply from the front of `buf`: `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenReply, usize)>, V2Error> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let code = OpenCode::from_u8(buf[0]).ok_or(V2Error::BadCode(buf[0]))?;
        let len = buf[1] as usize;
        if buf.len() < 2 + len {
            return Ok(None);
        }
        let message = std::str::from_utf8(&buf[2..2 + len]).map_err(|_| V2Error::BadMessage)?;
        Ok(Some((
            OpenReply {
                code,
                message: message.to_owned(),
            },
            2 + len,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_request_layout() {
        let req = OpenRequest {
            host: "a.b".into(),
            port: 443,
        };
        assert_eq!(req.encode(), vec![2, 1, 187, 3, b'a', b'.', b'b']);
        assert_eq!(OpenRequest::decode(&req.encode()[..5]), Ok(None));
        assert_eq!(OpenRequest::decode(&req.encode()), Ok(Some((req, 7))));
        assert_eq!(OpenRequest::decode(&[9]), Err(V2Error::BadMagic(9)));
        assert_eq!(
            OpenRequest::decode(&[2, 0, 0, 1, b'a']),
            Err(V2Error::BadPort)
        );
    }

    #[test]
    fn reply_truncates_on_char_boundary() {
        let reply = OpenReply {
            code: OpenCode::ConnectFailed,
            message: "é".repeat(200),
        };
        let enc = reply.encode();
        let (back, n) = OpenReply::decode(&enc).unwrap().unwrap();
        assert_eq!(n, enc.len());
        assert_eq!(back.message.len(), 254);
    }
}
