//! Shared test fixtures: loopback origins, a JSON-only v1 peer written from the spec, and helpers to pair our two ends through the in-memory relay.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crabbox_egress::memory::{MemoryRelay, MemoryWs};
use crabbox_egress::{
    BridgeConfig, BridgeError, ClientConfig, HostConfig, Policy, ProxyServer, Role, SessionStats,
    run_host,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

pub const WAIT: Duration = Duration::from_secs(10);

/// Policy that allows exactly the literal 127.0.0.1 (private, so the opt-in is on).
pub fn loopback_policy() -> Arc<Policy> {
    Arc::new(
        Policy::builder()
            .allow(["127.0.0.1"])
            .allow_private(true)
            .build()
            .unwrap(),
    )
}

/// Echo server; each connection echoes until EOF, then closes.
pub async fn echo_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `banner` on accept, then echoes.
pub async fn banner_origin(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(banner).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Accepts and holds connections without ever reading (a stalled destination).
/// A small receive buffer makes the stall bite quickly.
pub async fn stalled_origin() -> SocketAddr {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Writes endless data to every connection (a fast destination).
pub async fn firehose_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// A tiny HTTP/1.1 origin: answers every request with `origin=<name> path=<path>` and closes.
pub async fn http_origin(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&buf).to_string();
                let path = text.split(' ').nth(1).unwrap_or("?").to_owned();
                let body = format!("origin={name} path={path}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// Our host end and our client end, paired through a [`MemoryRelay`].
pub struct Pair {
    pub relay: MemoryRelay,
    pub proxy: Arc<ProxyServer>,
    pub proxy_addr: SocketAddr,
    pub host_stats: Arc<SessionStats>,
    pub host_task: JoinHandle<Result<(), BridgeError>>,
    pub client_task: JoinHandle<Result<(), BridgeError>>,
}

pub fn fast_bridge(mut cfg: BridgeConfig, v2: bool) -> BridgeConfig {
    cfg.enable_v2 = v2;
    cfg.stats_interval = Duration::from_millis(100);
    cfg
}

pub async fn spawn_host(
    relay: &MemoryRelay,
    v2: bool,
    policy: Arc<Policy>,
    stats: Arc<SessionStats>,
) -> JoinHandle<Result<(), BridgeError>> {
    let cfg = HostConfig {
        bridge: fast_bridge(BridgeConfig::host(), v2),
        stats,
        ..HostConfig::default()
    };
    spawn_host_with(relay, policy, cfg).await
}

pub async fn spawn_host_with(
    relay: &MemoryRelay,
    policy: Arc<Policy>,
    cfg: HostConfig,
) -> JoinHandle<Result<(), BridgeError>> {
    let ws = relay.connect(Role::Host).await;
    tokio::spawn(run_host(ws, policy, cfg))
}

pub async fn start_proxy(client_cfg: ClientConfig) -> (Arc<ProxyServer>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Arc::new(ProxyServer::start(listener, client_cfg).unwrap());
    let addr = proxy.local_addr();
    (proxy, addr)
}

pub fn attach(proxy: &Arc<ProxyServer>, ws: MemoryWs) -> JoinHandle<Result<(), BridgeError>> {
    let proxy = proxy.clone();
    tokio::spawn(async move { proxy.attach(ws).await })
}

/// Host joins first unless `client_first`.
pub async fn pair(host_v2: bool, client_v2: bool, client_first: bool) -> Pair {
    pair_on(MemoryRelay::new(), host_v2, client_v2, client_first).await
}

/// Like [`pair`], through a given relay (e.g. one that loses early frames).
pub async fn pair_on(
    relay: MemoryRelay,
    host_v2: bool,
    client_v2: bool,
    client_first: bool,
) -> Pair {
    let host_stats = Arc::new(SessionStats::new());
    let cfg = ClientConfig {
        bridge: fast_bridge(BridgeConfig::client(), client_v2),
        ..ClientConfig::default()
    };
    let (proxy, proxy_addr) = start_proxy(cfg).await;
    let (host_task, client_task);
    if client_first {
        client_task = attach(&proxy, relay.connect(Role::Client).await);
        wait_until(|| relay.is_connected(Role::Client)).await;
        host_task = spawn_host(&relay, host_v2, loopback_policy(), host_stats.clone()).await;
    } else {
        host_task = spawn_host(&relay, host_v2, loopback_policy(), host_stats.clone()).await;
        client_task = attach(&proxy, relay.connect(Role::Client).await);
    }
    // The relay sees the client as soon as it dials; the proxy serves only once
    // its attach task has taken the bridge, so wait for that too.
    wait_until(|| {
        relay.is_connected(Role::Client) && relay.is_connected(Role::Host) && proxy.is_bridged()
    })
    .await;
    Pair {
        relay,
        proxy,
        proxy_addr,
        host_stats,
        host_task,
        client_task,
    }
}

/// Polls `cond` every 10 ms for up to [`WAIT`] (state changes, not binding).
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Opens a proxy connection and sends a CONNECT; returns the socket and the response head.
pub async fn connect_via(proxy: SocketAddr, dest: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// Reads bytes one at a time up to the end of a response head (so nothing after it is consumed).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("response head timed out")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Connects to the proxy, sends `request` (a head and any bytes after it)
/// in one write and reads everything until the proxy closes.
pub async fn exchange(proxy: SocketAddr, request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_to_end(&mut s).await
}

/// [`exchange`] for an answer that is text.
pub async fn exchange_text(proxy: SocketAddr, request: &str) -> String {
    String::from_utf8(exchange(proxy, request).await).unwrap()
}

pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("read_to_end timed out")
        .unwrap();
    out
}

pub async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(got, msg);
}

/// A bridge peer that speaks only the reference's v1 JSON frames, written from
/// the protocol description with serde_json (not with our codec).
pub struct JsonPeer {
    pub ws: MemoryWs,
}

impl JsonPeer {
    pub async fn join(relay: &MemoryRelay, role: Role) -> JsonPeer {
        JsonPeer {
            ws: relay.connect(role).await,
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_data(&mut self, id: &str, bytes: &[u8]) {
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.send(json!({"type": "data", "id": id, "body": body}))
            .await;
    }

    /// Next frame a reference peer would act on (unknown types such as `hello` are skipped, as the reference does).
    /// Panics on a binary message: a v1 peer must never receive one.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame in time")
                .expect("socket ended")
                .unwrap();
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("non-JSON text frame");
                    match v["type"].as_str() {
                        Some("open" | "open_ok" | "error" | "data" | "close") => return v,
                        _ => continue,
                    }
                }
                Message::Binary(_) => panic!("a v1 peer received a binary frame"),
                Message::Close(f) => panic!("socket closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Next frame whose type is `kind` and (if given) whose id is `id`; data frames of other streams are skipped.
    pub async fn recv_kind(&mut self, kind: &str, id: Option<&str>) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind && id.is_none_or(|id| v["id"] == id) {
                return v;
            }
        }
    }

    pub fn decode_body(v: &Value) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(v["body"].as_str().unwrap_or(""))
            .unwrap()
    }
}
