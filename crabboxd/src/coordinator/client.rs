//! `Client`: HTTP requests to one coordinator — headers per the reference
//! CLI (bearer token, owner/org, JSON content type), same-origin redirects,
//! and one error type that says whether retrying helps.

#![expect(
    clippy::disallowed_types,
    reason = "coordinator/ is the one module that speaks HTTP to the coordinator"
)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    token::TokenProvider,
    types::{EventsEnvelope, Lease, LeaseEnvelope, Run, RunEnvelope, RunEvent},
};
use crate::config::CoordinatorConfig;

/// A client of one coordinator.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: url::Url,
    token: TokenProvider,
    owner: Option<String>,
    org: Option<String>,
    /// What the user typed (an id or a slug) → the lease's canonical id.
    ids: Arc<Mutex<HashMap<String, String>>>,
}

/// How many names the canonical-id cache holds before it starts over.
const ID_CACHE: usize = 1024;

/// The answer of `GET /v1/health`.
#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    /// Always `true` from a healthy coordinator.
    pub ok: bool,
    /// `crabbox-coordinator` for the reference and for ours.
    #[serde(default)]
    pub service: String,
}

/// A failed coordinator call.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request did not complete (DNS, connect, TLS, timeout).
    #[error("coordinator {method} {path}: {source}")]
    Network {
        /// The method.
        method: &'static str,
        /// The path (never a query, which could hold a secret).
        path: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// The coordinator answered with a non-2xx status.
    #[error("coordinator {method} {path}: http {status}: {code}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The `error` field of the body (or `http_<status>`).
        code: String,
        /// The `message` field of the body, if any.
        message: Option<String>,
    },
    /// A bridge WebSocket could not be opened (network, TLS, protocol).
    #[error("coordinator bridge {path}: {message}")]
    Bridge {
        /// The path.
        path: String,
        /// What failed.
        message: String,
    },
    /// The call took longer than its own deadline (run events: 2 s).
    #[error("coordinator {method} {path}: no answer in time")]
    Timeout {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
    },
    /// The token command failed; no request was sent.
    #[error("coordinator token: {0}")]
    Token(String),
    /// The body was not the expected JSON.
    #[error("coordinator {method} {path}: unexpected response: {source}")]
    Decode {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
        /// The cause.
        source: reqwest::Error,
    },
}

/// What kind of failure a coordinator call had: the one classification
/// of HTTP codes, `error` fields and transport failures, so callers match
/// on kinds, never on status numbers or strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer, or an answer that says "try later": network, TLS,
    /// timeouts, 408, 429, 5xx. The only retryable kind.
    Unavailable,
    /// 404 or 410: the coordinator does not know the thing (or no longer).
    NotFound,
    /// 401, or the token command failed: no valid credentials.
    Unauthenticated,
    /// 403: the credentials lack the right.
    Forbidden,
    /// 400 or 422: the request was refused as invalid.
    Invalid,
    /// 409 `lease_ended` / `lease_expired`: the lease is over.
    LeaseEnded,
    /// Any other 409: the request conflicts with the current state.
    Conflict,
    /// Any other answer, or a body that was not the expected JSON.
    Other,
}

/// A failure reading a response body: JSON of the wrong shape is a
/// [`CoordinatorError::Decode`]; the connection failing or timing out while
/// the body arrives is a network failure, retried like one. (reqwest calls
/// both a decode error; only the first has serde's error as its cause.)
fn body_error(method: &'static str, path: &str, source: reqwest::Error) -> CoordinatorError {
    let path = path.to_owned();
    let mut cause = std::error::Error::source(&source);
    let mut json = false;
    while let Some(e) = cause {
        json |= e.is::<serde_json::Error>();
        cause = e.source();
    }
    if json {
        CoordinatorError::Decode {
            method,
            path,
            source,
        }
    } else {
        CoordinatorError::Network {
            method,
            path,
            source,
        }
    }
}

impl CoordinatorError {
    /// Classifies the failure (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoordinatorError::Network { .. }
            | CoordinatorError::Bridge { .. }
            | CoordinatorError::Timeout { .. } => ErrorKind::Unavailable,
            CoordinatorError::Token(_) => ErrorKind::Unauthenticated,
            CoordinatorError::Decode { .. } => ErrorKind::Other,
            CoordinatorError::Status { status, code, .. } => match *status {
                408 | 429 | 500.. => ErrorKind::Unavailable,
                404 | 410 => ErrorKind::NotFound,
                401 => ErrorKind::Unauthenticated,
                403 => ErrorKind::Forbidden,
                400 | 422 => ErrorKind::Invalid,
                409 if code == "lease_ended" || code == "lease_expired" => ErrorKind::LeaseEnded,
                409 => ErrorKind::Conflict,
                _ => ErrorKind::Other,
            },
        }
    }

    /// Whether retrying may help: network failures, 408, 429 and 5xx
    /// ([`ErrorKind::Unavailable`]). Everything else (403 forbidden, 404
    /// gone, 409 conflicts, 410) is fatal.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    /// Why the lease this call was about has ended for good, when the
    /// coordinator said so: `lease_ended`, `lease_expired`, or not found.
    pub fn lease_end(&self) -> Option<LeaseEnd> {
        match self {
            CoordinatorError::Status { status: 404, .. } => Some(LeaseEnd::NotFound),
            CoordinatorError::Status { code, .. } if code == "lease_ended" => Some(LeaseEnd::Ended),
            CoordinatorError::Status { code, .. } if code == "lease_expired" => {
                Some(LeaseEnd::Expired)
            }
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    message: Option<String>,
}

impl Client {
    /// Builds a client for `config`. Redirects are followed only within the
    /// coordinator's origin, as the reference CLI does, so a token is never
    /// sent to another host.
    pub fn new(config: &CoordinatorConfig) -> anyhow::Result<Self> {
        install_crypto_provider();
        let origin = config.url.origin();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else if attempt.url().origin() == origin {
                    attempt.follow()
                } else {
                    attempt.error("cross-origin redirect refused")
                }
            }))
            .user_agent(concat!("crabboxd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            base: config.url.clone(),
            token: TokenProvider::new(config.token.clone()),
            owner: config.owner.clone(),
            org: config.org.clone(),
            ids: Arc::default(),
        })
    }

    /// The canonical id of a lease named by id or slug: `GET /v1/leases/{name}`
    /// once, then from a cache (also filled by every lease record seen).
    pub async fn canonical_lease_id(&self, name: &str) -> Result<String, CoordinatorError> {
        if let Some(id) = self.ids.lock().unwrap().get(name) {
            return Ok(id.clone());
        }
        let lease = self.lease(name).await?;
        let id = lease.id.clone();
        self.ids.lock().unwrap().insert(name.to_owned(), id.clone());
        Ok(id)
    }

    /// The canonical id of `name` if it is already known (no request).
    pub fn known_lease_id(&self, name: &str) -> Option<String> {
        self.ids.lock().unwrap().get(name).cloned()
    }

    /// Forgets the names of an ended lease (a slug may be reused).
    pub fn forget_lease(&self, id: &str) {
        self.ids.lock().unwrap().retain(|_, v| v != id);
    }

    fn remember(&self, lease: &Lease) {
        if lease.id.is_empty() {
            return;
        }
        let mut ids = self.ids.lock().unwrap();
        if ids.len() >= ID_CACHE {
            ids.clear();
        }
        ids.insert(lease.id.clone(), lease.id.clone());
        if let Some(slug) = lease.slug.as_deref().filter(|s| !s.is_empty()) {
            ids.insert(slug.to_owned(), lease.id.clone());
        }
    }

    /// The base URL (it never holds credentials; config refuses them).
    pub fn base(&self) -> &url::Url {
        &self.base
    }

    /// `GET /v1/health` (unauthenticated), with a short timeout.
    pub async fn health(&self) -> Result<Health, CoordinatorError> {
        const PATH: &str = "/v1/health";
        let url = self.url(PATH);
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|source| CoordinatorError::Network {
                method: "GET",
                path: PATH.into(),
                source,
            })?;
        let resp = check_status(resp, "GET", PATH).await?;
        resp.json()
            .await
            .map_err(|source| body_error("GET", PATH, source))
    }

    /// `GET /v1/leases/{id}`.
    pub async fn lease(&self, id: &str) -> Result<Lease, CoordinatorError> {
        let path = format!("/v1/leases/{}", encode(id));
        let env: LeaseEnvelope = self.send("GET", &path, None::<&()>).await?;
        self.remember(&env.lease);
        Ok(env.lease)
    }

    /// `POST /v1/leases/{id}/heartbeat`. `idle_timeout` is sent only as an
    /// explicit override, as the reference CLI does; a plain touch omits it.
    pub async fn heartbeat(
        &self,
        id: &str,
        idle_timeout: Option<Duration>,
    ) -> Result<Lease, CoordinatorError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            #[serde(skip_serializing_if = "Option::is_none")]
            idle_timeout_seconds: Option<u64>,
        }
        let path = format!("/v1/leases/{}/heartbeat", encode(id));
        let body = Body {
            idle_timeout_seconds: idle_timeout.map(|d| d.as_secs().max(1)),
        };
        let env: LeaseEnvelope = self.send("POST", &path, Some(&body)).await?;
        self.remember(&env.lease);
        Ok(env.lease)
    }

    /// `POST /v1/leases/{id}/release` with `{"delete": …}`.
    pub async fn release(&self, id: &str, delete: bool) -> Result<Lease, CoordinatorError> {
        #[derive(Serialize)]
        struct Body {
            delete: bool,
        }
        let path = format!("/v1/leases/{}/release", encode(id));
        let env: LeaseEnvelope = self.send("POST", &path, Some(&Body { delete })).await?;
        Ok(env.lease)
    }

    /// `GET /v1/runs/{id}`.
    pub async fn run(&self, id: &str) -> Result<Run, CoordinatorError> {
        let path = format!("/v1/runs/{}", encode(id));
        let env: RunEnvelope = self.send("GET", &path, None::<&()>).await?;
        Ok(env.run)
    }

    /// `GET /v1/runs/{id}/events?after=&limit=`: events with `seq > after`,
    /// ascending, at most `limit` (the coordinator caps it at 500).
    pub async fn run_events(
        &self,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<RunEvent>, CoordinatorError> {
        let path = format!("/v1/runs/{}/events?after={after}&limit={limit}", encode(id));
        let env: EventsEnvelope = self.send("GET", &path, None::<&()>).await?;
        Ok(env.events)
    }

    /// Sends one authenticated request and decodes the JSON answer. A body,
    /// when present, always goes with `Content-Type: application/json`: the
    /// reference coordinator ignores bodies without it.
    pub(super) async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CoordinatorError> {
        let mut req = match method {
            "GET" => self.http.get(self.url(path)),
            "PUT" => self.http.put(self.url(path)),
            _ => self.http.post(self.url(path)),
        }
        .timeout(Duration::from_secs(30));
        if let Some(token) = self.bearer().await? {
            req = req.bearer_auth(token.expose());
        }
        for (name, value) in self.identity_headers() {
            req = req.header(name, value);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| CoordinatorError::Network {
                method,
                path: path.to_owned(),
                source,
            })?;
        let resp = check_status(resp, method, path).await?;
        resp.json()
            .await
            .map_err(|source| body_error(method, path, source))
    }

    /// `X-Crabbox-Owner` / `X-Crabbox-Org`, when configured.
    pub(super) fn identity_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("x-crabbox-owner", &self.owner),
            ("x-crabbox-org", &self.org),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_deref().map(|v| (name, v)))
    }

    /// The coordinator token for this request, if one is configured.
    pub(super) async fn bearer(&self) -> Result<Option<crate::config::Secret>, CoordinatorError> {
        self.token.token().await.map_err(CoordinatorError::Token)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base.as_str().trim_end_matches('/'), path)
    }
}

async fn check_status(
    resp: reqwest::Response,
    method: &'static str,
    path: &str,
) -> Result<reqwest::Response, CoordinatorError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body: Option<ErrorBody> = resp.json().await.ok();
    let (code, message) = match body {
        Some(ErrorBody { error, message }) => (
            error.unwrap_or_else(|| format!("http_{}", status.as_u16())),
            message,
        ),
        None => (format!("http_{}", status.as_u16()), None),
    };
    Err(CoordinatorError::Status {
        method,
        path: path.to_owned(),
        status: status.as_u16(),
        code,
        message,
    })
}

/// Percent-encodes one path segment (a lease id or slug).
pub(super) fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// How a lease ended, as learned from the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Released (`409 lease_ended`, or a bridge closed `1008 lease ended`).
    Ended,
    /// Expired (`409 lease_expired`, or `1008 lease expired`).
    Expired,
    /// The coordinator does not know it (404).
    NotFound,
}

impl std::fmt::Display for LeaseEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeaseEnd::Ended => "lease ended",
            LeaseEnd::Expired => "lease expired",
            LeaseEnd::NotFound => "lease not found",
        })
    }
}

/// The workspace builds rustls with the ring provider only; make it the
/// process default once so every TLS client (reqwest, WebSockets) finds it.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers the first connection on `listener` with `reply`, then closes it.
    async fn answer_once(listener: tokio::net::TcpListener, reply: &'static [u8]) {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let _ = sock.write_all(reply).await;
    }

    /// One `GET /v1/leases/…` against a server whose whole answer is `reply`.
    async fn lease_with_reply(reply: &'static [u8]) -> CoordinatorError {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let c = client(url.parse().unwrap());
        let (res, ()) = tokio::join!(c.lease("cbx_000000000001"), answer_once(listener, reply));
        res.unwrap_err()
    }

    fn client(url: url::Url) -> Client {
        Client::new(&CoordinatorConfig {
            url,
            token: None,
            owner: None,
            org: None,
            heartbeat_transport: Default::default(),
            control_ping_interval: Duration::from_secs(15),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_body_cut_off_is_a_network_failure_and_wrong_json_is_not() {
        let err = lease_with_reply(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"lease\":",
        )
        .await;
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        let err = lease_with_reply(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]",
        )
        .await;
        assert!(matches!(err, CoordinatorError::Decode { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Other, "{err}");
    }
}
