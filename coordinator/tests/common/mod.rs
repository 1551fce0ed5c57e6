//! Helpers shared by the coordinator's integration tests: HTTP calls, WebSocket clients.
#![allow(dead_code)]

use std::time::Duration;

use crabbox_coordinator::testing::TestCoordinator;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A reqwest client (rustls needs a process-wide provider even for plain HTTP).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// One JSON call; returns the status and the body (JSON, or a string if not JSON).
pub async fn call(
    http: &reqwest::Client,
    coord: &TestCoordinator,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http.request(method, format!("{}{}", coord.base_url, path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// Register a lease (`PUT /v1/leases/{id}/registration`) and return the lease JSON.
pub async fn register(
    http: &reqwest::Client,
    coord: &TestCoordinator,
    token: &str,
    id: &str,
    slug: &str,
    ttl: i64,
    idle: i64,
) -> Value {
    let body = json!({"provider":"ssh","target":"linux","host":"127.0.0.1","sshUser":"crab","sshPort":"22",
        "slug": slug, "ttlSeconds": ttl, "idleTimeoutSeconds": idle});
    let (status, v) = call(
        http,
        coord,
        "PUT",
        &format!("/v1/leases/{id}/registration"),
        Some(token),
        Some(body),
    )
    .await;
    assert!(
        status == 201 || status == 200,
        "register {id}: {status} {v}"
    );
    v["lease"].clone()
}

/// Mint an egress ticket; returns (status, body).
pub async fn ticket(
    http: &reqwest::Client,
    coord: &TestCoordinator,
    token: &str,
    lease: &str,
    role: &str,
    session: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({"role": role});
    if let Some(s) = session {
        body["sessionID"] = json!(s);
    }
    call(
        http,
        coord,
        "POST",
        &format!("/v1/leases/{lease}/egress/ticket"),
        Some(token),
        Some(body),
    )
    .await
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Open a WebSocket with extra headers.
pub async fn ws_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true).await?;
    Ok(ws)
}

/// HTTP status of a refused WebSocket handshake.
pub fn handshake_status(err: &tungstenite::Error) -> u16 {
    match err {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// Open a bridge with a ticket in `X-Crabbox-Bridge-Ticket`.
pub async fn bridge(coord: &TestCoordinator, lease: &str, role: &str, ticket: &str) -> Ws {
    let url = coord.ws_url(&format!("/v1/leases/{lease}/egress/{role}"));
    ws_connect(&url, &[("x-crabbox-bridge-ticket", ticket)])
        .await
        .expect("bridge upgrade")
}

/// Open the control socket as `token`.
pub async fn control(coord: &TestCoordinator, token: &str) -> Ws {
    let auth = format!("Bearer {token}");
    ws_connect(&coord.ws_url("/v1/control"), &[("authorization", &auth)])
        .await
        .expect("control upgrade")
}

/// Next data message (pings and pongs skipped), bounded by 10 s.
pub async fn next_msg(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("read error");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Next JSON text frame.
pub async fn next_json(ws: &mut Ws) -> Value {
    match next_msg(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Send a JSON text frame.
pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Wait for the server's close frame; returns (code, reason).
pub async fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match next_msg(ws).await {
            Message::Close(Some(f)) => return (u16::from(f.code), f.reason.to_string()),
            Message::Close(None) => return (1005, String::new()),
            _ => continue,
        }
    }
}

/// Wait until `f` is true, polling every 10 ms for up to 5 s.
pub async fn eventually<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(mut f: F) {
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

/// A data frame if one arrives within 100 ms, else `None`.
pub async fn next_msg_or_none(ws: &mut Ws) -> Option<Message> {
    match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        _ => None,
    }
}

/// The real `crabbox-coordinator` binary on `127.0.0.1:0` with a temporary
/// database, for tests that measure the process (`/proc/<pid>/status`, fds).
pub struct CoordinatorProcess {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    /// `CRABBOX_ADMIN_TOKEN`.
    pub admin_token: String,
    /// `CRABBOX_SESSION_SECRET`, for minting user tokens.
    pub session_secret: String,
    /// The log file (stderr of the process).
    pub log: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Start the binary with `CRABBOX_LOG=<filter>` and wait until it listens.
    pub fn start(filter: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("coordinator.log");
        let admin_token = format!("admin-{}", crabbox_coordinator::ids::uuid_v4());
        let session_secret = format!("session-{}", crabbox_coordinator::ids::uuid_v4());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_crabbox-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--db"])
            .arg(dir.path().join("c.db"))
            .env("CRABBOX_ADMIN_TOKEN", &admin_token)
            .env("CRABBOX_SESSION_SECRET", &session_secret)
            .env_remove("CRABBOX_SHARED_TOKEN")
            .env("CRABBOX_LOG", filter)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text
                .lines()
                .find(|l| l.contains("crabbox-coordinator listening"))
                .and_then(|l| l.split("listen=").nth(1))
            {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "coordinator never listened:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            base_url: format!("http://{addr}"),
            admin_token,
            session_secret,
            log,
            child,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.base_url.trim_start_matches("http://"))
    }

    /// A signed user token valid for a day.
    pub fn user_token(&self, owner: &str, org: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        crabbox_coordinator::auth::issue_user_token(
            &crabbox_coordinator::Secret::new(self.session_secret.clone()),
            owner,
            org,
            owner,
            now,
            86_400,
        )
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    /// Reset the peak-RSS counter (`VmHWM`) to the current RSS.
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").unwrap();
    }

    /// Open sockets of the process (`/proc/<pid>/fd` entries that are sockets).
    pub fn socket_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
            })
            .count()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// One JSON call against a base URL; returns the status and the body.
pub async fn call_url(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}
