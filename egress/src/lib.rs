//! Mediated egress data plane: the bridge protocol (v1 JSON, v2 yamux), the lease-side HTTP proxy and the host-side dialer with its allowlist.
//!
//! A browser inside a lease talks to a loopback HTTP proxy (the *client* end,
//! [`run_client`] / [`ProxyServer`]). Each proxied connection becomes a stream
//! over one WebSocket that the coordinator pairs with the operator's *host*
//! end ([`run_host`]), which checks the [`Policy`], resolves once, dials only
//! validated public addresses and relays bytes.
//!
//! # Layout
//!
//! * [`frame_v1`] — the reference's JSON text frames (`open`, `open_ok`, `data`, `close`, `error`).
//! * [`frame_v2`] — the `hello`/`stats` control frames and the binary open header of v2 streams.
//! * `bridge` — one WebSocket: negotiation, v1 stream registry, yamux session, keepalive.
//! * `stream_v1`, `mux`, `ws_io` — the two stream transports and the WebSocket plumbing below them.
//! * [`proxy`] — request-head parsing, CONNECT / absolute-form handling over any byte stream, loopback listen rule, and [`proxy::local::serve`]: one connection served with a direct policy-checked dial (no bridge).
//! * [`connect`] — the one bridge dialler both ends use, with its fatal/refused/retryable classification.
//! * [`client`] — the lease side: [`ProxyServer`], whose listener outlives any one bridge.
//! * [`host`] — the operator side: [`Policy`], public-address rules, resolve-and-pin dialer, [`run_host`].
//! * [`stats`] — per-session counters the daemon displays.
//! * [`error`] — [`BridgeError`] and its fatal/retryable classification.
//! * [`memory`] — an in-memory coordinator-like relay for tests and demos.
//!
//! The crate knows nothing of the daemon, gRPC or SSH. The wire format is
//! described in `docs/protocol.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bridge;
pub mod client;
pub mod connect;
pub mod error;
pub mod frame_v1;
pub mod frame_v2;
pub mod host;
pub mod memory;
mod mux;
pub mod proxy;
mod relay;
pub mod stats;
mod stream_v1;
mod ws_io;

pub use bridge::{BridgeConfig, Role};
pub use client::{ClientConfig, ProxyServer, run_client};
pub use connect::{BridgeSocket, ConnectError, connect_bridge};
pub use error::{BridgeError, ErrorClass, FatalReason};
pub use host::{HostConfig, Policy, PolicyBuilder, PolicyError, run_host};
pub use stats::{HostCount, PeerStats, SessionStats, StatsSnapshot};

/// The newest bridge protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 2;
