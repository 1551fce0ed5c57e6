//! The HTTP proxy: request-head parsing and rewriting ([`request`]), the chunked-body scanner (`chunked`), the loopback listen rule ([`listen`]), per-connection handling over any byte stream (`conn`) and serving without a bridge ([`local`]).

mod chunked;
mod conn;
pub mod listen;
pub mod local;
pub mod request;

pub(crate) use conn::{ConnLimits, ViaBridge, serve_connection};
pub use listen::{ListenError, validate_listen};
pub use local::{LocalConfig, LocalProxy, serve};

/// Exact answer to a successful `CONNECT` (byte-identical to the reference).
pub const CONNECT_OK: &[u8] =
    b"HTTP/1.1 200 Connection Established\r\nProxy-Agent: crabbox\r\n\r\n";
/// Exact answer to an unusable request.
pub const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\r\n";
/// Exact v1 answer to a failed open (the host's text never reaches the browser).
pub const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\n\r\n";
/// Answer when the request head did not arrive in time.
pub const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n";
/// Answer when the request head is over the size cap.
pub const HEAD_TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n";

/// A response with a short text body saying why (used for v2 502s and for 503s).
pub fn text_response(status: &str, reason: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
