//! The coordinator client: the only module that knows the coordinator's HTTP
//! routes and JSON shapes. It classifies every failure once, as fatal or
//! retryable, for the supervisor.

use std::time::Duration;

use serde::Deserialize;

use crate::config::CoordinatorConfig;

/// A client of one coordinator.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: url::Url,
}

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

impl CoordinatorError {
    /// Whether retrying may help: network failures, 408, 429 and 5xx.
    /// Everything else (403 forbidden, 404 gone, 409 conflicts, 410) is fatal.
    pub fn is_retryable(&self) -> bool {
        match self {
            CoordinatorError::Network { .. } => true,
            CoordinatorError::Status { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
            CoordinatorError::Decode { .. } => false,
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
        })
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
            .map_err(|source| CoordinatorError::Decode {
                method: "GET",
                path: PATH.into(),
                source,
            })
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

/// The workspace builds rustls with the ring provider only; make it the
/// process default once so every TLS client (reqwest, WebSockets) finds it.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
