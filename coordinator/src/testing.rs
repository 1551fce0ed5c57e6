//! An in-process coordinator for tests: bound to `127.0.0.1:0`, on a
//! temporary database, with known tokens, stopped when dropped.
//!
//! ```no_run
//! # async fn demo() {
//! use crabbox_coordinator::testing::TestCoordinator;
//! let coord = TestCoordinator::start().await;
//! let user = coord.user_token("alice@example.com", "acme", "alice");
//! // HTTP: format!("{}/v1/health", coord.base_url); WebSocket: coord.ws_url("/v1/control").
//! let coord = coord.restart().await; // same database, same port when it is free
//! # drop((coord, user));
//! # }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::issue_user_token;
use crate::{Clock, Config, Secret};

/// Owner pinned to [`TestCoordinator::shared_token`] callers.
pub const SHARED_OWNER: &str = "shared@example.com";
/// `CRABBOX_DEFAULT_ORG` of a test coordinator.
pub const DEFAULT_ORG: &str = "crabbox-test";

/// A running coordinator. Dropping it stops the server (without waiting);
/// [`TestCoordinator::stop`] stops it and waits.
pub struct TestCoordinator {
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// `CRABBOX_ADMIN_TOKEN`.
    pub admin_token: String,
    /// `CRABBOX_SHARED_TOKEN` (owner [`SHARED_OWNER`], org [`DEFAULT_ORG`]).
    pub shared_token: String,
    /// The clock the server uses; [`Clock::advance`] ages tickets and leases.
    pub clock: Clock,
    config: Config,
    dir: Arc<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestCoordinator {
    /// Start with the default test configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Start after letting `tweak` adjust the configuration (tokens, flags).
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut config = Config::new(dir.path().join("coordinator.db"));
        config.admin_token = Some(Secret::new(format!("admin-{}", crate::ids::uuid_v4())));
        config.shared_token = Some(Secret::new(format!("shared-{}", crate::ids::uuid_v4())));
        config.session_secret = Some(Secret::new(format!("session-{}", crate::ids::uuid_v4())));
        config.shared_owner = Some(SHARED_OWNER.to_owned());
        config.default_org = Some(DEFAULT_ORG.to_owned());
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::launch(config, dir, listener)
    }

    fn launch(config: Config, dir: Arc<tempfile::TempDir>, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::serve(config.clone(), listener, async move {
            let _ = rx.await;
        }));
        let expose = |s: &Option<Secret>| {
            s.as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_default()
        };
        Self {
            base_url: format!("http://{addr}"),
            addr,
            admin_token: expose(&config.admin_token),
            shared_token: expose(&config.shared_token),
            clock: config.clock.clone(),
            config,
            dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.config.db_path.clone()
    }

    /// A signed `cbxu_` token valid for one day.
    pub fn user_token(&self, owner: &str, org: &str, login: &str) -> String {
        self.user_token_with_ttl(owner, org, login, Duration::from_secs(86_400))
    }

    /// A signed `cbxu_` token issued now (by the server clock) with the given TTL.
    pub fn user_token_with_ttl(
        &self,
        owner: &str,
        org: &str,
        login: &str,
        ttl: Duration,
    ) -> String {
        let secret = self
            .config
            .session_secret
            .as_ref()
            .expect("session secret configured");
        issue_user_token(
            secret,
            owner,
            org,
            login,
            self.clock.now_ms() / 1000,
            ttl.as_secs() as i64,
        )
    }

    /// Register an `active` lease owned by `token`'s caller (`PUT
    /// /v1/leases/{id}/registration`, provider `ssh`, host 127.0.0.1, TTL 1 h,
    /// idle 30 min) and return the lease JSON. `id` should look like
    /// `cbx_` + 12 hex so runs accept it.
    pub async fn register_lease(
        &self,
        token: &str,
        id: &str,
        slug: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({
            "provider": "ssh", "target": "linux", "host": "127.0.0.1", "sshUser": "crabbox",
            "sshPort": "22", "slug": slug, "ttlSeconds": 3600, "idleTimeoutSeconds": 1800,
        });
        self.register_lease_with(token, id, &body).await
    }

    /// Registers lease `id` with a registration body of the caller's (a
    /// real sshd's host, user, ports and pinned key, say); the lease record.
    pub async fn register_lease_with(
        &self,
        token: &str,
        id: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, v) = self
            .request("PUT", &format!("/v1/leases/{id}/registration"), token, body)
            .await?;
        anyhow::ensure!(
            status == 200 || status == 201,
            "registration of {id} failed: {status} {v}"
        );
        Ok(v["lease"].clone())
    }

    /// One JSON request over a fresh HTTP/1.1 connection, without an HTTP
    /// client dependency: returns the status and the JSON body (`Null` if none).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        request_to(self.addr, method, path, token, body).await
    }

    /// Stop the server and wait for it to finish; returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner().await
    }

    async fn stop_inner(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    /// Stop and start again on the same database (and the same port when it
    /// can be bound again; otherwise a new port — read [`TestCoordinator::base_url`]).
    pub async fn restart(mut self) -> Self {
        self.stop_inner()
            .await
            .expect("coordinator stopped cleanly");
        let listener = match TcpListener::bind(self.addr).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1:0"),
        };
        Self::launch(self.config.clone(), self.dir.clone(), listener)
    }
}

/// One JSON request to any coordinator at `addr` (e.g. the binary started by
/// a test) over a fresh HTTP/1.1 connection; see [`TestCoordinator::request`].
pub async fn request_to(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &serde_json::Value,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // The server answers with Content-Length (no chunking) for JSON bodies.
    let v = serde_json::from_str(payload).unwrap_or(serde_json::Value::Null);
    Ok((status, v))
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
