//! Proxy request heads: parsing (httparse), the destination of `CONNECT` / absolute-form / origin-form requests, body framing, the origin-form rewrite, and a chunked-body boundary scanner.

use std::net::Ipv6Addr;

pub use super::chunked::{ChunkError, ChunkedScanner};

/// Most headers accepted in one request head.
pub const MAX_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method as sent (`CONNECT`, `GET`, …).
    pub method: String,
    /// Request target as sent.
    pub target: String,
    /// Minor HTTP version (0 or 1).
    pub version: u8,
    /// Header names and raw values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Lowercased host name or IP literal (no brackets).
    pub host: String,
    /// Port, 1–65535.
    pub port: u16,
}

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `CONNECT host:port`: answer 200 and tunnel.
    Tunnel(Destination),
    /// Any other method: forward one request in origin-form, then close.
    Forward {
        /// Destination.
        dest: Destination,
        /// Origin-form target (`/path?query`).
        path: String,
        /// `Host` value to send.
        host_header: String,
    },
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request the proxy answers with `400 Bad Request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not an HTTP/1.x request head.
    #[error("malformed request head")]
    Malformed,
    /// No usable host or port.
    #[error("request has no usable destination")]
    BadDestination,
    /// A scheme other than http/https in absolute-form.
    #[error("unsupported scheme in request target")]
    UnsupportedScheme,
    /// Conflicting or invalid body framing (a request-smuggling risk).
    #[error("ambiguous request body framing")]
    BadFraming,
}

/// Parses a request head from the front of `buf`. `Ok(None)`: incomplete.
/// On success also returns the head's length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let head = RequestHead {
                method: req.method.ok_or(RequestError::Malformed)?.to_owned(),
                target: req.path.ok_or(RequestError::Malformed)?.to_owned(),
                version: req.version.ok_or(RequestError::Malformed)?,
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect(),
            };
            Ok(Some((head, len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(RequestError::Malformed),
    }
}

impl RequestHead {
    /// First value of header `name` (case-insensitive), as UTF-8 if it is.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Decides what to do with the request.
    pub fn action(&self) -> Result<Action, RequestError> {
        if self.method.eq_ignore_ascii_case("CONNECT") {
            return Ok(Action::Tunnel(parse_authority(&self.target, None)?));
        }
        let target = self.target.as_str();
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        let (default_port, rest) = if lower.starts_with("http://") {
            (80, &target[7..])
        } else if lower.starts_with("https://") {
            (443, &target[8..])
        } else if target.starts_with('/') {
            // Origin-form: the destination comes from Host.
            let host = self
                .header("host")
                .ok_or(RequestError::BadDestination)?
                .trim();
            let dest = parse_authority(host, Some(80))?;
            return Ok(Action::Forward {
                dest,
                path: target.to_owned(),
                host_header: host.to_owned(),
            });
        } else if target.contains("://") {
            return Err(RequestError::UnsupportedScheme);
        } else {
            return Err(RequestError::BadDestination);
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        let mut path = rest[end..].split('#').next().unwrap_or("").to_owned();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        let host_header = authority
            .rsplit_once('@')
            .map_or(authority, |(_, h)| h)
            .to_owned();
        let dest = parse_authority(authority, Some(default_port))?;
        Ok(Action::Forward {
            dest,
            path,
            host_header,
        })
    }

    /// How the body is delimited; conflicting framing is refused.
    pub fn body_framing(&self) -> Result<BodyFraming, RequestError> {
        let te: Vec<&[u8]> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .map(|(_, v)| v.as_slice())
            .collect();
        let cl: Vec<&[u8]> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_slice())
            .collect();
        if !te.is_empty() {
            if !cl.is_empty() {
                return Err(RequestError::BadFraming);
            }
            let last = te
                .last()
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or("");
            let last = last.rsplit(',').next().unwrap_or("").trim();
            return if last.eq_ignore_ascii_case("chunked") {
                Ok(BodyFraming::Chunked)
            } else {
                Err(RequestError::BadFraming)
            };
        }
        let mut len = None;
        for v in cl {
            let n: u64 = std::str::from_utf8(v)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or(RequestError::BadFraming)?;
            if len.is_some_and(|l| l != n) {
                return Err(RequestError::BadFraming);
            }
            len = Some(n);
        }
        Ok(match len {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        })
    }

    /// Serialises the head in origin-form for the destination: hop-by-hop and
    /// proxy headers dropped, `Host` set, and `Connection: close` so the
    /// response's end is the stream's end.
    pub fn rewrite_origin_form(&self, path: &str, host_header: &str) -> Vec<u8> {
        let mut listed: Vec<String> = Vec::new();
        for (n, v) in &self.headers {
            if (n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("proxy-connection"))
                && let Ok(v) = std::str::from_utf8(v)
            {
                listed.extend(
                    v.split(',')
                        .map(|t| t.trim().to_ascii_lowercase())
                        .filter(|t| !t.is_empty()),
                );
            }
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(host_header.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (n, v) in &self.headers {
            let lower = n.to_ascii_lowercase();
            let hop = matches!(
                lower.as_str(),
                "host"
                    | "connection"
                    | "proxy-connection"
                    | "keep-alive"
                    | "proxy-authorization"
                    | "te"
                    | "upgrade"
            );
            if hop || listed.contains(&lower) {
                continue;
            }
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out
    }
}

/// Parses `host:port` (`[v6]:port`, optional `user@`), lowercasing the host.
/// `default_port` applies when the port is absent; `None` makes it required.
pub fn parse_authority(
    authority: &str,
    default_port: Option<u16>,
) -> Result<Destination, RequestError> {
    let bad = RequestError::BadDestination;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(bad.clone())?;
        v6.parse::<Ipv6Addr>().map_err(|_| bad.clone())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(bad.clone())?),
        };
        (v6, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err(bad),
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => {
            let n: u16 = p.parse().map_err(|_| bad.clone())?;
            if n == 0 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad);
            }
            n
        }
        None => default_port.ok_or(bad.clone())?,
    };
    let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':');
    if host.is_empty() || host.len() > 253 || !host.bytes().all(valid) {
        return Err(bad);
    }
    Ok(Destination {
        host: host.to_ascii_lowercase(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> RequestHead {
        parse_head(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn destinations() {
        let connect = head("CONNECT Discord.COM:443 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            connect.action().unwrap(),
            Action::Tunnel(Destination {
                host: "discord.com".into(),
                port: 443
            })
        );
        assert_eq!(
            head("CONNECT discord.com HTTP/1.1\r\n\r\n").action(),
            Err(RequestError::BadDestination)
        );
        assert_eq!(
            head("CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")
                .action()
                .unwrap(),
            Action::Tunnel(Destination {
                host: "::1".into(),
                port: 8443
            })
        );
        let abs = head("GET http://u@Example.com:8080/a?b=1#frag HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(
            abs.action().unwrap(),
            Action::Forward {
                dest: Destination {
                    host: "example.com".into(),
                    port: 8080
                },
                path: "/a?b=1".into(),
                host_header: "Example.com:8080".into()
            }
        );
        let q = head("GET http://example.com?x HTTP/1.1\r\n\r\n");
        assert!(matches!(q.action().unwrap(), Action::Forward { path, .. } if path == "/?x"));
        let https = head("GET https://example.com HTTP/1.1\r\n\r\n");
        assert!(
            matches!(https.action().unwrap(), Action::Forward { dest, .. } if dest.port == 443)
        );
        let origin = head("GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert!(
            matches!(origin.action().unwrap(), Action::Forward { dest, .. } if dest.port == 80)
        );
        assert_eq!(
            head("GET /x HTTP/1.1\r\n\r\n").action(),
            Err(RequestError::BadDestination)
        );
        assert_eq!(
            head("GET ftp://x/ HTTP/1.1\r\n\r\n").action(),
            Err(RequestError::UnsupportedScheme)
        );
        assert_eq!(
            head("CONNECT a:0 HTTP/1.1\r\n\r\n").action(),
            Err(RequestError::BadDestination)
        );
        assert_eq!(
            head("CONNECT a:99999 HTTP/1.1\r\n\r\n").action(),
            Err(RequestError::BadDestination)
        );
        assert!(parse_head(b"CONNECT a b:1 HTTP/1.1\r\n\r\n").is_err());
        assert_eq!(
            head("CONNECT a_b!:1 HTTP/1.1\r\n\r\n").action(),
            Err(RequestError::BadDestination)
        );
    }

    #[test]
    fn framing_refuses_ambiguity() {
        let h = head("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body_framing(), Err(RequestError::BadFraming));
        let h = head("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert_eq!(h.body_framing(), Err(RequestError::BadFraming));
        let h = head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.body_framing(), Ok(BodyFraming::Chunked));
        let h = head("POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(h.body_framing(), Ok(BodyFraming::Length(7)));
        assert_eq!(
            head("GET / HTTP/1.1\r\n\r\n").body_framing(),
            Ok(BodyFraming::None)
        );
    }

    #[test]
    fn rewrite_drops_proxy_headers() {
        let h = head(
            "GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nProxy-Connection: keep-alive\r\n\
             Proxy-Authorization: Basic xyz\r\nConnection: X-Drop\r\nX-Drop: 1\r\nAccept: */*\r\n\r\n",
        );
        let out = String::from_utf8(h.rewrite_origin_form("/x", "a.example")).unwrap();
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }
}
